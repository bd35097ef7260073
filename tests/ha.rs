//! Network builds on a RabbitMQ cluster of three nodes that the test binary starts
//! itself (see `util::rabbit_cluster`), with a real nginx cache and real workers.

use crate::util::rabbit_cluster::Fleet;
use crate::util::rabbit_cluster::Node;
use crate::util::{alias, finish_within, line_count, Workspace};
use std::time::Duration;

/// A recipe of `n` tasks, each appending its name to `log` as it runs, and the
/// alias `all` of them.
fn tasks(n: usize, log: &std::path::Path, seconds: &str) -> String {
    let mut recipe = String::new();
    for i in 0..n {
        recipe.push_str(&format!(
            "[task.t{i}]\nrun = [\"echo t{i} >> {}\", \"sleep {seconds}\", \"echo t{i} > {{artifact}}/out\"]\n",
            log.display()
        ));
    }
    recipe + &alias("all", (0..n).map(|i| format!("t{i}")))
}

/// The `amqp.host` setting that names `nodes`.
fn brokers(nodes: &[Node]) -> String {
    let hosts: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    format!("amqp.host={}", hosts.join(","))
}

/// The tasks `log` says ran, sorted; each must appear once.
#[track_caller]
fn ran_once(log: &std::path::Path, n: usize) {
    let mut ran: Vec<String> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    ran.sort();
    let mut expected: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    expected.sort();
    assert_eq!(ran, expected, "each task must run exactly once");
}

#[test]
fn a_build_on_a_three_node_cluster_runs_each_task_once() {
    let Some(fleet) = Fleet::start() else { return };
    let _workers: Vec<_> = (0..3).map(|_| fleet.worker(&[])).collect();
    let log = fleet.dir.path().join("ran");
    let ws = Workspace::with(&tasks(12, &log, "0"));
    let client = fleet.spawn_build(&ws, &[], &["all"]);
    finish_within(client, Duration::from_secs(60), "the build").success();
    ran_once(&log, 12);
}

const QUORUM: &str = "amqp.queue_type=quorum";

#[test]
fn a_build_on_quorum_queues_runs_each_task_once_and_says_once_that_they_have_no_priorities() {
    let Some(fleet) = Fleet::start() else { return };
    let quorum = [QUORUM.to_string()];
    let workers: Vec<_> = (0..3).map(|_| fleet.worker(&quorum)).collect();
    let log = fleet.dir.path().join("ran");
    let ws = Workspace::with(&tasks(12, &log, "0"));
    let client = fleet.spawn_build(&ws, &quorum, &["all"]);
    let run = finish_within(client, Duration::from_secs(60), "the build");
    run.success();
    assert_eq!(
        run.count("quorum queues have no priorities"),
        1,
        "{}",
        run.all()
    );
    ran_once(&log, 12);
    for w in &workers {
        assert_eq!(w.output().matches("have no priorities").count(), 1);
    }
    let node = &fleet.rabbit.nodes[0];
    let queues = fleet
        .rabbit
        .ctl(
            node,
            &["list_queues", "-q", "--no-table-headers", "name", "type"],
        )
        .unwrap();
    let line = queues
        .lines()
        .find(|l| l.starts_with(&fleet.queue()))
        .unwrap_or_else(|| panic!("no {} in\n{queues}", fleet.queue()));
    assert!(line.ends_with("quorum"), "{line}");
}

#[test]
fn a_build_survives_the_sigkill_of_the_node_that_leads_its_quorum_queue() {
    let Some(fleet) = Fleet::start_exclusive() else {
        return;
    };
    let rabbit = fleet.rabbit;
    let (leader, others) = (&rabbit.nodes[0], &rabbit.nodes[1..]);
    // A worker on the first node alone declares the queue there (its leader).
    let first = fleet.worker(&[
        QUORUM.to_string(),
        format!("amqp.host=127.0.0.1:{}", leader.port),
    ]);
    drop(first);
    assert_eq!(
        rabbit
            .queue_node(&others[0], &fleet.queue())
            .map(|n| &n.name),
        Some(&leader.name)
    );
    let settings = [QUORUM.to_string(), brokers(others)];
    let workers: Vec<_> = (0..3).map(|_| fleet.worker(&settings)).collect();
    let log = fleet.dir.path().join("ran");
    let ws = Workspace::with(&tasks(12, &log, "0.5"));
    let client = fleet.spawn_build(&ws, &settings, &["all"]);
    crate::util::wait_until("three tasks to start", Duration::from_secs(30), || {
        line_count(&log) >= 3
    });
    rabbit.kill(leader);
    let before = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(before < 12, "the build was over before the node died");
    let run = finish_within(client, Duration::from_secs(60), "the build");
    rabbit.restart(leader);
    run.success().lacks("delivered 3 times");
    ran_once(&log, 12);
    // The leader's move is no delivery: no request came back to a worker.
    for w in &workers {
        assert!(!w.output().contains("(delivery 2"), "{}", w.output());
    }
}

