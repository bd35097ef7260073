//! Network builds with real RabbitMQ (127.0.0.1:5672), a real nginx cache and real
//! `jolt amqp-worker` processes. Each test has a routing key of its own.

use crate::util::{
    alias, cluster, finish, finish_within, wait_until, Nginx, WorkerProcess, Workspace,
};
use std::time::{Duration, Instant};

const GRAPH: &str = r#"
[task.src]
influence = ["src/*.c"]
run = "cat src/*.c > {artifact}/all.c"

[task.lib]
parameters.n = "1"
requires = ["src"]
run = "echo lib{n} $(cat {deps.src}/all.c) > {artifact}/lib.txt"

[task.app]
requires = ["lib:n=1", "lib:n=2", "lib:n=3"]
run = ["cat {deps.lib:n=1}/lib.txt {deps.lib:n=2}/lib.txt {deps.lib:n=3}/lib.txt > {artifact}/app.txt", "echo app built"]
"#;

#[test]
fn a_graph_is_built_by_two_workers_then_reused() {
    let Some(c) = cluster() else { return };
    let (w1, w2) = (c.worker(), c.worker());
    let ws = Workspace::with(GRAPH);
    ws.file("src/a.c", "int a;");
    let run = c.build(&ws, &["app"]);
    run.success()
        .contains("Remote execution started (app ")
        .contains("Remote execution finished after")
        .contains("Download finished after")
        .lacks("Execution started");
    assert_eq!(run.count("Remote execution started"), 5);
    let app = std::fs::read_to_string(run.locations()[0].join("app.txt")).unwrap();
    assert_eq!(app, "lib1 int a;\nlib2 int a;\nlib3 int a;\n");
    let served =
        w1.output().matches("Request for").count() + w2.output().matches("Request for").count();
    assert_eq!(served, 5);

    let again = c.build(&ws, &["app"]);
    again.success().lacks("Remote execution started");
    let fresh = ws.sibling();
    let fetched = c.build(&fresh, &["app"]);
    fetched
        .success()
        .lacks("Remote execution started")
        .contains("Download started (app ");
    drop((w1, w2));
}

#[test]
fn a_failing_remote_task_exits_1_and_shows_its_log() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with("[task.bad]\nrun = [\"echo about to fail\", \"false\"]\n");
    let run = c.build(&ws, &["bad"]);
    run.code(1)
        .contains("[bad] about to fail")
        .contains("Command failed: false")
        .contains("Remote execution failed");
}

#[test]
fn a_failed_remote_command_is_reported_once_and_a_cut_tail_says_how_much_was_cut() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with("[task.bad]\nrun = \"seq 1 5002; false\"\n");
    let failed = "Command failed: seq 1 5002; false";
    // Regression (issue 23): the worker sent back its log's tail, which held jolt's
    // line `Command failed: ...`, with the failure's lines after it: the client
    // replayed the line twice; and nothing said that 4,802 lines were cut.
    for args in [&["bad"][..], &["-q", "bad"]] {
        let run = c.build(&ws, args);
        run.code(1)
            .contains(&format!("[bad] {failed}\n"))
            .contains(
                "[bad] [... the first 4802 lines of the output are not shown ...]\n[bad] 4803\n",
            )
            .contains("Remote execution failed");
        assert_eq!(run.count(failed), 1, "{args:?}\n{}", run.all());
    }
}

#[test]
fn a_failing_remote_task_exits_1_also_with_http_credentials_and_an_unstable_one_0() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with(
        "[task.bad]\nrun = \"false\"\n[task.flaky]\nunstable = true\nrun = \"false\"\n",
    );
    // Regression (issue 23): after a remote failure the client asked whether the
    // cache was still there with `HEAD {uri}/`, which nginx answers 403 (a directory
    // without an index); with credentials set, a 403 counted as "credentials
    // refused": the cache unreachable, exit 3, and an unstable task failed the build.
    let auth = ["http.username=client", "http.password=secret"];
    let run = finish(c.spawn_build_with(&ws, &auth, &["bad"]));
    run.code(1)
        .contains("Remote execution failed")
        .lacks("unreachable");
    let run = finish(c.spawn_build_with(&ws, &auth, &["flaky"]));
    run.code(0).lacks("unreachable");
}

#[test]
fn a_remote_tasks_output_is_replayed_on_success() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with(
        "[task.dep]\nrun = \"echo from-the-requirement\"\n[task.say]\nrequires = [\"dep\"]\nrun = [\"echo hello-from-a-worker\", \"echo to-stderr >&2\"]\n",
    );
    // Regression (issue 13): only a failing remote task's output was shown.
    c.build(&ws, &["say"])
        .success()
        .contains("[say] hello-from-a-worker")
        .contains("[say] to-stderr")
        .contains("[dep] from-the-requirement");
    // Regression (issue 23): a task that keeps no artifact ran on a worker, and its
    // output was not replayed.
    let ws = Workspace::with("[task.once]\ncacheable = false\nrun = \"echo not-kept-output\"\n");
    let run = c.build(&ws, &["once"]);
    run.success()
        .contains("Remote execution finished")
        .contains("[once] not-kept-output");
}

#[test]
fn status_counts_a_pools_requests_and_workers_and_a_pool_nobody_serves_is_warned_about() {
    let Some(c) = cluster() else { return };
    let ws = Workspace::with("[task.t]\nrun = \"echo ok\"\n");
    let config = c.config().display().to_string();
    let pool = c.broker.routing_key.clone();
    // No worker: the client says so within 10 s instead of waiting in silence.
    let client = c.spawn_build(&ws, &["t"]);
    let started = std::time::Instant::now();
    let status = ws.jolt(&["-c", &config, "status"]);
    status.success();
    wait_until("the request in the broker", Duration::from_secs(10), || {
        ws.jolt(&["-c", &config, "status"]).all().contains(&format!(
            "pool {pool} (queue jolt_tasks_{pool}): 1 requests waiting, 0 workers consuming"
        ))
    });
    // The warning is in the client's run log as soon as it is printed.
    let warning = format!("No worker takes requests of pool '{pool}'");
    let logged = || {
        std::fs::read_dir(ws.state_home().join("jolt/runs"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(&warning)))
    };
    wait_until("the idle pool warning", Duration::from_secs(10), logged);
    assert!(started.elapsed() < Duration::from_secs(10));
    let _w = c.worker();
    crate::util::finish(client).success().contains(&warning);
    wait_until("the worker to consume", Duration::from_secs(10), || {
        ws.jolt(&["-c", &config, "status", &pool])
            .all()
            .contains("0 requests waiting, 1 workers consuming")
    });
    ws.jolt(&["-c", &config, "status", "no-such-pool-here"])
        .success()
        .contains("no queue yet");
}

#[test]
fn a_killed_worker_loses_no_task() {
    let Some(c) = cluster() else { return };
    let first = c.worker();
    let marker = c.dir.path().join("started");
    let ws = Workspace::with(&format!(
        "[task.slow]\nrun = [\"echo run >> {}\", \"sleep 2\", \"echo done > {{artifact}}/f\"]\n",
        marker.display()
    ));
    let client = c.spawn_build(&ws, &["slow"]);
    wait_until("the task to start", Duration::from_secs(30), || {
        marker.exists()
    });
    first.signal(libc::SIGKILL);
    let second = c.worker();
    let run = finish(client);
    run.success();
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\nrun\n");
    assert!(
        second.output().contains("(redelivered)"),
        "{}",
        second.output()
    );
}

#[test]
fn two_clients_building_one_graph_execute_each_task_once() {
    let Some(c) = cluster() else { return };
    let (_w1, _w2) = (c.worker(), c.worker());
    let counter = c.dir.path().join("count");
    let recipe = format!(
        "[task.a]\nrun = [\"echo a >> {0}\", \"sleep 1\"]\n[task.b]\nrequires = [\"a\"]\nrun = [\"echo b >> {0}\", \"sleep 1\"]\n",
        counter.display()
    );
    let (one, two) = (Workspace::with(&recipe), Workspace::with(&recipe));
    let first = c.spawn_build(&one, &["b"]);
    let second = c.spawn_build(&two, &["b"]);
    finish(first).success();
    finish(second).success();
    let mut lines: Vec<String> = std::fs::read_to_string(&counter)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    assert_eq!(lines, vec!["a", "b"]);
}

#[test]
fn a_high_priority_request_overtakes_queued_ones() {
    let Some(c) = cluster() else { return };
    let w = c.worker();
    let order = c.dir.path().join("order");
    let gate = c.dir.path().join("gate");
    let recipe = format!(
        "[task.blocker]\nrun = \"while [ ! -f {gate} ]; do sleep 0.05; done\"\n[task.low]\nrun = \"echo low >> {order}\"\n[task.high]\nrun = \"echo high >> {order}\"\n",
        gate = gate.display(),
        order = order.display()
    );
    let ws = Workspace::with(&recipe);
    let blocker = c.spawn_build(&ws, &["blocker"]);
    // The worker holds the blocker: the next requests wait in the queue.
    w.wait_for("Request for blocker", Duration::from_secs(30));
    let low = c.spawn_build(&ws, &["low"]);
    wait_until("low to be queued", Duration::from_secs(30), || {
        c.broker.queued() == Some(1)
    });
    let mut high = c.spawn_build_with(&ws, &["amqp.priority=5"], &["high"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.broker.queued() != Some(2) {
        if let Ok(Some(_)) = high.try_wait() {
            panic!("high ended early: {}", finish(high).all());
        }
        assert!(Instant::now() < deadline, "high was never queued");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&gate, "").unwrap();
    finish(blocker).success();
    finish(low).success();
    finish(high).success();
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "high\nlow\n");
}

#[test]
fn a_routing_key_sends_a_task_only_to_its_pool() {
    let Some(c) = cluster() else { return };
    let pool = format!("{}-gpu", c.broker.routing_key);
    let general = c.worker();
    let special = WorkerProcess::start(&c.config(), &[format!("amqp.routing_key={pool}")]);
    let ws = Workspace::with(&format!(
        "[task.plain]\nrun = \"true\"\n[task.special]\nrouting_key = \"{pool}\"\nrequires = [\"plain\"]\nrun = \"true\"\n"
    ));
    c.build(&ws, &["special"]).success();
    assert!(
        special.output().contains("Request for special"),
        "{}",
        special.output()
    );
    assert!(!general.output().contains("Request for special"));
    assert!(general.output().contains("Request for plain"));
    c.broker.with_channel(|ch| {
        let _ = ch.queue_delete(format!("jolt_tasks_{pool}"), Default::default());
    });
}

#[test]
fn an_interrupted_client_leaves_the_workers_healthy() {
    let Some(c) = cluster() else { return };
    let w = c.worker();
    let marker = c.dir.path().join("started");
    let ws = Workspace::with(&format!(
        "[task.slow]\nrun = [\"touch {}\", \"sleep 3\"]\n[task.quick]\nrun = \"echo quick\"\n",
        marker.display()
    ));
    let client = c.spawn_build(&ws, &["slow"]);
    wait_until("the task to start", Duration::from_secs(30), || {
        marker.exists()
    });
    unsafe { libc::kill(client.id() as i32, libc::SIGINT) };
    let run = finish(client);
    assert_eq!(run.code, 130, "{}", run.all());
    c.build(&ws, &["quick"]).success();
    assert!(w.output().contains("Request for quick"));
}

#[test]
fn an_unreachable_broker_exits_3_naming_it() {
    let Some(server) = Nginx::start() else { return };
    let ws = Workspace::with("[task.a]\nrun = \"true # network-1\"\n");
    let uri = format!("http.uri={}", server.url);
    let run = ws.jolt(&[
        "-c",
        &uri,
        "-c",
        "amqp.host=127.0.0.1",
        "-c",
        "amqp.port=1",
        "build",
        "--network",
        "a",
    ]);
    run.code(3).contains("127.0.0.1:1");
}

#[test]
fn a_client_and_a_worker_given_several_brokers_use_one_that_answers() {
    // Issue 25: `amqp.host` named one broker: `a:5681,b:5682` was the host
    // `a:5681,b` on the port 5682.
    let Some(c) = cluster() else { return };
    // Seven brokers nobody listens for and the live one: a shuffle tries a dead one
    // first seven times in eight.
    let mut brokers: Vec<String> = (1..=7).map(|p| format!("127.0.0.1:{p}")).collect();
    brokers.push("127.0.0.1:5672".to_string());
    let hosts = format!("amqp.host={}", brokers.join(","));
    let used = "amqp://127.0.0.1:5672/%2F";
    let w = WorkerProcess::start(&c.config(), std::slice::from_ref(&hosts));
    let output = w.output();
    assert!(
        output.contains(&format!("Connected to {used}; waiting")),
        "{output}"
    );
    let ws = Workspace::with("[task.a]\nrun = \"echo a > {artifact}/a\"\n");
    let config = c.config().display().to_string();
    ws.jolt(&["-c", &config, "-c", &hosts, "build", "--network", "a"])
        .success()
        .contains(&format!("Connected to the broker {used}"))
        .contains("Remote execution finished");
    // Each connection tries them in a fresh order: of ten, some met a dead one first.
    let mut failed_over = 0;
    for _ in 0..10 {
        let run = ws.jolt(&["-vv", "-c", &config, "-c", &hosts, "status"]);
        run.success()
            .contains(&format!("Connected to the broker {used}"));
        if run
            .all()
            .contains("Cannot connect to RabbitMQ at amqp://127.0.0.1:")
        {
            failed_over += 1;
        }
    }
    assert!(
        failed_over > 0,
        "ten connections tried the live broker first"
    );
}

#[test]
fn brokers_that_all_fail_exit_3_naming_each_in_bounded_time() {
    let Some(server) = Nginx::start() else { return };
    let ws = Workspace::with("[task.a]\nrun = \"true # network-2\"\n");
    let uri = format!("http.uri={}", server.url);
    // Refused at once, and (TEST-NET-1, routed nowhere) refused or timed out.
    let hosts = "amqp.host=127.0.0.1:1,127.0.0.1:2,192.0.2.1:5672";
    let start = Instant::now();
    let run = ws.jolt(&[
        "-c",
        &uri,
        "-c",
        hosts,
        "-c",
        "amqp.connect_timeout=1",
        "build",
        "--network",
        "a",
    ]);
    run.code(3)
        .contains("Cannot connect to RabbitMQ at any of its 3 brokers: amqp://127.0.0.1:1/%2F (")
        .contains("amqp://127.0.0.1:2/%2F (")
        .contains("amqp://192.0.2.1:5672/%2F (");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    ws.jolt(&["-c", hosts, "-c", "amqp.connect_timeout=1", "status"])
        .code(3)
        .contains("amqp://127.0.0.1:1/%2F (")
        .contains("amqp://127.0.0.1:2/%2F (")
        .contains("amqp://192.0.2.1:5672/%2F (");
}

/// An exclusive, server-named queue of the test's own.
fn private_queue(ch: &amiquip::Channel) -> amiquip::Queue<'_> {
    ch.queue_declare(
        "",
        amiquip::QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A consumer of everything `q` receives, without acks.
fn consume_all<'a>(q: &amiquip::Queue<'a>) -> amiquip::Consumer<'a> {
    q.consume(amiquip::ConsumerOptions {
        no_ack: true,
        ..Default::default()
    })
    .unwrap()
}

