//! What the HTTP cache holds, learned before planning: one existence check (`HEAD`)
//! per node that planning will ask about, many in flight at once, a wave at a time.
//!
//! Planning walks from the goals and asks the HTTP cache about each node it reaches;
//! whether it goes on to a node's requirements depends on the answer (a node the
//! cache holds needs nothing below it). Asked one after another, a build pays a round
//! trip per node: 300 nodes 20 ms away cost 6 s before anything starts. Here the
//! walk goes breadth first: the nodes of a wave are checked together
//! ([`CHECKS_AT_ONCE`] at a time), and the next wave is the requirements of those the
//! cache lacks. A build then pays a round trip per level of what it must build.
//! The answers are kept for the planner ([`Scheduler::remote_has`]), which asks
//! itself about anything not learned here. The first failed check stops the
//! learning: the planner meets that failure in its order and handles it as it would
//! have (a warning and a cache marked down, or the end of a network build).

use super::choose;
use super::plan::{usable_http, Choice, Plan};
use super::scheduler::Scheduler;
use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Existence checks in flight at once (the HTTP agent keeps as many connections).
pub const CHECKS_AT_ONCE: usize = crate::store::http::CONNECTIONS_PER_HOST;

impl Scheduler<'_> {
    /// Learns the HTTP cache's answers for the nodes planning will ask about (see the
    /// module's documentation) into `self.known`.
    pub(super) fn learn_remote(&mut self) {
        let Some(http) = usable_http(self.services, self.mode) else {
            return;
        };
        let graph = self.graph;
        let cache = self.services.cache;
        let mut seen = vec![false; 2 * graph.nodes.len()];
        let mut wave: Vec<usize> = graph.goals.clone();
        while !wave.is_empty() {
            let mut next = Vec::new();
            let mut ask = Vec::new();
            for i in wave {
                if std::mem::replace(&mut seen[i], true) {
                    continue;
                }
                if self.viewer(i).is_some() {
                    next.extend(self.needs(i));
                    continue;
                }
                let node = &graph.nodes[i];
                if node.is_alias() {
                    next.extend(graph.expand_alias(i));
                    continue;
                }
                if node.is_resource() {
                    next.extend(self.needs(i));
                    continue;
                }
                let local = node.task.cacheable && cache.is_present(node.name(), &node.identity);
                if self.asks_remote(i, local) {
                    match self.known.get(&i) {
                        // Answered before (see `Options::goals_absent`).
                        Some(Ok(present)) => {
                            if self.goes_below(i, local, *present) {
                                next.extend(self.needs(i));
                            }
                        }
                        _ => ask.push(i),
                    }
                } else if self.goes_below(i, local, false) {
                    next.extend(self.needs(i));
                }
            }
            let checks: Vec<(&str, &str)> = ask
                .iter()
                .map(|&i| (graph.nodes[i].name(), graph.nodes[i].identity.as_str()))
                .collect();
            // The build's first check goes alone: a cache that is down or failing
            // costs one request (and its retries), not a burst of them.
            let answers = check_all(&checks, self.known.is_empty(), |task, identity| {
                http.exists(task, identity)
            });
            let mut failed = false;
            for (i, answer) in ask.into_iter().zip(answers) {
                let Some(answer) = answer else {
                    continue; // not asked: an earlier check failed
                };
                failed |= answer.is_err();
                let present = matches!(answer, Ok(true));
                self.known.insert(i, answer);
                let node = &graph.nodes[i];
                let local = node.task.cacheable && cache.is_present(node.name(), &node.identity);
                if !failed && self.goes_below(i, local, present) {
                    next.extend(self.needs(i));
                }
            }
            if failed {
                return;
            }
            wave = next;
        }
    }

    /// Whether planning will ask the HTTP cache about node `i`: what [`choose`]
    /// asks, for the question comes first (one rule for both, so that nothing is
    /// checked that planning would not ask, nor the reverse).
    fn asks_remote(&self, i: usize, local: bool) -> bool {
        let mut probe = Answers {
            remote: false,
            asked: false,
        };
        choose::choose(self.kind(), self.facts(i, local), &mut probe);
        probe.asked
    }

    /// Whether planning goes on to node `i`'s needs: when [`choose`] has it execute,
    /// here or on a worker, given what the caches hold.
    fn goes_below(&self, i: usize, local: bool, remote: bool) -> bool {
        let mut known = Answers {
            remote,
            asked: false,
        };
        matches!(
            choose::choose(self.kind(), self.facts(i, local), &mut known),
            Choice::Plan(Plan::Execute | Plan::Remote)
        )
    }
}

