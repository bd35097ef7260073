//! The executor: decides what each node of a graph needs (nothing, the cached
//! artifact, a download, an execution here or on a network worker), then does it on a
//! pool of threads.
//!
//! The calling thread is the scheduler and owns the console: it keeps two ready
//! queues (executions here, limited by `-j`; transfers and remote executions, limited
//! separately), highest weight first, hands node indices to the pool through a
//! crossbeam channel and receives the threads' events (started, output lines, done)
//! on another. What a thread does for a node is in [`job`].
//!
//! Only what is needed runs: a goal that is available needs nothing else; a task that
//! must execute needs the artifacts it sees and its resources. "Available" means in
//! the local cache for local builds, and in the HTTP cache for network builds and on
//! workers.

mod choose;
pub mod guardian;
mod job;
mod presence;
pub mod process;
mod remote;

use anyhow::Result;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError};
use std::collections::{BTreeMap, BinaryHeap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::console;
use crate::graph::Graph;
use crate::interrupt;
use crate::remote::client::NetworkClient;
use crate::remote::messages::RecipeBundle;
use crate::store::artifact::Manifest;
use crate::store::http::{self as http_cache, HttpCache};
use crate::store::local::LocalCache;
use crate::util::fs::{self as fsutil, format_duration};
use job::Runner;
use remote::Job;

/// What kind of build this is.
#[derive(Clone, Copy)]
pub enum Mode<'a> {
    /// `jolt build`: execute here, download what the HTTP cache holds.
    Local,
    /// `jolt download`: fetch the goals from the HTTP cache, never execute.
    DownloadOnly,
    /// A network worker: the goal is executed here (unless the HTTP cache holds it)
    /// and uploaded; requirements must come from the caches.
    Worker,
    /// `jolt build --network`: workers execute, the client uploads what only it has
    /// and downloads the goals.
    Network(&'a Network<'a>),
}

/// What a network build needs besides the caches.
pub struct Network<'a> {
    pub client: &'a NetworkClient,
    /// The workspace's recipe files, which every request names by digest.
    pub recipes: RecipeBundle,
    /// Remote executions in flight at once.
    pub jobs: usize,
}

/// Executor options.
pub struct Options<'a> {
    /// Executions at once on this machine.
    pub jobs: usize,
    /// `-k`: keep starting tasks whose requirements succeeded after a failure.
    pub keep_going: bool,
    pub mode: Mode<'a>,
    /// `--dry-run`: plan, say what would happen to each task, run nothing.
    pub dry_run: bool,
    /// `--explain`: say why each task that executes does.
    pub explain: bool,
    /// The HTTP cache lacked the goals a moment ago (a worker asked before it took
    /// the identity lock): planning does not ask again.
    pub goals_absent: bool,
}

/// The most events (mostly output lines) queued for the scheduler.
const EVENTS_QUEUED: usize = 4096;

/// Events queued for the scheduler per pool thread, up to [`EVENTS_QUEUED`]. The
/// queue's slots are allocated and initialized when it is made: 4,096 of them, about
/// half a MiB, cost a worker more than a trivial task's own bookkeeping on every
/// request (each runs the executor for one job).
const EVENTS_PER_THREAD: usize = 256;

/// What became of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not needed by this build.
    Unneeded,
    /// Needed, but never started (the build stopped first).
    Pending,
    /// Found in the local cache.
    Cached,
    /// Found in the HTTP cache and not needed here.
    InHttpCache,
    /// Fetched from the HTTP cache.
    Downloaded,
    /// Sent to the HTTP cache (network builds, workers).
    Uploaded,
    Executed,
    Failed,
    /// Failed, but marked `unstable`: does not fail the build.
    Unstable,
    /// Not run because a requirement failed.
    Blocked,
    Interrupted,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Unneeded => "unneeded",
            Status::Pending => "not run",
            Status::Cached => "cached",
            Status::InHttpCache => "in http cache",
            Status::Downloaded => "downloaded",
            Status::Uploaded => "uploaded",
            Status::Executed => "executed",
            Status::Failed => "failed",
            Status::Unstable => "unstable",
            Status::Blocked => "blocked",
            Status::Interrupted => "interrupted",
        }
    }
}

