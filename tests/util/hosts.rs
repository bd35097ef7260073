//! Test hosts of the project's own: network namespaces joined to this machine by
//! veth pairs, each with an address of its own, names resolved as a swarm resolves
//! them (`amqp`, `cache`) through `/etc/netns/<name>/hosts`, and forwarders on the
//! host side that carry `amqp:5672` to the machine's RabbitMQ (which listens on
//! loopback only, and lets `guest` in from there) and `cache:8080` to a cache.
//!
//! A link taken down (`ip link set … down` in the namespace) drops packets both ways
//! without a word, as a real network does. Everything is torn down on drop, also when
//! a test fails.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Whether this machine lets tests make namespaces: root and `ip`. `false` (skip)
/// when not, unless `CI=true`, where that fails.
pub fn available() -> bool {
    let ok = unsafe { libc::geteuid() } == 0
        && Command::new("ip")
            .args(["netns", "list"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("these tests need root and iproute2 (ip netns) with CI=true");
        }
        eprintln!("skipping: needs root and ip netns");
    }
    ok
}

#[track_caller]
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One test host: a namespace with one link to this machine.
pub struct Host {
    pub name: String,
    /// The host's own address.
    pub addr: String,
    /// This machine's address on the link, where `amqp` and `cache` point.
    pub gateway: String,
    link: String,
    forwarders: Vec<Forwarder>,
}

impl Host {
    /// A new host; `amqp` and `cache` resolve to this machine's end of its link.
    pub fn new() -> Host {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id() % 10000);
        let name = format!("jolt-{id}");
        let (outside, inside) = (format!("jo{id}"), format!("ji{id}"));
        let net = format!("10.{}.{}", 100 + std::process::id() % 150, (n * 4) % 256);
        let (gateway, addr) = (format!("{net}.1"), format!("{net}.2"));
        let host = Host {
            name: name.clone(),
            addr: addr.clone(),
            gateway: gateway.clone(),
            link: inside.clone(),
            forwarders: Vec::new(),
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside,
        ]);
        ip(&["link", "set", &inside, "netns", &name]);
        ip(&["addr", "add", &format!("{gateway}/30"), "dev", &outside]);
        ip(&["link", "set", &outside, "up"]);
        host.exec(&["ip", "addr", "add", &format!("{addr}/30"), "dev", &inside]);
        host.exec(&["ip", "link", "set", &inside, "up"]);
        host.exec(&["ip", "link", "set", "lo", "up"]);
        let etc = host.etc();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("hosts"),
            format!("127.0.0.1 localhost\n{gateway} amqp cache\n"),
        )
        .unwrap();
        host
    }

    fn etc(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.name)
    }

    #[track_caller]
    fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// A command that runs on this host.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Carries `amqp:5672` seen from this host to the machine's RabbitMQ.
    pub fn forward_broker(&mut self) {
        self.forward(5672, "127.0.0.1:5672");
    }

    /// Carries `cache:8080` seen from this host to `target` (`addr:port`).
    pub fn forward_cache(&mut self, target: &str) {
        self.forward(8080, target);
    }

    fn forward(&mut self, port: u16, target: &str) {
        let f = Forwarder::start(&format!("{}:{port}", self.gateway), target);
        self.forwarders.push(f);
    }

    /// Takes the link down: packets vanish both ways, nobody is told.
    pub fn link_down(&self) {
        self.exec(&["ip", "link", "set", &self.link, "down"]);
    }

    pub fn link_up(&self) {
        self.exec(&["ip", "link", "set", &self.link, "up"]);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for f in &self.forwarders {
            f.stop();
        }
        // Deleting the namespace deletes its end of the link, and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(self.etc());
    }
}

/// A TCP forwarder: connections to `listen` are carried to `target`.
struct Forwarder {
    stop: Arc<AtomicBool>,
    listen: String,
}

impl Forwarder {
    fn start(listen: &str, target: &str) -> Forwarder {
        let listener = TcpListener::bind(listen).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, target) = (stop.clone(), target.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(&target)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Forwarder {
            stop,
            listen: listen.to_string(),
        }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(&self.listen);
    }
}
