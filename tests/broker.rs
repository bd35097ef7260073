//! Network builds across broker trouble: a restart while a client waits, and a task
//! that outlives RabbitMQ's consumer_timeout. These change the broker for everyone, so
//! each holds it alone (`cluster_exclusive`).

use crate::util::{cluster_exclusive, finish, wait_until, Workspace};
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
