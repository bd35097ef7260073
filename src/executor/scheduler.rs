//! The scheduler: plans what each node needs (walking from the goals), hands ready
//! nodes to the pool's lanes, and settles each job's outcome, releasing or blocking
//! what waits for it. It runs on the calling thread, which owns the console.

use anyhow::Result;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::collections::BinaryHeap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::choose;

use super::outcome::{kept_name, ArtifactInfo, Done, Event, Failure, Status};
use super::plan::{
    http_warning, usable_http, Choice, Mode, Options, Plan, Probe, Services, LANES, REMOTE,
    TRANSFER,
};
use super::remote::Job;
use super::spans::Spans;
use super::status_line::{status_text, RemoteCounts};
use crate::console;
use crate::graph::Graph;
use crate::interrupt;
use crate::store::http as http_cache;
use crate::util::fs::format_duration;

/// What the HTTP cache answered for each node before planning asked (see
/// `presence`), by node.
pub(super) type Known = std::collections::HashMap<usize, Result<bool>>;

/// The scheduler's ends of the pool: jobs out, events in, and how many jobs run in
/// each lane (executions here, transfers, remote executions) against its limit.
pub(super) struct Lanes<'n> {
    pub(super) jobs: crossbeam_channel::Sender<Job<'n>>,
    /// Dropped with the lanes: the waiter of remote calls ends.
    pub(super) _quit: crossbeam_channel::Sender<()>,
    /// Set when the build stops: the waiter withdraws the requests no worker took.
    pub(super) withdraw: Arc<std::sync::atomic::AtomicBool>,
    pub(super) events: Receiver<Event>,
    pub(super) limits: [usize; LANES],
    pub(super) running: [usize; LANES],
}

/// Plans and settles a build's nodes.
///
/// `plan`, `status`, `available`, `pending` and `dependents` have two entries per
/// node: the node `i` itself, and at `n + i` (`n` nodes), the node's *view*: a
/// group of the artifacts it sees (see [`crate::graph::visible`]), available when they all
/// are. An execution waits for its view; a view for the node's direct requirements
/// and the views of those it sees through. So every link is an edge of the graph,
/// where waiting for each artifact seen directly linked a chain's every node to
/// every node below it (memory in the square of the depth).
pub(super) struct Scheduler<'a> {
    pub(super) graph: &'a Graph,
    pub(super) services: &'a Services<'a>,
    pub(super) mode: Mode<'a>,
    pub(super) is_goal: Vec<bool>,
    pub(super) plan: Vec<Plan>,
    pub(super) status: Vec<Status>,
    /// The node's artifact (or, for a group, everything it groups) is available.
    pub(super) available: Vec<bool>,
    pub(super) pending: Vec<usize>,
    pub(super) dependents: Vec<Vec<usize>>,
    pub(super) ready: [BinaryHeap<(i64, std::cmp::Reverse<usize>)>; LANES],
    pub(super) durations: Vec<Option<Duration>>,
    pub(super) started: Vec<Option<Instant>>,
    pub(super) logs: Vec<Option<String>>,
    pub(super) stop: bool,
    pub(super) keep_going: bool,
    pub(super) done: usize,
    pub(super) total: usize,
    /// Remote executions a worker has accepted and not yet answered, and which.
    pub(super) remote_running: usize,
    pub(super) on_worker: Vec<bool>,
    /// Why the HTTP cache, which this build needs, could not be used.
    pub(super) unreachable: Option<String>,
    /// Requirements built again because a worker found them in no cache.
    pub(super) rebuilt: Vec<bool>,
    /// What the HTTP cache answered before planning asked (see `presence`).
    pub(super) known: Known,
    /// `--dry-run`: the HTTP cache is asked before a download is planned.
    pub(super) dry_run: bool,
    /// Where the build's first download is: it goes alone until the cache answers.
    pub(super) probe: Probe,
    /// When and where each job ran.
    pub(super) spans: Spans,
    /// The error lines of each failed task.
    pub(super) errors: Vec<Option<String>>,
    /// Local artifacts hashed against their manifests (see `decide`).
    pub(super) hashed: Vec<bool>,
}

