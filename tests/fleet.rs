//! Network builds across test hosts of the project's own (network namespaces, see
//! `util::hosts`): links that drop, hosts that drop packets. Each scenario asserts
//! what the client and the caches end up with.

use std::time::{Duration, Instant};

use crate::util::hosts::{self, Host};
use crate::util::{cluster, finish, wait_until, Nginx, WorkerProcess, Workspace};

/// What a process on a test host needs to reach the cluster by name.
fn over_links(heartbeat: u32) -> Vec<String> {
    vec![
        "amqp.host=amqp".to_string(),
        "http.uri=http://cache:8080/cache".to_string(),
        format!("amqp.heartbeat={heartbeat}"),
        "amqp.connect_timeout=2".to_string(),
    ]
}

#[test]
fn a_worker_cut_off_mid_task_loses_nothing_and_rejoins() {
    if !hosts::available() {
        return;
    }
    let Some(c) = cluster() else { return };
    let mut far = Host::new();
    far.forward_broker();
    far.forward_cache(&format!("127.0.0.1:{}", c.server.port));
    let cut = WorkerProcess::start_on(&far, &c.config(), &over_links(2));
    let marker = c.dir.path().join("runs");
    let ws = Workspace::with(&format!(
        "[task.slow]\nrun = [\"echo run >> {}\", \"sleep 8\", \"echo done > {{artifact}}/f\"]\n",
        marker.display()
    ));
    let client = c.spawn_build(&ws, &["slow"]);
    wait_until("the task to start", Duration::from_secs(30), || {
        marker.exists()
    });
    let near = c.worker();
    far.link_down();
    // The broker misses the cut-off worker's heartbeats, drops its connection (its
    // lock, its unacked request), and the request goes to the other worker.
    let run = finish(client);
    run.success();
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().lines().count(),
        2,
        "{}\n{}",
        cut.output(),
        near.output()
    );
    far.link_up();
    wait_until(
        "the cut-off worker to rejoin",
        Duration::from_secs(60),
        || cut.output().matches("waiting for requests").count() >= 2,
    );
    // Its late upload and reply changed nothing a client sees.
    let other = ws.sibling();
    let again = c.build(&other, &["slow"]);
    again
        .success()
        .contains("Download finished")
        .lacks("Remote execution started");
    assert_eq!(
        std::fs::read_to_string(again.locations()[0].join("f")).unwrap(),
        "done\n"
    );
}

#[test]
fn a_client_cut_off_from_the_broker_resumes_and_each_task_runs_once() {
    if !hosts::available() {
        return;
    }
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let mut far = Host::new();
    far.forward_broker();
    far.forward_cache(&format!("127.0.0.1:{}", c.server.port));
    let marker = c.dir.path().join("runs");
    let ws = Workspace::with(&format!(
        "[task.slow]\nrun = [\"echo run >> {}\", \"sleep 5\", \"echo done > {{artifact}}/f\"]\n",
        marker.display()
    ));
    let mut cmd = far.command(env!("CARGO_BIN_EXE_jolt"));
    let config = c.config().display().to_string();
    cmd.args(["-c", &config]);
    for o in over_links(2) {
        cmd.args(["-c", &o]);
    }
    cmd.args(["build", "--network", "slow"]);
    let client = ws.spawn_command(cmd);
    wait_until("the task to start", Duration::from_secs(30), || {
        marker.exists()
    });
    far.link_down();
    std::thread::sleep(Duration::from_secs(8));
    far.link_up();
    let run = finish(client);
    run.success().contains("Reconnected");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\n");
}

/// A cache on a host of its own, whose link can go down.
fn far_cache() -> (Host, Nginx) {
    let host = Host::new();
    let server = Nginx::start_on(&host).expect("nginx");
    (host, server)
}

#[test]
fn a_cache_host_that_drops_packets_costs_a_local_build_one_connect_timeout() {
    if !hosts::available() {
        return;
    }
    let (host, server) = far_cache();
    let ws = Workspace::with(
        "[task.a]\nrun = \"echo a > {artifact}/a\"\n[task.b]\nrun = \"echo b > {artifact}/b\"\n",
    );
    let uri = format!("http.uri={}/cache", server.url);
    host.link_down();
    let started = Instant::now();
    let run = ws.jolt(&[
        "-c",
        &uri,
        "-c",
        "http.connect_timeout=2",
        "build",
        "a",
        "b",
    ]);
    run.success();
    assert_eq!(run.count("unreachable"), 1, "{}", run.all());
    assert!(
        started.elapsed() < Duration::from_secs(2 + 3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_network_build_with_a_cache_host_that_drops_packets_exits_3() {
    if !hosts::available() {
        return;
    }
    let Some(c) = cluster() else { return };
    let (host, server) = far_cache();
    let ws = Workspace::with("[task.a]\nrun = \"true # fleet-1\"\n");
    let config = c.config().display().to_string();
    let uri = format!("http.uri={}/cache", server.url);
    host.link_down();
    let started = Instant::now();
    ws.jolt(&[
        "-c",
        &config,
        "-c",
        &uri,
        "-c",
        "http.connect_timeout=2",
        "build",
        "--network",
        "a",
    ])
    .code(3)
    .contains(&server.url);
    assert!(
        started.elapsed() < Duration::from_secs(2 + 3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_broker_host_that_drops_packets_is_exit_3_within_the_connect_timeout() {
    if !hosts::available() {
        return;
    }
    let Some(server) = Nginx::start() else { return };
    let host = Host::new();
    host.link_down();
    let ws = Workspace::with("[task.a]\nrun = \"true # fleet-2\"\n");
    let uri = format!("http.uri={}", server.url);
    let broker = format!("amqp.host={}", host.addr);
    let started = Instant::now();
    ws.jolt(&[
        "-c",
        &uri,
        "-c",
        &broker,
        "-c",
        "amqp.connect_timeout=2",
        "build",
        "--network",
        "a",
    ])
    .code(3)
    .contains(&host.addr);
    assert!(
        started.elapsed() < Duration::from_secs(2 + 3),
        "{:?}",
        started.elapsed()
    );
}