/// Publishes `requests` (raw bodies) to the cluster's pool and returns the first
/// final reply for `identity` within 20 s (not `accepted` or `running`), read from
/// a queue of the test's own.
fn publish_for_reply(
    c: &crate::util::Cluster,
    identity: &str,
    requests: &[&[u8]],
) -> Option<String> {
    c.broker.with_channel(|ch| {
        use amiquip::{ConsumerMessage, FieldTable, Publish};
        let q = private_queue(ch);
        q.bind(
            &ch.exchange_declare_passive("jolt_results").unwrap(),
            identity,
            FieldTable::new(),
        )
        .unwrap();
        let consumer = consume_all(&q);
        let exchange = ch.exchange_declare_passive("jolt_exchange").unwrap();
        for body in requests {
            exchange
                .publish(Publish::new(body, c.broker.routing_key.as_str()))
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match consumer.receiver().recv_timeout(left) {
                Ok(ConsumerMessage::Delivery(d)) => {
                    let reply = String::from_utf8_lossy(&d.body).into_owned();
                    let news = ["\"kind\":\"accepted\"", "\"kind\":\"running\""];
                    if !news.iter().any(|k| reply.contains(k)) {
                        return Some(reply);
                    }
                }
                _ => return None,
            }
        }
    })
}

#[test]
fn malformed_and_incompatible_requests_are_answered_and_acked() {
    let Some(c) = cluster() else { return };
    let w = c.worker();
    let identity = "e".repeat(64);
    let version_99 = format!("{{\"version\": 99, \"identity\": \"{identity}\"}}");
    let replies: Vec<String> =
        publish_for_reply(&c, &identity, &[b"{not json", version_99.as_bytes()])
            .into_iter()
            .collect();
    assert_eq!(replies.len(), 1);
    assert!(
        replies[0].contains("\"kind\":\"error\"") && replies[0].contains("incompatible"),
        "{}",
        replies[0]
    );
    wait_until("the queue to drain", Duration::from_secs(10), || {
        c.broker.queued() == Some(0)
    });
    assert_eq!(w.output().matches("Refusing a request").count(), 2);
    // The worker is still serving.
    let ws = Workspace::with("[task.ok]\nrun = \"true\"\n");
    c.build(&ws, &["ok"]).success();
}

#[test]
fn sigterm_lets_a_worker_finish_its_task_then_exit() {
    let Some(c) = cluster() else { return };
    let mut w = c.worker();
    let marker = c.dir.path().join("started");
    let ws = Workspace::with(&format!(
        "[task.slow]\nrun = [\"touch {}\", \"sleep 2\"]\n",
        marker.display()
    ));
    let client = c.spawn_build(&ws, &["slow"]);
    wait_until("the task to start", Duration::from_secs(30), || {
        marker.exists()
    });
    w.signal(libc::SIGTERM);
    finish(client).success();
    let status = w.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", w.output());
    assert!(w.output().contains("Reply Success"));
}

#[test]
fn a_fast_task_runs_locally_when_its_requirements_are_local() {
    let Some(c) = cluster() else { return };
    let w = c.worker();
    let ws = Workspace::with(
        "[task.dep]\nrun = \"echo dep > {artifact}/f\"\n[task.quick]\nfast = true\nrequires = [\"dep\"]\nrun = \"cat {deps.dep}/f > {artifact}/f\"\n",
    );
    // dep is remote only: quick goes to a worker.
    let remote = c.build(&ws, &["quick"]);
    remote
        .success()
        .contains("Remote execution started (quick ");
    assert!(w.output().contains("Request for quick"));
    // With dep in the local cache, a fresh quick (-f) runs here.
    ws.jolt(&["build", "dep"]).success();
    let local = c.build(&ws, &["-f", "quick"]);
    local
        .success()
        .contains("Execution started (quick ")
        .lacks("Remote execution started (quick ");
}

#[test]
fn an_artifact_only_the_client_has_is_uploaded_for_the_workers() {
    let Some(c) = cluster() else { return };
    let w = c.worker();
    let ws = Workspace::with(
        "[task.dep]\nrun = \"echo mine > {artifact}/f\"\n[task.top]\nrequires = [\"dep\"]\nrun = \"cp {deps.dep}/f {artifact}/f\"\n",
    );
    ws.jolt(&["build", "dep"]).success();
    let run = c.build(&ws, &["top"]);
    run.success()
        .contains("Upload started (dep ")
        .contains("Remote execution started (top ");
    assert!(!w.output().contains("Request for dep"));
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("f")).unwrap(),
        "mine\n"
    );
}

#[test]
fn an_artifact_changed_since_it_was_built_is_never_uploaded() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    // Changed since it was built, and of an older jolt (no digests in its manifest).
    for change in ["content", "no-digests"] {
        let ws = Workspace::with(&format!(
            "[task.dep]\nrun = \"echo mine > {{artifact}}/f # {change}\"\n[task.top]\nrequires = [\"dep\"]\nrun = \"cp {{deps.dep}}/f {{artifact}}/f\"\n",
        ));
        let dir = ws.jolt(&["build", "dep"]).success().locations()[0].clone();
        if change == "content" {
            let f = dir.join("f");
            std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .unwrap();
            std::fs::write(&f, "PWNED\n").unwrap();
        } else {
            let path = dir.join(".manifest.json");
            let mut manifest: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            manifest.as_object_mut().unwrap().remove("contents");
            std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
        }
        // Regression (issue 24): what a task or anyone wrote into a local artifact
        // went to the HTTP cache under the genuine identity; then (found by an
        // attacking helper) the build failed instead of building it again.
        let run = c.build(&ws, &["top"]);
        run.success()
            .contains("Removed the artifact")
            .contains("Remote execution started (dep ")
            .lacks("Upload started (dep ");
        assert_eq!(
            std::fs::read_to_string(run.locations()[0].join("f")).unwrap(),
            "mine\n",
            "{change}"
        );
        assert!(c.server.objects().iter().any(|o| o.contains("dep/")));
    }
}

#[test]
fn scaling_down_mid_build_loses_no_task() {
    let Some(c) = cluster() else { return };
    let mut workers = vec![c.worker(), c.worker(), c.worker()];
    let log = c.dir.path().join("done");
    let mut recipe = alias("all", (0..30).map(|i| format!("t{i}")));
    for i in 0..30 {
        recipe.push_str(&format!(
            "[task.t{i}]\nrun = [\"sleep 0.3\", \"echo t{i} >> {}\", \"echo {i} > {{artifact}}/n\"]\n",
            log.display()
        ));
    }
    let ws = Workspace::with(&recipe);
    let client = c.spawn_build(&ws, &["all"]);
    wait_until("a few tasks to finish", Duration::from_secs(60), || {
        std::fs::read_to_string(&log)
            .map(|s| s.lines().count() >= 3)
            .unwrap_or(false)
    });
    let mut leaving = workers.remove(0);
    leaving.signal(libc::SIGTERM);
    let run = finish(client);
    run.success();
    assert_eq!(run.locations().len(), 30);
    let status = leaving.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", leaving.output());
    let mut done: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    done.sort();
    done.dedup();
    assert_eq!(done.len(), 30);
}

#[test]
fn a_worker_provisions_a_downloaded_tool_and_a_repository() {
    let Some(c) = cluster() else { return };
    let w = c.worker();
    // A tool tarball and a bare repository, both served by the cluster's nginx.
    let staging = tempfile::tempdir().unwrap();
    let bin = staging.path().join("tool/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("count-lines"), "#!/bin/sh\nwc -l < \"$1\"\n").unwrap();
    let run = |cmd: &mut std::process::Command| assert!(cmd.status().unwrap().success());
    run(std::process::Command::new("chmod").args(["+x", bin.join("count-lines").to_str().unwrap()]));
    let tarball = c.server.file("dl/tool.tgz");
    std::fs::create_dir_all(tarball.parent().unwrap()).unwrap();
    run(std::process::Command::new("tar").args([
        "-czf",
        tarball.to_str().unwrap(),
        "-C",
        staging.path().to_str().unwrap(),
        "tool",
    ]));
    let sha = String::from_utf8(
        std::process::Command::new("sha256sum")
            .arg(&tarball)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let sha = sha.split_whitespace().next().unwrap();
    let work = staging.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("lines.txt"), "a\nb\nc\n").unwrap();
    let bare = c.server.file("git/src.git");
    for args in [
        vec!["init", "-q", "-b", "main", "."],
        vec!["add", "."],
        vec![
            "-c",
            "user.email=t@example.org",
            "-c",
            "user.name=t",
            "commit",
            "-qm",
            "x",
        ],
        vec!["clone", "-q", "--bare", ".", bare.to_str().unwrap()],
    ] {
        run(std::process::Command::new("git")
            .args(&args)
            .current_dir(&work));
    }
    run(std::process::Command::new("git")
        .args(["update-server-info"])
        .current_dir(&bare));
    let ws = Workspace::with(&format!(
        "[task.tool]\nkind = \"download\"\nurl = \"{0}/dl/tool.tgz\"\nsha256 = \"{sha}\"\nenviron = {{ PATH = \"tool/bin\" }}\n[task.src]\nkind = \"git\"\nurl = \"{0}/git/src.git\"\nrev = \"main\"\n[task.count]\nrequires = [\"tool\", \"src\"]\nrun = \"count-lines {{deps.src}}/lines.txt > {{artifact}}/n\"\n",
        c.server.url
    ));
    let built = c.build(&ws, &["count"]);
    built
        .success()
        .contains("Remote execution started (tool ")
        .contains("Remote execution started (src ");
    assert_eq!(
        std::fs::read_to_string(built.locations()[0].join("n"))
            .unwrap()
            .trim(),
        "3"
    );
    assert!(w.output().contains("Request for count"));
}

#[test]
fn a_non_cacheable_requirement_runs_on_the_worker_with_its_consumer() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with(
        "[task.gen]\ncacheable = false\nrun = \"echo generated > {artifact}/g\"\n[task.app]\nrequires = [\"gen\"]\nrun = \"cp {deps.gen}/g {artifact}/g\"\n",
    );
    let run = c.build(&ws, &["app"]);
    run.success();
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("g")).unwrap(),
        "generated\n"
    );
}

#[test]
fn a_request_queue_declared_otherwise_fails_the_build_instead_of_hanging() {
    let Some(c) = cluster() else { return };
    let _w = c.worker(); // declares the queue with the default x-max-priority
    let ws = Workspace::with("[task.a]\nrun = \"true # network-2\"\n");
    let client = c.spawn_build_with(&ws, &["amqp.max_priority=3"], &["a"]);
    let run = finish(client);
    // A broker setup error, not a task's failure (issue 23): exit 3, naming the queue.
    let queue = format!("jolt_tasks_{}", c.broker.routing_key);
    run.code(3)
        .contains(&format!("refuses the declaration of the queue {queue}"))
        .contains("PRECONDITION_FAILED");
    assert_eq!(run.count("refuses the declaration"), 1, "{}", run.all());
}

