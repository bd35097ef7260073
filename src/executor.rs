//! The executor: decides what each node of a graph needs (nothing, the cached
//! artifact, an execution), then runs the executions on a pool of threads.
//!
//! The calling thread is the scheduler and owns the console: it keeps the ready queue
//! (highest weight first), hands node indices to `jobs` worker threads through a
//! crossbeam channel and receives their events (started, output lines, done) on
//! another. A worker locks the artifact, runs the commands with `sh -e -c` in their
//! own process group, publishes into a staging directory and commits it to the cache.
//!
//! Only what is needed runs: a goal that is cached needs nothing else; a task that must
//! execute needs the artifacts it sees and its resources.

use anyhow::Result;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::artifact::{self, Manifest, BUILD_LOG};
use crate::cache::{ArtifactLock, Cache};
use crate::console;
use crate::fsutil::{self, format_duration};
use crate::graph::{self, Graph, Node};
use crate::http_cache::{self, HttpCache};
use crate::interrupt;
use crate::placeholder::{self, DepRef};

/// Grace period between SIGTERM and SIGKILL when a command's process group is killed.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Executor options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Worker threads.
    pub jobs: usize,
    /// `-k`: keep starting tasks whose requirements succeeded after a failure.
    pub keep_going: bool,
    /// `jolt download`: fetch the goals from the HTTP cache, never execute.
    pub download_only: bool,
}

/// What became of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not needed by this build.
    Unneeded,
    /// Needed, but never started (the build stopped first).
    Pending,
    /// Found in the local cache.
    Cached,
    /// Fetched from the HTTP cache.
    Downloaded,
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
            Status::Downloaded => "downloaded",
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
    pub interrupted: bool,
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
}

impl Failure {
    fn new(line: impl Into<String>) -> Failure {
        Failure {
            lines: vec![line.into()],
            interrupted: false,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::new(format!("{e:#}"))
    }
}

enum Done {
    Executed(Arc<ArtifactInfo>, Duration),
    Downloaded(Arc<ArtifactInfo>),
    /// Another process committed the artifact while this one waited for its lock.
    Reused(Arc<ArtifactInfo>),
    /// The HTTP cache could not deliver a usable artifact: build it instead.
    DownloadFailed,
}

enum Event {
    Started(usize),
    Output(usize, String, bool),
    Log(console::Level, String),
    Done(usize, Result<Done, Failure>),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plan {
    /// Not (yet) needed.
    Unplanned,
    Cached,
    Download,
    Execute,
    /// An alias or a resource: done once what it groups is done.
    Group,
}

/// The services a build uses.
pub struct Services<'a> {
    pub cache: &'a Cache,
    pub http: Option<&'a HttpCache>,
}

/// Runs the graph's goals.
pub fn run(graph: &Graph, services: &Services, root: &Path, opts: &Options) -> Result<Report> {
    let n = graph.nodes.len();
    let mut sched = Scheduler {
        graph,
        services,
        plan: vec![Plan::Unplanned; n],
        status: vec![Status::Unneeded; n],
        available: vec![false; n],
        pending: vec![0; n],
        dependents: vec![Vec::new(); n],
        ready: BinaryHeap::new(),
        durations: vec![None; n],
        started: vec![None; n],
        stop: false,
        keep_going: opts.keep_going,
        download_only: opts.download_only,
        done: 0,
        total: 0,
    };
    for &g in &graph.goals {
        sched.plan(g)?;
    }

    let infos: Vec<OnceLock<Arc<ArtifactInfo>>> = (0..n).map(|_| OnceLock::new()).collect();
    let prefix_output = opts.jobs > 1 && sched.total > 1;
    let mut interrupted = false;
    let scratch_dirs: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let result: Result<()> = std::thread::scope(|scope| {
        let (job_tx, job_rx) = unbounded::<(usize, Plan)>();
        let (ev_tx, ev_rx) = unbounded::<Event>();
        for _ in 0..opts.jobs.max(1) {
            let worker = Worker {
                graph,
                cache: services.cache,
                http: services.http,
                root,
                infos: &infos,
                events: ev_tx.clone(),
                scratch: &scratch_dirs,
            };
            let jobs: Receiver<(usize, Plan)> = job_rx.clone();
            scope.spawn(move || {
                while let Ok((i, plan)) = jobs.recv() {
                    let result = match plan {
                        Plan::Download => worker.download(i),
                        _ => worker.execute(i),
                    };
                    let _ = worker.events.send(Event::Done(i, result));
                }
            });
        }
        drop(ev_tx);
        let mut running = 0usize;
        let outcome = loop {
            if interrupt::is_set() && !sched.stop {
                sched.stop = true;
                interrupted = true;
                console::error("Interrupted by user");
            }
            while !sched.stop && running < opts.jobs.max(1) {
                let Some((_, std::cmp::Reverse(i))) = sched.ready.pop() else {
                    break;
                };
                running += 1;
                let _ = job_tx.send((i, sched.plan[i]));
            }
            if running == 0 {
                break Ok(());
            }
            sched.show_status(running);
            let event = match ev_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break Ok(()),
            };
            match event {
                Event::Started(i) => {
                    sched.started[i] = Some(Instant::now());
                    console::info(&format!("Execution started ({})", graph.nodes[i].label()))
                }
                Event::Output(i, line, is_err) => {
                    let prefix = prefix_output.then(|| graph.nodes[i].short.as_str());
                    console::output(prefix, &line, is_err);
                }
                Event::Log(level, message) => console::log(level, &message),
                Event::Done(i, result) => {
                    running -= 1;
                    if let Err(e) = sched.finish(i, result, &infos) {
                        sched.stop = true;
                        // Let the running jobs end before giving up.
                        while running > 0 {
                            if let Ok(Event::Done(..)) = ev_rx.recv() {
                                running -= 1;
                            }
                        }
                        break Err(e);
                    }
                }
            }
        };
        drop(job_tx);
        outcome
    });
    console::status(None);
    for dir in scratch_dirs.into_inner().unwrap_or_default() {
        let _ = fsutil::remove_dir_all(&dir);
    }
    result?;
    Ok(Report {
        status: sched.status,
        duration: sched.durations,
        interrupted,
    })
}

