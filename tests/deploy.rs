//! The deployment files of docker/ as users deploy them: the cache's nginx config
//! run natively, the configurations jolt reads. (scripts/lint-deploy checks their
//! syntax against each tool's schema.)

use crate::http::{jolt, RECIPE};
use crate::util::{wait_until, Nginx, Workspace};
use std::path::Path;
use std::time::Duration;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// nginx run natively with the cache config users deploy (docker/swarm/nginx.conf,
/// also in docker/k8s/cache.yaml), its paths moved into a temporary directory:
/// `/srv/jolt` (the volume) becomes `DIR/srv`.
struct ShippedCache {
    child: std::process::Child,
    dir: tempfile::TempDir,
    url: String,
}

impl ShippedCache {
    fn start() -> Option<ShippedCache> {
        Nginx::start()?; // nginx is installed (or the test skips, outside CI)
        let dir = tempfile::tempdir().unwrap();
        let shipped = repo("docker/swarm/nginx.conf");
        let d = dir.path().display().to_string();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = std::fs::read_to_string(shipped)
            .unwrap()
            .replace("/srv/jolt", &format!("{d}/srv"))
            .replace("/var/run/nginx.pid", &format!("{d}/nginx.pid"))
            .replace("/var/log/nginx", &d)
            .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
        assert!(conf.contains(&format!("{d}/srv/tmp")), "{conf}");
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        std::fs::create_dir(dir.path().join("srv")).unwrap(); // the mount point
        let child = std::process::Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            // One process, so killing it (the guard's drop) leaves no orphaned worker.
            .args(["-g", "daemon off; master_process off;"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let cache = ShippedCache {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        };
        wait_until(
            "nginx with the shipped config",
            Duration::from_secs(5),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        Some(cache)
    }
}

impl Drop for ShippedCache {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_shipped_cache_config_serves_builds_and_its_trim_spares_uploads_in_progress() {
    let Some(cache) = ShippedCache::start() else {
        return;
    };
    let ws = Workspace::with(RECIPE);
    ws.file("src/a.c", "int a;\n");
    ws.file(
        "jolt.conf.toml",
        &format!("[http]\nuri = \"{}/\"\n", cache.url),
    );
    jolt(&ws, &["build", "app", "other"])
        .success()
        .contains("Upload finished");
    let artifacts = cache.dir.path().join("srv/artifacts");
    assert_eq!(std::fs::read_dir(artifacts.join("lib")).unwrap().count(), 1);
    // An upload nginx is still receiving sits in the volume's tmp directory.
    let receiving = cache.dir.path().join("srv/tmp/0000000042");
    std::fs::write(&receiving, b"half an artifact").unwrap();
    ws.jolt(&[
        "cache",
        "trim",
        artifacts.to_str().unwrap(),
        "--max-size",
        "0",
    ])
    .success()
    .contains("Freed ");
    assert!(receiving.exists());
    assert_eq!(std::fs::read_dir(&artifacts).unwrap().count(), 0);
    // Hidden paths, which the trim leaves alone, are refused, encoded or not.
    for path in ["/.big/x.tar", "/%2ebig/x.tar", "/t/.x.tar"] {
        assert_eq!(put_status(&cache.url, path), 403, "{path}");
    }
    assert_eq!(put_status(&cache.url, "/t/x.tar"), 201);
    // A network client's fleet mark, beside its recipe bundle (no credentials).
    let mark = "/_recipes/fleet-0123456789abcdef0123456789abcdef.json";
    assert_eq!(put_status(&cache.url, mark), 201);
    // A trimmed cache is a cache that misses: the next build executes and uploads.
    let again = ws.sibling();
    jolt(&again, &["build", "app"])
        .success()
        .contains("Upload finished");
}

/// The status of a small `PUT` of `path` to the server at `url` (`http://host:port`).
fn put_status(url: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    write!(
        stream,
        "PUT {path} HTTP/1.0\r\nHost: cache\r\nContent-Length: 1\r\n\r\nx"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

/// The block scalar `key: |` of a YAML file, as the ConfigMap holds it.
fn block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let head = lines
        .next()
        .unwrap_or_else(|| panic!("no {key} in the file"));
    let indent = head.len() - head.trim_start().len() + 2;
    let mut out = String::new();
    for line in lines {
        if !line.trim().is_empty() && line.len() - line.trim_start().len() < indent {
            break;
        }
        out.push_str(line.get(indent..).unwrap_or(""));
        out.push('\n');
    }
    out
}

#[test]
fn the_shipped_configurations_hold_only_keys_jolt_knows() {
    let ws = Workspace::new();
    let k8s = std::fs::read_to_string(repo("docker/k8s/workers.yaml")).unwrap();
    ws.file("k8s-worker.conf", &block(&k8s, "worker.conf"));
    let mut files = vec![ws.root().join("k8s-worker.conf")];
    files.push(repo("docker/swarm/worker.conf"));
    files.push(repo("docker/swarm/client.conf"));
    for file in files {
        let run = ws.jolt(&["-c", file.to_str().unwrap(), "config", "-l"]);
        run.success();
        assert!(!run.all().contains("WARNING"), "{}", run.all());
        assert!(run.all().contains("amqp.host = "), "{}", run.all());
    }
    // The worker image's cache: where the Dockerfile gives its user a directory.
    let k8s_conf = std::fs::read_to_string(ws.root().join("k8s-worker.conf")).unwrap();
    let dockerfile = std::fs::read_to_string(repo("docker/Dockerfile")).unwrap();
    for conf in [
        k8s_conf,
        std::fs::read_to_string(repo("docker/swarm/worker.conf")).unwrap(),
    ] {
        assert!(conf.contains("cachedir = \"/var/cache/jolt\""), "{conf}");
    }
    assert!(dockerfile.contains("install -d -o jolt -g jolt -m 0750 /var/cache/jolt"));
    assert!(dockerfile.contains("USER 10001:10001"));
    // Tasks read what the worker's user reads: no Kubernetes API token (issue 24).
    assert!(k8s.contains("\n      automountServiceAccountToken: false\n"));
}