#[test]
fn a_quorum_request_queue_an_operator_declared_exits_3_naming_it_for_client_and_worker() {
    let Some(c) = cluster() else { return };
    let queue = format!("jolt_tasks_{}", c.broker.routing_key);
    c.broker.with_channel(|ch| {
        let mut args = amiquip::FieldTable::new();
        args.insert(
            "x-queue-type".into(),
            amiquip::AmqpValue::LongString("quorum".into()),
        );
        ch.queue_declare(
            queue.clone(),
            amiquip::QueueDeclareOptions {
                durable: true,
                arguments: args,
                ..Default::default()
            },
        )
        .unwrap();
    });
    // Regression (issue 23): the client exited 1 (`server closed channel 1 (code=406,
    // ...)`), and workers retried every second forever.
    let ws = Workspace::with("[task.a]\nrun = \"true # quorum\"\n");
    c.build(&ws, &["a"])
        .code(3)
        .contains(&format!("refuses the declaration of the queue {queue}"));
    let started = Instant::now();
    c.worker_to_its_end(&[])
        .code(3)
        .contains(&format!("queue {queue}"))
        .lacks("reconnecting");
    assert!(started.elapsed() < Duration::from_secs(30));
}

// No request waits forever, no request kills the fleet, no secret leaks (issue 9).

/// A layered graph: `layers` layers of `width` trivial tasks, each requiring two
/// tasks of the layer below.
fn layered(layers: usize, width: usize) -> String {
    let mut recipe = String::new();
    for l in 0..layers {
        for w in 0..width {
            recipe.push_str(&format!(
                "[task.t{l}_{w}]\nrun = \"echo {l}.{w} > {{artifact}}/f\"\n"
            ));
            if l > 0 {
                recipe.push_str(&format!(
                    "requires = [\"t{}_{w}\", \"t{}_{}\"]\n",
                    l - 1,
                    l - 1,
                    (w + 1) % width
                ));
            }
        }
    }
    recipe.push_str(&alias(
        "all",
        (0..width).map(|w| format!("t{}_{w}", layers - 1)),
    ));
    recipe
}

#[test]
fn four_clients_building_one_graph_at_once_all_finish() {
    let Some(c) = cluster() else { return };
    let _workers: Vec<WorkerProcess> = (0..6).map(|_| c.worker()).collect();
    let recipe = layered(6, 10);
    let clients: Vec<Workspace> = (0..4).map(|_| Workspace::with(&recipe)).collect();
    for round in 0..3 {
        let salt = format!("round{round}");
        let builds: Vec<std::process::Child> = clients
            .iter()
            .map(|ws| c.spawn_build_with(ws, &["amqp.jobs=8"], &["-s", &salt, "all"]))
            .collect();
        for build in builds {
            // Regression: a request dropped as a duplicate while its holder was between
            // its reply and releasing the lock was never answered.
            finish_within(build, Duration::from_secs(180), &format!("round {round}")).success();
        }
    }
}

#[test]
fn a_duplicate_request_is_answered_even_when_its_holder_never_replies() {
    let Some(c) = cluster() else { return };
    let recipe = "[task.x]\nrun = \"echo x > {artifact}/x\"\n";
    let ws = Workspace::with(recipe);
    let identity = ws.identity("x");
    // Another worker holds the lock of x and is about to release it, its reply
    // already sent: before this client bound its reply queue.
    let mut holder =
        amiquip::Connection::insecure_open("amqp://guest:guest@127.0.0.1:5672/%2F").unwrap();
    let channel = holder.open_channel(None).unwrap();
    channel
        .queue_declare(
            c.lock_queue(&identity),
            amiquip::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
        )
        .unwrap();
    let w = c.worker();
    let client = c.spawn_build(&ws, &["x"]);
    wait_until("the duplicate", Duration::from_secs(30), || {
        w.output().contains("dropping this duplicate")
    });
    // The holder's artifact reaches the cache, and its lock goes.
    let uploader = ws.sibling();
    let uri = format!("http.uri={}/cache", c.server.url);
    uploader.jolt(&["-c", &uri, "build", "x"]).success();
    let _ = channel.close();
    let _ = holder.close();
    // Regression: the dropped request was never answered, and the client, never
    // having heard "accepted", never sent it again.
    finish_within(client, Duration::from_secs(60), "the client").success();
}

#[test]
fn a_request_that_kills_its_workers_is_refused_after_two_deliveries() {
    let Some(c) = cluster() else { return };
    let marker = c.dir.path().join("runs");
    let ws = Workspace::with(&format!(
        "[task.deadly]\nrun = [\"echo run >> {}\", \"sleep 300\"]\n",
        marker.display()
    ));
    let client = c.spawn_build(&ws, &["deadly"]);
    let runs = || crate::util::line_count(&marker);
    for delivery in 1..=2 {
        let worker = c.worker();
        wait_until("the task to start", Duration::from_secs(60), || {
            runs() == delivery
        });
        worker.signal(libc::SIGKILL);
    }
    let third = c.worker();
    let run = finish_within(client, Duration::from_secs(60), "the client");
    run.code(1).contains("delivered 3 times");
    assert_eq!(runs(), 2, "{}", third.output());
    assert!(
        third.output().contains("Refusing deadly"),
        "{}",
        third.output()
    );
    wait_until("the queue to drain", Duration::from_secs(10), || {
        c.broker.queued() == Some(0)
    });
}

#[test]
fn a_forged_reply_with_an_absurd_duration_fails_the_task_instead_of_hanging() {
    let Some(c) = cluster() else { return };
    let ws = Workspace::with("[task.a]\nrun = \"true # network-3\"\n");
    let identity = ws.identity("a");
    // No worker: the request waits in its queue, and the client for a reply.
    let client = c.spawn_build(&ws, &["a"]);
    wait_until("the request", Duration::from_secs(30), || {
        c.broker.queued() == Some(1)
    });
    let forged = format!(
        "{{\"version\": 1, \"identity\": \"{identity}\", \"kind\": \"success\", \"worker\": \"forger\", \"duration\": 1e300}}"
    );
    c.broker.with_channel(|ch| {
        ch.basic_publish(
            "jolt_results",
            amiquip::Publish::new(forged.as_bytes(), identity.as_str()),
        )
        .unwrap();
    });
    // Regression: the job thread panicked and the build hung for good.
    finish_within(client, Duration::from_secs(30), "the client")
        .code(1)
        .lacks("panicked")
        .contains("could not be downloaded");
}

#[test]
fn a_worker_whose_credentials_are_refused_exits_3() {
    let Some(c) = cluster() else { return };
    let started = Instant::now();
    c.worker_to_its_end(&["amqp.password=wrong-pw"])
        .code(3)
        .contains("refused user 'guest'")
        .lacks("wrong-pw");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn tasks_on_a_worker_never_see_its_credentials() {
    let Some(c) = cluster() else { return };
    let _w = WorkerProcess::start_with_env(
        &c.config(),
        &[],
        &[
            ("JOLT_HTTP_PASSWORD", "http-s3cret"),
            ("JOLT_AMQP_PASSWORD", "guest"),
        ],
    );
    let ws = Workspace::with("[task.envdump]\nrun = \"env > {artifact}/env; env\"\n");
    let run = c.build(&ws, &["envdump"]);
    run.success();
    let env = std::fs::read_to_string(run.locations()[0].join("env")).unwrap();
    assert!(!env.contains("http-s3cret"), "{env}");
    assert!(!env.contains("JOLT_AMQP_PASSWORD"), "{env}");
    let log = std::fs::read_to_string(run.locations()[0].join(".build.log")).unwrap();
    assert!(!log.contains("http-s3cret"), "{log}");
}

#[test]
fn debug_output_never_shows_the_broker_password() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with("[task.a]\nrun = \"true # network-4\"\n");
    let config = c.config().display().to_string();
    let run = ws.jolt(&["-vv", "-c", &config, "build", "--network", "a"]);
    run.success();
    // Regression: amiquip's handshake showed `response: "\0guest\0guest"`.
    assert!(!run.all().contains("\\0guest"), "{}", run.all());
}

#[test]
fn an_archive_clients_reject_is_built_again_by_a_worker() {
    let Some(c) = cluster() else { return };
    let w = c.worker();
    let ws = Workspace::with("[task.a]\nrun = \"echo a > {artifact}/a\"\n");
    let first = c.build(&ws, &["a"]);
    first.success();
    let id = first.identity();
    std::fs::write(
        c.server.file(&format!("cache/a/{id}.tar")),
        b"not an archive".repeat(100),
    )
    .unwrap();
    let other = ws.sibling();
    let run = c.build(&other, &["a"]);
    run.success().contains("having it built again");
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("a")).unwrap(),
        "a\n"
    );
    assert_eq!(
        w.output().matches("Request for a ").count(),
        2,
        "{}",
        w.output()
    );
}

/// A genuine request of a build of `task`, taken from the queue before any worker
/// sees it (the cluster must have no worker yet); the client is killed.
fn taken_request(c: &crate::util::Cluster, ws: &Workspace, task: &str) -> Vec<u8> {
    let mut client = c.spawn_build(ws, &[task]);
    wait_until("the request", Duration::from_secs(30), || {
        c.broker.queued() == Some(1)
    });
    let body = c.broker.with_channel(|ch| {
        let q = ch
            .queue_declare_passive(format!("jolt_tasks_{}", c.broker.routing_key))
            .unwrap();
        q.get(true)
            .unwrap()
            .expect("the request")
            .delivery
            .body
            .clone()
    });
    client.kill().unwrap();
    client.wait().unwrap();
    body
}

#[test]
fn a_replace_request_leaves_a_good_archive_alone() {
    let Some(c) = cluster() else { return };
    let ws = Workspace::with("[task.a]\nrun = \"echo a > {artifact}/a\"\n");
    let body = taken_request(&c, &ws, "a");
    let w = c.worker();
    let built = c.build(&ws, &["a"]);
    built.success();
    let id = built.identity();
    let object = c.server.file(&format!("cache/a/{id}.tar"));
    let before = std::fs::read(&object).unwrap();
    // Regression (issue 24): any broker user could have a worker upload its own
    // copy over a good archive by asking for a replacement.
    let mut request: serde_json::Value = serde_json::from_slice(&body).unwrap();
    request["replace"] = serde_json::Value::Bool(true);
    let reply = publish_for_reply(&c, &id, &[&serde_json::to_vec(&request).unwrap()]).unwrap();
    assert!(reply.contains("\"kind\":\"success\""), "{reply}");
    assert!(w.output().contains("intact, left alone"), "{}", w.output());
    assert_eq!(
        w.output().matches("Upload started").count(),
        1,
        "{}",
        w.output()
    );
    assert_eq!(std::fs::read(&object).unwrap(), before);
}

/// Adds a file `name` holding `text` to the tar archive `tar` (a source snapshot).
fn tar_with(tar: &std::path::Path, name: &str, text: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(name), text).unwrap();
    let copy = dir.path().join("s.tar");
    std::fs::copy(tar, &copy).unwrap();
    let status = std::process::Command::new("tar")
        .arg("-rf")
        .arg(&copy)
        .arg("-C")
        .arg(dir.path())
        .arg(name)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(&copy).unwrap()
}

#[test]
fn a_source_snapshot_is_checked_against_its_digest_and_only_its_influence_is_seen() {
    let Some(c) = cluster() else { return };
    let recipe =
        "[task.mk]\ninfluence = [\"Makefile\"]\nrun = \"make -s -f Makefile > {artifact}/out\"\n";
    let makefile = "-include local.mk\nall:\n\t@echo ${MSG}\nMSG ?= genuine\n";
    let ws = Workspace::with(recipe);
    ws.file("Makefile", makefile);
    let body = taken_request(&c, &ws, "mk");
    let mut request: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let digest = request["snapshot"].as_str().unwrap().to_string();
    let snapshot = c.server.file(&format!("cache/_sources/{digest}.tar"));
    let identity = request["identity"].as_str().unwrap().to_string();
    let w = c.worker();
    // Regression (issue 24): a snapshot was unpacked without being hashed, and
    // every entry extracted, so anyone who may upload to _sources/ had a worker
    // build with a local.mk of theirs, under the genuine identity.
    let forged = tar_with(&snapshot, "local.mk", "MSG = PWNED\n");
    let genuine = std::fs::read(&snapshot).unwrap();
    std::fs::write(&snapshot, &forged).unwrap();
    let reply = publish_for_reply(&c, &identity, &[&body]).unwrap();
    assert!(reply.contains("\"kind\":\"error\""), "{reply}");
    assert!(reply.contains(&format!("not the {digest}")), "{reply}");
    // The forged snapshot under its own digest, named by a forged request: its
    // local.mk is not the task's to see.
    std::fs::write(&snapshot, &genuine).unwrap();
    let forged_digest = {
        use sha2::Digest;
        jolt::testing::hex(&sha2::Sha256::digest(&forged))
    };
    std::fs::write(
        c.server
            .file(&format!("cache/_sources/{forged_digest}.tar")),
        &forged,
    )
    .unwrap();
    request["snapshot"] = serde_json::Value::String(forged_digest);
    let reply =
        publish_for_reply(&c, &identity, &[&serde_json::to_vec(&request).unwrap()]).unwrap();
    assert!(
        reply.contains("\"kind\":\"success\""),
        "{reply}\n{}",
        w.output()
    );
    let run = c.build(&ws, &["mk"]);
    run.success().lacks("Remote execution started");
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("out")).unwrap(),
        "genuine\n"
    );
}

