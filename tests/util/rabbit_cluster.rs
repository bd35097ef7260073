//! A RabbitMQ cluster of three nodes that the test binary starts itself, natively
//! (as it starts nginx): `rabbitmq-server -detached` per node, each with its own node
//! name (`jolt<pid>n1@localhost`...), AMQP and distribution ports, data, logs and
//! config, one Erlang cookie in a home of their own, no plugins; nodes 2 and 3 join
//! node 1 (`stop_app`, `join_cluster`, `start_app`). The machine's own broker
//! (`rabbit@localhost`) is never touched.
//!
//! Starting takes about 15 s on two cores (measured: nodes up in ~5 s, each join
//! ~3.5 s), so the cluster is started once per test binary, on first use, and shared:
//! each test uses routing keys of its own. A test that kills a node holds the
//! cluster alone ([`RabbitCluster::exclusive`]) and starts the node again before it
//! lets go. The nodes are killed and their directory removed when the test binary
//! exits (`atexit`, as statics are never dropped); nodes a crashed run left behind
//! (their owner process is gone) are killed by the next run, found by the
//! environment they were started with.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// The environment variable that marks a node with the test process that owns it.
const OWNER: &str = "JOLT_TEST_RABBIT_OWNER";

/// How long the nodes may take to start and join.
const START_LIMIT: Duration = Duration::from_secs(90);

pub struct Node {
    /// `jolt<pid>nN@localhost`.
    pub name: String,
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    dist_port: u16,
}

pub struct RabbitCluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

/// How a test holds the cluster: shared, or alone (one that kills nodes).
#[allow(dead_code)] // held for its Drop only
pub enum Hold {
    Shared(RwLockReadGuard<'static, ()>),
    Exclusive(RwLockWriteGuard<'static, ()>),
}

static CLUSTER: OnceLock<Result<RabbitCluster, String>> = OnceLock::new();
static USE: RwLock<()> = RwLock::new(());

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A RabbitMQ program: Debian's `/usr/sbin` wrappers switch to the `rabbitmq` user
/// (and its cookie) when run as root, so the scripts behind them are preferred.
fn program(name: &str) -> Option<PathBuf> {
    let direct = Path::new("/usr/lib/rabbitmq/bin").join(name);
    if direct.exists() {
        return Some(direct);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.exists())
    })
}

impl RabbitCluster {
    /// The shared cluster, started on first use; `None` (skip) when RabbitMQ is not
    /// installed or the cluster cannot start, unless `CI=true`, where that fails.
    pub fn shared() -> Option<(&'static RabbitCluster, Hold)> {
        let hold = Hold::Shared(USE.read().unwrap_or_else(|e| e.into_inner()));
        Self::get().map(|c| (c, hold))
    }

    /// [`RabbitCluster::shared`] for a test that stops or kills nodes: it waits until
    /// no other test uses the cluster, and must leave every node running.
    pub fn exclusive() -> Option<(&'static RabbitCluster, Hold)> {
        let hold = Hold::Exclusive(USE.write().unwrap_or_else(|e| e.into_inner()));
        Self::get().map(|c| (c, hold))
    }