/// A committed (or, for non-cacheable tasks, temporary) artifact and its metadata.
#[derive(Debug)]
pub struct ArtifactInfo {
    pub dir: PathBuf,
    pub environ: BTreeMap<String, String>,
    pub strings: BTreeMap<String, String>,
    pub paths: BTreeMap<String, String>,
}

impl ArtifactInfo {
    fn from_manifest(dir: PathBuf, m: Manifest) -> ArtifactInfo {
        ArtifactInfo {
            dir,
            environ: m.environ,
            strings: m.strings,
            paths: m.paths,
        }
    }
}

/// The outcome of a build.
#[derive(Debug)]
pub struct Report {
    pub status: Vec<Status>,
    pub duration: Vec<Option<Duration>>,
    /// The tail of the log of each failed task; in a worker's build also the output
    /// of the goal it executed, at most its last MiB, for the reply.
    pub logs: Vec<Option<String>>,
    pub interrupted: bool,
    /// When and where each job ran.
    pub spans: Vec<Option<Span>>,
    /// The error lines of each failed task.
    pub errors: Vec<Option<String>>,
}

/// When a job ran, since the build's start, and where.
#[derive(Debug, Clone)]
pub struct Span {
    pub start: Duration,
    pub end: Duration,
    /// `local N`, `transfer N`, `remote N` or `worker NAME`.
    pub lane: String,
    /// `execute`, `remote`, `download` or `upload`.
    pub kind: &'static str,
}

impl Report {
    pub fn count(&self, s: Status) -> usize {
        self.status.iter().filter(|&&x| x == s).count()
    }

    /// Whether any failure counts against the build.
    pub fn failed(&self) -> bool {
        self.status
            .iter()
            .any(|s| matches!(s, Status::Failed | Status::Blocked | Status::Pending))
    }
}

struct Failure {
    lines: Vec<String>,
    interrupted: bool,
    /// The tail of the task's log.
    log: Option<String>,
    /// The failure happened on a network worker.
    remote: bool,
    /// Where the task's whole output was kept (see `runlog`).
    kept: Option<PathBuf>,
    /// How long the task ran, where the scheduler did not see it start (a worker's
    /// figure for a network build).
    took: Option<Duration>,
    /// An infrastructure failure that stops the build (exit 3) instead of failing
    /// the task, as its error message: the HTTP cache found unreachable in a network
    /// build, which needs it; the broker refusing a declaration.
    infra: Option<String>,
}

impl Failure {
    fn new(line: impl Into<String>) -> Failure {
        Failure {
            lines: vec![line.into()],
            interrupted: false,
            log: None,
            remote: false,
            kept: None,
            took: None,
            infra: None,
        }
    }