#[test]
fn two_fleets_on_one_broker_each_build_an_identity_they_share() {
    let (Some(a), Some(b)) = (cluster(), cluster()) else {
        return;
    };
    let (wa, wb) = (a.worker(), b.worker());
    let recipe = "[task.shared]\nrun = \"sleep 1; echo two-fleets > {artifact}/out\"\n";
    let (wsa, wsb) = (Workspace::with(recipe), Workspace::with(recipe));
    // Regression (issue 24): the fleets' workers locked the identity against each
    // other, and each client heard the other fleet's replies: one client took the
    // other fleet's success and failed, the artifact not being in its cache.
    let (ca, cb) = (
        a.spawn_build(&wsa, &["shared"]),
        b.spawn_build(&wsb, &["shared"]),
    );
    let (ra, rb) = (finish(ca), finish(cb));
    for (run, w) in [(&ra, &wa), (&rb, &wb)] {
        run.success().lacks("no longer in the HTTP cache");
        assert!(
            w.output().contains("Execution started (shared "),
            "{}",
            w.output()
        );
        assert_eq!(
            std::fs::read_to_string(run.locations()[0].join("out")).unwrap(),
            "two-fleets\n"
        );
    }
}

#[test]
fn a_worker_refuses_a_request_of_another_cache_naming_both() {
    let (Some(a), Some(b)) = (cluster(), cluster()) else {
        return;
    };
    // A worker of fleet b on fleet a's pool: one broker vhost, one routing key.
    let wb = WorkerProcess::start(
        &b.config(),
        &[format!("amqp.routing_key={}", a.broker.routing_key)],
    );
    let recipe = "[task.stray]\nrun = \"echo stray > {artifact}/out\"\n";
    let ws = Workspace::with(recipe);
    // Fleet b's cache holds the same recipe bundle (the fleets build one workspace).
    let bundle = jolt::testing::RecipeBundle::new(&[jolt::testing::RecipeText {
        path: "jolt.toml".into(),
        text: recipe.into(),
    }]);
    let stored = b
        .server
        .file(&format!("cache/_recipes/{}.json", bundle.digest));
    std::fs::create_dir_all(stored.parent().unwrap()).unwrap();
    std::fs::write(&stored, &bundle.bytes).unwrap();
    // Regression (issue 24): the worker built the task and uploaded it into its own
    // cache, and the client, finding it in neither, said it was "no longer in the
    // HTTP cache".
    let run = a.build(&ws, &["stray"]);
    run.code(1)
        .contains("the request is another fleet's")
        .contains(&format!(
            "its client uses the HTTP cache {}/cache",
            a.server.url
        ))
        .contains(&format!("this worker {}/cache", b.server.url))
        .contains("a broker vhost of its own")
        .lacks("no longer in the HTTP cache")
        .lacks("storing it again");
    assert!(
        !wb.output().contains("Execution started"),
        "{}",
        wb.output()
    );
    assert!(
        !b.server
            .objects()
            .iter()
            .any(|o| o.starts_with("cache/stray/")),
        "{:?}",
        b.server.objects()
    );
}

#[test]
fn one_cache_named_two_ways_by_client_and_worker_is_one_fleet() {
    let Some(c) = cluster() else { return };
    // The client says 127.0.0.1, the worker localhost: two fleet digests, one cache.
    let w = WorkerProcess::start(
        &c.config(),
        &[format!("http.uri=http://localhost:{}/cache", c.server.port)],
    );
    let ws = Workspace::with("[task.named]\nrun = \"echo named > {artifact}/out\"\n");
    let run = c.build(&ws, &["named"]);
    run.success();
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("out")).unwrap(),
        "named\n"
    );
    // The client proved its cache with a mark, which the worker found in its own.
    let marks: Vec<String> = c
        .server
        .objects()
        .into_iter()
        .filter(|o| o.starts_with("cache/_recipes/fleet-"))
        .collect();
    assert_eq!(marks.len(), 1, "{marks:?}\n{}", w.output());
}

#[test]
fn a_fleet_mark_a_trim_took_is_stored_again() {
    let Some(c) = cluster() else { return };
    let ws = Workspace::with("[task.marked]\nrun = \"echo marked > {artifact}/out\"\n");
    let client = c.spawn_build(&ws, &["marked"]);
    wait_until("the request queued", Duration::from_secs(30), || {
        c.broker.queued() == Some(1)
    });
    let marks = c.server.file("cache/_recipes");
    for entry in std::fs::read_dir(&marks).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("fleet-") {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    // A worker that names the cache otherwise asks for the mark, and its client,
    // not finding it in its cache either, stores it again: no refusal.
    let w = WorkerProcess::start(
        &c.config(),
        &[format!("http.uri=http://localhost:{}/cache", c.server.port)],
    );
    let run = finish(client);
    run.success()
        .contains("found the fleet mark of marked")
        .contains("storing it again");
    assert!(
        w.output().contains("Execution started (marked "),
        "{}",
        w.output()
    );
}

#[test]
fn a_success_whose_artifact_is_not_in_the_cache_is_not_called_gone_from_it() {
    let Some(c) = cluster() else { return };
    let ws = Workspace::with("[task.ghost]\nrun = \"echo ghost > {artifact}/out\"\n");
    let identity = ws.identity("ghost");
    let client = c.spawn_build(&ws, &["ghost"]);
    wait_until("the request queued", Duration::from_secs(30), || {
        c.broker.queued() == Some(1)
    });
    // What a worker of another cache (or of an older jolt, without marks) answers.
    let fleet = jolt::testing::fleet_of(&format!("{}/cache", c.server.url));
    let reply = format!(
        "{{\"version\": 2, \"identity\": \"{identity}\", \"kind\": \"success\", \"worker\": \"elsewhere:1\", \"cache\": \"{fleet}\"}}"
    );
    c.broker.with_channel(|ch| {
        ch.exchange_declare_passive("jolt_results")
            .unwrap()
            .publish(amiquip::Publish::new(reply.as_bytes(), identity.as_str()))
            .unwrap()
    });
    // Regression (issue 24): the client said the artifact was "no longer in the HTTP
    // cache", where it had never been.
    finish(client)
        .code(1)
        .contains("is not in the HTTP cache, though elsewhere:1 said it built it")
        .lacks("no longer");
}

// Requests of a client that went away are not built (issue 14).

#[test]
fn the_requests_of_a_killed_client_are_not_built() {
    let Some(c) = cluster() else { return };
    let w = c.worker();
    let marker = c.dir.path().join("runs");
    let mut recipe = String::new();
    for t in 0..8 {
        recipe.push_str(&format!(
            "[task.t{t}]\nrun = [\"echo {t} >> {}\", \"sleep 1\"]\n",
            marker.display()
        ));
    }
    recipe.push_str(&alias("all", (0..8).map(|t| format!("t{t}"))));
    let ws = Workspace::with(&recipe);
    let mut client = c.spawn_build(&ws, &["all"]);
    wait_until("the first task", Duration::from_secs(30), || {
        marker.exists()
    });
    wait_until("every request queued", Duration::from_secs(30), || {
        c.broker.queued() == Some(7)
    });
    unsafe { libc::kill(client.id() as i32, libc::SIGKILL) };
    let _ = client.wait();
    wait_until("the queue to drain", Duration::from_secs(30), || {
        c.broker.queued() == Some(0)
    });
    std::thread::sleep(Duration::from_secs(2));
    let runs = std::fs::read_to_string(&marker).unwrap().lines().count();
    // Regression: a dead client's seven queued requests were all built.
    assert!(runs <= 2, "{runs} tasks ran:\n{}", w.output());
    assert!(
        w.output().contains("is gone; dropping the request"),
        "{}",
        w.output()
    );
}

// A worker asks whether anyone waits for a request (an `accepted` the broker may
// return) once per requester in a quarter of a second, not for every request
// (issue 12): the `accepted` a client gets for a short task is what the broker
// spent the most on per task after the lock. A build that runs longer is announced
// anyway.

#[test]
fn a_worker_tells_a_client_accepted_once_for_many_short_tasks_and_for_each_long_one() {
    let Some(c) = cluster() else { return };
    let mut recipe = String::new();
    for t in 0..20 {
        recipe.push_str(&format!("[task.short{t}]\nrun = \"true # short {t}\"\n"));
    }
    recipe.push_str(&alias("shorts", (0..20).map(|t| format!("short{t}"))));
    // Taken after `first`, whose `accepted` said the client is there: the worker
    // does not ask again, and announces the build once it has run a while (a
    // quarter of a second; its first `running` would come after `amqp.progress`,
    // here 1 s).
    recipe.push_str(
        "[task.first]\nrun = \"true # first\"\n[task.long]\nrequires = [\"first\"]\nrun = [\"sleep 0.8\", \"echo long > {artifact}/l\"]\n",
    );
    let ws = Workspace::with(&recipe);
    // A client heard from is taken to be there for a minute, and no build is
    // announced later: neither how fast one request follows another nor how long
    // a short build takes matters.
    let shorts = {
        let _w = WorkerProcess::start_with_env(
            &c.config(),
            &["amqp.progress=600".to_string()],
            &[
                ("JOLT_TEST_REQUESTER_KEPT_MS", "60000"),
                ("JOLT_TEST_ACCEPTED_AFTER_MS", "600000"),
            ],
        );
        c.build(&ws, &["-v", "shorts"])
    };
    shorts.success();
    let accepted = shorts.count("Remote execution accepted by");
    // Regression: every request was answered `accepted` (20 here).
    assert_eq!(accepted, 1, "{}", shorts.all());
    let _w = WorkerProcess::start_with_env(
        &c.config(),
        &[],
        &[("JOLT_TEST_REQUESTER_KEPT_MS", "60000")],
    );
    let long = c.build(&ws, &["-v", "long"]);
    long.success();
    assert!(heard_accepted(&long, "long"), "{}", long.all());
}

// A build whose request asked whether anyone waits (its `accepted` went out then)
// says `running` next after `amqp.progress`, not a quarter of a second after.

#[test]
fn a_build_announced_when_taken_sends_no_running_before_amqp_progress() {
    let Some(c) = cluster() else { return };
    let _w = WorkerProcess::start(&c.config(), &["amqp.progress=30".to_string()]);
    let ws = Workspace::with("[task.t]\nrun = [\"sleep 0.8\", \"echo t > {artifact}/t\"]\n");
    let identity = ws.identity("t");
    let kinds: Vec<String> = c.broker.with_channel(|ch| {
        let q = private_queue(ch);
        q.bind(
            &ch.exchange_declare_passive("jolt_results").unwrap(),
            identity.as_str(),
            amiquip::FieldTable::new(),
        )
        .unwrap();
        let heard = consume_all(&q);
        c.build(&ws, &["t"]).success();
        std::thread::sleep(Duration::from_millis(300));
        heard
            .receiver()
            .try_iter()
            .filter_map(|m| match m {
                amiquip::ConsumerMessage::Delivery(d) => {
                    let reply: serde_json::Value = serde_json::from_slice(&d.body).ok()?;
                    Some(reply["kind"].as_str()?.to_string())
                }
                _ => None,
            })
            .collect()
    });
    // Regression: `accepted`, then `running` 250 ms later, then `success`.
    assert_eq!(kinds, ["accepted", "success"]);
}

/// Whether a client's `-v` output says that a worker took `task`.
fn heard_accepted(run: &crate::util::Run, task: &str) -> bool {
    run.lines_with("Remote execution accepted by")
        .iter()
        .any(|l| l.contains(&format!("({task} ")))
}

// A client that binds to a build after its `accepted` went out hears `running`,
// and counts the task as running on that worker (found by an attacking helper: a
// second client showed it queued in the broker until it was done).

#[test]
fn a_client_that_comes_after_a_builds_accepted_counts_it_running_on_its_worker() {
    let Some(c) = cluster() else { return };
    let w = c.worker();
    // Long enough for the second client to start and bind while it runs.
    let recipe = "[task.slow]\nrun = [\"sleep 6\", \"echo s > {artifact}/s\"]\n";
    let a = Workspace::with(recipe);
    let b = a.sibling();
    let first = c.spawn_build(&a, &["-v", "slow"]);
    wait_until("the build to run a while", Duration::from_secs(30), || {
        w.output().contains("Request for slow")
    });
    std::thread::sleep(Duration::from_millis(600));
    let second = c.build(&b, &["-v", "slow"]);
    second.success();
    // Regression: `running` was not news of a worker running it.
    assert!(heard_accepted(&second, "slow"), "{}", second.all());
    finish(first).success();
}

// A request's `reply_to` is only a name: a worker publishes nothing to it (found
// by an attacking helper: a forged one had the worker send `accepted` into another
// application's queue, and build a request nobody waited for).

#[test]
fn a_forged_reply_to_has_nothing_published_to_it_and_nothing_built() {
    let Some(c) = cluster() else { return };
    let marker = c.dir.path().join("forged");
    let ws = Workspace::with(&format!(
        "[task.f]\nrun = [\"touch {}\", \"echo f > {{artifact}}/f\"]\n",
        marker.display()
    ));
    // A real request, left in the broker by a client that is gone.
    let mut client = c.spawn_build(&ws, &["f"]);
    wait_until("the request queued", Duration::from_secs(30), || {
        c.broker.queued() == Some(1)
    });
    unsafe { libc::kill(client.id() as i32, libc::SIGKILL) };
    let _ = client.wait();
    c.broker.with_channel(|ch| {
        use amiquip::{AmqpProperties, Publish};
        let foreign = private_queue(ch);
        let heard = consume_all(&foreign);
        let pool = ch
            .queue_declare_passive(format!("jolt_tasks_{}", c.broker.routing_key))
            .unwrap();
        let got = pool.get(false).unwrap().expect("the request");
        ch.basic_publish(
            "jolt_exchange",
            Publish::with_properties(
                &got.delivery.body,
                c.broker.routing_key.as_str(),
                AmqpProperties::default()
                    .with_delivery_mode(2)
                    .with_reply_to(foreign.name().to_string()),
            ),
        )
        .unwrap();
        got.ack(ch).unwrap();
        let w = c.worker();
        wait_until("the request dropped", Duration::from_secs(30), || {
            w.output().contains("is gone; dropping the request")
        });
        assert!(heard.receiver().try_recv().is_err(), "{}", w.output());
    });
    assert!(!marker.exists());
}

#[test]
fn a_network_build_with_the_cache_down_exits_3_and_sends_nothing() {
    let Some(c) = cluster() else { return };
    let ws = Workspace::with("[task.a]\nrun = \"true # network-5\"\n");
    let config = c.config().display().to_string();
    let run = ws.jolt(&[
        "-c",
        &config,
        "-c",
        "http.uri=http://127.0.0.1:9/cache",
        "build",
        "--network",
        "a",
    ]);
    // Regression: it said it would go on without the cache, sent its requests,
    // then exited 3.
    run.code(3)
        .contains("network builds need it")
        .lacks("going on without it");
    assert!(matches!(c.broker.queued(), None | Some(0)));
}

#[test]
fn a_broker_that_never_answers_exits_3_within_the_connect_timeout() {
    let Some(server) = Nginx::start() else { return };
    // Accepts the connection, never speaks AMQP.
    let silent = crate::util::FakeCache::start(crate::util::Fault::Hang);
    let port = silent
        .url
        .rsplit_once(':')
        .unwrap()
        .1
        .trim_end_matches("/cache");
    let ws = Workspace::with("[task.a]\nrun = \"true # network-6\"\n");
    let uri = format!("http.uri={}", server.url);
    let amqp_port = format!("amqp.port={port}");
    let started = Instant::now();
    ws.jolt(&[
        "-c",
        &uri,
        "-c",
        "amqp.host=127.0.0.1",
        "-c",
        &amqp_port,
        "-c",
        "amqp.connect_timeout=2",
        "build",
        "--network",
        "a",
    ])
    .code(3);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
}

// TLS to the broker, verified (issue 14).

#[test]
fn a_network_build_over_tls_to_the_broker() {
    let Some(c) = cluster() else { return };
    let Some(front) = crate::util::TlsBroker::start("localhost") else {
        return;
    };
    let tls = [
        format!("amqp.host=amqps://localhost:{}", front.port),
        format!("amqp.ca_file={}", front.ca.display()),
    ];
    let w = WorkerProcess::start(&c.config(), &tls);
    let ws = Workspace::with("[task.a]\nrun = \"echo tls > {artifact}/a\"\n");
    let overrides: Vec<&str> = tls.iter().map(String::as_str).collect();
    let run = finish(c.spawn_build_with(&ws, &overrides, &["a"]));
    run.success().contains("Remote execution finished");
    assert!(w.output().contains("amqps://localhost"), "{}", w.output());
    // Without the CA, the broker's certificate is refused: exit 3, naming the host.
    let no_ca = format!("amqp.host=amqps://localhost:{}", front.port);
    let other = Workspace::with("[task.b]\nrun = \"true\"\n");
    finish(c.spawn_build_with(&other, &[no_ca.as_str()], &["b"]))
        .code(3)
        .contains("localhost");
}

#[test]
fn a_broker_certificate_for_another_host_is_refused() {
    let Some(c) = cluster() else { return };
    let Some(front) = crate::util::TlsBroker::start("amqp.example") else {
        return;
    };
    let host = format!("amqp.host=amqps://localhost:{}", front.port);
    let ca = format!("amqp.ca_file={}", front.ca.display());
    let ws = Workspace::with("[task.a]\nrun = \"true # network-7\"\n");
    finish(c.spawn_build_with(&ws, &[host.as_str(), ca.as_str()], &["a"]))
        .code(3)
        .contains("localhost");
}

#[test]
fn a_worker_waits_for_its_cache_to_come_back_and_then_serves() {
    let Some(c) = cluster() else { return };
    let relay = crate::util::Relay::start(&format!("127.0.0.1:{}", c.server.port));
    let through_relay = format!("http.uri=http://127.0.0.1:{}/cache", relay.port);
    // With credentials, as workers have them: nginx answers the worker's probe of
    // `{uri}/` 403 (a directory without an index), which counted as "credentials
    // refused", so the worker waited forever (issue 23).
    let w = WorkerProcess::start_with_env(
        &c.config(),
        &[through_relay, "http.username=worker".into()],
        &[("JOLT_HTTP_PASSWORD", "secret")],
    );
    relay.set_up(false);
    // The worker finds its cache down: this request fails...
    let ws = Workspace::with(
        "[task.a]\nrun = \"true # network-8\"\n[task.b]\nrun = \"true # network-8\"\n",
    );
    c.build(&ws, &["a"]).code(1);
    // ...and the next one waits until the cache is back, instead of failing too.
    let client = c.spawn_build(&ws, &["b"]);
    wait_until("the worker to wait", Duration::from_secs(30), || {
        w.output().contains("waiting for it")
    });
    relay.set_up(true);
    finish(client).success();
    // Regression: a worker treated the cache as down for the rest of its life.
    assert!(w.output().contains("answers again"), "{}", w.output());
}

// Caches that stay within their size on machines that run for months (issue 15).

#[test]
fn a_long_running_workers_cache_keeps_to_its_size() {
    let Some(c) = cluster() else { return };
    let w = WorkerProcess::start(&c.config(), &["jolt.cachesize=300K".to_string()]);
    let mut recipe = String::new();
    for t in 0..10 {
        recipe.push_str(&format!(
            "[task.t{t}]\nrun = \"head -c 102400 /dev/zero > {{artifact}}/f{t}\"\n"
        ));
    }
    let names: Vec<String> = (0..10).map(|t| format!("t{t}")).collect();
    let ws = Workspace::with(&recipe);
    for name in &names {
        c.build(&ws, &["--no-download", name]).success();
    }
    let size: u64 = std::fs::read_dir(w.cache_dir())
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| crate::util::dir_size(&e.path()))
        .sum();
    // Regression: everything a worker ever used stayed "in use" (1.1 MB here).
    assert!(size <= 420 * 1024, "the worker's cache holds {size} bytes");
}

