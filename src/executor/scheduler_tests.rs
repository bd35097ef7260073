//! The scheduler's readiness on fabricated graphs: what is ready after planning,
//! and what a job that ends releases or blocks. No job runs: each test settles them
//! itself, as `choose.rs` is tested without a build.

use std::sync::{Arc, OnceLock};

use super::outcome::{ArtifactInfo, Done, Failure, Status};
use super::plan::{Mode, Options, Plan, Services, LOCAL};
use super::scheduler::Scheduler;
use crate::graph::hashes::FileHashes;
use crate::graph::Graph;
use crate::recipe::Recipes;
use crate::store::local::LocalCache;

struct Fixture {
    _dir: tempfile::TempDir,
    graph: Graph,
    cache: LocalCache,
}

fn fixture(recipe: &str, goals: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jolt.toml"), recipe).unwrap();
    let recipes = Recipes::load(dir.path()).unwrap();
    let hashes = FileHashes::ephemeral(dir.path());
    let goals: Vec<String> = goals.iter().map(|g| g.to_string()).collect();
    let graph = crate::graph::build(&recipes, &hashes, &goals, &Default::default()).unwrap();
    let cache = LocalCache::open(&dir.path().join("cache"), 0).unwrap();
    Fixture {
        _dir: dir,
        graph,
        cache,
    }
}

fn options(keep_going: bool) -> Options<'static> {
    Options {
        jobs: 1,
        keep_going,
        mode: Mode::Local,
        dry_run: false,
        explain: false,
        goals_absent: false,
    }
}

/// Plans the goals of `recipe` (with `-k` if `keep_going`) and hands the scheduler
/// to `test`.
fn planned(recipe: &str, goals: &[&str], keep_going: bool, test: impl FnOnce(&mut Scheduler)) {
    let f = fixture(recipe, goals);
    let services = Services {
        cache: &f.cache,
        http: None,
    };
    let opts = options(keep_going);
    let mut s = Scheduler::new(&f.graph, &services, &opts);
    for &g in &f.graph.goals {
        s.plan(g).unwrap();
    }
    test(&mut s);
}

/// The node of task `name` (one instance).
fn node(s: &Scheduler, name: &str) -> usize {
    s.graph.nodes.iter().position(|n| n.name() == name).unwrap()
}

/// The tasks ready to execute here, by name, sorted.
fn ready(s: &Scheduler) -> Vec<String> {
    let mut names: Vec<String> = s.ready[LOCAL]
        .iter()
        .map(|(_, std::cmp::Reverse(i))| s.graph.nodes[*i].name().to_string())
        .collect();
    names.sort_unstable();
    names
}

/// Takes task `name` off its ready queue, as the pool would, and ends it so.
fn end(s: &mut Scheduler, name: &str, result: Result<Done, Failure>) {
    let i = node(s, name);
    let lane = s.plan[i].lane();
    let before = s.ready[lane].len();
    s.ready[lane].retain(|(_, std::cmp::Reverse(r))| *r != i);
    assert_eq!(s.ready[lane].len(), before - 1, "{name} was not ready");
    let infos: Vec<OnceLock<Arc<ArtifactInfo>>> =
        (0..s.graph.nodes.len()).map(|_| OnceLock::new()).collect();
    s.finish(i, result, &infos).unwrap();
}

fn status(s: &Scheduler, name: &str) -> Status {
    s.status[node(s, name)]
}

const DIAMOND: &str = "[task.a]\n[task.b]\nrequires = [\"a\"]\n[task.c]\nrequires = [\"a\"]\n\
    [task.d]\nrequires = [\"b\", \"c\"]\n";

#[test]
fn a_task_is_ready_once_everything_it_sees_is_available() {
    planned(DIAMOND, &["d"], false, |s| {
        assert_eq!(ready(s), ["a"]);
        end(s, "a", Ok(Done::Uploaded));
        assert_eq!(ready(s), ["b", "c"]);
        end(s, "b", Ok(Done::Uploaded));
        // d sees a, b and c: b alone is not enough.
        assert_eq!(ready(s), ["c"]);
        end(s, "c", Ok(Done::Uploaded));
        assert_eq!(ready(s), ["d"]);
        let links: usize = s.dependents.iter().map(Vec::len).sum();
        assert_eq!(links, 0, "every link released");
    });
}

#[test]
fn a_failure_blocks_what_sees_it_and_stops_the_build() {
    planned(DIAMOND, &["d"], true, |s| {
        end(s, "a", Ok(Done::Uploaded));
        end(s, "b", Err(Failure::new("boom")));
        assert_eq!(status(s, "b"), Status::Failed);
        // With -k, c still runs; d, which sees b, never will.
        assert_eq!(ready(s), ["c"]);
        assert_eq!(status(s, "d"), Status::Blocked);
        assert!(!s.stop);
        end(s, "c", Ok(Done::Uploaded));
        assert!(ready(s).is_empty());
    });
    planned(DIAMOND, &["d"], false, |s| {
        end(s, "a", Err(Failure::new("boom")));
        assert!(s.stop, "without -k a failure stops the build");
        for t in ["b", "c", "d"] {
            assert_eq!(status(s, t), Status::Blocked, "{t}");
        }
    });
}

#[test]
fn an_unstable_failure_fails_the_stable_task_that_sees_it_which_blocks_the_rest() {
    // a is unstable; b, stable, sees it fail and fails ("depends on failed task
    // 'a'"); c sees both through b's view and is blocked by b's failure.
    let recipe = "[task.a]\nunstable = true\n[task.b]\nrequires = [\"a\"]\n\
        [task.c]\nrequires = [\"b\"]\n";
    planned(recipe, &["c"], true, |s| {
        end(s, "a", Err(Failure::new("flaky")));
        assert_eq!(status(s, "a"), Status::Unstable);
        assert_eq!(status(s, "b"), Status::Failed);
        assert_eq!(status(s, "c"), Status::Blocked);
        assert!(ready(s).is_empty());
    });
}

#[test]
fn a_failed_download_plans_the_execution_and_what_it_sees() {
    let f = fixture(DIAMOND, &["d"]);
    let services = Services {
        cache: &f.cache,
        http: None,
    };
    let opts = options(false);
    let mut s = Scheduler::new(&f.graph, &services, &opts);
    // As if the HTTP cache had answered for d: a download, nothing below.
    let d = node(&s, "d");
    s.status[d] = Status::Pending;
    s.plan[d] = Plan::Download;
    s.total += 1;
    s.make_ready(d);
    assert!(s.plan.iter().filter(|&&p| p == Plan::Unplanned).count() > 4);
    end(&mut s, "d", Ok(Done::DownloadFailed));
    // Built instead, after what it sees.
    assert_eq!(s.plan[d], Plan::Execute);
    assert_eq!(ready(&s), ["a"]);
}