    fn interrupted(line: impl Into<String>) -> Failure {
        Failure {
            interrupted: true,
            ..Failure::new(line)
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        let message = format!("{e:#}");
        Failure {
            infra: (crate::error::exit_code(&e) == crate::error::Exit::Infra)
                .then(|| message.clone()),
            ..Failure::new(message)
        }
    }
}

enum Done {
    Executed(Arc<ArtifactInfo>, Duration),
    /// Executed by a network worker; the artifact is in the HTTP cache (and, for a
    /// goal, downloaded).
    RemoteExecuted(Option<Arc<ArtifactInfo>>, Duration),
    Downloaded(Arc<ArtifactInfo>),
    Uploaded,
    /// Another process committed the artifact while this one waited for its lock.
    Reused(Arc<ArtifactInfo>),
    /// The HTTP cache could not deliver a usable artifact: build it instead.
    DownloadFailed,
    /// The local artifact an upload was to send is not what it was built as (an
    /// older jolt's, without digests, or changed since), and was removed: build it.
    Unusable,
    /// A request no worker had taken, withdrawn when the build stopped: not run.
    Withdrawn,
    /// A worker found requirements of a remote execution in no cache (a trim, an
    /// operator, a cache shard that went down took them since planning): a miss.
    /// They are built again, and the execution waits for them.
    RequirementsMissing {
        missing: Vec<usize>,
        worker: String,
        error: String,
    },
}

enum Event {
    Started(usize),
    Output(usize, String, bool),
    /// A line of a remote task's log, always shown with the task's name.
    Replay(usize, String),
    Log(console::Level, String),
    /// A remote execution was accepted by a worker (named).
    RemoteRunning(usize, String),
    /// The HTTP cache answered a download's request (it has the artifact).
    Answered(usize),
    Done(usize, Result<Done, Failure>),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plan {
    /// Not (yet) needed.
    Unplanned,
    /// Available without work.
    Available,
    Download,
    Upload,
    Execute,
    Remote,
    /// An alias or a resource: done once what it groups is done.
    Group,
}

/// What a mode decides for a node.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Choice {
    Plan(Plan),
    /// In the HTTP cache, and not needed here.
    InHttpCache,
    /// It must come from a cache, and none holds it.
    NotBuilt,
}

impl Plan {
    /// Which ready queue and limit the job uses: [`LOCAL`] executions, [`TRANSFER`]
    /// (downloads and uploads) or [`REMOTE`] executions.
    fn lane(self) -> usize {
        match self {
            Plan::Execute => LOCAL,
            Plan::Remote => REMOTE,
            _ => TRANSFER,
        }
    }
}

/// The lanes of the pool: each has its ready queue and its limit (`-j`,
/// `http.transfers`, `amqp.jobs`).
const LOCAL: usize = 0;
const TRANSFER: usize = 1;
const REMOTE: usize = 2;
const LANES: usize = 3;

/// The services a build uses.
pub struct Services<'a> {
    pub cache: &'a LocalCache,
    pub http: Option<&'a HttpCache>,
}

/// The error that stops a build which needs the HTTP cache (`jolt download`, network
/// builds) when the cache is unreachable (`why`): exit 3.
fn cache_unreachable(why: &str, mode: Mode) -> anyhow::Error {
    let what = match mode {
        Mode::DownloadOnly => "nothing can be downloaded",
        _ => "network builds need it",
    };
    crate::error::infra(format!(
        "The HTTP cache is unreachable ({why}): {what}; stopping"
    ))
}

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
        sched.explain();
    }
    if opts.dry_run {
        sched.tell_plan();
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
    let transfer_slots = job::Slots::new(transfers);
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

/// The scheduler's ends of the pool: jobs out, events in, and how many jobs run in
/// each lane (executions here, transfers, remote executions) against its limit.
struct Lanes<'n> {
    jobs: crossbeam_channel::Sender<Job<'n>>,
    /// Dropped with the lanes: the waiter of remote calls ends.
    _quit: crossbeam_channel::Sender<()>,
    /// Set when the build stops: the waiter withdraws the requests no worker took.
    withdraw: Arc<std::sync::atomic::AtomicBool>,
    events: Receiver<Event>,
    limits: [usize; LANES],
    running: [usize; LANES],
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
struct Scheduler<'a> {
    graph: &'a Graph,
    services: &'a Services<'a>,
    mode: Mode<'a>,
    is_goal: Vec<bool>,
    plan: Vec<Plan>,
    status: Vec<Status>,
    /// The node's artifact (or, for a group, everything it groups) is available.
    available: Vec<bool>,
    pending: Vec<usize>,
    dependents: Vec<Vec<usize>>,
    ready: [BinaryHeap<(i64, std::cmp::Reverse<usize>)>; LANES],
    durations: Vec<Option<Duration>>,
    started: Vec<Option<Instant>>,
    logs: Vec<Option<String>>,
    stop: bool,
    keep_going: bool,
    done: usize,
    total: usize,
    /// Remote executions a worker has accepted and not yet answered, and which.
    remote_running: usize,
    on_worker: Vec<bool>,
    /// Why the HTTP cache, which this build needs, could not be used.
    unreachable: Option<String>,
    /// Requirements built again because a worker found them in no cache.
    rebuilt: Vec<bool>,
    /// What the HTTP cache answered before planning asked (see `presence`).
    known: presence::Known,
    /// `--dry-run`: the HTTP cache is asked before a download is planned.
    dry_run: bool,
    /// The build's first download, while the cache has not answered it: `None`
    /// before it, `Some(None)` after.
    probe: Option<Option<usize>>,
    /// When and where each job ran.
    spans: Spans,
    /// The error lines of each failed task.
    errors: Vec<Option<String>>,
    /// Local artifacts hashed against their manifests (see `decide`).
    hashed: Vec<bool>,
}