impl<'a> Scheduler<'a> {
    pub(super) fn new(
        graph: &'a Graph,
        services: &'a Services<'a>,
        opts: &Options<'a>,
    ) -> Scheduler<'a> {
        let n = graph.nodes.len();
        let mut is_goal = vec![false; n];
        for &g in &graph.goals {
            is_goal[g] = true;
        }
        Scheduler {
            graph,
            services,
            mode: opts.mode,
            is_goal,
            plan: vec![Plan::Unplanned; 2 * n],
            status: vec![Status::Unneeded; 2 * n],
            available: vec![false; 2 * n],
            pending: vec![0; 2 * n],
            dependents: vec![Vec::new(); 2 * n],
            ready: Default::default(),
            durations: vec![None; n],
            started: vec![None; n],
            logs: vec![None; n],
            stop: false,
            keep_going: opts.keep_going,
            done: 0,
            total: 0,
            remote_running: 0,
            on_worker: vec![false; n],
            unreachable: None,
            rebuilt: vec![false; n],
            known: if opts.goals_absent {
                graph.goals.iter().map(|&g| (g, Ok(false))).collect()
            } else {
                Known::new()
            },
            dry_run: opts.dry_run,
            probe: Probe::NotYet,
            spans: Spans::new(n),
            errors: vec![None; n],
            hashed: vec![false; n],
        }
    }

    /// Hands ready nodes to the pool and takes its events until nothing runs;
    /// returns whether the build was interrupted.
    pub(super) fn drive(
        &mut self,
        mut lanes: Lanes<'_>,
        infos: &[OnceLock<Arc<ArtifactInfo>>],
        prefix_output: bool,
    ) -> Result<bool> {
        let mut interrupted = false;
        loop {
            if interrupt::is_set() && !self.stop {
                self.stop = true;
                interrupted = true;
                console::error("Interrupted by user");
            }
            for lane in 0..LANES {
                while !self.stop && lanes.running[lane] < lanes.limits[lane] {
                    if lane == TRANSFER && matches!(self.probe, Probe::Waiting(_)) {
                        // The build's first download goes alone until the cache
                        // answers: a failing cache costs one request, not one each.
                        break;
                    }
                    let Some((_, std::cmp::Reverse(i))) = self.ready[lane].pop() else {
                        break;
                    };
                    if self.probe == Probe::NotYet && self.plan[i] == Plan::Download {
                        self.probe = Probe::Waiting(i);
                    }
                    lanes.running[lane] += 1;
                    self.spans.begin(i, self.plan[i]);
                    let _ = lanes.jobs.send(Job::Run(i, self.plan[i]));
                }
            }
            if lanes.running == [0; LANES] {
                return Ok(interrupted);
            }
            if self.stop {
                lanes
                    .withdraw
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            self.show_status(lanes.running);
            let event = match lanes.events.recv_timeout(Duration::from_millis(100)) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(interrupted),
            };
            if let Err(e) = self.on_event(event, &mut lanes, infos, prefix_output) {
                self.stop = true;
                // Let the running jobs end before giving up.
                let mut left: usize = lanes.running.iter().sum();
                while left > 0 {
                    match lanes.events.recv() {
                        Ok(Event::Done(..)) => left -= 1,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                return Err(e);
            }
        }
    }

    fn on_event(
        &mut self,
        event: Event,
        lanes: &mut Lanes<'_>,
        infos: &[OnceLock<Arc<ArtifactInfo>>],
        prefix_output: bool,
    ) -> Result<()> {
        let graph = self.graph;
        match event {
            Event::Started(i) => {
                self.started[i] = Some(Instant::now());
                console::info(&format!("Execution started ({})", graph.nodes[i].label()))
            }
            Event::Output { i, line, is_err } => {
                let node = &graph.nodes[i];
                let prefix = prefix_output.then_some(node.short.as_str());
                console::output(&node.qualified, prefix, &line, is_err);
            }
            Event::Replay(i, line) => {
                let node = &graph.nodes[i];
                console::output(&node.qualified, Some(&node.short), &line, false)
            }
            Event::Log(level, message) => console::log(level, &message),
            Event::Answered(i) => {
                if self.probe == Probe::Waiting(i) {
                    self.probe = Probe::Answered;
                }
            }
            Event::RemoteRunning(i, worker) => {
                // Once per node, though a request sent again is accepted again.
                if !std::mem::replace(&mut self.on_worker[i], true) {
                    self.remote_running += 1;
                }
                if !worker.is_empty() {
                    self.spans.lane[i] = Some(format!("worker {worker}"));
                }
            }
            Event::Done(i, result) => {
                if self.probe == Probe::Waiting(i) {
                    self.probe = Probe::Answered;
                }
                let node = &graph.nodes[i];
                crate::runlog::task_done(&node.qualified, &node.short);
                lanes.running[self.plan[i].lane()] -= 1;
                self.spans.end(i);
                // A request withdrawn or failed before a worker took it was never
                // counted.
                if std::mem::replace(&mut self.on_worker[i], false) {
                    self.remote_running -= 1;
                }
                self.finish(i, result, infos)?;
            }
        }
        Ok(())
    }
}

/// The planner's questions about node `i`, answered by the scheduler.
pub(super) struct Asking<'s, 'a> {
    pub(super) scheduler: &'s mut Scheduler<'a>,
    pub(super) i: usize,
}

impl choose::Ask for Asking<'_, '_> {
    fn remote(&mut self) -> bool {
        self.scheduler.remote_has(self.i)
    }

    fn fast_here(&mut self) -> bool {
        self.scheduler.fast_here(self.i)
    }
}

impl Scheduler<'_> {
    /// Plans node `i` and, first, everything it needs. Depth-first without recursion
    /// (a requirement chain may be thousands of tasks deep): each frame is a node
    /// with the needs it still has to plan.
    pub(super) fn plan(&mut self, i: usize) -> Result<()> {
        if self.plan[i] != Plan::Unplanned {
            return Ok(());
        }
        match self.decide(i, false)? {
            Some(needs) => self.plan_needs(i, needs),
            None => Ok(()),
        }
    }

    /// Plans `needs` (planning their own needs first), then makes node `i` wait for
    /// those that are not available, or ready when none is left.
    fn plan_needs(&mut self, i: usize, needs: Vec<usize>) -> Result<()> {
        let mut frames: Vec<(usize, Vec<usize>, usize)> = vec![(i, needs, 0)];
        while let Some((node, needs, next)) = frames.last_mut() {
            let Some(&d) = needs.get(*next) else {
                let node = *node;
                frames.pop();
                if self.pending[node] == 0 && self.status[node] == Status::Pending {
                    self.make_ready(node);
                }
                continue;
            };
            // What a view holds is what an execution reads.
            let used = self.viewer(*node).is_some();
            if used && self.plan[d] == Plan::Available && self.unhashed(d) {
                // Found in the local cache as a goal or an alias's member, which read
                // nothing: decided again, hashed this time. Nothing waits for it yet.
                self.plan[d] = Plan::Unplanned;
                self.available[d] = false;
            }
            if self.plan[d] == Plan::Unplanned {
                if let Some(own) = self.decide(d, used)? {
                    frames.push((d, own, 0));
                    continue;
                }
            }
            *next += 1;
            let node = *node;
            self.wait_for(node, d);
        }
        Ok(())
    }

    /// Makes node `i` wait for its planned need `d`, unless `d` is available; a need
    /// that failed blocks `i`.
    fn wait_for(&mut self, i: usize, d: usize) {
        if self.available[d] {
            return;
        }
        if self.status[d] == Status::Pending {
            // Each pair is linked once: a node's needs are planned once, and hold no
            // duplicates (see `needs`; a deep chain makes these lists long: no search).
            self.pending[i] += 1;
            self.dependents[d].push(i);
        } else if self.status[i] == Status::Pending {
            self.status[i] = Status::Blocked;
            self.propagate(i, Some((d, false)));
        }
    }

    /// The view of node `i` (see [`Scheduler`]).
    fn view(&self, i: usize) -> usize {
        self.graph.nodes.len() + i
    }

    /// The node whose view `v` is, if `v` is a view.
    pub(super) fn viewer(&self, v: usize) -> Option<usize> {
        v.checked_sub(self.graph.nodes.len())
    }

    /// What an execution of node `i` needs: its view and its resources; what a view
    /// needs: the node's direct requirements and the views of those it sees through.
    /// No entry appears twice: direct requirements are free of repetitions, and
    /// resources are never among them.
    pub(super) fn needs(&self, i: usize) -> Vec<usize> {
        let graph = self.graph;
        let Some(viewer) = self.viewer(i) else {
            let mut needs = vec![self.view(i)];
            needs.extend(&graph.nodes[i].resources);
            return needs;
        };
        let direct = graph.direct_artifacts(viewer);
        let mut needs = direct.to_vec();
        needs.extend(
            direct
                .iter()
                .filter(|&&d| crate::graph::transparent(&graph.nodes[d]))
                .map(|&d| self.view(d)),
        );
        needs
    }

    /// Decides what node `i` needs: `Some(needs)` when it waits for them (an
    /// execution, a group), `None` when it is settled or ready already. `used`: an
    /// execution here will read its artifact, so a local one must be what its
    /// manifest says (hashed, once per build): one that is not counts as absent,
    /// removed and built or downloaded again, never used.
    fn decide(&mut self, i: usize, used: bool) -> Result<Option<Vec<usize>>> {
        let graph = self.graph;
        self.status[i] = Status::Pending;
        if self.viewer(i).is_some() {
            self.plan[i] = Plan::Group;
            return Ok(Some(self.needs(i)));
        }
        let node = &graph.nodes[i];
        if node.is_alias() {
            self.plan[i] = Plan::Group;
            return Ok(Some(graph.expand_alias(i)));
        }
        if node.is_resource() {
            self.plan[i] = Plan::Group;
            return Ok(Some(self.needs(i)));
        }
        let cache = self.services.cache;
        cache.mark_used([(node.name(), node.identity.as_str())])?;
        let mut local = node.task.cacheable && cache.is_present(node.name(), &node.identity);
        if local && used && self.hashes() {
            local = self.intact_once(i)?;
        }
        let (kind, facts) = (self.kind(), self.facts(i, local));
        let plan = choose::choose(kind, facts, &mut Asking { scheduler: self, i });
        if self.unreachable.is_some() {
            // The build stops (see `run`): nothing is settled from what it found.
            return Ok(None);
        }
        let plan = match plan {
            Choice::Plan(plan) => plan,
            Choice::InHttpCache => {
                self.plan[i] = Plan::Available;
                self.status[i] = Status::InHttpCache;
                self.available[i] = true;
                return Ok(None);
            }
            Choice::NotBuilt => {
                self.not_built(i);
                return Ok(None);
            }
        };
        self.plan[i] = plan;
        match plan {
            Plan::Available => {
                self.status[i] = Status::Cached;
                self.available[i] = true;
                Ok(None)
            }
            Plan::Execute | Plan::Remote => {
                self.total += 1;
                Ok(Some(self.needs(i)))
            }
            _ => {
                self.total += 1;
                self.make_ready(i);
                Ok(None)
            }
        }
    }

    /// Whether planning hashes the local artifacts executions here read: local
    /// builds and workers, unless they run nothing.
    fn hashes(&self) -> bool {
        matches!(self.mode, Mode::Local | Mode::Worker) && !self.dry_run
    }

    /// Whether node `i` was found in the local cache and not hashed, where planning
    /// hashes what executions read.
    fn unhashed(&self, i: usize) -> bool {
        self.status[i] == Status::Cached && !self.hashed[i] && self.hashes()
    }

    /// The kind of build, as [`choose`] knows it.
    pub(super) fn kind(&self) -> choose::Kind {
        match self.mode {
            Mode::Local => choose::Kind::Local,
            Mode::DownloadOnly => choose::Kind::DownloadOnly,
            Mode::Worker => choose::Kind::Worker,
            Mode::Network(_) => choose::Kind::Network,
        }
    }

    /// What is known of node `i` without asking anyone (`local`: in the local cache).
    pub(super) fn facts(&self, i: usize, local: bool) -> choose::Facts {
        let http = self.services.http;
        choose::Facts {
            goal: self.is_goal[i],
            cacheable: self.graph.nodes[i].task.cacheable,
            local,
            download: http.is_some_and(|h| h.download && !h.is_down()),
            upload: http.is_some_and(|h| h.upload),
            ask_first: self.dry_run,
        }
    }

    /// Whether node `i` is `fast` and every artifact it needs is in the local cache,
    /// as its manifest says: hashed (once per build) as what executions here read
    /// (see `decide`); one that differs is removed, and the task goes to a worker.
    pub(super) fn fast_here(&mut self, i: usize) -> bool {
        let graph = self.graph;
        let cache = self.services.cache;
        if !graph.nodes[i].task.def.fast {
            return false;
        }
        // Resources are never among what a node sees.
        let seen = graph.visible(i);
        if !seen.iter().all(|&d| {
            let n = &graph.nodes[d];
            cache.is_present(n.name(), &n.identity)
        }) {
            return false;
        }
        if self.dry_run {
            return true;
        }
        seen.into_iter()
            .all(|d| matches!(self.intact_once(d), Ok(true)))
    }

    /// Whether node `d`'s local artifact is what its manifest says, hashed once per
    /// build: one that differs is removed (`LocalCache::intact`). Under its lock, as
    /// any removal; one another process holds is being checked or uploaded by it.
    fn intact_once(&mut self, d: usize) -> Result<bool> {
        if std::mem::replace(&mut self.hashed[d], true) {
            return Ok(true);
        }
        let (node, cache) = (&self.graph.nodes[d], self.services.cache);
        Ok(match cache.try_lock(&node.identity)? {
            Some(_lock) => cache.intact(node.name(), &node.identity),
            None => true,
        })
    }

    /// A task that must come from a cache but no cache holds.
    fn not_built(&mut self, i: usize) {
        let node = &self.graph.nodes[i];
        let message = match self.mode {
            Mode::Worker => format!(
                "Requirement {} is in no cache: it must be built before its consumers",
                node.label()
            ),
            _ => format!("Task must be built first: no cache holds {}", node.label()),
        };
        console::error(&message);
        self.plan[i] = Plan::Available;
        self.status[i] = Status::Failed;
        self.propagate(i, Some((i, false)));
    }

    /// Whether the HTTP cache holds node `i`'s artifact (and, for local builds,
    /// downloads are enabled).
    pub(super) fn remote_has(&mut self, i: usize) -> bool {
        let Some(http) = usable_http(self.services, self.mode) else {
            return false;
        };
        let node = &self.graph.nodes[i];
        let answer = match self.known.remove(&i) {
            Some(answer) => answer,
            None => http.exists(node.name(), &node.identity),
        };
        match answer {
            Ok(present) => present,
            // Network builds and `jolt download` cannot go on without the cache: the
            // build stops with this error (exit 3) instead of a warning.
            Err(e)
                if http_cache::is_unreachable(&e)
                    && matches!(self.mode, Mode::Network(_) | Mode::DownloadOnly) =>
            {
                http.mark_down();
                self.unreachable.get_or_insert(format!("{e:#}"));
                false
            }
            Err(e) => {
                if let Some(w) = http_warning(http, "HEAD", &e) {
                    console::warn(&w);
                }
                false
            }
        }
    }

    pub(super) fn make_ready(&mut self, i: usize) {
        if self.plan[i] == Plan::Group {
            // Resources and aliases do no work of their own.
            self.status[i] = Status::Unneeded;
            self.available[i] = true;
            self.propagate(i, None);
        } else {
            let lane = self.plan[i].lane();
            self.ready[lane].push((self.graph.nodes[i].weight, std::cmp::Reverse(i)));
        }
    }

    /// Releases the dependents of a finished node; `failed` names a failed requirement
    /// and whether it was unstable. Depth-first in dependents' order, without
    /// recursion: a frame is a node, how it ended, and its dependents left to visit.
    fn propagate(&mut self, i: usize, failed: Option<(usize, bool)>) {
        let first = std::mem::take(&mut self.dependents[i]);
        let mut frames = vec![(failed, first, 0usize)];
        while let Some((failed, dependents, next)) = frames.last_mut() {
            let Some(&c) = dependents.get(*next) else {
                frames.pop();
                continue;
            };
            *next += 1;
            let failed = *failed;
            if self.status[c] != Status::Pending {
                continue;
            }
            let ended = match failed {
                None => {
                    self.pending[c] -= 1;
                    if self.pending[c] > 0 {
                        continue;
                    }
                    if self.plan[c] != Plan::Group {
                        let lane = self.plan[c].lane();
                        self.ready[lane].push((self.graph.nodes[c].weight, std::cmp::Reverse(c)));
                        continue;
                    }
                    // A group whose members are all done is done itself.
                    self.status[c] = Status::Unneeded;
                    self.available[c] = true;
                    None
                }
                Some((f, unstable)) => {
                    if unstable && matches!(self.plan[c], Plan::Execute | Plan::Remote) {
                        let node = &self.graph.nodes[c];
                        console::error(&format!(
                            "Task depends on failed task '{}' ({})",
                            self.graph.nodes[f].short,
                            node.label()
                        ));
                        let s = if node.task.def.unstable {
                            Status::Unstable
                        } else {
                            if !self.keep_going {
                                self.stop = true;
                            }
                            Status::Failed
                        };
                        self.status[c] = s;
                        Some((c, s == Status::Unstable))
                    } else {
                        self.status[c] = Status::Blocked;
                        // A view passes on what it waited for; its consumer judges.
                        Some((f, unstable && self.viewer(c).is_some()))
                    }
                }
            };
            let next_dependents = std::mem::take(&mut self.dependents[c]);
            frames.push((ended, next_dependents, 0));
        }
    }

    fn succeed(
        &mut self,
        i: usize,
        status: Status,
        info: Option<Arc<ArtifactInfo>>,
        infos: &[OnceLock<Arc<ArtifactInfo>>],
    ) {
        if let Some(info) = info {
            let _ = infos[i].set(info);
        }
        self.status[i] = status;
        self.available[i] = true;
        self.propagate(i, None);
    }

    pub(super) fn finish(
        &mut self,
        i: usize,
        result: Result<Done, Failure>,
        infos: &[OnceLock<Arc<ArtifactInfo>>],
    ) -> Result<()> {
        let node = &self.graph.nodes[i];
        self.done += 1;
        match result {
            Ok(Done::Executed(info, duration)) => {
                console::info(&format!(
                    "Execution finished after {} ({})",
                    format_duration(duration),
                    node.label()
                ));
                if matches!(self.mode, Mode::Worker) && self.is_goal[i] {
                    // Replayed by the client; read now, since a task that keeps no
                    // artifact keeps its log only for the build.
                    self.logs[i] = crate::store::artifact::output_tail(
                        &info.dir.join(crate::store::artifact::BUILD_LOG),
                        crate::store::artifact::REPLAYED_OUTPUT,
                    );
                }
                self.durations[i] = Some(duration);
                self.succeed(i, Status::Executed, Some(info), infos);
            }
            Ok(Done::RemoteExecuted(info, duration)) => {
                console::info(&format!(
                    "Remote execution finished after {} ({})",
                    format_duration(duration),
                    node.label()
                ));
                self.durations[i] = Some(duration);
                self.succeed(i, Status::Executed, info, infos);
            }
            Ok(Done::Downloaded(info)) => self.succeed(i, Status::Downloaded, Some(info), infos),
            Ok(Done::Uploaded) => self.succeed(i, Status::Uploaded, None, infos),
            Ok(Done::Reused(info)) => {
                console::verbose(&format!(
                    "Execution skipped, built by another process ({})",
                    node.label()
                ));
                self.succeed(i, Status::Cached, Some(info), infos);
            }
            Ok(Done::DownloadFailed) => self.download_failed(i)?,
            Ok(Done::Unusable) => self.build_instead(i)?,
            Ok(Done::Withdrawn) => self.status[i] = Status::Pending,
            Ok(Done::RequirementsMissing {
                missing,
                worker,
                error,
            }) => self.requirements_missing(i, missing, &worker, &error)?,
            Err(failure) if failure.interrupted => {
                self.status[i] = Status::Interrupted;
                self.propagate(i, Some((i, false)));
            }
            Err(mut failure) if failure.infra.is_some() => {
                let message = failure.infra.take().unwrap_or_default();
                // The build's error says it, once.
                failure.lines.retain(|line| *line != message);
                self.failed(i, failure);
                self.errors[i] = Some(message.clone());
                return Err(crate::error::infra(message));
            }
            Err(failure) => self.failed(i, failure),
        }
        Ok(())
    }

    /// Node `i` is to be built after all (here, or on a worker in a network build),
    /// with what it needs: what was planned for it (a download, an upload of the
    /// local artifact) found nothing usable.
    fn build_instead(&mut self, i: usize) -> Result<()> {
        self.done -= 1;
        self.plan[i] = match self.mode {
            Mode::Network(_) => Plan::Remote,
            _ => Plan::Execute,
        };
        self.plan_needs(i, self.needs(i))
    }

    /// A worker found the requirements `missing` of node `i`'s remote execution in no
    /// cache: each is built again (once a build: one gone twice fails `i` with the
    /// worker's error), and `i` waits for them, then is sent again.
    fn requirements_missing(
        &mut self,
        i: usize,
        missing: Vec<usize>,
        worker: &str,
        error: &str,
    ) -> Result<()> {
        let graph = self.graph;
        self.done -= 1;
        if missing
            .iter()
            .any(|&d| self.rebuilt[d] && self.status[d] != Status::Pending)
        {
            let mut failure = Failure::new(format!("{worker}: {error}"));
            failure.remote = true;
            self.failed(i, failure);
            return Ok(());
        }
        self.status[i] = Status::Pending;
        for &d in &missing {
            if self.status[d] == Status::Pending {
                continue; // being built again for another consumer
            }
            console::warn(&format!(
                "{worker} found {} in no cache: building it again",
                graph.nodes[d].label()
            ));
            self.rebuilt[d] = true;
            self.available[d] = false;
            self.status[d] = Status::Pending;
            self.total += 1;
            self.plan[d] = Plan::Remote;
            self.plan_needs(d, self.needs(d))?;
        }
        for &d in &missing {
            self.wait_for(i, d);
        }
        if self.pending[i] == 0 && self.status[i] == Status::Pending {
            self.make_ready(i);
        }
        Ok(())
    }

    /// The HTTP cache could not deliver node `i`: build it instead where that is
    /// allowed, have a worker replace an archive that was rejected, else fail.
    fn download_failed(&mut self, i: usize) -> Result<()> {
        let node = &self.graph.nodes[i];
        let http = self.services.http;
        let url = http
            .map(|h| h.url(node.name(), &node.identity))
            .unwrap_or_default();
        let rejected = http.is_some_and(|h| h.is_rejected(node.name(), &node.identity));
        match self.mode {
            Mode::Local => self.build_instead(i)?,
            Mode::Network(_) if rejected => {
                // The cache's archive is unusable: a worker builds it again and
                // uploads it over the bad one (the request says so).
                console::warn(&format!(
                    "The HTTP cache holds an unusable artifact of {} ({url}): having it built again",
                    node.label()
                ));
                self.build_instead(i)?;
            }
            Mode::Network(_) => {
                console::error(&format!(
                    "The HTTP cache holds an unusable artifact of {} ({url}): remove it and build again",
                    node.label()
                ));
                self.status[i] = Status::Failed;
                if !self.keep_going {
                    self.stop = true;
                }
                self.propagate(i, Some((i, false)));
            }
            Mode::DownloadOnly | Mode::Worker => self.not_built(i),
        }
        Ok(())
    }

    /// Node `i` failed: its lines, its log's tail for the report, and its consumers.
    pub(super) fn failed(&mut self, i: usize, failure: Failure) {
        let node = &self.graph.nodes[i];
        self.errors[i] = Some(failure.lines.join("; "));
        if console::quiet() && !failure.interrupted {
            // `-q` hid the task's output as it came: what went wrong is in it.
            for line in failure.log.iter().flat_map(|l| l.lines()) {
                console::output_always(Some(&node.short), line, true);
            }
        }
        for line in &failure.lines {
            console::error(line);
        }
        let unstable = node.task.def.unstable;
        let elapsed = failure
            .took
            .or_else(|| self.started[i].map(|s| s.elapsed()))
            .unwrap_or_default();
        self.durations[i] = Some(elapsed);
        console::error(&format!(
            "{}xecution failed after {} ({}){}",
            if failure.remote { "Remote e" } else { "E" },
            format_duration(elapsed),
            node.label(),
            if unstable { ", unstable" } else { "" }
        ));
        let kept = failure.kept.clone().or_else(|| {
            let text = failure
                .log
                .as_deref()
                .filter(|l| failure.remote && !l.is_empty())?;
            crate::runlog::keep_task_text(&kept_name(node), text)
        });
        if let Some(path) = kept {
            console::error(&format!("Task output kept in {}", path.display()));
        }
        let mut log = failure.log.unwrap_or_default();
        for line in &failure.lines {
            if !log.is_empty() {
                log.push('\n');
            }
            log.push_str(line);
        }
        self.logs[i] = Some(log);
        self.status[i] = if unstable {
            Status::Unstable
        } else {
            Status::Failed
        };
        if !unstable && !self.keep_going {
            self.stop = true;
        }
        self.propagate(i, Some((i, unstable)));
    }

    fn show_status(&self, running: [usize; LANES]) {
        if !console::status_enabled() {
            return;
        }
        let now = self.spans.t0.elapsed();
        let local: Vec<(&str, Duration)> = self
            .spans
            .active
            .iter()
            .filter(|&&i| self.plan[i] == Plan::Execute)
            .map(|&i| {
                let began = self.spans.began[i].unwrap_or(now);
                (
                    self.graph.nodes[i].short.as_str(),
                    now.saturating_sub(began),
                )
            })
            .collect();
        let remote = match self.mode {
            // Sent requests are queued in the broker until a worker accepts them.
            Mode::Network(_) => Some(RemoteCounts {
                on_workers: self.remote_running,
                in_broker: running[REMOTE].saturating_sub(self.remote_running),
                waiting: self.ready[REMOTE].len(),
            }),
            _ => None,
        };
        console::status(Some(status_text(
            self.done, self.total, &local, remote, self.stop,
        )));
    }
}