struct Scheduler<'a> {
    graph: &'a Graph,
    services: &'a Services<'a>,
    plan: Vec<Plan>,
    status: Vec<Status>,
    /// The node's artifact (or, for a group, everything it groups) is there.
    available: Vec<bool>,
    pending: Vec<usize>,
    dependents: Vec<Vec<usize>>,
    ready: BinaryHeap<(i64, std::cmp::Reverse<usize>)>,
    durations: Vec<Option<Duration>>,
    started: Vec<Option<Instant>>,
    stop: bool,
    keep_going: bool,
    download_only: bool,
    done: usize,
    total: usize,
}

/// Warns once that the HTTP cache is unreachable, or about any other HTTP failure.
fn http_warning(http: &HttpCache, what: &str, err: &anyhow::Error) -> Option<String> {
    if http_cache::is_unreachable(err) {
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
    /// Decides what node `i` needs, planning its requirements first.
    fn plan(&mut self, i: usize) -> Result<()> {
        if self.plan[i] != Plan::Unplanned {
            return Ok(());
        }
        let graph = self.graph;
        let node = &graph.nodes[i];
        self.status[i] = Status::Pending;
        let needs: Vec<usize> = if node.is_alias() {
            self.plan[i] = Plan::Group;
            graph.expand_alias(i)
        } else if node.is_resource() {
            self.plan[i] = Plan::Group;
            graph
                .visible(i)
                .iter()
                .chain(&node.resources)
                .copied()
                .collect()
        } else {
            let cache = self.services.cache;
            cache.mark_used([(node.name(), node.identity.as_str())])?;
            if node.task.cacheable && cache.is_present(node.name(), &node.identity) {
                self.plan[i] = Plan::Cached;
                self.status[i] = Status::Cached;
                self.available[i] = true;
                return Ok(());
            }
            self.total += 1;
            if node.task.cacheable && self.remote_has(i) {
                self.plan[i] = Plan::Download;
                self.make_ready(i);
                return Ok(());
            }
            if self.download_only {
                self.not_built(i);
                return Ok(());
            }
            self.plan[i] = Plan::Execute;
            graph
                .visible(i)
                .iter()
                .chain(&node.resources)
                .copied()
                .collect()
        };
        self.plan_needs(i, needs)
    }

    fn plan_needs(&mut self, i: usize, needs: Vec<usize>) -> Result<()> {
        for d in needs {
            self.plan(d)?;
            if self.available[d] {
                continue;
            }
            if self.status[d] == Status::Pending {
                if !self.dependents[d].contains(&i) {
                    self.pending[i] += 1;
                    self.dependents[d].push(i);
                }
            } else {
                self.status[i] = Status::Blocked;
            }
        }
        if self.pending[i] == 0 && self.status[i] == Status::Pending {
            self.make_ready(i);
        }
        Ok(())
    }

    /// `jolt download` of a task that no cache holds.
    fn not_built(&mut self, i: usize) {
        console::error(&format!(
            "Task must be built first: no cache holds {}",
            self.graph.nodes[i].label()
        ));
        self.status[i] = Status::Failed;
        self.propagate(i, Some((i, false)));
    }

    /// Whether the HTTP cache holds node `i`'s artifact (and downloads are enabled).
    fn remote_has(&mut self, i: usize) -> bool {
        let Some(http) = self.services.http.filter(|h| h.download && !h.is_down()) else {
            return false;
        };
        let node = &self.graph.nodes[i];
        match http.exists(node.name(), &node.identity) {
            Ok(present) => present,
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
            self.ready
                .push((self.graph.nodes[i].weight, std::cmp::Reverse(i)));
        }
    }

    /// Releases the dependents of a finished node; `failed` names a failed requirement.
    fn propagate(&mut self, i: usize, failed: Option<(usize, bool)>) {
        for c in std::mem::take(&mut self.dependents[i]) {
            if self.status[c] != Status::Pending {
                continue;
            }
            match failed {
                None => {
                    self.pending[c] -= 1;
                    if self.pending[c] == 0 {
                        self.make_ready(c);
                    }
                }
                Some((f, unstable)) => {
                    if unstable && self.plan[c] == Plan::Execute {
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
                        self.propagate(c, Some((c, s == Status::Unstable)));
                    } else {
                        self.status[c] = Status::Blocked;
                        self.propagate(c, Some((f, false)));
                    }
                }
            }
        }
    }

    fn succeed(
        &mut self,
        i: usize,
        status: Status,
        info: Arc<ArtifactInfo>,
        infos: &[OnceLock<Arc<ArtifactInfo>>],
    ) {
        let _ = infos[i].set(info);
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
                self.durations[i] = Some(duration);
                self.succeed(i, Status::Executed, info, infos);
            }
            Ok(Done::Downloaded(info)) => self.succeed(i, Status::Downloaded, info, infos),
            Ok(Done::Reused(info)) => {
                console::verbose(&format!(
                    "Execution skipped, built by another process ({})",
                    node.label()
                ));
                self.succeed(i, Status::Cached, info, infos);
            }
            Ok(Done::DownloadFailed) if self.download_only => self.not_built(i),
            Ok(Done::DownloadFailed) => {
                self.done -= 1;
                self.plan[i] = Plan::Execute;
                let needs = self
                    .graph
                    .visible(i)
                    .iter()
                    .chain(&node.resources)
                    .copied()
                    .collect();
                self.plan_needs(i, needs)?;
            }
            Err(failure) if failure.interrupted => {
                self.status[i] = Status::Interrupted;
                self.propagate(i, Some((i, false)));
            }
            Err(failure) => {
                for line in &failure.lines {
                    console::error(line);
                }
                let unstable = node.task.def.unstable;
                let elapsed = self.started[i].map(|s| s.elapsed()).unwrap_or_default();
                self.durations[i] = Some(elapsed);
                console::error(&format!(
                    "Execution failed after {} ({}){}",
                    format_duration(elapsed),
                    node.label(),
                    if unstable { ", unstable" } else { "" }
                ));
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
        }
        Ok(())
    }

    fn show_status(&self, running: usize) {
        console::status(Some(format!(
            "[{}/{}] {} running{}",
            self.done,
            self.total,
            running,
            if self.stop { ", stopping" } else { "" }
        )));
    }
}

