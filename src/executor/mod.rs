//! The executor: decides what each node of a graph needs (nothing, the cached
//! artifact, a download, an execution here or on a network worker), then does it on a
//! pool of threads.
//!
//! The calling thread is the scheduler and owns the console: it keeps two ready
//! queues (executions here, limited by `-j`; transfers and remote executions, limited
//! separately), highest weight first, hands node indices to the pool through a
//! crossbeam channel and receives the threads' events (started, output lines, done)
//! on another. What a thread does for a node is in `job`.
//!
//! The files, by what they hold: the vocabulary every other file speaks, in two
//! leaves: `plan` (what a build is, its services, what is decided for a node and
//! the lanes of the pool) and `outcome` (what becomes of nodes and jobs: statuses,
//! the report, events, a job's result); `choose`, the decision for one node;
//! `scheduler`, which plans, hands out and settles, with `presence` asking the
//! HTTP cache ahead, `spans` recording where jobs ran, `status_line` and
//! `explain` saying it; `job` and `remote`, what a pool thread does (with `shell`,
//! `tasklog`, `fetch` and `slots`); `process`
//! and `guardian`, one command. This file holds the entry point, [`run`], which
//! starts the pool and hands it to the scheduler.
//!
//! Only what is needed runs: a goal that is available needs nothing else; a task that
//! must execute needs the artifacts it sees and its resources. "Available" means in
//! the local cache for local builds, and in the HTTP cache for network builds and on
//! workers.

mod choose;
mod explain;
mod fetch;
pub mod guardian;
mod job;
mod outcome;
mod plan;
mod presence;
pub mod process;
mod remote;
mod scheduler;
#[cfg(test)]
mod scheduler_tests;
mod shell;
mod slots;
mod spans;
mod status_line;
mod tasklog;

pub use outcome::{ArtifactInfo, Report, Span, Status};
pub use plan::{Mode, Network, Options, Services};

use anyhow::Result;
use crossbeam_channel::{unbounded, Receiver};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::console;
use crate::graph::Graph;
use crate::util::fs as fsutil;
use job::Runner;
use outcome::{Event, Failure};
use plan::{cache_unreachable, Plan, LANES, LOCAL, REMOTE, TRANSFER};
use remote::Job;
use scheduler::{Lanes, Scheduler};

/// The most events (mostly output lines) queued for the scheduler.
const EVENTS_QUEUED: usize = 4096;

/// Events queued for the scheduler per pool thread, up to [`EVENTS_QUEUED`]. The
/// queue's slots are allocated and initialized when it is made: 4,096 of them, about
/// half a MiB, cost a worker more than a trivial task's own bookkeeping on every
/// request (each runs the executor for one job).
const EVENTS_PER_THREAD: usize = 256;