/// When and where each job of a build ran, for `--result` and `--trace`: a lane is
/// a slot of the pool (`local N`, `transfer N`, `remote N`), or the worker that
/// accepted a remote execution.
struct Spans {
    t0: Instant,
    began: Vec<Option<Duration>>,
    ended: Vec<Option<Duration>>,
    lane: Vec<Option<String>>,
    kind: Vec<&'static str>,
    /// Slots of each lane in use, and the lane and slot of each running job.
    busy: [Vec<bool>; LANES],
    slot: Vec<(usize, usize)>,
    /// The jobs running now.
    active: Vec<usize>,
}

impl Spans {
    fn new(n: usize) -> Spans {
        Spans {
            t0: Instant::now(),
            began: vec![None; n],
            ended: vec![None; n],
            lane: vec![None; n],
            kind: vec![""; n],
            busy: Default::default(),
            slot: vec![(0, 0); n],
            active: Vec::new(),
        }
    }

    fn begin(&mut self, i: usize, plan: Plan) {
        let lane_index = plan.lane();
        let busy = &mut self.busy[lane_index];
        let slot = busy.iter().position(|b| !b).unwrap_or(busy.len());
        if slot == busy.len() {
            busy.push(true);
        } else {
            busy[slot] = true;
        }
        self.slot[i] = (lane_index, slot);
        let (kind, lane) = match plan {
            Plan::Execute => ("execute", "local"),
            Plan::Remote => ("remote", "remote"),
            Plan::Download => ("download", "transfer"),
            _ => ("upload", "transfer"),
        };
        self.kind[i] = kind;
        self.lane[i] = Some(format!("{lane} {slot}"));
        self.began[i] = Some(self.t0.elapsed());
        self.active.push(i);
    }

    fn end(&mut self, i: usize) {
        self.ended[i] = Some(self.t0.elapsed());
        self.active.retain(|&a| a != i);
        let (lane, slot) = self.slot[i];
        if let Some(b) = self.busy[lane].get_mut(slot) {
            *b = false;
        }
    }

    /// The spans of the jobs that ran.
    fn finished(self) -> Vec<Option<Span>> {
        (0..self.began.len())
            .map(|i| {
                Some(Span {
                    start: self.began[i]?,
                    end: self.ended[i]?,
                    lane: self.lane[i].clone()?,
                    kind: self.kind[i],
                })
            })
            .collect()
    }
}