#[test]
fn a_client_sends_again_what_a_classic_queue_lost_with_its_node() {
    let Some(fleet) = Fleet::start_exclusive() else {
        return;
    };
    let rabbit = fleet.rabbit;
    let (home, others) = (&rabbit.nodes[0], &rabbit.nodes[1..]);
    // A worker on the first node alone declares the queue there (its home).
    drop(fleet.worker(&[format!("amqp.host=127.0.0.1:{}", home.port)]));
    assert_eq!(
        rabbit
            .queue_node(&others[0], &fleet.queue())
            .map(|n| &n.name),
        Some(&home.name)
    );
    let settings = [brokers(others)];
    let _workers: Vec<_> = (0..3).map(|_| fleet.worker(&settings)).collect();
    let log = fleet.dir.path().join("ran");
    let ws = Workspace::with(&tasks(12, &log, "0.5"));
    let client = fleet.spawn_build(&ws, &settings, &["all"]);
    crate::util::wait_until("three tasks to start", Duration::from_secs(30), || {
        line_count(&log) >= 3
    });
    rabbit.kill(home);
    let before = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(before < 12, "the build was over before the node died");
    std::thread::sleep(Duration::from_secs(2));
    rabbit.restart(home);
    let run = finish_within(client, Duration::from_secs(60), "the build");
    run.success()
        .lacks("delivered 3 times")
        .contains("was unreachable and is back: sending again");
    ran_once(&log, 12);
}

#[test]
fn a_request_the_broker_refuses_is_published_again_until_it_takes_it() {
    let Some(fleet) = Fleet::start() else { return };
    let node = &fleet.rabbit.nodes[0];
    // The queue holds at most 2 waiting requests and refuses (nacks) the others.
    let policy = format!("full-{}", fleet.routing_key);
    fleet
        .rabbit
        .ctl(
            node,
            &[
                "set_policy",
                &policy,
                &format!("^{}$", fleet.queue()),
                r#"{"max-length":2,"overflow":"reject-publish"}"#,
                "--apply-to",
                "queues",
            ],
        )
        .unwrap();
    let _workers: Vec<_> = (0..2).map(|_| fleet.worker(&[])).collect();
    let log = fleet.dir.path().join("ran");
    let ws = Workspace::with(&tasks(8, &log, "0.2"));
    let client = fleet.spawn_build(&ws, &[], &["all"]);
    let run = finish_within(client, Duration::from_secs(40), "the build");
    let _ = fleet.rabbit.ctl(node, &["clear_policy", &policy]);
    run.success();
    ran_once(&log, 8);
}

#[test]
fn two_failovers_of_a_mirrored_classic_queue_refuse_nothing() {
    let Some(fleet) = Fleet::start_exclusive() else {
        return;
    };
    let rabbit = fleet.rabbit;
    let (home, others) = (&rabbit.nodes[0], &rabbit.nodes[1..]);
    // Classic mirroring (RabbitMQ 3): a promoted mirror marks every waiting request
    // redelivered, which no worker's death caused.
    let policy = format!("mirror-{}", fleet.routing_key);
    rabbit
        .ctl(
            home,
            &[
                "set_policy",
                &policy,
                &format!("^{}$", fleet.queue()),
                r#"{"ha-mode":"all","ha-sync-mode":"automatic"}"#,
                "--apply-to",
                "queues",
            ],
        )
        .unwrap();
    drop(fleet.worker(&[format!("amqp.host=127.0.0.1:{}", home.port)]));
    let settings = [brokers(others)];
    let workers: Vec<_> = (0..2).map(|_| fleet.worker(&settings)).collect();
    let log = fleet.dir.path().join("ran");
    let ws = Workspace::with(&tasks(24, &log, "0.3"));
    let client = fleet.spawn_build(&ws, &settings, &["all"]);
    crate::util::wait_until("a task to start", Duration::from_secs(30), || {
        line_count(&log) >= 1
    });
    // Two failovers: the master's node stops and starts again, twice.
    for _ in 0..2 {
        let master = rabbit.queue_node(&others[0], &fleet.queue()).unwrap();
        rabbit.ctl(master, &["stop_app"]).unwrap();
        rabbit.ctl(master, &["start_app"]).unwrap();
    }
    let run = finish_within(client, Duration::from_secs(90), "the build");
    let _ = rabbit.ctl(home, &["clear_policy", &policy]);
    run.success().lacks("delivered 3 times");
    ran_once(&log, 24);
    let output: String = workers.iter().map(|w| w.output()).collect();
    assert!(
        output.contains("no worker started it (a broker failover)"),
        "{output}"
    );
}

#[test]
fn a_request_that_kills_its_workers_on_a_quorum_queue_is_refused_after_two_deliveries() {
    let Some(fleet) = Fleet::start() else { return };
    let quorum = [QUORUM.to_string()];
    let marker = fleet.dir.path().join("runs");
    let ws = Workspace::with(&format!(
        "[task.deadly]\nrun = [\"echo run >> {}\", \"sleep 300\"]\n",
        marker.display()
    ));
    let client = fleet.spawn_build(&ws, &quorum, &["deadly"]);
    let runs = || line_count(&marker);
    for delivery in 1..=2 {
        let worker = fleet.worker(&quorum);
        crate::util::wait_until("the task to start", Duration::from_secs(60), || {
            runs() == delivery
        });
        worker.signal(libc::SIGKILL);
    }
    // Both deliveries were started and went unanswered: the third is refused.
    let third = fleet.worker(&quorum);
    let run = finish_within(client, Duration::from_secs(60), "the client");
    run.code(1).contains("delivered 3 times");
    assert_eq!(runs(), 2, "{}", third.output());
    assert!(
        third.output().contains("Refusing deadly"),
        "{}",
        third.output()
    );
}