// The worker image runs tasks as an unprivileged user (issue 15).

#[test]
fn a_worker_running_as_an_unprivileged_user_builds_and_uploads() {
    let Some(c) = cluster() else { return };
    let Some(w) = WorkerProcess::start_unprivileged(&c.config(), 10001) else {
        return;
    };
    let ws =
        Workspace::with("[task.who]\nrun = \"id -u > {artifact}/uid; touch {builddir}/scratch\"\n");
    let run = c.build(&ws, &["who"]);
    run.success().contains("Remote execution finished");
    let uid = std::fs::read_to_string(run.locations()[0].join("uid")).unwrap();
    assert_eq!(uid.trim(), "10001");
    // Everything the worker keeps is its user's, so the cache volume of the image
    // (owned by that user) is all it needs to write.
    let mut files = 0;
    for entry in walkdir(&w.cache_dir()) {
        let meta = std::fs::symlink_metadata(&entry).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            10001,
            "{}",
            entry.display()
        );
        files += 1;
    }
    assert!(files > 3, "{files}");
}

#[test]
fn a_task_on_an_unprivileged_worker_finds_its_credentials_in_no_process() {
    // Regression (issue 24): a task walked up to its worker and read
    // `/proc/<worker>/environ`, JOLT_HTTP_PASSWORD and the broker password in it;
    // and `/proc/<worker>/cmdline`, open to every user, held a password given with
    // `-c` (the broker's, here).
    let http = format!("http-pw-{}", std::process::id());
    let amqp = format!("amqp-pw-{}", std::process::id());
    let Some(c) = crate::util::cluster_with_cache_auth(&format!("worker:{http}")) else {
        return;
    };
    let user = BrokerUser::add(&amqp);
    let credentials = [
        ("JOLT_HTTP_USERNAME", "worker"),
        ("JOLT_HTTP_PASSWORD", http.as_str()),
        ("JOLT_AMQP_USERNAME", user.name.as_str()),
    ];
    let on_the_command_line = [format!("amqp.password={amqp}")];
    let Some(_w) = WorkerProcess::start_unprivileged_with(
        &c.config(),
        10001,
        &on_the_command_line,
        &credentials,
    ) else {
        return;
    };
    // The task holds the passwords in two halves, so that its own command line
    // does not: it searches the environment and command line of every process it
    // may read (its ancestors and every jolt process among them), and notes the
    // jolt processes and ancestors it saw, and that its search finds what it seeks.
    let (h1, h2) = http.split_at(4);
    let (a1, a2) = amqp.split_at(4);
    let ws = Workspace::with(&format!(
        r#"[task.search]
run = """
printf '%s%s\n%s%s\n' {h1} {h2} {a1} {a2} > {{builddir}}/pattern
printf '%s%s' {h1} {h2} > {{builddir}}/probe
grep -q -F -f {{builddir}}/pattern {{builddir}}/probe && echo yes > {{artifact}}/search-works
touch {{artifact}}/found
for p in /proc/[0-9]*; do
  comm=$(cat $p/comm 2>/dev/null) || continue
  case $comm in jolt|jolt-guardian) echo $comm >> {{artifact}}/jolts ;; esac
  for f in environ cmdline; do
    if grep -q -a -F -f {{builddir}}/pattern $p/$f 2>/dev/null; then echo "$p/$f $comm" >> {{artifact}}/found; fi
  done
done
p=$$
while [ "$p" -gt 1 ]; do
  cat /proc/$p/comm >> {{artifact}}/ancestors
  p=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status)
done
id -u > {{artifact}}/uid
"""
"#
    ));
    let mut cmd = ws.command(&[
        "-c",
        &c.config().display().to_string(),
        "build",
        "--network",
    ]);
    cmd.arg("search")
        .env("JOLT_HTTP_USERNAME", "worker")
        .env("JOLT_HTTP_PASSWORD", &http);
    let run = ws.run(cmd);
    // The worker built with its credentials: it took the request from the broker
    // as its own user, and uploaded the artifact the client downloaded.
    run.success().contains("Remote execution finished");
    let artifact = &run.locations()[0];
    let read = |name: &str| std::fs::read_to_string(artifact.join(name)).unwrap();
    assert_eq!(read("uid").trim(), "10001");
    assert_eq!(read("search-works").trim(), "yes");
    assert_eq!(read("found"), "", "the task found a password");
    let jolts = read("jolts");
    assert!(jolts.lines().any(|l| l == "jolt"), "{jolts}");
    assert!(jolts.lines().any(|l| l == "jolt-guardian"), "{jolts}");
    let ancestors = read("ancestors");
    assert!(ancestors.lines().any(|l| l == "jolt"), "{ancestors}");
}

#[test]
fn a_worker_warns_of_a_password_its_configuration_file_holds() {
    // Issue 24: tasks run as the worker's user and read its configuration files;
    // only the environment keeps a credential from them.
    let Some(c) = cluster() else { return };
    let file = c.dir.path().join("with-passwords.conf");
    let config = std::fs::read_to_string(c.config()).unwrap();
    // The cluster's cache asks for no credential, and guest is the broker's.
    let config = config
        .replace(
            "[http]\n",
            "[http]\nusername = \"ci\"\npassword = \"file-s3cret\"\n",
        )
        .replace(
            "host = \"127.0.0.1\"",
            "host = \"amqp://guest:guest@127.0.0.1\"",
        );
    std::fs::write(&file, config).unwrap();
    let w = WorkerProcess::start(&file, &[]);
    let file = file.display();
    let out = w.output();
    assert!(out.contains(&format!("http.password comes from {file}, which the tasks this worker runs can read: give it in JOLT_HTTP_PASSWORD instead")), "{out}");
    assert!(out.contains(&format!("The password in amqp.host comes from {file}, which the tasks this worker runs can read: give it in JOLT_AMQP_PASSWORD instead")), "{out}");
    assert!(!out.contains("file-s3cret"), "{out}");
    drop(w);
    let in_the_environment = [
        ("JOLT_HTTP_USERNAME", "ci"),
        ("JOLT_HTTP_PASSWORD", "env-s3cret"),
        ("JOLT_AMQP_HOST", "amqp://guest:guest@127.0.0.1"),
    ];
    let w = WorkerProcess::start_with_env(&c.config(), &[], &in_the_environment);
    assert!(
        !w.output()
            .contains("which the tasks this worker runs can read"),
        "{}",
        w.output()
    );
}

