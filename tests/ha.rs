//! Network builds on a RabbitMQ cluster of three nodes that the test binary starts
//! itself (see `util::rabbit_cluster`), with a real nginx cache and real workers.

use crate::util::rabbit_cluster::Fleet;
use crate::util::{alias, finish_within, Workspace};
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