/// A worker thread's view of the build.
struct Worker<'a> {
    graph: &'a Graph,
    cache: &'a Cache,
    http: Option<&'a HttpCache>,
    root: &'a Path,
    infos: &'a [OnceLock<Arc<ArtifactInfo>>],
    events: Sender<Event>,
    scratch: &'a Mutex<Vec<PathBuf>>,
}

type Log = Arc<Mutex<File>>;

impl Worker<'_> {
    fn info(&self, i: usize) -> Result<Arc<ArtifactInfo>, Failure> {
        if let Some(info) = self.infos[i].get() {
            return Ok(info.clone());
        }
        let node = &self.graph.nodes[i];
        let dir = self.cache.artifact_dir(node.name(), &node.identity);
        let manifest = Manifest::read(&dir).map_err(|e| {
            Failure::new(format!("Artifact of '{}' is unusable: {e:#}", node.short))
        })?;
        Ok(self.infos[i]
            .get_or_init(|| Arc::new(ArtifactInfo::from_manifest(dir, manifest)))
            .clone())
    }

    fn log(&self, level: console::Level, message: String) {
        let _ = self.events.send(Event::Log(level, message));
    }

    /// Takes node `i`'s artifact lock, waiting (with a message) for another process.
    fn lock(&self, i: usize) -> Result<ArtifactLock, Failure> {
        let node = &self.graph.nodes[i];
        if let Some(lock) = self.cache.try_lock(&node.identity)? {
            return Ok(lock);
        }
        self.log(
            console::Level::Info,
            format!(
                "Artifact is temporarily locked by another process ({})",
                node.label()
            ),
        );
        Ok(self.cache.lock(&node.identity)?)
    }

    fn http_warning(&self, http: &HttpCache, what: &str, err: &anyhow::Error) {
        if let Some(w) = http_warning(http, what, err) {
            self.log(console::Level::Warning, w);
        }
    }

    /// Fetches node `i`'s artifact from the HTTP cache into the local cache.
    fn download(&self, i: usize) -> Result<Done, Failure> {
        let node = &self.graph.nodes[i];
        let Some(http) = self.http else {
            return Ok(Done::DownloadFailed);
        };
        let _lock = self.lock(i)?;
        if self.cache.is_present(node.name(), &node.identity) {
            return Ok(Done::Reused(self.info(i)?));
        }
        self.log(
            console::Level::Info,
            format!("Download started ({})", node.label()),
        );
        let start = Instant::now();
        let staging = self.cache.stage(node.name(), &node.identity)?;
        let url = http.url(node.name(), &node.identity);
        let fetched = http.fetch(node.name(), &node.identity, &staging);
        let manifest = match fetched {
            Ok(Some(manifest)) => manifest,
            Ok(None) => {
                let _ = fsutil::remove_dir_all(&staging);
                self.log(
                    console::Level::Warning,
                    format!("{url} is no longer in the HTTP cache; building the task instead"),
                );
                return Ok(Done::DownloadFailed);
            }
            Err(e) => {
                let _ = fsutil::remove_dir_all(&staging);
                self.http_warning(http, "Download", &e);
                if !http_cache::is_unreachable(&e) {
                    self.log(
                        console::Level::Warning,
                        format!("Building {} instead of downloading {url}", node.short),
                    );
                }
                return Ok(Done::DownloadFailed);
            }
        };
        let dir = self
            .cache
            .commit(&staging, node.name(), &node.identity, manifest.size)
            .inspect_err(|_| {
                let _ = fsutil::remove_dir_all(&staging);
            })?;
        self.log(
            console::Level::Info,
            format!(
                "Download finished after {} ({})",
                format_duration(start.elapsed()),
                node.label()
            ),
        );
        Ok(Done::Downloaded(Arc::new(ArtifactInfo::from_manifest(
            dir, manifest,
        ))))
    }

    /// Uploads a freshly committed artifact when uploads are enabled; failures warn.
    fn upload(&self, i: usize, dir: &Path) {
        let Some(http) = self.http.filter(|h| h.upload && !h.is_down()) else {
            return;
        };
        let node = &self.graph.nodes[i];
        match http.exists(node.name(), &node.identity) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => return self.http_warning(http, "HEAD", &e),
        }
        self.log(
            console::Level::Info,
            format!("Upload started ({})", node.label()),
        );
        let start = Instant::now();
        let result = self
            .cache
            .scratch(&format!("upload-{}", node.name()))
            .and_then(|scratch| {
                let r = http.store(node.name(), &node.identity, dir, &scratch);
                let _ = fsutil::remove_dir_all(&scratch);
                r
            });
        match result {
            Ok(()) => self.log(
                console::Level::Info,
                format!(
                    "Upload finished after {} ({})",
                    format_duration(start.elapsed()),
                    node.label()
                ),
            ),
            Err(e) => self.http_warning(http, "Upload", &e),
        }
    }

    fn execute(&self, i: usize) -> Result<Done, Failure> {
        let node = &self.graph.nodes[i];
        let cacheable = node.task.cacheable;
        let _lock = if cacheable { Some(self.lock(i)?) } else { None };
        if cacheable && self.cache.is_present(node.name(), &node.identity) {
            return Ok(Done::Reused(self.info(i)?));
        }
        let _ = self.events.send(Event::Started(i));
        let start = Instant::now();
        let builddir = self.cache.scratch(&format!("build-{}", node.name()))?;
        let staging = if cacheable {
            self.cache.stage(node.name(), &node.identity)?
        } else {
            self.cache.scratch(&format!("artifact-{}", node.name()))?
        };
        let result = self.build(i, &builddir, &staging, start);
        let _ = fsutil::remove_dir_all(&builddir);
        let manifest = match result {
            Ok(manifest) => manifest,
            Err(failure) => {
                let _ = fsutil::remove_dir_all(&staging);
                return Err(failure);
            }
        };
        let duration = start.elapsed();
        let dir = if cacheable {
            let dir = self
                .cache
                .commit(&staging, node.name(), &node.identity, manifest.size)
                .inspect_err(|_| {
                    let _ = fsutil::remove_dir_all(&staging);
                })?;
            self.upload(i, &dir);
            dir
        } else {
            self.scratch.lock().expect("scratch").push(staging.clone());
            staging
        };
        Ok(Done::Executed(
            Arc::new(ArtifactInfo::from_manifest(dir, manifest)),
            duration,
        ))
    }

    /// Expands a template in the context of node `i`.
    fn expand(
        &self,
        i: usize,
        template: &str,
        dirs: Option<(&Path, &Path)>,
    ) -> Result<String, Failure> {
        let node = &self.graph.nodes[i];
        let mut resolve = |name: &str| -> Result<Option<String>> {
            if let Some(v) = node.params.get(name) {
                return Ok(Some(v.clone()));
            }
            match (name, dirs) {
                ("root", _) => return Ok(Some(self.root.display().to_string())),
                ("builddir", Some((b, _))) => return Ok(Some(b.display().to_string())),
                ("artifact", Some((_, a))) => return Ok(Some(a.display().to_string())),
                _ => {}
            }
            if let Some(var) = name.strip_prefix("env.") {
                return Ok(Some(std::env::var(var).unwrap_or_default()));
            }
            if let Some(rest) = name.strip_prefix("deps.") {
                let (dep, key) = match placeholder::parse_dep(rest) {
                    DepRef::Dir(d) => (d, None),
                    DepRef::String(d, k) => (d, Some((true, k))),
                    DepRef::Path(d, k) => (d, Some((false, k))),
                };
                let d = graph::find_dep(&self.graph.nodes, i, dep)?;
                let info = self
                    .info(d)
                    .map_err(|f| anyhow::anyhow!(f.lines.join("; ")))?;
                return Ok(match key {
                    None => Some(info.dir.display().to_string()),
                    Some((true, k)) => info.strings.get(k).cloned(),
                    Some((false, k)) => info
                        .paths
                        .get(k)
                        .map(|p| info.dir.join(p).display().to_string()),
                });
            }
            Ok(None)
        };
        placeholder::expand(node.name(), template, &mut resolve).map_err(Failure::from)
    }

    /// The environment of node `i`'s commands.
    fn environment(
        &self,
        i: usize,
        builddir: &Path,
        staging: &Path,
    ) -> Result<Vec<(String, String)>, Failure> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("JOLT_ROOT".into(), self.root.display().to_string());
        env.insert("JOLT_BUILDDIR".into(), builddir.display().to_string());
        env.insert("JOLT_ARTIFACT".into(), staging.display().to_string());
        env.insert(
            "JOLT_CACHEDIR".into(),
            self.cache.root.display().to_string(),
        );
        for &d in self.graph.visible(i) {
            let info = self.info(d)?;
            for (name, value) in &info.environ {
                if name.contains("PATH") {
                    let old = env
                        .get(name)
                        .cloned()
                        .or_else(|| std::env::var(name).ok())
                        .unwrap_or_default();
                    let mut parts: Vec<String> = value
                        .split(':')
                        .filter(|p| !p.is_empty())
                        .map(|p| info.dir.join(p).display().to_string())
                        .collect();
                    if !old.is_empty() {
                        parts.push(old);
                    }
                    env.insert(name.clone(), parts.join(":"));
                } else {
                    env.insert(name.clone(), value.clone());
                }
            }
        }
        for (name, value) in &self.graph.nodes[i].task.def.env {
            let v = self.expand(i, value, Some((builddir, staging)))?;
            env.insert(name.clone(), v);
        }
        Ok(env.into_iter().collect())
    }

    fn build(
        &self,
        i: usize,
        builddir: &Path,
        staging: &Path,
        start: Instant,
    ) -> Result<Manifest, Failure> {
        let node = &self.graph.nodes[i];
        let task = &node.task;
        let log_file = File::create(staging.join(BUILD_LOG))
            .map_err(|e| Failure::new(format!("Cannot create build log: {e}")))?;
        let log: Log = Arc::new(Mutex::new(log_file));
        let dirs = Some((builddir, staging));
        let env = self.environment(i, builddir, staging)?;
        let cwd = match &task.def.cwd {
            Some(c) => self.root.join(self.expand(i, c, dirs)?),
            None => self.root.to_path_buf(),
        };
        let deadline = task.timeout.map(|t| start + t);

        let mut acquired: Vec<usize> = Vec::new();
        let mut result = Ok(());
        for &r in &node.resources {
            let renv = self.environment(r, builddir, staging)?;
            let rnode = &self.graph.nodes[r];
            let _ = self.events.send(Event::Log(
                console::Level::Info,
                format!(
                    "Resource acquisition started ({} for {})",
                    rnode.label(),
                    node.short
                ),
            ));
            result = rnode.task.acquire.iter().try_for_each(|c| {
                let cmd = self.expand(r, c, None)?;
                self.command(i, &cmd, self.root, &renv, deadline, &log)
            });
            if let Err(f) = result {
                result = Err(Failure {
                    lines: f
                        .lines
                        .into_iter()
                        .chain([format!("Resource acquisition failed ({})", rnode.label())])
                        .collect(),
                    interrupted: f.interrupted,
                });
                break;
            }
            acquired.push(r);
        }
        if result.is_ok() {
            result = task.run.iter().try_for_each(|c| {
                let cmd = self.expand(i, c, dirs)?;
                self.command(i, &cmd, &cwd, &env, deadline, &log)
            });
        }
        for &r in acquired.iter().rev() {
            let rnode = &self.graph.nodes[r];
            let renv = self.environment(r, builddir, staging)?;
            let released = rnode.task.release.iter().try_for_each(|c| {
                let cmd = self.expand(r, c, None)?;
                self.command(i, &cmd, self.root, &renv, None, &log)
            });
            if let Err(f) = released {
                if result.is_ok() {
                    result = Err(f);
                }
            }
        }
        result?;

        for rule in &task.publish {
            let rule = artifact::Rule {
                files: self.expand(i, &rule.files, dirs)?,
                cwd: match &rule.cwd {
                    Some(c) => cwd.join(self.expand(i, c, dirs)?),
                    None => cwd.clone(),
                },
                dest: rule
                    .dest
                    .as_ref()
                    .map(|d| self.expand(i, d, dirs))
                    .transpose()?,
                flatten: rule.flatten,
            };
            artifact::publish(node.name(), &rule, staging)?;
        }
        let meta = |map: &BTreeMap<String, String>| -> Result<BTreeMap<String, String>, Failure> {
            map.iter()
                .map(|(k, v)| Ok((k.clone(), self.expand(i, v, None)?)))
                .collect()
        };
        let (files, size) = artifact::list_files(staging)?;
        let _ = log.lock().expect("log").flush();
        let manifest = Manifest {
            task: node.name().to_string(),
            identity: node.identity.clone(),
            parameters: node.params.clone(),
            influence: node.influence.clone(),
            environ: meta(&task.def.environ)?,
            strings: meta(&task.def.strings)?,
            paths: meta(&task.def.paths)?,
            files,
            created: fsutil::format_timestamp(fsutil::now_secs()),
            size,
            expires: task.expires,
            duration: start.elapsed().as_secs_f64(),
            jolt: env!("CARGO_PKG_VERSION").to_string(),
        };
        manifest.write(staging)?;
        Ok(manifest)
    }

    /// Runs one shell command of node `i`, streaming its output.
    fn command(
        &self,
        i: usize,
        cmd: &str,
        cwd: &Path,
        env: &[(String, String)],
        deadline: Option<Instant>,
        log: &Log,
    ) -> Result<(), Failure> {
        let node: &Node = &self.graph.nodes[i];
        let mut child = Command::new("sh")
            .arg("-e")
            .arg("-c")
            .arg(cmd)
            .current_dir(cwd)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                Failure::new(format!(
                    "Cannot run command in {} ({}): {e}",
                    cwd.display(),
                    node.short
                ))
            })?;
        let (done_tx, done_rx) = unbounded::<()>();
        let streams: Vec<(Box<dyn std::io::Read + Send>, bool)> = vec![
            (Box::new(child.stdout.take().expect("piped stdout")), false),
            (Box::new(child.stderr.take().expect("piped stderr")), true),
        ];
        for (stream, is_err) in streams {
            let events = self.events.clone();
            let log = log.clone();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match reader.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let _ = log.lock().expect("log").write_all(&buf);
                            let line = String::from_utf8_lossy(&buf);
                            let line = line.trim_end_matches(['\n', '\r']).to_string();
                            let _ = events.send(Event::Output(i, line, is_err));
                        }
                    }
                }
                drop(done);
            });
        }
        drop(done_tx);

        let pgid = child.id() as i32;
        let mut backoff = Duration::from_micros(200);
        let mut killed: Option<(Instant, bool)> = None; // (when, timed out)
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) => {}
                Err(_) => break None,
            }
            let now = Instant::now();
            match killed {
                None => {
                    let timed_out = deadline.is_some_and(|d| now >= d);
                    if timed_out || interrupt::is_set() {
                        unsafe { libc::kill(-pgid, libc::SIGTERM) };
                        killed = Some((now, timed_out));
                    }
                }
                Some((when, _)) if now.duration_since(when) > KILL_GRACE => {
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }
                Some(_) => {}
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(20));
        };
        if killed.is_some() {
            // Take down whatever else the command left in its group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        // Wait for the output to drain; a background process holding the pipe open
        // must not hold up the build forever.
        let _ = done_rx.recv_timeout(Duration::from_secs(2));
        match killed {
            Some((_, true)) => {
                let _ = writeln!(log.lock().expect("log"), "Command timeout: {cmd}");
                Err(Failure::new(format!("Command timeout: {cmd}")))
            }
            Some((_, false)) => Err(Failure {
                lines: vec![format!("Command interrupted: {cmd}")],
                interrupted: true,
            }),
            None => match status {
                Some(s) if s.success() => Ok(()),
                other => {
                    let _ = writeln!(log.lock().expect("log"), "Command failed: {cmd}");
                    let code = other
                        .and_then(|s| s.code())
                        .map(|c| format!("exit status {c}"))
                        .unwrap_or_else(|| "killed by a signal".into());
                    log::debug!("{cmd}: {code}");
                    Err(Failure::new(format!("Command failed: {cmd}")))
                }
            },
        }
    }
}