/// What a task may read of the worker that runs it, run as `sh probe.sh BUILDDIR
/// ARTIFACT` followed by the two passwords, each in two halves (so that no command
/// line holds one). Into the artifact: the environment and command line of every
/// process, every configuration file a jolt process names with `-c` and those jolt
/// reads by itself, what the memory of its ancestors and of every jolt process
/// holds of the passwords, and what the files under `$HOME` (the worker's cache and
/// workspaces among them) hold of them. `search-works` says that a search of memory
/// finds a password in a process the task may read.
const PROBE: &str = r#"b=$1 a=$2
printf '%s%s\n%s%s\n' "$3" "$4" "$5" "$6" > "$b/pattern"
memory() {
  while read -r range perms rest; do
    case $perms in r*) ;; *) continue ;; esac
    case $range in ffffffffff*) continue ;; esac
    start=$((0x${range%-*} / 4096)); end=$((0x${range#*-} / 4096))
    dd if=/proc/$1/mem bs=4096 skip=$start count=$((end - start)) 2>/dev/null
  done < /proc/$1/maps
}
search() { grep -a -o -F -f "$b/pattern"; }
PROBE="$3$4" sleep 60 &
probe=$!
sleep 0.2
memory $probe 2>/dev/null | search | grep -q . && echo yes > "$a/search-works"
kill $probe; wait $probe
for p in /proc/[0-9]*; do
  cat $p/environ $p/cmdline >> "$a/processes" 2>/dev/null
  comm=$(cat $p/comm 2>/dev/null) || continue
  case $comm in jolt|jolt-guardian) ;; *) continue ;; esac
  echo "$comm" >> "$a/jolts"
  dd if=$p/mem bs=1 count=0 2>/dev/null && echo "$comm" >> "$a/mem-opened"
  memory ${p#/proc/} 2>/dev/null | search >> "$a/memory"
  tr '\0' '\n' < $p/cmdline | sed -n '/^-c$/{n;p}' >> "$b/given"
done
p=$PPID
while [ "$p" -gt 1 ]; do
  cat /proc/$p/comm >> "$a/ancestors"
  memory $p 2>/dev/null | search >> "$a/memory"
  p=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status)
done
for f in $(cat "$b/given") /etc/jolt/config.toml "${XDG_CONFIG_HOME:-$HOME/.config}/jolt/config.toml"; do
  [ -f "$f" ] && cat "$f" >> "$a/configs" && echo "$f" >> "$a/configs-read"
done
grep -r -a -o -F -f "$b/pattern" --exclude=pattern "$HOME" > "$b/home" 2>/dev/null
cp "$b/home" "$a/home"
id -u > "$a/uid"
"#;

#[test]
fn a_task_on_a_worker_as_the_image_runs_it_reads_no_credential_of_the_worker() {
    // Issue 24: the worker image's deployment, on one machine: a worker as uid
    // 10001, its credentials in its environment only (as docker/k8s/workers.yaml
    // gives them), its configuration in a file; a task of that uid tries every
    // way to its credentials it has, and ships what it read to the client.
    if !crate::util::running_as_root("to start a worker as the image's uid, 10001") {
        return;
    }
    let http = format!("image-http-{}", std::process::id());
    let amqp = format!("image-amqp-{}", std::process::id());
    let Some(c) = crate::util::cluster_with_cache_auth(&format!("worker:{http}")) else {
        return;
    };
    let user = BrokerUser::add(&amqp);
    let credentials = [
        ("JOLT_HTTP_USERNAME", "worker"),
        ("JOLT_HTTP_PASSWORD", http.as_str()),
        ("JOLT_AMQP_USERNAME", user.name.as_str()),
        ("JOLT_AMQP_PASSWORD", amqp.as_str()),
    ];
    let Some(w) = WorkerProcess::start_unprivileged_with(&c.config(), 10001, &[], &credentials)
    else {
        return;
    };
    assert!(
        !w.output().contains("can read: give it in"),
        "{}",
        w.output()
    );
    let (h1, h2) = http.split_at(6);
    let (a1, a2) = amqp.split_at(6);
    let ws = Workspace::with(&format!(
        "[task.probe]\ninfluence = [\"probe.sh\"]\nrun = \"sh probe.sh {{builddir}} {{artifact}} {h1} {h2} {a1} {a2}\"\n"
    ));
    ws.file("probe.sh", PROBE);
    let mut cmd = ws.command(&[
        "-c",
        &c.config().display().to_string(),
        "build",
        "--network",
        "probe",
    ]);
    cmd.env("JOLT_HTTP_USERNAME", "worker")
        .env("JOLT_HTTP_PASSWORD", &http);
    let run = ws.run(cmd);
    // The worker works with its credentials: it took the request from the broker
    // as its own user, and uploaded the artifact the client downloaded.
    run.success().contains("Remote execution finished");
    let artifact = &run.locations()[0];
    let read = |name: &str| std::fs::read_to_string(artifact.join(name)).unwrap_or_default();
    assert_eq!(read("uid").trim(), "10001");
    // The task searched where a password would be, and could read it there.
    assert_eq!(read("search-works").trim(), "yes");
    let jolts = read("jolts");
    assert!(jolts.lines().any(|l| l == "jolt"), "{jolts}");
    assert!(jolts.lines().any(|l| l == "jolt-guardian"), "{jolts}");
    assert!(
        read("ancestors").lines().any(|l| l == "jolt"),
        "{}",
        read("ancestors")
    );
    assert!(
        read("configs").contains(&c.broker.routing_key),
        "{}",
        read("configs-read")
    );
    // Nothing it read holds a credential.
    for entry in walkdir(artifact) {
        let Ok(bytes) = std::fs::read(&entry) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        for secret in [&http, &amqp] {
            assert!(
                !text.contains(secret.as_str()),
                "the task read {secret} into {}",
                entry.display()
            );
        }
    }
    // Non-dumpable: the memory of no jolt process opens to its user.
    assert_eq!(read("mem-opened"), "");
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.symlink_metadata().unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn a_worker_that_cannot_write_its_cache_exits_2_at_start() {
    use std::os::unix::fs::PermissionsExt;
    if !crate::util::running_as_root("to start a worker as another user") {
        return;
    }
    // A cache volume left by root, as a stack deployed before the worker image ran
    // as uid 10001 has: the worker used to take requests and fail every one.
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = top.path().join("cache");
    for sub in [".locks", ".refs", ".tmp"] {
        std::fs::create_dir_all(cache.join(sub)).unwrap();
    }
    let conf = top.path().join("worker.conf");
    std::fs::write(
        &conf,
        format!(
            "[http]\nuri = \"http://127.0.0.1:9/\"\n[jolt]\ncachedir = \"{}\"\n",
            cache.display()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.env("HOME", top.path())
        .env("XDG_CONFIG_HOME", top.path().join("config"))
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_jolt"))
        .arg("-c")
        .arg(&conf)
        .arg("amqp-worker");
    let run = Workspace::new().run(cmd);
    run.code(2)
        .contains(&format!("Cannot write the local cache {}", cache.display()))
        .contains("as uid 65534");
}

// Requests whose size does not grow with the workspace (issue 12).

#[test]
fn recipes_travel_by_digest_uploaded_once_and_parsed_once_per_worker() {
    let Some(c) = cluster() else { return };
    let _w = WorkerProcess::start(&c.config(), &[]);
    let mut recipe =
        String::from("[task.all]\nkind = \"alias\"\nrequires = [\"a\", \"b\", \"c\"]\n");
    for t in ["a", "b", "c"] {
        recipe.push_str(&format!(
            "[task.{t}]\nrun = \"echo digest-{t} > {{artifact}}/out\"\n"
        ));
    }
    // A workspace whose recipes are large: requests must not carry them.
    recipe.push_str(&format!("# {}\n", "x".repeat(200_000)));
    let ws = Workspace::with(&recipe);
    let recipes = |method: &str| {
        std::fs::read_to_string(c.server.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("\"{method} /")) && l.contains("/_recipes/"))
            // Not the client's fleet mark, stored beside its bundle, nor the workers'
            // delivery records.
            .filter(|l| !l.contains("/_recipes/fleet-") && !l.contains("/_recipes/started-"))
            .count()
    };
    c.build(&ws, &["all"]).success();
    assert_eq!(recipes("PUT"), 1, "the client stores its recipes once");
    assert_eq!(
        recipes("GET"),
        1,
        "the worker fetches them once for 3 tasks"
    );
    // Another build of the same workspace: the worker has them parsed already (the
    // client stores them again: a PUT per build).
    c.build(&ws, &["-s", "again", "all"]).success();
    assert_eq!(recipes("PUT"), 2);
    assert_eq!(recipes("GET"), 1);
    // Changed recipes are another bundle.
    ws.file(
        "jolt.toml",
        &recipe.replace("echo digest-a", "echo digest-A"),
    );
    c.build(&ws, &["all"]).success();
    assert_eq!(recipes("PUT"), 3);
    assert_eq!(recipes("GET"), 2);
    // A bundle gone bad on the server is replaced by the next build (a fresh worker
    // refused it for good before: the client saw it there and never stored it again).
    let bundles = c.server.file("cache/_recipes");
    for entry in std::fs::read_dir(&bundles).unwrap().flatten() {
        std::fs::write(entry.path(), b"garbage").unwrap();
    }
    drop(_w);
    let _fresh = c.worker();
    c.build(&ws, &["-s", "healed", "all"]).success();
}

#[test]
fn a_client_queues_every_ready_task_in_the_broker() {
    let Some(c) = cluster() else { return };
    let mut recipe = alias("all", (0..400).map(|t| format!("t{t}")));
    for t in 0..400 {
        recipe.push_str(&format!("[task.t{t}]\nrun = \"true\"\n"));
    }
    let ws = Workspace::with(&recipe);
    // No worker: what the client sends waits in the queue. Killed however the test
    // ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let client = Killed(c.spawn_build(&ws, &["all"]));
    // Regression (issue 12): at most 32 (then 64) requests were in flight, so a fleet
    // larger than that had idle workers while tasks were ready.
    wait_until("every ready task queued", Duration::from_secs(30), || {
        c.broker.queued() == Some(400)
    });
    // ...without a thread each: they wait for their replies on one (the pool and
    // the kept transfer threads make about 200 here; a thread each made over 400).
    let status = std::fs::read_to_string(format!("/proc/{}/status", client.0.id())).unwrap();
    let threads: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(
        threads < 300,
        "{threads} threads for 400 requests in flight"
    );
}

// Each test's task is its own: replies go to every client bound to an identity,
// whichever test's it is.

/// Lines of the cluster's nginx access log for `method` and a path containing `part`.
fn access(c: &crate::util::Cluster, method: &str, part: &str) -> usize {
    std::fs::read_to_string(c.server.dir.path().join("access.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("\"{method} /")) && l.contains(part))
        .count()
}

#[test]
fn a_task_built_on_a_worker_costs_two_checks_an_upload_and_a_download() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with("[task.t]\nrun = \"echo two-checks > {artifact}/out\"\n");
    let identity = ws.identity("t");
    c.build(&ws, &["t"]).success();
    // The client asks once, the worker once before it builds; the upload goes
    // without another check (issue 12: a HEAD before the PUT made three).
    assert_eq!(access(&c, "HEAD", &identity), 2);
    assert_eq!(access(&c, "PUT", &identity), 1);
    assert_eq!(access(&c, "GET", &identity), 1);
}

#[test]
fn a_request_for_an_artifact_in_the_http_cache_is_answered_without_a_build() {
    let Some(c) = cluster() else { return };
    let w = c.worker();
    let ws = Workspace::with("[task.t]\nrun = \"echo no-build > {artifact}/out\"\n");
    let identity = ws.identity("t");
    c.build(&ws, &["t"]).success();
    let recipes_fetched = access(&c, "GET", "/_recipes/");
    // A second client's request for it, sent before the first one's upload: the
    // worker answers from the cache (its recipes, a digest nobody stored, are not
    // even fetched).
    let body = format!(
        "{{\"version\": 2, \"identity\": \"{identity}\", \"task\": \"t\", \"reference\": \"t\", \"recipes\": \"{}\"}}",
        "0".repeat(64)
    );
    let reply = publish_for_reply(&c, &identity, &[body.as_bytes()])
        .unwrap_or_else(|| panic!("no reply:\n{}", w.output()));
    assert!(reply.contains("\"kind\":\"success\""), "{reply}");
    assert!(
        w.output().contains("is in the HTTP cache already"),
        "{}",
        w.output()
    );
    assert_eq!(access(&c, "GET", "/_recipes/"), recipes_fetched);
}

#[test]
fn a_worker_fetches_a_requirement_it_lacks_with_one_get() {
    let Some(c) = cluster() else { return };
    let ws = Workspace::with(
        "[task.req]\nrun = \"echo one-get > {artifact}/r\"\n[task.top]\nrequires = [\"req\"]\nrun = \"cat {deps.req}/r > {artifact}/t\"\n",
    );
    let req = ws.identity("req");
    {
        let _w = c.worker();
        c.build(&ws, &["top"]).success();
    }
    // A fresh worker lacks `req`: it asks the HTTP cache for it with its GET alone
    // (issue 12: a HEAD went before each).
    let _fresh = c.worker();
    let (heads, gets) = (access(&c, "HEAD", &req), access(&c, "GET", &req));
    c.build(&ws, &["-f", "top"]).success();
    assert_eq!(access(&c, "GET", &req), gets + 1);
    assert!(
        access(&c, "HEAD", &req) <= heads + 1,
        "the worker asked with HEAD before its GET"
    );
}