    fn get() -> Option<&'static RabbitCluster> {
        match CLUSTER.get_or_init(Self::start) {
            Ok(cluster) => Some(cluster),
            Err(why) if ci() => panic!("a RabbitMQ cluster is required with CI=true: {why}"),
            Err(why) => {
                eprintln!("skipping: no RabbitMQ cluster ({why})");
                None
            }
        }
    }

    fn start() -> Result<RabbitCluster, String> {
        if program("rabbitmq-server").is_none() || program("rabbitmqctl").is_none() {
            return Err("RabbitMQ is not installed (apt-get install -y rabbitmq-server)".into());
        }
        kill_leftovers();
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("jolt-rabbit-{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("home")).map_err(|e| e.to_string())?;
        let cookie = dir.join("home/.erlang.cookie");
        std::fs::write(&cookie, format!("JOLTTESTCOOKIE{pid}")).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "").map_err(|e| e.to_string())?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n").map_err(|e| e.to_string())?;
        let mut ports = free_ports(6).into_iter();
        let nodes = (1..=3)
            .map(|n| Node {
                name: format!("jolt{pid}n{n}@localhost"),
                port: ports.next().unwrap(),
                dist_port: ports.next().unwrap(),
            })
            .collect();
        let cluster = RabbitCluster { nodes, dir };
        // SAFETY: registers a plain function, run once as the process exits.
        unsafe { libc::atexit(stop_at_exit) };
        let begun = Instant::now();
        for node in &cluster.nodes {
            cluster.spawn(node)?;
        }
        for node in &cluster.nodes {
            cluster.await_node(node, begun + START_LIMIT)?;
        }
        let first = &cluster.nodes[0].name;
        for node in &cluster.nodes[1..] {
            cluster.ctl(node, &["stop_app"])?;
            cluster.ctl(node, &["join_cluster", first])?;
            cluster.ctl(node, &["start_app"])?;
        }
        eprintln!(
            "started a RabbitMQ cluster of {} nodes in {:.1} s",
            cluster.nodes.len(),
            begun.elapsed().as_secs_f64()
        );
        Ok(cluster)
    }

    /// `amqp.host` for every node, `127.0.0.1:P1,127.0.0.1:P2,...`.
    pub fn hosts(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        hosts.join(",")
    }

    fn node_dir(&self, node: &Node) -> PathBuf {
        self.dir.join(node.name.split('@').next().unwrap())
    }

    /// The environment every node and every `rabbitmqctl` of the cluster runs with.
    fn env(&self, cmd: &mut Command) {
        cmd.env("HOME", self.dir.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null());
    }

    /// Starts `node` (detached), with the data it has from an earlier start.
    fn spawn(&self, node: &Node) -> Result<(), String> {
        let dir = self.node_dir(node);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let config = dir.join("rabbitmq.conf");
        std::fs::write(
            &config,
            "loopback_users = none\ncluster_partition_handling = pause_minority\n",
        )
        .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(program("rabbitmq-server").unwrap());
        self.env(&mut cmd);
        let status = cmd
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", &config)
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env(OWNER, std::process::id().to_string())
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run rabbitmq-server: {e}"))?;
        if !status.success() {
            return Err(format!(
                "rabbitmq-server -detached for {} failed",
                node.name
            ));
        }
        Ok(())
    }

    /// Waits until `node` runs its broker (`rabbitmqctl await_startup` answers only
    /// once the node has registered with epmd, so it is tried again until then).
    fn await_node(&self, node: &Node, deadline: Instant) -> Result<(), String> {
        loop {
            match self.ctl(node, &["await_startup"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "{} did not start ({e}); see {}",
                        node.name,
                        self.node_dir(node).join("log").display()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }

    /// Runs `rabbitmqctl -n NODE args`; its output, or why it failed.
    pub fn ctl(&self, node: &Node, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(program("rabbitmqctl").unwrap());
        self.env(&mut cmd);
        let out = cmd
            .args(["-n", &node.name])
            .args(args)
            .output()
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "rabbitmqctl -n {} {} failed: {}{}",
                node.name,
                args.join(" "),
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The node on which the queue `queue` has its leader (quorum) or lives
    /// (classic), asked of `asked`.
    pub fn queue_node(&self, asked: &Node, queue: &str) -> Option<&Node> {
        // `leader` is empty for a classic queue, whose `pid` names its node.
        let args = [
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "leader",
            "pid",
        ];
        let out = self.ctl(asked, &args).ok()?;
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(queue))?;
        let named = line.split_whitespace().nth(1)?;
        self.nodes.iter().find(|n| named.contains(n.name.as_str()))
    }

    /// Kills `node` with SIGKILL and waits until it is gone.
    pub fn kill(&self, node: &Node) {
        for pid in beams(|name, _| name == node.name) {
            // SAFETY: kill has no preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !beams(|name, _| name == node.name).is_empty() {
            assert!(Instant::now() < deadline, "{} did not die", node.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `node` again (after [`RabbitCluster::kill`]) and waits until it runs.
    pub fn restart(&self, node: &Node) {
        self.spawn(node).unwrap();
        self.await_node(node, Instant::now() + START_LIMIT).unwrap();
    }

    /// Deletes `queue`, asked of the first running node (a test's clean-up).
    pub fn delete_queue(&self, queue: &str) {
        for node in &self.nodes {
            if self.ctl(node, &["delete_queue", queue]).is_ok() {
                return;
            }
        }
    }
}

/// Ports free on 127.0.0.1 now (held together while picked, so all differ).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// The Erlang VMs this harness started, as (pid) of those whose node name and
/// owner `keep` accepts; found by the environment they were started with.
fn beams(keep: impl Fn(&str, i32) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "beam.smp" {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        let value = |key: &str| {
            vars.iter()
                .find_map(|v| v.strip_prefix(format!("{key}=").as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let (Some(name), Some(owner)) = (value("RABBITMQ_NODENAME"), value(OWNER)) else {
            continue;
        };
        if keep(&name, owner.parse().unwrap_or(0)) {
            out.push(pid);
        }
    }
    out
}

/// Kills the nodes of runs whose test process is gone, and removes their data.
fn kill_leftovers() {
    for pid in beams(|_, owner| !super::alive(owner)) {
        // SAFETY: kill has no preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(owner) = name
            .strip_prefix("jolt-rabbit-")
            .and_then(|p| p.parse::<i32>().ok())
        {
            if !super::alive(owner) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

extern "C" fn stop_at_exit() {
    let me = std::process::id() as i32;
    for pid in beams(|_, owner| owner == me) {
        // SAFETY: kill has no preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if let Some(Ok(cluster)) = CLUSTER.get() {
        let _ = std::fs::remove_dir_all(&cluster.dir);
    }
}

/// The cluster and an nginx cache for a network build test, with a routing key of
/// the test's own; its request queue is deleted when dropped.
pub struct Fleet {
    pub rabbit: &'static RabbitCluster,
    pub server: super::Nginx,
    pub routing_key: String,
    pub dir: tempfile::TempDir,
    _hold: Hold,
}

impl Fleet {
    /// A fleet on the shared cluster (`None`, skipping, as [`RabbitCluster::shared`]).
    pub fn start() -> Option<Fleet> {
        Self::on(RabbitCluster::shared()?)
    }

    /// A fleet holding the cluster alone, for a test that kills nodes.
    pub fn start_exclusive() -> Option<Fleet> {
        Self::on(RabbitCluster::exclusive()?)
    }

    fn on((rabbit, hold): (&'static RabbitCluster, Hold)) -> Option<Fleet> {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fleet = Fleet {
            rabbit,
            server: super::Nginx::start()?,
            routing_key: format!("ha-{}-{n}", std::process::id()),
            dir: tempfile::tempdir().unwrap(),
            _hold: hold,
        };
        std::fs::write(
            fleet.config(),
            format!(
                "[http]\nuri = \"{}/cache\"\n[amqp]\nhost = \"{}\"\nrouting_key = \"{}\"\nprogress = 1\n",
                fleet.server.url,
                rabbit.hosts(),
                fleet.routing_key
            ),
        )
        .unwrap();
        Some(fleet)
    }

    /// The config file naming the cache and every node.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("fleet.toml")
    }

    /// A worker given every node, with extra `-c` overrides.
    pub fn worker(&self, overrides: &[String]) -> super::WorkerProcess {
        super::WorkerProcess::start(&self.config(), overrides)
    }

    /// Starts `jolt build --network` in `ws` with extra `-c` overrides.
    pub fn spawn_build(
        &self,
        ws: &super::Workspace,
        overrides: &[String],
        args: &[&str],
    ) -> std::process::Child {
        super::spawn_network_build(ws, &self.config(), overrides, args)
    }

    /// The request queue of this fleet's routing key.
    pub fn queue(&self) -> String {
        format!("jolt_tasks_{}", self.routing_key)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.rabbit.delete_queue(&self.queue());
    }
}