impl<'a> Scheduler<'a> {
    fn new(graph: &'a Graph, services: &'a Services<'a>, opts: &Options<'a>) -> Scheduler<'a> {
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
                presence::Known::new()
            },
            dry_run: opts.dry_run,
            probe: None,
            spans: Spans::new(n),
            errors: vec![None; n],
            hashed: vec![false; n],
        }
    }

    /// Hands ready nodes to the pool and takes its events until nothing runs;
    /// returns whether the build was interrupted.
    fn drive(
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
                    if lane == TRANSFER && self.probe.is_some_and(|p| p.is_some()) {
                        // The build's first download goes alone until the cache
                        // answers: a failing cache costs one request, not one each.
                        break;
                    }
                    let Some((_, std::cmp::Reverse(i))) = self.ready[lane].pop() else {
                        break;
                    };
                    if self.probe.is_none() && self.plan[i] == Plan::Download {
                        self.probe = Some(Some(i));
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
            Event::Output(i, line, is_err) => {
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
                if self.probe == Some(Some(i)) {
                    self.probe = Some(None);
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
                if self.probe == Some(Some(i)) {
                    self.probe = Some(None);
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

/// What a network build's requests are doing.
#[derive(Clone, Copy)]
struct RemoteCounts {
    /// Accepted by a worker.
    on_workers: usize,
    /// Sent, not yet accepted.
    in_broker: usize,
    /// Ready, not yet sent (over `amqp.jobs`).
    waiting: usize,
}

/// At most how many running tasks the status line names.
const STATUS_NAMES: usize = 3;

/// The live status line: progress, the tasks running here (the longest running
/// first) with their time so far, and where a network build's requests are.
fn status_text(
    done: usize,
    total: usize,
    running: &[(&str, Duration)],
    remote: Option<RemoteCounts>,
    stopping: bool,
) -> String {
    let mut text = format!("[{done}/{total}] {} running", running.len());
    let mut longest: Vec<&(&str, Duration)> = running.iter().collect();
    longest.sort_by_key(|r| std::cmp::Reverse(r.1));
    if !longest.is_empty() {
        let named: Vec<String> = longest
            .iter()
            .take(STATUS_NAMES)
            .map(|(name, t)| format!("{name} {}s", t.as_secs()))
            .collect();
        text.push_str(&format!(": {}", named.join(", ")));
        if longest.len() > STATUS_NAMES {
            text.push_str(&format!(" +{}", longest.len() - STATUS_NAMES));
        }
    }
    if let Some(r) = remote {
        text.push_str(&format!(
            "; {} on workers, {} queued in the broker",
            r.on_workers, r.in_broker
        ));
        if r.waiting > 0 {
            text.push_str(&format!(", {} not sent yet", r.waiting));
        }
    }
    if stopping {
        text.push_str(", stopping");
    }
    text
}

/// The name a failed task's kept output gets: `NAME-ID8`.
fn kept_name(node: &crate::graph::Node) -> String {
    format!(
        "{}-{}",
        node.short,
        &node.identity[..node.identity.len().min(8)]
    )
}

/// The lines only `old` has (`- LINE`), then those only `new` has (`+ LINE`), each
/// in its order; a line repeated counts as many times.
fn explain_diff(old: &[String], new: &[String]) -> Vec<String> {
    fn count(lines: &[String]) -> std::collections::HashMap<&str, usize> {
        let mut n = std::collections::HashMap::new();
        for l in lines {
            *n.entry(l.as_str()).or_default() += 1;
        }
        n
    }
    let (mut in_old, mut in_new) = (count(old), count(new));
    let mut out = Vec::new();
    for l in old {
        match in_new.get_mut(l.as_str()) {
            Some(k) if *k > 0 => *k -= 1,
            _ => out.push(format!("- {l}")),
        }
    }
    for l in new {
        match in_old.get_mut(l.as_str()) {
            Some(k) if *k > 0 => *k -= 1,
            _ => out.push(format!("+ {l}")),
        }
    }
    out
}

/// The planner's questions about node `i`, answered by the scheduler.
struct Asking<'s, 'a> {
    scheduler: &'s mut Scheduler<'a>,
    i: usize,
}

impl choose::Ask for Asking<'_, '_> {
    fn remote(&mut self) -> bool {
        self.scheduler.remote_has(self.i)
    }

    fn fast_here(&mut self) -> bool {
        self.scheduler.fast_here(self.i)
    }
}

/// The HTTP cache, when a build in `mode` may ask it what it holds: it is up, and a
/// local build or `jolt download` may download.
fn usable_http<'s>(services: &Services<'s>, mode: Mode) -> Option<&'s HttpCache> {
    let local = matches!(mode, Mode::Local | Mode::DownloadOnly);
    services
        .http
        .filter(|h| (h.download || !local) && !h.is_down())
}

/// Warns once that the HTTP cache is unreachable, or about any other HTTP failure.
fn http_warning(http: &HttpCache, what: &str, err: &anyhow::Error) -> Option<String> {
    if http_cache::is_interrupted(err) {
        // Ctrl-C, not the server: nothing to say about the cache.
        None
    } else if http_cache::is_unreachable(err) {
        http.mark_down().then(|| {
            format!(
                "HTTP cache {} is unreachable ({err:#}); going on without it",
                http.uri()
            )
        })
    } else {
        Some(format!("{what} failed: {err:#}"))
    }
}

impl Scheduler<'_> {
    /// Plans node `i` and, first, everything it needs. Depth-first without recursion
    /// (a requirement chain may be thousands of tasks deep): each frame is a node
    /// with the needs it still has to plan.
    fn plan(&mut self, i: usize) -> Result<()> {
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
    fn viewer(&self, v: usize) -> Option<usize> {
        v.checked_sub(self.graph.nodes.len())
    }

    /// What an execution of node `i` needs: its view and its resources; what a view
    /// needs: the node's direct requirements and the views of those it sees through.
    /// No entry appears twice: direct requirements are free of repetitions, and
    /// resources are never among them.
    fn needs(&self, i: usize) -> Vec<usize> {
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
            self.hashed[i] = true;
            // Under its lock, as any removal; one another process holds is being
            // checked or uploaded by it.
            if let Some(_lock) = cache.try_lock(&node.identity)? {
                local = cache.intact(node.name(), &node.identity);
            }
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

    /// `--explain`: for each task that executes, the influence lines that differ from
    /// the newest artifact of the same task and parameters in the local cache (`-`
    /// old, `+` new), or that there is none.
    fn explain(&self) {
        for (i, node) in self.graph.nodes.iter().enumerate() {
            if !matches!(self.plan[i], Plan::Execute | Plan::Remote) {
                continue;
            }
            let cache = self.services.cache;
            let Some(old) = cache.newest_other(node.name(), &node.params, &node.identity) else {
                console::info(&format!(
                    "Explain {}: no earlier artifact of this task and parameters in the local cache",
                    node.label()
                ));
                continue;
            };
            console::info(&format!(
                "Explain {}: differs from {} of {}:",
                node.label(),
                &old.identity[..old.identity.len().min(8)],
                old.created
            ));
            for line in explain_diff(&old.influence, &node.influence) {
                console::info(&format!("  {line}"));
            }
        }
    }

    /// `--dry-run`: says what would happen to each task of the graph, requirements
    /// first, and how many of each.
    fn tell_plan(&self) {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, node) in self.graph.nodes.iter().enumerate() {
            if node.is_alias() || node.is_resource() {
                continue;
            }
            let what = match (self.plan[i], self.status[i]) {
                (_, Status::Failed) => "missing",
                (Plan::Available, _) => "cached",
                (Plan::Download, _) => "download",
                (Plan::Upload, _) => "upload",
                (Plan::Execute, _) => "execute",
                (Plan::Remote, _) => "remote",
                (Plan::Unplanned | Plan::Group, _) => "skip",
            };
            *counts.entry(what).or_default() += 1;
            console::info(&format!("{what} ({})", node.label()));
        }
        let counts: Vec<String> = counts.iter().map(|(w, n)| format!("{n} {w}")).collect();
        console::info(&format!("Dry run: {}; nothing was run", counts.join(", ")));
    }

    /// The kind of build, as [`choose`] knows it.
    fn kind(&self) -> choose::Kind {
        match self.mode {
            Mode::Local => choose::Kind::Local,
            Mode::DownloadOnly => choose::Kind::DownloadOnly,
            Mode::Worker => choose::Kind::Worker,
            Mode::Network(_) => choose::Kind::Network,
        }
    }

    /// What is known of node `i` without asking anyone (`local`: in the local cache).
    fn facts(&self, i: usize, local: bool) -> choose::Facts {
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
    fn fast_here(&mut self, i: usize) -> bool {
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
        for d in seen {
            if std::mem::replace(&mut self.hashed[d], true) {
                continue;
            }
            let n = &graph.nodes[d];
            match cache.try_lock(&n.identity) {
                Ok(Some(_lock)) if !cache.intact(n.name(), &n.identity) => return false,
                // Intact, or being checked or uploaded by the process holding it.
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        true
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
    fn remote_has(&mut self, i: usize) -> bool {
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

    fn make_ready(&mut self, i: usize) {
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

    fn finish(
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
    fn failed(&mut self, i: usize, failure: Failure) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_names_the_longest_running_tasks_and_where_requests_are() {
        let s = Duration::from_secs;
        let running = [("a", s(1)), ("b", s(7)), ("c", s(3)), ("d", s(0))];
        assert_eq!(
            status_text(4, 30, &running, None, false),
            "[4/30] 4 running: b 7s, c 3s, a 1s +1"
        );
        let remote = RemoteCounts {
            on_workers: 2,
            in_broker: 24,
            waiting: 0,
        };
        assert_eq!(
            status_text(4, 30, &[], Some(remote), true),
            "[4/30] 0 running; 2 on workers, 24 queued in the broker, stopping"
        );
    }
}
