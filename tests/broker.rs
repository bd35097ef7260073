//! Network builds across broker trouble: a restart while a client waits, a task that
//! outlives RabbitMQ's consumer_timeout, a worker's connection closed mid-task. Those
//! that change the broker for everyone hold it alone (`cluster_exclusive`).

use crate::util::{cluster_exclusive, finish, wait_until, Relay, WorkerProcess, Workspace};
use std::process::Command;
use std::time::Duration;

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// Restores the broker's consumer_timeout (default 30 minutes) when dropped.
struct ConsumerTimeout;

impl ConsumerTimeout {
    fn set(ms: u64) -> ConsumerTimeout {
        rabbitmqctl(&[
            "eval",
            &format!("application:set_env(rabbit, consumer_timeout, {ms})."),
        ]);
        ConsumerTimeout
    }
}

impl Drop for ConsumerTimeout {
    fn drop(&mut self) {
        rabbitmqctl(&[
            "eval",
            "application:set_env(rabbit, consumer_timeout, 1800000).",
        ]);
    }
}

#[test]
fn a_broker_restart_while_the_client_waits_loses_nothing() {
    let Some(c) = cluster_exclusive() else {
        return;
    };
    let worker = c.worker();
    let marker = c.dir.path().join("started");
    let ws = Workspace::with(&format!(
        "[task.slow]\nrun = [\"echo run >> {}\", \"sleep 3\", \"echo done > {{artifact}}/f\"]\n[task.top]\nrequires = [\"slow\"]\nrun = \"cp {{deps.slow}}/f {{artifact}}/f\"\n",
        marker.display()
    ));
    let client = c.spawn_build(&ws, &["top"]);
    wait_until("the task to start", Duration::from_secs(30), || {
        marker.exists()
    });
    rabbitmqctl(&["stop_app"]);
    std::thread::sleep(Duration::from_secs(1));
    rabbitmqctl(&["start_app"]);
    let run = finish(client);
    run.success();
    let top = std::fs::read_to_string(run.locations()[0].join("f")).unwrap();
    assert_eq!(top, "done\n");
    assert!(
        std::fs::read_to_string(&marker).unwrap().lines().count() <= 2,
        "{}",
        worker.output()
    );
}

#[test]
fn a_task_longer_than_the_consumer_timeout_completes_once() {
    let Some(c) = cluster_exclusive() else {
        return;
    };
    // RabbitMQ 3.10 checks delivery timeouts on a channel tick of about a minute:
    // the task must outlast a tick after the timeout.
    let _timeout = ConsumerTimeout::set(2000);
    let (w1, w2) = (c.worker(), c.worker());
    let marker = c.dir.path().join("runs");
    let ws = Workspace::with(&format!(
        "[task.long]\nrun = [\"echo run >> {}\", \"sleep 75\", \"echo ok > {{artifact}}/f\"]\n",
        marker.display()
    ));
    let run = finish(c.spawn_build(&ws, &["long"]));
    run.success();
    let logs = format!("{}{}", w1.output(), w2.output());
    assert!(
        logs.contains("PRECONDITION_FAILED") || logs.contains("Cannot acknowledge"),
        "the broker's consumer_timeout never struck:\n{logs}"
    );
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "run\n",
        "executed more than once:\n{}\n{}",
        w1.output(),
        w2.output()
    );
}

/// The local ports of process `pid`'s TCP connections to the broker (port 5672).
fn broker_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_string)
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && inodes.iter().any(|i| i == f[9]) && f[2].ends_with(":1628") {
                if let Some(port) = f[1].rsplit(':').next() {
                    ports.push(u16::from_str_radix(port, 16).unwrap());
                }
            }
        }
    }
    ports
}