#[test]
fn a_worker_interrupted_while_it_asks_the_cache_leaves_the_request_for_another() {
    let Some(c) = cluster() else { return };
    // The worker's cache hangs: its check before the lock never ends.
    let hung = crate::util::FakeCache::start(crate::util::Fault::Hang);
    let w = WorkerProcess::start(&c.config(), &[format!("http.uri={}", hung.url)]);
    let ws = Workspace::with("[task.a]\nrun = \"echo left > {artifact}/a\"\n");
    let client = c.spawn_build(&ws, &["a"]);
    wait_until("the worker to ask", Duration::from_secs(30), || {
        hung.requests.load(std::sync::atomic::Ordering::SeqCst) > 0
    });
    w.signal(libc::SIGINT);
    // Regression: the interrupted check became an error reply, and the client failed.
    let _other = c.worker();
    finish(client).success();
}

#[test]
fn a_failure_stops_a_network_build_without_waiting_for_what_waits_in_the_broker() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    // 30 tasks of a pool no worker serves wait in the broker; `bad` fails.
    let idle = format!("{}-idle", c.broker.routing_key);
    let mut recipe = String::from("[task.bad]\nrun = \"exit 1 # withdraw\"\n");
    recipe.push_str(&alias(
        "all",
        std::iter::once("bad".to_string()).chain((0..30).map(|t| format!("t{t}"))),
    ));
    for t in 0..30 {
        recipe.push_str(&format!(
            "[task.t{t}]\nrouting_key = \"{idle}\"\nrun = \"echo {t} withdrawn\"\n"
        ));
    }
    let ws = Workspace::with(&recipe);
    let client = c.spawn_build(&ws, &["all"]);
    // Regression (issue 12): with every ready task queued, the client waited for
    // them all after the failure (here: for ever).
    let run = finish_within(client, Duration::from_secs(60), "the client");
    c.broker.with_channel(|ch| {
        let _ = ch.queue_delete(format!("jolt_tasks_{idle}"), Default::default());
    });
    // (Those parked after the failure are withdrawn as they come.)
    run.code(1).contains("Withdrawing ");
}

// Withdrawn requests are not built while the client waits for the tasks that run
// (found by an attacking helper: their bindings stayed, so a worker that took one
// before the client ended found someone waiting and built it).

#[test]
fn withdrawn_requests_are_not_built_while_the_client_waits_for_running_ones() {
    let Some(c) = cluster() else { return };
    let workers = (c.worker(), c.worker());
    let later = format!("{}-later", c.broker.routing_key);
    let marker = c.dir.path().join("withdrawn");
    let mut recipe = String::from(
        "[task.bad]\nrun = [\"sleep 0.5\", \"exit 1\"]\n[task.slow]\nrun = [\"sleep 5\", \"echo s > {artifact}/s\"]\n",
    );
    let tasks = ["bad".to_string(), "slow".to_string()];
    recipe.push_str(&alias(
        "all",
        tasks.into_iter().chain((0..5).map(|t| format!("t{t}"))),
    ));
    for t in 0..5 {
        recipe.push_str(&format!(
            "[task.t{t}]\nrouting_key = \"{later}\"\nrun = [\"echo {t} >> {}\", \"echo {t} > {{artifact}}/t\"]\n",
            marker.display()
        ));
    }
    let ws = Workspace::with(&recipe);
    let client = c.spawn_build(&ws, &["all"]);
    let waiting_later = || {
        c.broker.with_channel(|ch| {
            ch.queue_declare_passive(format!("jolt_tasks_{later}"))
                .ok()
                .and_then(|q| q.declared_message_count())
        })
    };
    wait_until("the later pool's requests", Duration::from_secs(30), || {
        waiting_later() == Some(5)
    });
    wait_until("bad to fail", Duration::from_secs(30), || {
        workers.0.output().contains("Reply Failed for bad")
            || workers.1.output().contains("Reply Failed for bad")
    });
    // The client withdraws the five, and waits for slow a few seconds more.
    std::thread::sleep(Duration::from_secs(1));
    let w = WorkerProcess::start(&c.config(), &[format!("amqp.routing_key={later}")]);
    wait_until("the later pool to drain", Duration::from_secs(30), || {
        waiting_later() == Some(0)
    });
    let run = finish_within(client, Duration::from_secs(60), "the client");
    c.broker.with_channel(|ch| {
        let _ = ch.queue_delete(format!("jolt_tasks_{later}"), Default::default());
    });
    run.code(1).contains("Withdrawing 5 requests");
    assert!(!marker.exists(), "{}", w.output());
}

#[test]
fn a_reply_that_comes_before_its_request_is_parked_is_not_lost() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with("[task.a]\nrun = \"echo early > {artifact}/a\"\n");
    // The client holds each request between its publication and its parking with
    // the waiter: the worker answers in between.
    let config = c.config().display().to_string();
    let client = ws
        .command(&["-c", &config, "build", "--network", "a"])
        .env("JOLT_TEST_PARK_PAUSE_MS", "1500")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Regression: the reply went to a waiter that did not know the call yet, and
    // the client waited for ever.
    finish_within(client, Duration::from_secs(30), "the client").success();
}

#[test]
fn tasks_on_one_lock_shard_run_side_by_side_and_each_runs_once() {
    let Some(c) = cluster() else { return };
    // Every identity on one lock shard: each lock after the first is taken by
    // asking the shard's holder whether it builds the same identity.
    let _workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::start_with_env(&c.config(), &[], &[("JOLT_TEST_LOCK_SHARDS", "1")]))
        .collect();
    let log = c.dir.path().join("runs");
    let task = |name: &str| {
        format!(
            "[task.{name}]\nrun = [\"echo {name}-start >> {0}\", \"sleep 2\", \"echo {name}-end >> {0}\"]\n",
            log.display()
        )
    };
    let recipe = format!("{}{}", task("shard_x"), task("shard_y"));
    let (one, two) = (Workspace::with(&recipe), Workspace::with(&recipe));
    let first = c.spawn_build(&one, &["shard_x", "shard_y"]);
    let second = c.spawn_build(&two, &["shard_x", "shard_y"]);
    finish_within(first, Duration::from_secs(60), "the first client").success();
    finish_within(second, Duration::from_secs(60), "the second client").success();
    let runs = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = runs.lines().collect();
    let mut sorted = lines.clone();
    sorted.sort();
    // Each once, although both clients asked for both.
    assert_eq!(
        sorted,
        [
            "shard_x-end",
            "shard_x-start",
            "shard_y-end",
            "shard_y-start"
        ],
        "{runs}"
    );
    // Side by side: the second task did not wait for the first one's lock.
    assert!(lines[..2].iter().all(|l| l.ends_with("-start")), "{runs}");
}

#[test]
fn a_worker_keeps_its_broker_connection_over_many_tasks() {
    let Some(c) = cluster() else { return };
    let w = c.worker();
    let mut recipe: String = (0..40)
        .map(|i| format!("[task.keep{i}]\nrun = \"echo keep{i} > {{artifact}}/out\"\n"))
        .collect();
    recipe.push_str(&alias("all", (0..40).map(|i| format!("keep{i}"))));
    let ws = Workspace::with(&recipe);
    c.build(&ws, &["all"]).success();
    // Regression: a lock's consumer dropped before amiquip's I/O thread had handed
    // it its cancellation was an internal error that closed the connection.
    let output = w.output();
    assert_eq!(output.matches("Connected to").count(), 1, "{output}");
    assert!(!output.contains("internal error"), "{output}");
}

#[test]
fn a_duplicate_that_comes_while_the_holder_uploads_is_not_built_again() {
    let Some(c) = cluster() else { return };
    // Each worker waits half a second before it takes a lock.
    let pause = [("JOLT_TEST_LOCK_PAUSE_MS", "500")];
    let workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::start_with_env(&c.config(), &[], &pause))
        .collect();
    let log = c.dir.path().join("runs");
    let recipe = format!(
        "[task.late_duplicate]\nrun = \"echo run >> {}\"\n[task.keepalive]\nrun = \"sleep 3\"\n",
        log.display()
    );
    let (one, two) = (Workspace::with(&recipe), Workspace::with(&recipe));
    let first = c.spawn_build(&one, &["late_duplicate"]);
    // The second request reaches another worker while the first is built and
    // uploaded, and takes the lock after the first worker let go of it; its
    // client still waits (for keepalive), so it is not dropped as unwanted.
    std::thread::sleep(Duration::from_millis(250));
    let second = c.spawn_build(&two, &["late_duplicate", "keepalive"]);
    finish_within(first, Duration::from_secs(60), "the first client").success();
    finish_within(second, Duration::from_secs(60), "the second client").success();
    // Regression: the cache was asked before the lock, so a worker that asked
    // before the holder's upload and locked after its release built the task again.
    let outputs = || workers.iter().map(|w| w.output()).collect::<String>();
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "run\n",
        "{}",
        outputs()
    );
}

#[test]
fn a_task_whose_lock_something_else_holds_fails_instead_of_waiting_for_ever() {
    let Some(c) = cluster() else { return };
    let ws = Workspace::with("[task.squatted]\nrun = \"true # squatted\"\n");
    let lock = c.lock_queue(&ws.identity("squatted"));
    // Not a worker's lock: a plain queue by that name, which never goes away.
    c.broker.with_channel(|ch| {
        ch.queue_declare(lock.clone(), amiquip::QueueDeclareOptions::default())
            .unwrap();
    });
    let _w = c.worker();
    let client = c.spawn_build_with(&ws, &["amqp.heartbeat=3"], &["squatted"]);
    // Regression: every worker took the request for a duplicate, and the client sent
    // it again every four silent progress intervals, for ever.
    finish_within(client, Duration::from_secs(90), "the client")
        .code(1)
        .contains("No worker runs squatted")
        .contains(&lock);
    c.broker.with_channel(|ch| {
        ch.queue_delete(lock, amiquip::QueueDeleteOptions::default())
            .unwrap();
    });
}

#[test]
fn a_worker_builds_in_the_workspace_a_build_left_as_it_was_and_only_there() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    // One after another on the one worker, each requiring the one before; each
    // records when its workspace's recipe file was written (the workspace's path
    // is new for each request).
    let ws = Workspace::with(
        "[task.kept_ws_a]\nrun = \"stat -c %z {root}/jolt.toml > {artifact}/written\"\n\
         [task.kept_ws_b]\nrequires = [\"kept_ws_a\"]\n\
         run = \"stat -c %z {root}/jolt.toml > {artifact}/written; touch {root}/litter\"\n\
         [task.kept_ws_c]\nrequires = [\"kept_ws_b\"]\n\
         run = [\"stat -c %z {root}/jolt.toml > {artifact}/written\", \"test ! -e {root}/litter\", \"chmod 555 {root}\"]\n\
         [task.kept_ws_d]\nrequires = [\"kept_ws_c\"]\n\
         run = [\"stat -c %z {root}/jolt.toml > {artifact}/written\", \"test $(stat -c %a {root}) != 555\"]\n",
    );
    c.build(&ws, &["kept_ws_a", "kept_ws_b", "kept_ws_c", "kept_ws_d"])
        .success();
    let written = |task: &str| {
        let dir = ws.artifacts(task).pop().expect(task);
        std::fs::read_to_string(dir.join("written")).unwrap()
    };
    // Regression: each request's workspace was made, written and deleted anew.
    assert_eq!(written("kept_ws_a"), written("kept_ws_b"));
    // One that a build changed is not used again: not for what it holds (c found no
    // litter), nor for the directory's own mode (d found it as made).
    assert_ne!(written("kept_ws_b"), written("kept_ws_c"));
    assert_ne!(written("kept_ws_c"), written("kept_ws_d"));
}

#[test]
fn a_process_an_earlier_build_left_running_does_not_write_into_a_later_ones_workspace() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with(
        "[task.left_running]\n\
         run = \"setsid -f sh -c 'sleep 1; echo injected > {root}/config.h' </dev/null >/dev/null 2>&1\"\n\
         [task.later_build]\nrequires = [\"left_running\"]\n\
         run = [\"sleep 2\", \"test ! -e {root}/config.h\"]\n",
    );
    // Regression: the later build ran in the kept workspace by its old path, which
    // the process left running wrote into.
    c.build(&ws, &["later_build"]).success();
}

#[test]
fn the_cache_log_tells_a_workers_requests_from_its_clients() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with("[task.agent_told]\nrun = \"echo told > {artifact}/out\"\n");
    c.build(&ws, &["agent_told"]).success();
    let log = std::fs::read_to_string(c.server.dir.path().join("access.log")).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("/agent_told/")).collect();
    // The worker's upload says it comes from a worker; the client's download does not.
    let put = lines.iter().find(|l| l.contains("\"PUT ")).expect("a PUT");
    assert!(put.contains("(worker)\""), "{log}");
    let get = lines.iter().find(|l| l.contains("\"GET ")).expect("a GET");
    assert!(
        get.contains("\"jolt/") && !get.contains("(worker)"),
        "{log}"
    );
}