/// Runs the graph's goals: plans what each node needs, then does it on a pool of
/// threads while this thread schedules and owns the console.
pub fn run(graph: &Graph, services: &Services, root: &Path, opts: &Options) -> Result<Report> {
    let mut sched = Scheduler::new(graph, services, opts);
    sched.learn_remote();
    for &g in &graph.goals {
        sched.plan(g)?;
        if let Some(why) = &sched.unreachable {
            return Err(cache_unreachable(why, opts.mode));
        }
    }
    if opts.explain {
        explain::explain(graph, &sched.plan, services.cache);
    }
    if opts.dry_run {
        explain::tell_plan(graph, &sched.plan, &sched.status);
        sched.status.truncate(graph.nodes.len());
        return Ok(Report {
            status: sched.status,
            duration: sched.durations,
            logs: sched.logs,
            interrupted: false,
            spans: Vec::new(),
            errors: sched.errors,
        });
    }
    let transfers = services.http.map_or_else(
        || crate::config::Config::default().http.transfers,
        |h| h.transfers,
    );
    let limits = [
        opts.jobs.max(1),
        transfers,
        match opts.mode {
            Mode::Network(net) => net.jobs,
            _ => 0,
        },
    ];
    let infos: Vec<OnceLock<Arc<ArtifactInfo>>> =
        (0..graph.nodes.len()).map(|_| OnceLock::new()).collect();
    let is_goal = sched.is_goal.clone();
    let scratch_dirs: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let transfer_slots = slots::Slots::new(transfers);
    let prefix_output = opts.jobs > 1 && sched.total > 1;
    // No more threads than jobs planned (none for a no-op build); a download that
    // turns into an execution later may wait for a free one. Remote executions hold
    // a thread only while they are prepared, sent or finished.
    let threads =
        (limits[LOCAL] + limits[TRANSFER] + limits[REMOTE].min(limits[TRANSFER])).min(sched.total);
    let result: Result<bool> = std::thread::scope(|scope| {
        let (job_tx, job_rx) = unbounded::<Job>();
        // Bounded: a command that prints faster than the console writes waits for
        // it (its pipe fills), instead of queueing its output in memory.
        let (ev_tx, ev_rx) = crossbeam_channel::bounded::<Event>(
            (EVENTS_PER_THREAD * threads.max(1)).min(EVENTS_QUEUED),
        );
        let (quit_tx, quit_rx) = crossbeam_channel::bounded::<()>(0);
        let withdraw = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A network build's requests wait for their replies on one thread, not a
        // thread each: a pool thread only prepares, sends and finishes them.
        let parked = match opts.mode {
            Mode::Network(net) => {
                let (parked, waiter) =
                    remote::channels(job_tx.clone(), ev_tx.clone(), quit_rx, withdraw.clone());
                std::thread::Builder::new()
                    .spawn_scoped(scope, move || waiter.run(graph, net))
                    .map_err(|e| anyhow::anyhow!("Cannot start a thread: {e}"))?;
                Some(parked)
            }
            _ => None,
        };
        for started in 0..threads {
            let runner = Runner {
                graph,
                cache: services.cache,
                http: services.http,
                mode: opts.mode,
                root,
                infos: &infos,
                events: ev_tx.clone(),
                scratch: &scratch_dirs,
                is_goal: &is_goal,
                transfers: &transfer_slots,
                parked: parked.clone(),
            };
            let jobs = job_rx.clone();
            let spawned =
                std::thread::Builder::new().spawn_scoped(scope, move || serve_jobs(&runner, &jobs));
            if let Err(e) = spawned {
                // Threads that did start serve the build; none is an error.
                if started == 0 {
                    return Err(anyhow::anyhow!("Cannot start a thread: {e}"));
                }
                console::debug(&format!("thread pool limited to {started} threads: {e}"));
                break;
            }
        }
        drop(ev_tx);
        drop(parked);
        let lanes = Lanes {
            jobs: job_tx,
            _quit: quit_tx,
            withdraw,
            events: ev_rx,
            limits,
            running: [0; LANES],
        };
        sched.drive(lanes, &infos, prefix_output)
    });
    console::status(None);
    for dir in scratch_dirs.into_inner().unwrap_or_default() {
        let _ = fsutil::remove_dir_all(&dir);
    }
    let interrupted = result?;
    sched.status.truncate(graph.nodes.len());
    Ok(Report {
        status: sched.status,
        duration: sched.durations,
        logs: sched.logs,
        interrupted,
        spans: sched.spans.finished(),
        errors: sched.errors,
    })
}

/// A pool thread's life: run the jobs it is handed until the channel closes. A
/// remote execution's job ends when its request is parked with the waiter; its
/// `Done` comes from the job that finishes it.
fn serve_jobs<'n>(runner: &Runner<'n>, jobs: &Receiver<Job<'n>>) {
    while let Ok(job) = jobs.recv() {
        let i = match &job {
            Job::Run(i, _) => *i,
            Job::Resume(call, _) => call.i,
        };
        // A panic is a bug, but it must fail this task, not hang the scheduler
        // waiting for a Done that never comes.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job {
            Job::Run(i, Plan::Remote) => runner.remote(i).transpose(),
            Job::Run(i, plan) => Some(runner.run(i, plan)),
            Job::Resume(call, next) => runner.resume(call, next),
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown cause".into());
            Some(Err(Failure::new(format!(
                "internal error while running {}: {what}",
                runner.graph.nodes[i].label()
            ))))
        });
        if let Some(result) = result {
            runner.send(Event::Done(i, result));
        }
    }
}

/// The pool's ends of the waiter of remote calls (`remote`): where a call is parked,
/// and the channel every call's replies come in on.
#[derive(Clone)]
struct Parked<'n> {
    calls: crossbeam_channel::Sender<Box<remote::Call<'n>>>,
    replies: crossbeam_channel::Sender<crate::remote::client::Incoming>,
}