#[test]
fn a_worker_that_loses_its_connection_mid_task_still_answers() {
    let Some(c) = crate::util::cluster() else {
        return;
    };
    let w = c.worker();
    let marker = c.dir.path().join("runs");
    let ws = Workspace::with(&format!(
        "[task.cut]\nrun = [\"echo run >> {}\", \"sleep 3\", \"echo ok > {{artifact}}/f\"]\n",
        marker.display()
    ));
    let client = c.spawn_build(&ws, &["cut"]);
    wait_until("the task to start", Duration::from_secs(30), || {
        marker.exists()
    });
    // Close the worker's connection, and only its (`rabbitmqctl close_connection`).
    let ports = broker_ports(w.child.id());
    assert!(!ports.is_empty(), "the worker has no broker connection");
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "peer_port"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        if let (Some(pid), Some(port)) = (f.next(), f.next()) {
            if ports.iter().any(|p| p.to_string() == port) {
                rabbitmqctl(&["close_connection", pid, "test: a connection lost mid-task"]);
            }
        }
    }
    let run = finish(client);
    run.success();
    // Regression (issue 12): the worker's reply was lost with its connection; the
    // client heard nothing until its silence watchdog sent the request again.
    w.wait_for("sent after reconnecting", Duration::from_secs(30));
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "run\n",
        "executed more than once:\n{}",
        w.output()
    );
}

/// A broker user for one test (password `secret`), deleted when dropped.
struct User(String);

impl User {
    /// A user `name` that may read and write everything and configure (declare,
    /// delete) only what `configure` matches.
    fn configuring(name: String, configure: &str) -> User {
        rabbitmqctl(&["add_user", &name, "secret"]);
        rabbitmqctl(&["set_permissions", "-p", "/", &name, configure, ".*", ".*"]);
        User(name)
    }

    /// The worker settings that log in as this user.
    fn settings(&self) -> [String; 2] {
        [
            format!("amqp.username={}", self.0),
            "amqp.password=secret".to_string(),
        ]
    }
}

impl Drop for User {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_user", &self.0]);
    }
}

#[test]
fn a_lock_the_broker_refuses_is_an_error_and_not_a_duplicate() {
    let Some(c) = crate::util::cluster() else {
        return;
    };
    // Everything a worker declares but its own lock queues.
    let user = User::configuring(
        format!("jolt_test_{}", std::process::id()),
        "^(jolt_tasks_.*|jolt_shard_.*|jolt_exchange|jolt_results|amq\\.gen.*)$",
    );
    let ws = Workspace::with("[task.refused_lock]\nrun = \"true # refused lock\"\n");
    // Another holder of the task's lock shard, so the worker needs its own lock.
    with_shard_held(&c.lock_key(&ws.identity("refused_lock")), |_consumer| {
        let w = crate::util::WorkerProcess::start(&c.config(), &user.settings());
        let client = c.spawn_build(&ws, &["refused_lock"]);
        // Regression: any refusal was taken for a lock held by another worker, and
        // the request was dropped as a duplicate.
        let run = crate::util::finish_within(client, Duration::from_secs(120), "the client");
        run.code(1).contains("delivered 3 times");
        let output = w.output();
        assert!(output.contains("Cannot declare a lock queue"), "{output}");
        assert!(!output.contains("dropping this duplicate"), "{output}");
    });
}

#[test]
fn a_worker_declares_no_lock_shard_queue_that_exists() {
    let Some(c) = crate::util::cluster() else {
        return;
    };
    // Everything a worker declares but the lock shard queues.
    let user = User::configuring(
        format!("jolt_test_shards_{}", std::process::id()),
        "^(jolt_tasks_.*|jolt_lock_.*|jolt_exchange|jolt_results|amq\\.gen.*)$",
    );
    let ws = Workspace::with("[task.shard_exists]\nrun = \"true # shard exists\"\n");
    // The shard queue exists (declared by another worker, here this test), so the
    // worker consumes it without declaring it: a declaration costs the broker about
    // as much as the lock. Regression: every worker declared every shard it used,
    // once per connection, and this user's worker failed the task.
    with_shard_held(&c.lock_key(&ws.identity("shard_exists")), |_consumer| {});
    let w = crate::util::WorkerProcess::start(&c.config(), &user.settings());
    let client = c.spawn_build(&ws, &["shard_exists"]);
    crate::util::finish_within(client, Duration::from_secs(60), "the client").code(0);
    let output = w.output();
    assert!(!output.contains("Cannot declare"), "{output}");
}

/// The lock shard queue of a lock key (`Cluster::lock_key`), as workers name it.
fn shard_queue_of(key: &str) -> String {
    let shard = u32::from_str_radix(&key[..4], 16).unwrap() % 1024;
    format!("jolt_shard_{shard:03x}")
}