#[test]
fn a_result_names_each_tasks_status_as_the_readme_lists_them() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with(GRAPH);
    ws.file("src/a.c", "int a;");
    c.build(&ws, &["lib:n=1"]).success();
    let fresh = ws.sibling();
    c.build(&fresh, &["app", "--result", "r.json"]).success();
    let report: serde_json::Value = serde_json::from_str(&fresh.read("r.json")).unwrap();
    let status = |name: &str| -> String {
        report["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["qualified"] == name || t["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {report}"))["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Regression (issue 23): a requirement found in the HTTP cache and not
    // downloaded was `remote`, a status the README did not list (and a word that
    // means built on a worker).
    assert_eq!(status("src"), "in http cache", "{report}");
    assert_eq!(status("app"), "executed", "{report}");
    let readme = include_str!("../README.md");
    for task in report["tasks"].as_array().unwrap() {
        let s = task["status"].as_str().unwrap();
        assert!(
            readme.contains(&format!("`{s}`")),
            "README lacks the status {s}"
        );
    }
}

#[test]
fn a_failed_remote_task_is_reported_with_the_time_it_ran() {
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with("[task.slow_failure]\nrun = \"sleep 1.2; exit 3\"\n");
    let run = c.build(&ws, &["slow_failure", "--result", "r.json"]);
    run.code(1).contains("Remote execution failed after 01s");
    let report: serde_json::Value = serde_json::from_str(&ws.read("r.json")).unwrap();
    // Regression: the client had not seen it start, and reported 0.
    let duration = report["tasks"][0]["duration"].as_f64().unwrap();
    assert!((1.2..60.0).contains(&duration), "{report}");
}

#[test]
fn a_cache_that_goes_away_while_a_worker_builds_stops_the_network_build_with_exit_3() {
    let Some(mut c) = cluster() else { return };
    let _w = c.worker();
    let started = c.dir.path().join("started");
    let ws = Workspace::with(&format!(
        "[task.cache_gone]\nrun = [\"touch {}\", \"sleep 2\", \"echo x > {{artifact}}/out\"]\n",
        started.display()
    ));
    let client = c.spawn_build(&ws, &["cache_gone"]);
    wait_until("the task to start", Duration::from_secs(30), || {
        started.exists()
    });
    c.server.stop();
    // Regression: the worker's upload failed, and the client failed the task with
    // exit 1, where a network build that cannot reach its cache is exit 3.
    let run = finish_within(client, Duration::from_secs(120), "the client");
    run.code(3).contains("The HTTP cache is unreachable");
}

/// A RabbitMQ user of this test's own, with all permissions on `/`; deleted when
/// dropped.
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    fn add(password: &str) -> BrokerUser {
        // One per test of this process: tests run side by side.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("jolt-test-{}-{next}", std::process::id());
        let ctl = |args: &[&str]| {
            let out = std::process::Command::new("rabbitmqctl")
                .args(args)
                .output()
                .expect("rabbitmqctl");
            assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
        };
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &name])
            .output();
        ctl(&["add_user", &name, password]);
        ctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        BrokerUser { name }
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// Every file under `dir`, read.
fn read_tree(dir: &std::path::Path) -> String {
    let mut text = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    text
}

#[test]
fn a_password_in_amqp_host_connects_and_is_never_shown() {
    // Regression (issue 24): `amqp://user:pw@host` was read as the host
    // `user:pw@host`, and printed in full by connection errors, the worker's start
    // line and reconnect warnings, jolt status and the run log.
    const SECRET: &str = "SECRET-pw-77";
    let Some(c) = cluster() else { return };
    let user = BrokerUser::add(SECRET);
    let host = format!("amqp.host=amqp://{}:{SECRET}@127.0.0.1", user.name);
    let w = WorkerProcess::start(&c.config(), std::slice::from_ref(&host));
    w.wait_for("from amqp://127.0.0.1:5672/", Duration::from_secs(5));
    let ws = Workspace::with("[task.a]\nrun = \"echo a > {artifact}/a\"\n");
    let config = c.config().display().to_string();
    let run = ws.jolt(&["-vv", "-c", &config, "-c", &host, "build", "--network", "a"]);
    run.success()
        .contains("Remote execution finished")
        .lacks(SECRET);
    ws.jolt(&["-c", &config, "-c", &host, "status"])
        .success()
        .lacks(SECRET);
    // The same with nothing listening on the port: the client, status, and a worker
    // that keeps trying.
    let wrong = format!("amqp.host=amqp://{}:{SECRET}@127.0.0.1:1", user.name);
    let run = ws.jolt(&["-c", &config, "-c", &wrong, "build", "--network", "a"]);
    run.code(3).contains("amqp://127.0.0.1:1/").lacks(SECRET);
    ws.jolt(&["-c", &config, "-c", &wrong, "status"])
        .lacks(SECRET);
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_jolt"));
    let worker = worker
        .args(["-c", &config, "-c", &wrong, "amqp-worker"])
        .env("JOLT_JOLT_CACHEDIR", c.dir.path().join("wcache"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    unsafe { libc::kill(worker.id() as i32, libc::SIGKILL) };
    let out = finish(worker);
    assert!(out.all().contains("amqp://127.0.0.1:1/"), "{}", out.all());
    out.lacks(SECRET);
    // A password the broker refuses is not shown either.
    let refused = format!("amqp.host=amqp://{}:WRONG-pw-88@127.0.0.1", user.name);
    ws.jolt(&["-c", &config, "-c", &refused, "build", "--network", "a"])
        .code(3)
        .contains(&format!("refused user '{}'", user.name))
        .lacks("WRONG-pw-88");
    // Written without a scheme, in the environment: tasks do not inherit it.
    let local = Workspace::with("[task.e]\nrun = \"env > {artifact}/env\"\n");
    let mut cmd = local.command(&["build", "e"]);
    cmd.env(
        "JOLT_AMQP_HOST",
        format!("{}:{SECRET}@127.0.0.1", user.name),
    );
    let run = local.run(cmd);
    run.success();
    let env = std::fs::read_to_string(run.locations()[0].join("env")).unwrap();
    assert!(!env.contains(SECRET), "{env}");
    let logs = read_tree(&ws.state_home()) + &read_tree(&local.state_home());
    assert!(logs.contains("amqp://127.0.0.1:1/"), "{logs}");
    assert!(!logs.contains(SECRET), "{logs}");
    assert!(!logs.contains("WRONG-pw-88"), "{logs}");
}

#[test]
fn a_build_stores_its_recipes_and_snapshot_again_when_a_worker_finds_them_gone() {
    let Some(c) = cluster() else { return };
    let ws =
        Workspace::with("[task.t]\ninfluence = [\"in.txt\"]\nrun = \"cp in.txt {artifact}/out\"\n");
    ws.file("in.txt", "stored again\n");
    // No worker yet: the request waits in the queue, its bundle and snapshot stored.
    let client = c.spawn_build(&ws, &["t"]);
    wait_until("the request", Duration::from_secs(30), || {
        c.broker.queued() == Some(1)
    });
    // Regression (issue 24): `jolt cache trim` took a running build's bundle (and
    // snapshot), a worker that had not parsed it failed the request, `the recipes
    // are not in the HTTP cache`, and the client never stored it again.
    for dir in ["cache/_recipes", "cache/_sources"] {
        let entries: Vec<_> = std::fs::read_dir(c.server.file(dir))
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with("fleet-"))
            .collect();
        assert_eq!(entries.len(), 1, "{dir}");
        std::fs::remove_file(entries[0].path()).unwrap();
    }
    let w = c.worker();
    let run = finish_within(client, Duration::from_secs(60), "the build");
    run.success()
        .contains("found the recipe bundle of t")
        .contains("found the source snapshot of t")
        .contains("missing from the HTTP cache: storing it again");
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("out")).unwrap(),
        "stored again\n",
        "{}",
        w.output()
    );
}

#[test]
fn a_requirement_gone_from_the_cache_before_a_worker_needs_it_is_built_again() {
    let Some(c) = cluster() else { return };
    let ws = Workspace::with(
        "[task.a]\nrun = \"echo a > {artifact}/a\"\n\
         [task.app]\nrequires = [\"a\"]\nrun = \"cat {deps.a}/a > {artifact}/out\"\n",
    );
    {
        let _w = c.worker();
        c.build(&ws, &["a"]).success();
    }
    // No worker: the client has planned `a` as in the HTTP cache, and its request
    // for `app` waits in the queue.
    let client = c.spawn_build(&ws, &["app"]);
    wait_until("the request", Duration::from_secs(30), || {
        c.broker.queued() == Some(1)
    });
    // What a trim, an operator or a cache shard that went down does meanwhile.
    let archives: Vec<_> = std::fs::read_dir(c.server.file("cache/a"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(archives.len(), 1);
    std::fs::remove_file(archives[0].path()).unwrap();
    // Regression (issue 25): the worker failed `app`, `requirement a is
    // unavailable`, and with it the build; a miss is built again.
    let w = c.worker();
    let run = finish_within(client, Duration::from_secs(60), "the build");
    run.success()
        .contains("found a")
        .contains("in no cache: building it again");
    assert_eq!(run.count("Remote execution finished"), 2, "{}", run.all());
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("out")).unwrap(),
        "a\n",
        "{}",
        w.output()
    );
    assert_eq!(
        std::fs::read_dir(c.server.file("cache/a")).unwrap().count(),
        1
    );
}

/// The digest a recipe bundle holding `files` (`(path, text)`) is stored under, once
/// stored in `c`'s HTTP cache.
fn store_bundle(c: &crate::util::Cluster, files: &[(&str, &str)]) -> String {
    use sha2::Digest;
    let files: Vec<serde_json::Value> = files
        .iter()
        .map(|(path, text)| serde_json::json!({ "path": path, "text": text }))
        .collect();
    let bytes = serde_json::to_vec(&files).unwrap();
    let digest = jolt::testing::hex(&sha2::Sha256::digest(&bytes));
    let path = c.server.file(&format!("cache/_recipes/{digest}.json"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    digest
}

/// The peak resident memory of process `pid`, in KiB.
fn peak_memory_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn recipes_beyond_the_limits_get_an_error_reply_and_leave_the_worker_small() {
    let Some(c) = cluster() else { return };
    let ws = Workspace::with("[task.ok]\nrun = \"true\"\n");
    let genuine = taken_request(&c, &ws, "ok");
    let genuine: serde_json::Value = serde_json::from_slice(&genuine).unwrap();
    let w = c.worker();
    // Regression (issue 24): a forged bundle of 62 MB, a chain of 1.2 million tasks
    // requested without pins, took a worker from 82 MB to 4 GB within 30 s, and
    // the request went on to two more workers.
    let tree = crate::util::parameter_tree(17);
    let comment = |bytes: usize| format!("# {}\n", "x".repeat(bytes));
    let forged = [
        // Twice the tasks a graph may hold.
        (
            store_bundle(&c, &[("jolt.toml", &tree)]),
            "l0",
            "has more than 100000 tasks (the limit)",
        ),
        // More recipe text than a workspace may hold: the worker reads no further.
        (
            store_bundle(&c, &[("jolt.toml", &(tree.clone() + &comment(17 << 20)))]),
            "l0",
            "jolt.toml: the recipes are larger than 16777216 bytes (the limit)",
        ),
        // A bundle larger than any workspace's: the worker downloads no further.
        (
            store_bundle(&c, &[("jolt.toml", &comment(34 << 20))]),
            "l0",
            "the recipe bundle is larger than 34603008 bytes (the limit)",
        ),
    ];
    for (n, (digest, goal, error)) in forged.iter().enumerate() {
        let identity = format!("{n}").repeat(64);
        let mut request = genuine.clone();
        request["recipes"] = serde_json::json!(digest);
        request["task"] = serde_json::json!(goal);
        request["reference"] = serde_json::json!(goal);
        request["identity"] = serde_json::json!(identity);
        request["pins"] = serde_json::json!({});
        let start = Instant::now();
        let body = serde_json::to_vec(&request).unwrap();
        let reply = publish_for_reply(&c, &identity, &[&body]).expect("a reply");
        assert!(
            reply.contains("\"kind\":\"error\"") && reply.contains(error),
            "{reply}\n{}",
            w.output()
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }
    // Acked: no request waits for another worker.
    wait_until("the queue to drain", Duration::from_secs(10), || {
        c.broker.queued() == Some(0)
    });
    let peak = peak_memory_kib(w.child.id());
    assert!(peak < 300 << 10, "the worker's peak memory: {peak} KiB");
    // The worker is still serving.
    c.build(&ws, &["ok"]).success();
}

#[test]
fn a_fast_task_run_here_never_reads_a_changed_requirement() {
    use std::os::unix::fs::PermissionsExt;
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = Workspace::with(
        "[task.dep]\nrun = \"echo genuine > {artifact}/f\"\n[task.quick]\nfast = true\nrequires = [\"dep\"]\nrun = \"cat {deps.dep}/f > {artifact}/f\"\n",
    );
    c.build(&ws, &["quick"]).success();
    let dir = ws.jolt(&["build", "dep"]).success().locations()[0].clone();
    std::fs::set_permissions(dir.join("f"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(dir.join("f"), "PWNED\n").unwrap();
    // Issue 24, item 1: planning hashes what executions here read in local builds
    // and on workers; a fast task a network build runs here read the changed copy.
    let run = c.build(&ws, &["-f", "quick"]);
    run.success();
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("f")).unwrap(),
        "genuine\n",
        "{}",
        run.stderr
    );
}