/// Answers to [`choose`]'s questions given beforehand, noting whether the HTTP cache
/// was asked about.
struct Answers {
    remote: bool,
    asked: bool,
}

impl choose::Ask for Answers {
    fn remote(&mut self) -> bool {
        self.asked = true;
        self.remote
    }

    fn fast_here(&mut self) -> bool {
        false
    }
}

/// Runs `check` for every `(task, identity)`, up to [`CHECKS_AT_ONCE`] at a time (with
/// `probe`, the first alone before the others); answers in the same order. After the
/// first failure no further check starts: those answers are `None`.
fn check_all(
    checks: &[(&str, &str)],
    probe: bool,
    check: impl Fn(&str, &str) -> Result<bool> + Sync,
) -> Vec<Option<Result<bool>>> {
    let answers: Vec<Mutex<Option<Result<bool>>>> =
        checks.iter().map(|_| Mutex::new(None)).collect();
    let mut first = 0;
    if let (true, Some(&(task, identity))) = (probe, checks.first()) {
        let answer = check(task, identity);
        let failed = answer.is_err();
        *answers[0].lock().unwrap_or_else(|e| e.into_inner()) = Some(answer);
        if failed {
            return answers
                .into_iter()
                .map(|a| a.into_inner().unwrap_or_else(|e| e.into_inner()))
                .collect();
        }
        first = 1;
    }
    let next = AtomicUsize::new(first);
    let failed = AtomicBool::new(false);
    let threads = checks.len().min(CHECKS_AT_ONCE);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= checks.len() || failed.load(Ordering::Relaxed) {
                    return;
                }
                let (task, identity) = checks[k];
                let answer = check(task, identity);
                if answer.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                *answers[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(answer);
            });
        }
    });
    answers
        .into_iter()
        .map(|a| a.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_run_at_once_and_answer_in_order() {
        let in_flight = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let tasks: Vec<String> = (0..40).map(|k| k.to_string()).collect();
        let checks: Vec<(&str, &str)> = tasks.iter().map(|t| (t.as_str(), "id")).collect();
        let answers = check_all(&checks, false, |task, _| {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(task.parse::<usize>().unwrap() % 2 == 0)
        });
        let answers: Vec<bool> = answers.into_iter().map(|a| a.unwrap().unwrap()).collect();
        assert_eq!(answers, (0..40).map(|k| k % 2 == 0).collect::<Vec<_>>());
        assert!(most.load(Ordering::SeqCst) > 1, "checks ran one at a time");
        assert!(most.load(Ordering::SeqCst) <= CHECKS_AT_ONCE);
    }

    #[test]
    fn no_check_starts_after_a_failure() {
        let started = AtomicUsize::new(0);
        let checks: Vec<(&str, &str)> = (0..100).map(|_| ("t", "id")).collect();
        let answers = check_all(&checks, false, |_, _| {
            started.fetch_add(1, Ordering::SeqCst);
            anyhow::bail!("refused")
        });
        let started = started.load(Ordering::SeqCst);
        assert!(started <= CHECKS_AT_ONCE, "{started} checks started");
        assert_eq!(answers.iter().filter(|a| a.is_some()).count(), started);
    }

    #[test]
    fn a_probe_that_fails_is_the_only_check() {
        let started = AtomicUsize::new(0);
        let checks: Vec<(&str, &str)> = (0..100).map(|_| ("t", "id")).collect();
        let answers = check_all(&checks, true, |_, _| {
            started.fetch_add(1, Ordering::SeqCst);
            anyhow::bail!("refused")
        });
        assert_eq!(started.load(Ordering::SeqCst), 1);
        assert!(answers[0].as_ref().is_some_and(|a| a.is_err()));
        assert!(answers[1..].iter().all(|a| a.is_none()));
    }
}