/// Runs `f` while a consumer of this test (which never answers questions) holds the
/// lock shard queue of the lock key `key`, declared as workers declare it.
fn with_shard_held(key: &str, f: impl FnOnce(&amiquip::Consumer)) {
    let mut holder =
        amiquip::Connection::insecure_open("amqp://guest:guest@127.0.0.1:5672/%2F").unwrap();
    let channel = holder.open_channel(None).unwrap();
    let mut arguments = amiquip::FieldTable::new();
    arguments.insert(
        "x-expires".into(),
        amiquip::AmqpValue::LongInt(30 * 60 * 1000),
    );
    let queue = channel
        .queue_declare(
            shard_queue_of(key),
            amiquip::QueueDeclareOptions {
                arguments,
                ..Default::default()
            },
        )
        .unwrap();
    let consumer = queue
        .consume(amiquip::ConsumerOptions {
            exclusive: true,
            no_ack: true,
            ..Default::default()
        })
        .unwrap();
    f(&consumer);
    drop(consumer);
    let _ = holder.close();
}

#[test]
fn a_shard_queue_deleted_while_a_worker_asks_its_holder_costs_no_delivery() {
    let Some(c) = crate::util::cluster() else {
        return;
    };
    let ws = Workspace::with("[task.shard_gone]\nrun = \"true # shard gone\"\n");
    let key = c.lock_key(&ws.identity("shard_gone"));
    let w = c.worker();
    with_shard_held(&key, |consumer| {
        let client = c.spawn_build(&ws, &["shard_gone"]);
        // The worker's question comes to the holder, which does not answer; then
        // someone deletes the shard queue.
        match consumer.receiver().recv_timeout(Duration::from_secs(30)) {
            Ok(amiquip::ConsumerMessage::Delivery(d)) => assert_eq!(d.body, key.as_bytes()),
            other => panic!("no question came: {other:?}"),
        }
        c.broker.with_channel(|ch| {
            ch.queue_delete(shard_queue_of(&key), amiquip::QueueDeleteOptions::default())
                .unwrap();
        });
        crate::util::finish_within(client, Duration::from_secs(60), "the client").success();
    });
    // Regression: the worker failed its session on the 404, reconnected, and the
    // request came back as its second (of two) deliveries.
    let output = w.output();
    assert!(!output.contains("(redelivered)"), "{output}");
    assert!(!output.contains("reconnecting"), "{output}");
    // Regression (issue 23): the refusals the lock protocol expects (the shard in
    // exclusive use, the shard gone) reached the log as amiquip's warnings, `server
    // closing channel ...`, two or three per task on a busy fleet.
    assert!(!output.contains("amiquip"), "{output}");
    assert!(!output.contains("closing channel"), "{output}");
}

#[test]
fn a_worker_whose_broker_dies_reconnects_to_another_of_amqp_host() {
    // Issue 25: `amqp.host` named one broker. Two relays to the broker stand for two
    // nodes; the one the worker reached dies.
    let Some(c) = crate::util::cluster() else {
        return;
    };
    let nodes = [
        Relay::start("127.0.0.1:5672"),
        Relay::start("127.0.0.1:5672"),
    ];
    let address = |relay: &Relay| format!("amqp://127.0.0.1:{}/%2F", relay.port);
    let hosts = format!(
        "amqp.host=127.0.0.1:{},127.0.0.1:{}",
        nodes[0].port, nodes[1].port
    );
    let w = WorkerProcess::start(&c.config(), std::slice::from_ref(&hosts));
    let output = w.output();
    let first = nodes
        .iter()
        .position(|n| output.contains(&format!("Connected to {}; waiting", address(n))))
        .unwrap_or_else(|| panic!("connected to neither node:\n{output}"));
    let (dead, alive) = (&nodes[first], &nodes[1 - first]);
    dead.fail();
    w.wait_for(
        &format!("Connected to {}; waiting", address(alive)),
        Duration::from_secs(30),
    );
    // The loss is said with the broker it was on.
    assert!(
        w.output()
            .contains(&format!("RabbitMQ at {}: ", address(dead))),
        "{}",
        w.output()
    );
    // A client given both connects past the dead one, and the worker builds.
    let ws = Workspace::with("[task.a]\nrun = \"echo a > {artifact}/a\"\n");
    let config = c.config().display().to_string();
    ws.jolt(&["-c", &config, "-c", &hosts, "build", "--network", "a"])
        .success()
        .contains(&format!("Connected to the broker {}", address(alive)))
        .contains("Remote execution finished");
}
