//! A fresh workspace per test, and a small fluent helper to run the real `jolt` binary
//! in it and assert on its exit code and output.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub mod hosts;
pub mod rabbit_cluster;

pub struct Workspace {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Workspace {
    /// An empty workspace with its own cache and config directories.
    pub fn new() -> Workspace {
        let dir = tempfile::tempdir().expect("temp dir");
        for sub in ["ws", "cache", "config", "xdgcache"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Workspace { dir }
    }

    /// A workspace whose `jolt.toml` holds `recipe`.
    pub fn with(recipe: &str) -> Workspace {
        let ws = Workspace::new();
        ws.file("jolt.toml", recipe);
        ws
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    pub fn cachedir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Where jolt writes its run logs.
    pub fn state_home(&self) -> PathBuf {
        self.dir.path().join("xdgstate")
    }

    pub fn config_home(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// Writes a file relative to the workspace root.
    pub fn file(&self, rel: &str, content: &str) -> &Workspace {
        let path = self.root().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
        self
    }

    /// The identity `jolt inspect` computes for `task` (nothing is built).
    #[track_caller]
    pub fn identity(&self, task: &str) -> String {
        let run = self.jolt(&["inspect", task]);
        let line = run.lines_with("Identity").first().cloned();
        line.and_then(|l| l.split_whitespace().last().map(str::to_string))
            .unwrap_or_else(|| panic!("inspect {task} shows no identity:\n{}", run.all()))
    }

    /// Makes a file look a minute old, as sources are.
    pub fn age(&self, rel: &str) -> &Workspace {
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(self.root().join(rel))
            .and_then(|f| f.set_modified(old))
            .unwrap();
        self
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root().join(rel)).unwrap_or_default()
    }

    /// A `jolt` command in the workspace root with an isolated environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jolt"));
        cmd.args(args);
        self.isolate(&mut cmd);
        cmd
    }

    /// Starts `cmd` (jolt, perhaps on a test host) in the workspace, its output
    /// captured (see [`finish`]).
    pub fn spawn_command(&self, mut cmd: Command) -> std::process::Child {
        self.isolate(&mut cmd);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start jolt")
    }

    /// Runs `cmd` in the workspace root with its own cache and config.
    fn isolate(&self, cmd: &mut Command) {
        cmd.current_dir(self.root());
        for (k, _) in std::env::vars() {
            if k.starts_with("JOLT_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("XDG_CONFIG_HOME", self.config_home())
            .env("XDG_CACHE_HOME", self.dir.path().join("xdgcache"))
            .env("XDG_STATE_HOME", self.state_home())
            .env("JOLT_JOLT_CACHEDIR", self.cachedir())
            .stdin(Stdio::null());
    }

    /// Starts `jolt ARGS` in the background, its output captured (see [`finish`]).
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start jolt")
    }

    /// Runs `jolt ARGS` to completion.
    #[track_caller]
    pub fn jolt(&self, args: &[&str]) -> Run {
        self.run(self.command(args))
    }

    #[track_caller]
    pub fn run(&self, mut cmd: Command) -> Run {
        let out = cmd.output().expect("run jolt");
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(
            !run.all().contains("panicked"),
            "jolt panicked:\n{}",
            run.all()
        );
        run
    }

    /// Committed artifact directories of `task` in the cache.
    pub fn artifacts(&self, task: &str) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(self.cachedir().join(task))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        out.retain(|p| p.is_dir());
        out.sort();
        out
    }

    /// Every entry under the cache's task directories whose name starts with a dot
    /// (staging directories), which must never survive a build.
    pub fn staging_leftovers(&self) -> Vec<PathBuf> {
        fn visit(dir: &Path, top: bool, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if top && name.starts_with('.') {
                    continue;
                }
                if name.starts_with('.') && name.ends_with(".tmp") {
                    out.push(e.path());
                } else if e.path().is_dir() && !e.path().join(".manifest.json").exists() {
                    visit(&e.path(), false, out);
                }
            }
        }
        let mut out = Vec::new();
        visit(&self.cachedir(), true, &mut out);
        out
    }
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    #[track_caller]
    pub fn code(&self, expected: i32) -> &Run {
        assert_eq!(
            self.code, expected,
            "exit code {} instead of {expected}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn success(&self) -> &Run {
        self.code(0)
    }

    #[track_caller]
    pub fn contains(&self, text: &str) -> &Run {
        assert!(
            self.all().contains(text),
            "output lacks {text:?}\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn lacks(&self, text: &str) -> &Run {
        assert!(
            !self.all().contains(text),
            "output has {text:?}\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn count(&self, text: &str) -> usize {
        self.all().matches(text).count()
    }

    /// Lines of output holding `text`.
    pub fn lines_with(&self, text: &str) -> Vec<String> {
        self.all()
            .lines()
            .filter(|l| l.contains(text))
            .map(str::to_string)
            .collect()
    }

    /// The directory of the `Location:` lines.
    pub fn locations(&self) -> Vec<PathBuf> {
        self.stdout
            .lines()
            .filter_map(|l| l.split_once("Location: ").map(|(_, p)| PathBuf::from(p)))
            .collect()
    }

    /// The file a failed task's whole output was kept in (the path of the
    /// `Task output kept in PATH` line).
    #[track_caller]
    pub fn kept_output(&self) -> String {
        self.all()
            .lines()
            .find_map(|l| l.split("Task output kept in ").nth(1))
            .expect("the kept output's path")
            .trim()
            .to_string()
    }

    /// The identity of the first goal's artifact (the name of its `Location:`).
    #[track_caller]
    pub fn identity(&self) -> String {
        identity_of(&self.locations()[0])
    }

    /// The names of the tasks whose execution started, in order.
    pub fn started(&self) -> Vec<String> {
        self.stdout
            .lines()
            .filter_map(|l| l.split_once("Execution started ("))
            .map(|(_, rest)| {
                rest.rsplit_once(' ')
                    .map(|(n, _)| n.to_string())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// The identity in the name of an artifact directory.
#[track_caller]
pub fn identity_of(dir: &Path) -> String {
    dir.file_name()
        .expect("an artifact directory")
        .to_string_lossy()
        .into_owned()
}

/// Whether a process is alive (a zombie nobody reaped counts as dead).
pub fn alive(pid: i32) -> bool {
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
    !matches!(state, Some(Some('Z')) | None)
}

/// An nginx serving a private HTTP artifact cache on a loopback port, started with the
/// repository's `scripts/nginx`; stopped when dropped.
pub struct Nginx {
    pub url: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    auth: Option<String>,
    child: Option<std::process::Child>,
    /// With https: the CA that signed the server's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// The test host it runs on (its namespace and address), if not this machine.
    on: Option<(String, String)>,
}

/// Makes a CA and a server certificate for `host` (and 127.0.0.1) in `dir` with
/// openssl: `ca.pem`, `server.crt`, `server.key`. Returns the CA's path.
pub fn make_certificates(dir: &Path, host: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (apt-get install -y openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req", "-x509", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
    ];
    ca.extend(ec);
    ca.extend(["-subj", "/CN=jolt test CA"]);
    openssl(&ca);
    let mut csr = vec!["req", "-keyout", "server.key", "-out", "server.csr"];
    csr.extend(ec);
    let subject = format!("/CN={host}");
    csr.extend(["-subj", subject.as_str()]);
    openssl(&csr);
    std::fs::write(
        dir.join("san.ext"),
        format!("subjectAltName=DNS:{host},IP:127.0.0.1\n"),
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    dir.join("ca.pem")
}

fn nginx_installed() -> bool {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .any(|p| Path::new(p).exists())
        || Command::new("sh")
            .args(["-c", "command -v nginx"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
}

impl Nginx {
    /// Starts a server, or returns `None` (the test skips) when nginx is not installed;
    /// with `CI=true` a missing nginx fails the test instead.
    pub fn start() -> Option<Nginx> {
        Self::start_with(None)
    }

    /// A server on which PUT needs Basic auth as `user:password`.
    pub fn start_with_auth(user_password: &str) -> Option<Nginx> {
        Self::start_with(Some(user_password.to_string()))
    }

    /// A server speaking https at `https://localhost:PORT`, with a certificate for
    /// `cert_host` signed by a CA of its own (see [`Nginx::ca`]).
    pub fn start_tls(cert_host: &str) -> Option<Nginx> {
        Self::start_inner(None, Some(cert_host))
    }

    fn start_with(auth: Option<String>) -> Option<Nginx> {
        Self::start_inner(auth, None)
    }

    /// A server on a test host, at `http://ADDRESS:PORT` of the host.
    pub fn start_on(host: &hosts::Host) -> Option<Nginx> {
        let mut server = Nginx {
            url: String::new(),
            port: 8080,
            dir: tempfile::tempdir().unwrap(),
            auth: None,
            child: None,
            ca: None,
            on: Some((host.name.clone(), host.addr.clone())),
        };
        server.spawn().then_some(server)
    }

    fn start_inner(auth: Option<String>, cert_host: Option<&str>) -> Option<Nginx> {
        if !nginx_installed() {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("nginx is required with CI=true: apt-get install -y nginx-light");
            }
            eprintln!("skipping: nginx is not installed (apt-get install -y nginx-light)");
            return None;
        }
        let mut server = Nginx {
            url: String::new(),
            port: 0,
            dir: tempfile::tempdir().unwrap(),
            auth,
            child: None,
            ca: None,
            on: None,
        };
        if let Some(host) = cert_host {
            server.ca = Some(make_certificates(&server.dir.path().join("tls"), host));
        }
        for _ in 0..20 {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            server.port = listener.local_addr().unwrap().port();
            drop(listener);
            if server.spawn() {
                return Some(server);
            }
        }
        panic!(
            "nginx did not start: {}",
            server.dir.path().join("error.log").display()
        );
    }

    fn spawn(&mut self) -> bool {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nginx");
        let mut cmd = match &self.on {
            Some((netns, _)) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns])
                    .arg(&script)
                    .env("NGINX_ADDRESS", "0.0.0.0");
                cmd
            }
            None => Command::new(script),
        };
        cmd.arg("run")
            .arg(self.dir.path())
            .arg(self.port.to_string());
        if let Some(a) = &self.auth {
            cmd.arg(a);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            let address = self.on.as_ref().map_or("127.0.0.1", |(_, a)| a.as_str());
            if std::net::TcpStream::connect((address, self.port)).is_ok() {
                self.child = Some(child);
                self.url = match self.ca {
                    Some(_) => format!("https://localhost:{}", self.port),
                    None => format!("http://{address}:{}", self.port),
                };
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Stops the server; its files stay.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Where the server keeps `path` (relative to the cache URL).
    pub fn file(&self, path: &str) -> PathBuf {
        self.dir.path().join("root").join(path)
    }

    /// Every `.tar` the server holds, relative to its root.
    pub fn objects(&self) -> Vec<String> {
        fn visit(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    visit(base, &e.path(), out);
                } else {
                    out.push(
                        e.path()
                            .strip_prefix(base)
                            .unwrap()
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
            }
        }
        let mut out = Vec::new();
        let root = self.dir.path().join("root");
        visit(&root, &root, &mut out);
        out.sort();
        out
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Workspace {
    /// A second workspace with the same files but its own (empty) cache.
    pub fn sibling(&self) -> Workspace {
        let other = Workspace::new();
        let status = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", self.root().display()))
            .arg(other.root())
            .status()
            .unwrap();
        assert!(status.success());
        other
    }
}

/// Tests share the machine's broker (`Shared`), except those that restart it or
/// change its settings (`Exclusive`), which run alone.
static BROKER_USE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// How a test holds the broker, for as long as it lives.
#[allow(dead_code)] // held for its Drop only
enum BrokerUse {
    Shared(std::sync::RwLockReadGuard<'static, ()>),
    Exclusive(std::sync::RwLockWriteGuard<'static, ()>),
}

/// The RabbitMQ of the machine (127.0.0.1:5672, guest/guest), with a routing key of
/// this test's own so tests never take each other's requests. Its request queue is
/// deleted when dropped.
pub struct Broker {
    pub routing_key: String,
    _use: BrokerUse,
}

impl Broker {
    /// `None` (skip) when no broker answers, unless `CI=true`, where that fails.
    pub fn start() -> Option<Broker> {
        let shared = BROKER_USE.read().unwrap_or_else(|e| e.into_inner());
        Self::start_as(BrokerUse::Shared(shared))
    }

    /// [`Broker::start`] for a test that restarts the broker or changes its
    /// settings: it waits until no other test uses the broker, and holds it alone.
    pub fn start_exclusive() -> Option<Broker> {
        let exclusive = BROKER_USE.write().unwrap_or_else(|e| e.into_inner());
        Self::start_as(BrokerUse::Exclusive(exclusive))
    }

    fn start_as(hold: BrokerUse) -> Option<Broker> {
        match amiquip::Connection::insecure_open("amqp://guest:guest@127.0.0.1:5672/%2F") {
            Ok(c) => {
                let _ = c.close();
            }
            Err(e) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("RabbitMQ is required with CI=true: {e}");
                }
                eprintln!("skipping: RabbitMQ is not running on 127.0.0.1:5672 ({e})");
                return None;
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Broker {
            routing_key: format!("test-{}-{n}-{nanos}", std::process::id()),
            _use: hold,
        })
    }

    /// Runs `f` on a fresh channel.
    pub fn with_channel<T>(&self, f: impl FnOnce(&amiquip::Channel) -> T) -> T {
        let mut c =
            amiquip::Connection::insecure_open("amqp://guest:guest@127.0.0.1:5672/%2F").unwrap();
        let ch = c.open_channel(None).unwrap();
        let out = f(&ch);
        let _ = c.close();
        out
    }

    /// Messages waiting in this test's request queue (`None` before it exists).
    pub fn queued(&self) -> Option<u32> {
        self.with_channel(|ch| {
            ch.queue_declare_passive(format!("jolt_tasks_{}", self.routing_key))
                .ok()
                .and_then(|q| q.declared_message_count())
        })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let key = self.routing_key.clone();
        let _ = std::panic::catch_unwind(|| {
            self.with_channel(|ch| {
                let _ = ch.queue_delete(format!("jolt_tasks_{key}"), Default::default());
            })
        });
    }
}

/// Whether this test runs as root, as tests that act as other users need (`why`):
/// `false` (skip) when not, unless `CI=true`, where that fails.
pub fn running_as_root(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs root ({why}) with CI=true");
    }
    eprintln!("skipping: needs root ({why})");
    false
}

/// A `jolt amqp-worker` process with its own cache; killed when dropped.
pub struct WorkerProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
    /// Its cache and config, removed with it.
    _home: tempfile::TempDir,
}

impl WorkerProcess {
    /// Starts a worker with `config` (a file) and extra `-c` overrides.
    pub fn start(config: &Path, overrides: &[String]) -> WorkerProcess {
        Self::start_with_env(config, overrides, &[])
    }

    /// [`WorkerProcess::start`] with extra environment variables.
    pub fn start_with_env(
        config: &Path,
        overrides: &[String],
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_jolt")),
            config,
            overrides,
            env,
        )
    }

    /// A worker on a test host of its own (see [`hosts`]).
    pub fn start_on(host: &hosts::Host, config: &Path, overrides: &[String]) -> WorkerProcess {
        Self::spawn(
            host.command(env!("CARGO_BIN_EXE_jolt")),
            config,
            overrides,
            &[],
        )
    }

    /// A worker running as user and group `uid`, as the worker image runs it
    /// (`None`, skipping, when this test does not run as root, outside CI).
    pub fn start_unprivileged(config: &Path, uid: u32) -> Option<WorkerProcess> {
        Self::start_unprivileged_with(config, uid, &[], &[])
    }

    /// [`WorkerProcess::start_unprivileged`] with extra `-c` overrides and
    /// environment variables.
    pub fn start_unprivileged_with(
        config: &Path,
        uid: u32,
        overrides: &[String],
        env: &[(&str, &str)],
    ) -> Option<WorkerProcess> {
        use std::os::unix::fs::chown;
        use std::os::unix::process::CommandExt;
        if !running_as_root("to start a worker as another user") {
            return None;
        }
        // The user must read its config and own its home: both live in a directory
        // of its own, since the test's temporary directories are root's alone.
        let home = tempfile::tempdir().unwrap();
        chown(home.path(), Some(uid), Some(uid)).unwrap();
        let own_config = home.path().join("worker.conf");
        std::fs::copy(config, &own_config).unwrap();
        chown(&own_config, Some(uid), Some(uid)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jolt"));
        cmd.uid(uid).gid(uid).env("HOME", home.path());
        let worker = Self::spawn_in(home, cmd, &own_config, overrides, env);
        worker.wait_for("waiting for requests", std::time::Duration::from_secs(20));
        Some(worker)
    }

    fn spawn(
        cmd: Command,
        config: &Path,
        overrides: &[String],
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let worker = Self::spawn_in(tempfile::tempdir().unwrap(), cmd, config, overrides, env);
        worker.wait_for("waiting for requests", std::time::Duration::from_secs(20));
        worker
    }

    /// Starts the worker in `cache`, its home, without waiting for it.
    fn spawn_in(
        cache: tempfile::TempDir,
        mut cmd: Command,
        config: &Path,
        overrides: &[String],
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let log = cache.path().join("worker.log");
        cmd.arg("-c").arg(config);
        for o in overrides {
            cmd.arg("-c").arg(o);
        }
        cmd.arg("amqp-worker");
        for (k, _) in std::env::vars() {
            if k.starts_with("JOLT_") {
                cmd.env_remove(k);
            }
        }
        let out = std::fs::File::create(&log).unwrap();
        cmd.envs(env.iter().copied());
        let child = cmd
            .env("JOLT_JOLT_CACHEDIR", cache.path().join("cache"))
            .env("XDG_CONFIG_HOME", cache.path().join("config"))
            .current_dir(cache.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        WorkerProcess {
            child,
            log,
            _home: cache,
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The worker's local cache.
    pub fn cache_dir(&self) -> PathBuf {
        self._home.path().join("cache")
    }

    /// Waits until the worker's output holds `text`.
    #[track_caller]
    pub fn wait_for(&self, text: &str, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.output().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "worker never printed {text:?}:\n{}",
                self.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub server: Nginx,
    pub broker: Broker,
    pub dir: tempfile::TempDir,
}

/// RabbitMQ and nginx for a network build test, with a config file naming both.
pub fn cluster() -> Option<Cluster> {
    cluster_with(Broker::start()?)
}

/// [`cluster`] with the broker held alone (see [`Broker::start_exclusive`]).
pub fn cluster_exclusive() -> Option<Cluster> {
    cluster_with(Broker::start_exclusive()?)
}

/// [`cluster`] with a cache on which PUT needs Basic auth as `user:password`.
pub fn cluster_with_cache_auth(user_password: &str) -> Option<Cluster> {
    cluster_on(Broker::start()?, Nginx::start_with_auth(user_password)?)
}

fn cluster_with(broker: Broker) -> Option<Cluster> {
    cluster_on(broker, Nginx::start()?)
}

fn cluster_on(broker: Broker, server: Nginx) -> Option<Cluster> {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster {
        server,
        broker,
        dir,
    };
    std::fs::write(
        c.config(),
        format!(
            "[http]\nuri = \"{}/cache\"\n[amqp]\nhost = \"127.0.0.1\"\nrouting_key = \"{}\"\nprogress = 1\n",
            c.server.url, c.broker.routing_key
        ),
    )
    .unwrap();
    Some(c)
}

impl Cluster {
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("network.toml")
    }

    pub fn worker(&self) -> WorkerProcess {
        WorkerProcess::start(&self.config(), &[])
    }

    /// Runs a worker with extra `-c` overrides until it exits by itself (one that
    /// cannot serve), and collects its output.
    pub fn worker_to_its_end(&self, overrides: &[&str]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jolt"));
        cmd.arg("-c").arg(self.config());
        for o in overrides {
            cmd.args(["-c", o]);
        }
        let out = cmd
            .arg("amqp-worker")
            .env("JOLT_JOLT_CACHEDIR", self.dir.path().join("wcache"))
            .output()
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// What a worker of this cluster locks for `identity`: the identity within the
    /// cluster's fleet (`Request::lock_key`), 64 hex digits.
    pub fn lock_key(&self, identity: &str) -> String {
        let fleet = jolt::testing::fleet_of(&format!("{}/cache", self.server.url));
        jolt::testing::lock_key(&fleet, identity)
    }

    /// The lock queue a worker of this cluster declares for `identity` when its
    /// shard is taken.
    pub fn lock_queue(&self, identity: &str) -> String {
        format!("jolt_lock_{}", self.lock_key(identity))
    }

    pub fn build(&self, ws: &Workspace, args: &[&str]) -> Run {
        let config = self.config().display().to_string();
        let mut all = vec!["-c", config.as_str(), "build", "--network"];
        all.extend_from_slice(args);
        ws.jolt(&all)
    }

    pub fn spawn_build(&self, ws: &Workspace, args: &[&str]) -> std::process::Child {
        self.spawn_build_with(ws, &[], args)
    }

    pub fn spawn_build_with(
        &self,
        ws: &Workspace,
        overrides: &[&str],
        args: &[&str],
    ) -> std::process::Child {
        spawn_network_build(ws, &self.config(), overrides, args)
    }
}

/// Waits for a spawned jolt and collects its output.
/// Waits for a spawned jolt at most `limit`; a build still running then is a hang.
pub fn finish_within(
    mut child: std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> Run {
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let run = finish(child);
            panic!("{what} hung:\n{}", run.all());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    finish(child)
}

pub fn finish(child: std::process::Child) -> Run {
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Starts `jolt -c CONFIG [-c OVERRIDE]... build --network ARGS` in `ws`.
pub fn spawn_network_build<S: AsRef<str>>(
    ws: &Workspace,
    config: &Path,
    overrides: &[S],
    args: &[&str],
) -> std::process::Child {
    let config = config.display().to_string();
    let mut all = vec!["-c", config.as_str()];
    for o in overrides {
        all.extend_from_slice(&["-c", o.as_ref()]);
    }
    all.extend_from_slice(&["build", "--network"]);
    all.extend_from_slice(args);
    ws.spawn(&all)
}

/// How many lines the file at `path` holds; 0 while it does not exist.
pub fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .count()
}

/// A binary tree of parameter values, `depth` levels of definitions (`l0` to
/// `l{depth}`): the graph of `l0` holds 2^(depth+1) - 1 tasks from `depth + 1`
/// definitions.
pub fn parameter_tree(depth: usize) -> String {
    let mut tree = String::new();
    for k in 0..depth {
        tree += &format!(
            "[task.l{k}]\nparameters.p = \"\"\nrequires = [\"l{}:p={{p}}0\", \"l{}:p={{p}}1\"]\n",
            k + 1,
            k + 1
        );
    }
    tree += &format!("[task.l{depth}]\nparameters.p = \"\"\n");
    tree
}

#[track_caller]
/// The recipe table of the alias task `name` that requires `requires`.
pub fn alias<T: std::fmt::Display>(name: &str, requires: impl IntoIterator<Item = T>) -> String {
    let requires: Vec<String> = requires.into_iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        "[task.{name}]\nkind = \"alias\"\nrequires = [{}]\n",
        requires.join(", ")
    )
}

pub fn wait_until(what: &str, timeout: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// How a [`FakeCache`] answers.
#[derive(Clone, Copy)]
pub enum Fault {
    /// Accepts connections and never answers.
    Hang,
    /// Answers every request with this status.
    Status(u16),
    /// Answers every request 200 with a 100 MB body sent a kilobyte at a time.
    Slow,
    /// Answers `HEAD` 200, and `GET` 200 with a kilobyte of a 100 MB body, then
    /// nothing more (a server frozen mid-transfer).
    Stall,
    /// Answers every request 404 after this many milliseconds (a far cache that
    /// holds nothing).
    Missing(u64),
}

/// An HTTP "cache" on a loopback port that misbehaves as told; `requests` counts the
/// requests it received, `most_at_once` the most it was answering at one time.
pub struct FakeCache {
    pub url: String,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub most_at_once: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeCache {
    pub fn start(fault: Fault) -> FakeCache {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/cache", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most_at_once = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let at_once = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (count, most) = (requests.clone(), most_at_once.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (count, most, at_once) = (count.clone(), most.clone(), at_once.clone());
                std::thread::spawn(move || {
                    use std::sync::atomic::Ordering::SeqCst;
                    let mut stream = stream;
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf);
                    count.fetch_add(1, SeqCst);
                    most.fetch_max(at_once.fetch_add(1, SeqCst) + 1, SeqCst);
                    match fault {
                        Fault::Missing(ms) => {
                            std::thread::sleep(std::time::Duration::from_millis(ms));
                            let _ = write!(
                                stream,
                                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            );
                        }
                        Fault::Hang => std::thread::sleep(std::time::Duration::from_secs(3600)),
                        Fault::Status(code) => {
                            let _ = write!(
                                stream,
                                "HTTP/1.1 {code} Fault\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            );
                        }
                        Fault::Stall => {
                            let head = String::from_utf8_lossy(&buf).starts_with("HEAD");
                            let _ = write!(
                                stream,
                                "HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n"
                            );
                            if !head {
                                let _ = stream.write_all(&[0u8; 1024]);
                                std::thread::sleep(std::time::Duration::from_secs(3600));
                            }
                        }
                        Fault::Slow => {
                            let _ = write!(
                                stream,
                                "HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n"
                            );
                            let chunk = [0u8; 1024];
                            while stream.write_all(&chunk).is_ok() {
                                std::thread::sleep(std::time::Duration::from_millis(50));
                            }
                        }
                    }
                    at_once.fetch_sub(1, SeqCst);
                });
            }
        });
        FakeCache {
            url,
            requests,
            most_at_once,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A TLS front (stunnel) before the machine's RabbitMQ on a loopback port, with a
/// certificate for `cert_host` signed by a CA of its own; stopped when dropped.
pub struct TlsBroker {
    pub port: u16,
    pub ca: PathBuf,
    _dir: tempfile::TempDir,
    child: std::process::Child,
}

impl TlsBroker {
    /// `None` (skip) without stunnel, unless `CI=true`, where that fails.
    pub fn start(cert_host: &str) -> Option<TlsBroker> {
        let stunnel = ["stunnel4", "stunnel"].into_iter().find(|s| {
            Command::new("sh")
                .args(["-c", &format!("command -v {s}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        let Some(stunnel) = stunnel else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("stunnel4 is required with CI=true: apt-get install -y stunnel4");
            }
            eprintln!("skipping: stunnel4 is not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let ca = make_certificates(dir.path(), cert_host);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let conf = dir.path().join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[amqps]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:5672\ncert = {0}/server.crt\nkey = {0}/server.key\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new(stunnel)
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let front = TlsBroker {
            port,
            ca,
            _dir: dir,
            child,
        };
        wait_until("stunnel", std::time::Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(front)
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay on a loopback port to `target`, which can be switched off (new
/// connections are then closed at once) and on again, or fail (switched off, and
/// the connections it relays cut).
pub struct Relay {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    relayed: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    pub fn start(target: &str) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let relayed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (on, target, kept) = (up.clone(), target.to_string(), relayed.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !on.load(std::sync::atomic::Ordering::Relaxed) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                kept.lock().unwrap().push(client.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { port, up, relayed }
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::Relaxed);
    }

    /// Switches the relay off and cuts every connection it relays, as a broker
    /// node that dies.
    pub fn fail(&self) {
        self.set_up(false);
        for stream in self.relayed.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Bytes of the files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}
