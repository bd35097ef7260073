//! The work a pool thread does for one node: execute it (commands, publish, commit,
//! upload), download it, upload it, or have a network worker execute it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use crossbeam_channel::Sender;

use super::outcome::{ArtifactInfo, Done, Event, Failure};
use super::plan::{http_warning, Mode, Plan};
use super::{guardian, process};
use crate::console;
use crate::graph::{self, Graph, Node, Resolved};
use crate::interrupt;
use crate::recipe::placeholder::{self, DepKey, Placeholder};

use crate::store::artifact::{self, Manifest, BUILD_LOG};
use crate::store::http::{self as http_cache, HttpCache};
use crate::store::local::{ArtifactLock, LocalCache};
use crate::store::sources;
use crate::util::fs::{self as fsutil, format_duration};
use crate::util::secrets;

/// The shell that runs commands, by its path: a bare `sh` is looked up in `PATH`
/// by the child, one failed `exec` per directory before it.
const SHELL: &str = "/bin/sh";

/// How long a resource's release commands may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(300);

/// How much earlier than the clock a file's modification time may read (file
/// systems stamp with a coarse clock): a file changed this close to a task's start
/// counts as written by the task.
const OUTPUT_SLACK: Duration = Duration::from_millis(50);

/// At most how much of a failed task's log is read for its report.
const TAIL_BYTES: u64 = 1 << 20;

/// Lines of a failed task's log kept for its report.
const LOG_TAIL: usize = 200;

/// A pool thread's view of the build.
pub(super) struct Runner<'a> {
    pub graph: &'a Graph,
    pub cache: &'a LocalCache,
    pub http: Option<&'a HttpCache>,
    pub mode: Mode<'a>,
    pub root: &'a Path,
    pub infos: &'a [OnceLock<Arc<ArtifactInfo>>],
    pub events: Sender<Event>,
    pub scratch: &'a Mutex<Vec<PathBuf>>,
    pub is_goal: &'a [bool],
    /// Downloads at once (`http.transfers`), whichever lane's job makes them: a
    /// remote execution downloads its goal on its own thread.
    pub transfers: &'a Slots,
    /// Where a network build's requests wait for their replies (`remote`).
    pub parked: Option<super::Parked<'a>>,
}

/// A counting semaphore.
pub(super) struct Slots {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

/// A slot of [`Slots`], given back when dropped.
pub(super) struct Slot<'a>(&'a Slots);

impl Slots {
    pub fn new(n: usize) -> Slots {
        Slots {
            free: Mutex::new(n.max(1)),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Takes a slot, waiting for one; `None` once the build is interrupted.
    fn take(&self) -> Option<Slot<'_>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            if interrupt::is_set() {
                return None;
            }
            free = self
                .freed
                .wait_timeout(free, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *free -= 1;
        Some(Slot(self))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// A task's build log while its execution runs. It is closed when the execution's
/// commands are done, before the artifact is published and committed: a process a
/// command left running (say, one that escaped its group with `setsid`) must not
/// write into a committed artifact.
#[derive(Clone)]
struct Log(Arc<Mutex<Option<File>>>);

impl Log {
    fn new(file: File) -> Log {
        Log(Arc::new(Mutex::new(Some(file))))
    }

    fn write_all(&self, bytes: &[u8]) {
        if let Some(f) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = f.write_all(bytes);
        }
    }

    fn line(&self, text: &str) {
        self.write_all(format!("{text}\n").as_bytes());
    }

    fn close(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The last `LOG_TAIL` lines of a file, after a line saying how many earlier lines
/// are not shown, if any.
fn tail(path: &Path) -> Option<String> {
    // The task may have replaced its log: read only a regular file, only its end.
    let (start, text) = artifact::read_end(path, TAIL_BYTES).ok()?;
    let (before, mid_line) = match start {
        0 => (0, false),
        _ => lines_before(path, start).ok()?,
    };
    Some(last_lines(
        &String::from_utf8_lossy(&text),
        before,
        mid_line,
        LOG_TAIL,
    ))
}

/// How many lines end in the first `end` bytes of a regular file, and whether a line
/// goes on past them.
fn lines_before(path: &Path, end: u64) -> std::io::Result<(u64, bool)> {
    use std::io::Read;
    let mut file = crate::util::fs::open_regular(path)?.take(end);
    let mut buf = vec![0u8; 1 << 16];
    let (mut lines, mut last) = (0, b'\n');
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok((lines, last != b'\n')),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[n - 1];
    }
}

/// The last `keep` lines of a log's `end`, which follows `before` lines not read (and,
/// if `mid_line`, begins inside a line, never shown), after a line saying how many
/// lines are not shown, as the output a worker sends back says how many bytes.
fn last_lines(end: &str, before: u64, mid_line: bool, keep: usize) -> String {
    let lines: Vec<&str> = end.lines().collect();
    let whole = &lines[usize::from(mid_line).min(lines.len())..];
    let shown = &whole[whole.len().saturating_sub(keep)..];
    let cut = before + (lines.len() - shown.len()) as u64;
    let mut text = match cut {
        0 => String::new(),
        1 => "[... the first line of the output is not shown ...]\n".to_string(),
        n => format!("[... the first {n} lines of the output are not shown ...]\n"),
    };
    text.push_str(&shown.join("\n"));
    text
}

impl Runner<'_> {
    /// Does what `plan` says for node `i`.
    pub fn run(&self, i: usize, plan: Plan) -> Result<Done, Failure> {
        match plan {
            Plan::Download => self.download(i, None),
            Plan::Upload => self.upload_job(i),
            Plan::Remote => Err(Failure::new(
                "internal error: a remote execution is not run, it is sent",
            )),
            _ => self.execute(i),
        }
    }

    pub(super) fn send(&self, event: Event) {
        let _ = self.events.send(event);
    }

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

    pub(super) fn log(&self, level: console::Level, message: String) {
        self.send(Event::Log(level, message));
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
        loop {
            if interrupt::is_set() {
                return Err(Failure::interrupted("Interrupted while waiting for a lock"));
            }
            if let Some(lock) = self.cache.try_lock(&node.identity)? {
                return Ok(lock);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn http_warning(&self, http: &HttpCache, what: &str, err: &anyhow::Error) {
        if let Some(w) = http_warning(http, what, err) {
            self.log(console::Level::Warning, w);
        }
    }

    /// Commits node `i`'s staged artifact; on failure nothing of it stays behind.
    fn commit(&self, i: usize, staging: &Path, size: u64) -> Result<PathBuf, Failure> {
        let node = &self.graph.nodes[i];
        self.cache
            .commit(staging, node.name(), &node.identity, size)
            .map_err(|e| {
                let _ = fsutil::remove_dir_all(staging);
                Failure::from(e)
            })
    }

    /// Fetches node `i`'s artifact from the HTTP cache into the local cache; after
    /// a remote execution, `built_by` names the worker that said it is there.
    pub(super) fn download(&self, i: usize, built_by: Option<&str>) -> Result<Done, Failure> {
        let node = &self.graph.nodes[i];
        let Some(http) = self.http else {
            return Ok(Done::DownloadFailed);
        };
        if http.is_down() {
            return Ok(Done::DownloadFailed);
        }
        let Some(_slot) = self.transfers.take() else {
            return Err(Failure::interrupted("Download interrupted"));
        };
        let _lock = self.lock(i)?;
        if self.cache.is_present(node.name(), &node.identity) {
            return Ok(Done::Reused(self.info(i)?));
        }
        let start = Instant::now();
        let staging = self.cache.stage(node.name(), &node.identity)?;
        let url = http.url(node.name(), &node.identity);
        // Said once the server has it: a local build asks with the GET itself.
        let (events, label) = (self.events.clone(), node.label());
        let fetched = http.fetch_then(
            node.name(),
            &node.identity,
            &staging,
            Box::new(move || {
                let _ = events.send(Event::Answered(i));
                let _ = events.send(Event::Log(
                    console::Level::Info,
                    format!("Download started ({label})"),
                ));
            }),
        );
        let manifest = match fetched {
            Ok(Some(manifest)) => manifest,
            Ok(None) => {
                let _ = fsutil::remove_dir_all(&staging);
                // A miss, in a local build (which does not ask first) and for a
                // worker's requirement (nor does it); gone since it was seen, where
                // planning asked; and after a worker's success, not where the
                // worker put it: "no longer" only of what this client saw there.
                let (level, text) = match (self.mode, built_by) {
                    (_, Some(worker)) => (
                        console::Level::Warning,
                        format!("{url} is not in the HTTP cache, though {worker} said it built it: does that worker use another cache?"),
                    ),
                    (Mode::Local, None) => (
                        console::Level::Debug,
                        format!("{url}: not in the HTTP cache"),
                    ),
                    (Mode::Worker, None) => (
                        console::Level::Warning,
                        format!("{url} is not in the HTTP cache"),
                    ),
                    (Mode::Network(_) | Mode::DownloadOnly, None) => (
                        console::Level::Warning,
                        format!("{url} is no longer in the HTTP cache"),
                    ),
                };
                self.log(level, text);
                return Ok(Done::DownloadFailed);
            }
            Err(e) if http_cache::is_interrupted(&e) => {
                let _ = fsutil::remove_dir_all(&staging);
                return Err(Failure::interrupted("Download interrupted"));
            }
            Err(e) => {
                let _ = fsutil::remove_dir_all(&staging);
                self.http_warning(http, "Download", &e);
                if !http_cache::is_unreachable(&e) && matches!(self.mode, Mode::Local) {
                    self.log(
                        console::Level::Warning,
                        format!("Building {} instead of downloading {url}", node.short),
                    );
                }
                return Ok(Done::DownloadFailed);
            }
        };
        let dir = self.commit(i, &staging, manifest.size)?;
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

    /// Sends a committed artifact to the HTTP cache unless it is there already.
    fn upload(&self, i: usize, dir: &Path) -> Result<(), anyhow::Error> {
        let Some(http) = self.http.filter(|h| h.upload) else {
            return Ok(());
        };
        let node = &self.graph.nodes[i];
        // A worker uploads only what it found missing from the HTTP cache, under the
        // identity's lock: it does not ask again.
        if !matches!(self.mode, Mode::Worker) && http.exists(node.name(), &node.identity)? {
            return Ok(());
        }
        self.log(
            console::Level::Info,
            format!("Upload started ({})", node.label()),
        );
        let start = Instant::now();
        http.store(node.name(), &node.identity, dir)?;
        self.log(
            console::Level::Info,
            format!(
                "Upload finished after {} ({})",
                format_duration(start.elapsed()),
                node.label()
            ),
        );
        Ok(())
    }

    /// Whether an upload must succeed: workers and network builds depend on it.
    fn upload_required(&self) -> bool {
        matches!(self.mode, Mode::Worker | Mode::Network(_))
    }

    /// Whether an artifact committed now goes to the HTTP cache too.
    fn will_upload(&self) -> bool {
        self.http.is_some_and(|http| {
            self.upload_required() || (http.upload && !http.is_down() && !http.uploads_refused())
        })
    }

    /// Uploads after a commit: a failure fails the task where the upload is required,
    /// and is a warning otherwise.
    fn publish_remote(&self, i: usize, dir: &Path) -> Result<(), Failure> {
        let Some(http) = self.http else {
            return Ok(());
        };
        if !self.will_upload() {
            return Ok(());
        }
        match self.upload(i, dir) {
            Ok(()) => Ok(()),
            Err(e) if http_cache::is_interrupted(&e) => {
                Err(Failure::interrupted("Upload interrupted"))
            }
            Err(e) if self.upload_required() => Err(Failure::new(format!("Upload failed: {e:#}"))),
            // Said once: the server would refuse every other artifact of the build.
            Err(e) if http_cache::is_upload_refused(&e) => {
                if http.refuse_uploads() {
                    self.log(
                        console::Level::Warning,
                        format!("Upload failed: {e:#}; no more uploads in this build"),
                    );
                }
                Ok(())
            }
            Err(e) => {
                self.http_warning(http, "Upload", &e);
                Ok(())
            }
        }
    }

    /// A job that only uploads an artifact present in the local cache.
    fn upload_job(&self, i: usize) -> Result<Done, Failure> {
        let node = &self.graph.nodes[i];
        let _lock = self.lock(i)?;
        // Only what it was built as goes to the HTTP cache; one that is not was
        // removed, and is built.
        if !self.cache.intact(node.name(), &node.identity) {
            return Ok(Done::Unusable);
        }
        let dir = self.cache.artifact_dir(node.name(), &node.identity);
        self.publish_remote(i, &dir)?;
        Ok(Done::Uploaded)
    }

    fn execute(&self, i: usize) -> Result<Done, Failure> {
        let node = &self.graph.nodes[i];
        let cacheable = node.task.cacheable;
        let _lock = if cacheable { Some(self.lock(i)?) } else { None };
        // One to be uploaded must be what it was built as, else it is built again.
        if cacheable
            && self.cache.is_present(node.name(), &node.identity)
            && (!self.will_upload() || self.cache.intact(node.name(), &node.identity))
        {
            let info = self.info(i)?;
            self.publish_remote(i, &info.dir)?;
            return Ok(Done::Reused(info));
        }
        self.send(Event::Started(i));
        let start = Instant::now();
        let builddir = self.cache.scratch(&format!("build-{}", node.name()))?;
        let staging = if cacheable {
            self.cache.stage(node.name(), &node.identity)?
        } else {
            self.cache.scratch(&format!("artifact-{}", node.name()))?
        };
        let result = self.build(i, &builddir, &staging, start);
        let _ = fsutil::remove_dir_mostly_empty(&builddir);
        let manifest = match result {
            Ok(manifest) => manifest,
            Err(mut failure) => {
                failure.log = tail(&staging.join(BUILD_LOG));
                if !failure.interrupted {
                    failure.kept = crate::runlog::keep_task_log(
                        &super::outcome::kept_name(node),
                        &staging.join(BUILD_LOG),
                        &failure.lines,
                    );
                }
                let _ = fsutil::remove_dir_all(&staging);
                return Err(failure);
            }
        };
        let duration = start.elapsed();
        let dir = if cacheable {
            let dir = self.commit(i, &staging, manifest.size)?;
            self.publish_remote(i, &dir)?;
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
        self.expand_with(i, template, dirs, false)
    }

    /// [`Runner::expand`]; a `glob` keeps its alternations (`{c,h}`).
    fn expand_with(
        &self,
        i: usize,
        template: &str,
        dirs: Option<(&Path, &Path)>,
        glob: bool,
    ) -> Result<String, Failure> {
        let node = &self.graph.nodes[i];
        // What the node sees, walked once for all the template's `{deps.X}`.
        let mut view: Option<Vec<usize>> = None;
        let mut resolve = |name: &str| -> Result<Option<String>> {
            let show = |p: &Path| Some(p.display().to_string());
            Ok(
                match Placeholder::parse(name, &|p| node.params.contains_key(p)) {
                    Placeholder::Param(p) => node.params.get(p).cloned(),
                    Placeholder::Root => show(self.root),
                    Placeholder::BuildDir => dirs.and_then(|(b, _)| show(b)),
                    Placeholder::Artifact => dirs.and_then(|(_, a)| show(a)),
                    Placeholder::Env(var) => {
                        Some(self.graph.env.get(var).cloned().unwrap_or_default())
                    }
                    Placeholder::Dep(dep, key) => {
                        let seen = view.get_or_insert_with(|| graph::visible(&self.graph.nodes, i));
                        let d = graph::find_among(&self.graph.nodes, seen, dep)?;
                        let info = self
                            .info(d)
                            .map_err(|f| anyhow::anyhow!(f.lines.join("; ")))?;
                        match key {
                            DepKey::Dir => show(&info.dir),
                            DepKey::String(k) => info.strings.get(k).cloned(),
                            DepKey::Path(k) => {
                                info.paths.get(k).and_then(|p| show(&info.dir.join(p)))
                            }
                        }
                    }
                    Placeholder::Unknown(_) => None,
                },
            )
        };
        let expanded = if glob {
            placeholder::expand_glob(node.name(), template, &mut resolve)
        } else {
            placeholder::expand(node.name(), template, &mut resolve)
        };
        expanded.map_err(Failure::from)
    }

    /// The environment of node `i`'s commands.
    fn environment(
        &self,
        i: usize,
        builddir: &Path,
        staging: &Path,
    ) -> Result<Vec<(String, String)>, Failure> {
        // The influencing variables with the values the identity was computed from
        // (on a network worker: the client's values).
        let mut env: BTreeMap<String, String> = self.graph.env.clone();
        env.insert("JOLT_ROOT".into(), self.root.display().to_string());
        env.insert("JOLT_BUILDDIR".into(), builddir.display().to_string());
        env.insert("JOLT_ARTIFACT".into(), staging.display().to_string());
        env.insert(
            "JOLT_CACHEDIR".into(),
            self.cache.root.display().to_string(),
        );
        for d in self.graph.visible(i) {
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

    /// Runs node `i`'s commands (around them, its resources' acquire and release),
    /// publishes into `staging` and writes the manifest.
    fn build(
        &self,
        i: usize,
        builddir: &Path,
        staging: &Path,
        start: Instant,
    ) -> Result<Manifest, Failure> {
        let node = &self.graph.nodes[i];
        let log_file = File::create(staging.join(BUILD_LOG))
            .map_err(|e| Failure::new(format!("Cannot create build log: {e}")))?;
        let x = Execution {
            i,
            builddir,
            staging,
            start,
            log: Log::new(log_file),
        };
        let cwd = match &node.task.def.cwd {
            Some(c) => self.root.join(self.expand(i, c, x.dirs())?),
            None => self.root.to_path_buf(),
        };
        let ran = self.run_commands(&x, &cwd);
        x.log.close();
        ran?;
        self.publish(&x, &cwd)?;
        self.check_stable(i)?;
        self.manifest(&x)
    }

    /// The commands of an execution. Their process groups live until it ends (a
    /// command may start a server the next one uses; an acquire's daemons serve until
    /// the release), then whatever is left of them is killed.
    fn run_commands(&self, x: &Execution, cwd: &Path) -> Result<(), Failure> {
        let node = &self.graph.nodes[x.i];
        let env = self.environment(x.i, x.builddir, x.staging)?;
        let groups = Groups::default();
        let shell = TaskShell {
            deadline: node.task.timeout.and_then(|t| x.start.checked_add(t)),
            log: &x.log,
            groups: &groups,
        };
        let (acquired, mut result) = self.acquire(x, &shell);
        if result.is_ok() {
            result = match &node.source {
                Some(Resolved::Git {
                    url,
                    commit,
                    keep_git,
                }) => sources::git_commands(url, commit, *keep_git)
                    .iter()
                    .try_for_each(|cmd| self.command(x.i, &shell.at(cmd, x.staging, &env))),
                Some(Resolved::Download { .. }) => {
                    self.download_source(x.i, (x.builddir, x.staging), &x.log)
                }
                None => node.task.run.iter().try_for_each(|c| {
                    let cmd = self.expand(x.i, c, x.dirs())?;
                    self.command(x.i, &shell.at(&cmd, cwd, &env))
                }),
            };
        }
        let released = self.release(x, &shell, &acquired);
        drop(groups);
        result.and(released)
    }

    /// Acquires node `x.i`'s resources in order, up to the first that fails; returns
    /// those acquired, and how it went.
    fn acquire(&self, x: &Execution, shell: &TaskShell) -> (Vec<usize>, Result<(), Failure>) {
        let node = &self.graph.nodes[x.i];
        let mut acquired = Vec::new();
        for &r in &node.resources {
            let rnode = &self.graph.nodes[r];
            self.send(Event::Log(
                console::Level::Info,
                format!(
                    "Resource acquisition started ({} for {})",
                    rnode.label(),
                    node.short
                ),
            ));
            let result = self.environment(r, x.builddir, x.staging).and_then(|renv| {
                rnode.task.acquire.iter().try_for_each(|c| {
                    let cmd = self.expand(r, c, None)?;
                    self.command(x.i, &shell.at(&cmd, self.root, &renv))
                })
            });
            if let Err(f) = result {
                let failure = Failure {
                    lines: f
                        .lines
                        .into_iter()
                        .chain([format!("Resource acquisition failed ({})", rnode.label())])
                        .collect(),
                    ..f
                };
                return (acquired, Err(failure));
            }
            acquired.push(r);
        }
        (acquired, Ok(()))
    }

    /// Releases `acquired` in reverse order. Releases run even after Ctrl-C (only
    /// their own timeout stops them), and a failing one does not skip the others;
    /// the first failure is returned.
    fn release(&self, x: &Execution, shell: &TaskShell, acquired: &[usize]) -> Result<(), Failure> {
        let mut result = Ok(());
        for &r in acquired.iter().rev() {
            let rnode = &self.graph.nodes[r];
            let released = self.environment(r, x.builddir, x.staging).and_then(|renv| {
                rnode.task.release.iter().try_for_each(|c| {
                    let cmd = self.expand(r, c, None)?;
                    self.command(
                        x.i,
                        &Shell {
                            deadline: Some(Instant::now() + RELEASE_TIMEOUT),
                            interruptible: false,
                            ..shell.at(&cmd, self.root, &renv)
                        },
                    )
                })
            });
            if released.is_err() && result.is_ok() {
                result = released;
            }
        }
        result
    }

    /// Copies what node `x.i`'s publish rules match into the artifact; sources from
    /// the workspace must be influences.
    fn publish(&self, x: &Execution, cwd: &Path) -> Result<(), Failure> {
        let node = &self.graph.nodes[x.i];
        let dirs = x.dirs();
        for rule in &node.task.publish {
            let rule = artifact::Rule {
                files: self.expand_with(x.i, &rule.files, dirs, true)?,
                cwd: match &rule.cwd {
                    Some(c) => cwd.join(self.expand(x.i, c, dirs)?),
                    None => cwd.to_path_buf(),
                },
                dest: rule
                    .dest
                    .as_ref()
                    .map(|d| self.expand(x.i, d, dirs))
                    .transpose()?,
                flatten: rule.flatten,
            };
            let published = artifact::publish(node.name(), &rule, x.staging)?;
            let began = std::time::SystemTime::now() - x.start.elapsed();
            self.check_influence(x.i, &published, &[x.builddir, x.staging], began)?;
        }
        Ok(())
    }

    /// Writes the manifest of what the execution staged, once it is checked.
    fn manifest(&self, x: &Execution) -> Result<Manifest, Failure> {
        let node = &self.graph.nodes[x.i];
        let task = &node.task;
        let meta = |map: &BTreeMap<String, String>| -> Result<BTreeMap<String, String>, Failure> {
            map.iter()
                .map(|(k, v)| Ok((k.clone(), self.expand(x.i, v, None)?)))
                .collect()
        };
        let (contents, size) = artifact::describe(x.staging)?;
        let manifest = Manifest {
            task: node.name().to_string(),
            identity: node.identity.clone(),
            parameters: node.params.clone(),
            influence: node.influence.clone(),
            environ: meta(&task.def.environ)?,
            strings: meta(&task.def.strings)?,
            paths: meta(&task.def.paths)?,
            files: contents.keys().cloned().collect(),
            contents,
            created: fsutil::format_timestamp(fsutil::now_secs()),
            size,
            expires: task.expires,
            duration: x.start.elapsed().as_secs_f64(),
            jolt: env!("CARGO_PKG_VERSION").to_string(),
        };
        manifest
            .check_metadata()
            .map_err(|e| Failure::new(format!("{e:#} ({})", node.short)))?;
        manifest.write(x.staging)?;
        Ok(manifest)
    }

    /// Files published from the workspace (not from the build directory, the
    /// artifact or a requirement's artifact) must be among node `i`'s influence
    /// files: otherwise its identity would not change when they do. As in Jolt, each
    /// one missing is named, and the task fails. Files the task itself wrote (changed
    /// since it `began`) are its outputs, not sources.
    fn check_influence(
        &self,
        i: usize,
        published: &[PathBuf],
        scratch: &[&Path],
        began: std::time::SystemTime,
    ) -> Result<(), Failure> {
        let node = &self.graph.nodes[i];
        let root = fsutil::normalize(self.root);
        let mut elsewhere: Vec<PathBuf> = scratch.iter().map(|p| fsutil::normalize(p)).collect();
        for d in self.graph.visible(i) {
            if let Some(info) = self.infos[d].get() {
                elsewhere.push(fsutil::normalize(&info.dir));
            }
        }
        let mut missing = Vec::new();
        for path in published {
            let path = fsutil::normalize(path);
            let Ok(rel) = path.strip_prefix(&root) else {
                continue;
            };
            if elsewhere.iter().any(|e| path.starts_with(e)) {
                continue;
            }
            // A symlink is published (and influences) as a link, never followed.
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            let files = if is_dir {
                crate::util::globs::files(&path, "**")?
                    .into_iter()
                    .map(|f| rel.join(f))
                    .collect()
            } else {
                vec![rel.to_path_buf()]
            };
            let output = |f: &Path| {
                std::fs::symlink_metadata(root.join(f))
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t + OUTPUT_SLACK >= began)
            };
            missing.extend(files.into_iter().filter(|f| {
                let known = node.files.binary_search_by(|g| g.path.as_path().cmp(f));
                known.is_err() && !output(f)
            }));
        }
        if missing.is_empty() {
            return Ok(());
        }
        let mut lines: Vec<String> = missing
            .iter()
            .map(|f| format!("Missing influence: {} ({})", f.display(), node.short))
            .collect();
        lines.push("Task is missing source influence".to_string());
        Err(Failure {
            lines,
            interrupted: false,
            log: None,
            remote: false,
            kept: None,
            took: None,
            infra: None,
        })
    }

    /// Node `i`'s influence files must still hold the content its identity was
    /// computed from once its commands have run and its artifact is staged: else the
    /// artifact may come from other content (an editor saved a file meanwhile, the
    /// task rewrote one of its inputs), and filed under this identity it would be
    /// handed to whoever has the original content. An unchanged file costs one
    /// `stat`; one whose metadata changed is hashed (changed back is unchanged).
    fn check_stable(&self, i: usize) -> Result<(), Failure> {
        let node = &self.graph.nodes[i];
        let lines: Vec<String> = node
            .file_hashes()
            .filter(|(file, hash)| !file.seen.still(self.root, &file.path, hash))
            .map(|(file, _)| {
                format!(
                    "Influence changed during the build: {} ({})",
                    file.path.display(),
                    node.short
                )
            })
            .collect();
        if lines.is_empty() {
            return Ok(());
        }
        Err(Failure {
            lines,
            interrupted: interrupt::is_set(),
            log: None,
            remote: false,
            kept: None,
            took: None,
            infra: None,
        })
    }

    /// `kind = "download"`: fetches the first mirror that answers, verifies the
    /// SHA-256 while streaming, and extracts or copies the file into the artifact.
    fn download_source(
        &self,
        i: usize,
        (builddir, staging): (&Path, &Path),
        log: &Log,
    ) -> Result<(), Failure> {
        let node = &self.graph.nodes[i];
        let Some(Resolved::Download {
            urls,
            sha256,
            extract,
        }) = &node.source
        else {
            return Err(Failure::new("internal error: not a download task"));
        };
        let (sha256, extract) = (sha256.as_str(), *extract);
        let mut errors = Vec::new();
        for url in urls {
            if interrupt::is_set() {
                return Err(Failure::interrupted("Download interrupted"));
            }
            let name = sources::file_name(url);
            let fetch_url = url;
            // What is shown and logged: the URL without its userinfo.
            let url = &secrets::masked_url(url);
            let file = builddir.join(&name);
            log.line(&format!("Downloading {url}"));
            self.log(
                console::Level::Info,
                format!("Downloading {url} ({})", node.label()),
            );
            match sources::fetch(fetch_url, &file) {
                Err(e) => errors.push(secrets::redact(&format!("{e:#}")).into_owned()),
                Ok(actual) if actual != sha256 => errors.push(format!(
                    "{url}: sha256 mismatch: expected {sha256}, got {actual}"
                )),
                Ok(_) => {
                    let extracted = extract
                        && sources::extract(&file, &name, staging)
                            .map_err(|e| Failure::new(format!("{url}: {e:#}")))?;
                    if !extracted {
                        std::fs::rename(&file, staging.join(&name))
                            .or_else(|_| std::fs::copy(&file, staging.join(&name)).map(|_| ()))
                            .map_err(|e| Failure::new(format!("{url}: {e}")))?;
                    }
                    return Ok(());
                }
            }
        }
        Err(Failure {
            lines: errors,
            interrupted: false,
            log: None,
            remote: false,
            kept: None,
            took: None,
            infra: None,
        })
    }

    /// Runs one shell command of node `i` in a process group of its own, streaming
    /// its output. When the command ends, whatever it left running in its group is
    /// killed, unless the caller keeps the group (a resource's acquire command).
    fn command(&self, i: usize, shell: &Shell) -> Result<(), Failure> {
        let node: &Node = &self.graph.nodes[i];
        if shell.interruptible && interrupt::is_set() {
            return Err(Failure::interrupted(format!(
                "Command interrupted: {}",
                secrets::redact(shell.cmd)
            )));
        }
        self.log(
            console::Level::Verbose,
            format!("Running: {} ({})", secrets::redact(shell.cmd), node.short),
        );
        let mut command = Command::new(SHELL);
        command
            .arg("-e")
            .arg("-c")
            .arg(shell.cmd)
            .current_dir(shell.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for var in credential_vars() {
            command.env_remove(var);
        }
        command.envs(shell.env.iter().map(|(k, v)| (k, v)));
        if !guardian::active() {
            // SAFETY: prctl is async-signal-safe; between fork and exec it only asks
            // the kernel to kill the command if this thread (and so a killed jolt)
            // goes away. Only without a guardian: a pre_exec hook makes std fork
            // instead of spawning (see `guardian`).
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                    Ok(())
                });
            }
        }
        let spawning = guardian::spawning();
        let mut child = process::spawn_recorded(|| command.spawn()).map_err(|e| {
            Failure::new(format!(
                "Cannot run command in {} ({}): {e}",
                shell.cwd.display(),
                node.short
            ))
        })?;
        let pgid = child.id() as i32;
        crate::testhooks::pause_after_spawn();
        spawning.started(pgid);
        // From here on the child is reaped only by `Groups`, after its group is killed.
        let mut forward = Forward {
            i,
            log: shell.log.clone(),
            events: self.events.clone(),
        };
        let ended = process::supervise(
            &mut child,
            shell.deadline,
            shell.interruptible,
            &mut forward,
        );
        shell.groups.keep(child);
        // A process the command left running still holds its output: pass on what
        // it prints until it closes it.
        for stream in ended.open {
            stream.forward_detached(Forward {
                i,
                log: shell.log.clone(),
                events: self.events.clone(),
            });
        }
        let (status, killed) = (ended.exit, ended.killed);
        let cmd = &*secrets::redact(shell.cmd);
        // A failure's lines go to the kept output after the whole log (see
        // `execute`), not into the log: its tail, shown with `-q` and sent back by a
        // worker, is shown beside them.
        match killed {
            Some(process::Killed::TimedOut) => Err(Failure::new(format!("Command timeout: {cmd}"))),
            Some(process::Killed::Interrupted) => {
                Err(Failure::interrupted(format!("Command interrupted: {cmd}")))
            }
            None => match status {
                Some(process::Exit::Code(0)) => Ok(()),
                other => {
                    let how = other.map_or_else(
                        || "an exit status jolt could not read".to_string(),
                        |e| e.to_string(),
                    );
                    crate::console::debug(&format!("{cmd}: {how}"));
                    Err(Failure::new(format!("Command failed: {cmd}")))
                }
            },
        }
    }
}

/// One shell command to run for a node.
struct Shell<'a> {
    cmd: &'a str,
    cwd: &'a Path,
    env: &'a [(String, String)],
    deadline: Option<Instant>,
    log: &'a Log,
    /// Ctrl-C kills it (releases of resources run to their end instead).
    interruptible: bool,
    /// Where its process group goes when it ends.
    groups: &'a Groups,
}

/// One execution of a node: where it builds, where it stages, since when, its log.
struct Execution<'a> {
    i: usize,
    builddir: &'a Path,
    staging: &'a Path,
    start: Instant,
    log: Log,
}

impl Execution<'_> {
    /// The directories `{builddir}` and `{artifact}` stand for.
    fn dirs(&self) -> Option<(&Path, &Path)> {
        Some((self.builddir, self.staging))
    }
}

/// What every command of one execution shares.
struct TaskShell<'a> {
    deadline: Option<Instant>,
    log: &'a Log,
    groups: &'a Groups,
}

impl TaskShell<'_> {
    /// A command of this execution, with the defaults (interruptible).
    fn at<'a>(&'a self, cmd: &'a str, cwd: &'a Path, env: &'a [(String, String)]) -> Shell<'a> {
        Shell {
            cmd,
            cwd,
            env,
            deadline: self.deadline,
            log: self.log,
            interruptible: true,
            groups: self.groups,
        }
    }
}

/// The commands of one execution that have ended, their leaders not yet reaped: a
/// zombie keeps its pid, so the number of its process group cannot be taken by
/// another process before the group is killed. Dropping it (when the execution
/// ends, also by a panic) kills what is left of every group, reaps the leaders and
/// tells the guardian.
#[derive(Default)]
struct Groups(Mutex<Vec<std::process::Child>>);

impl Groups {
    fn keep(&self, child: std::process::Child) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(child);
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        let children = std::mem::take(self.0.get_mut().unwrap_or_else(|e| e.into_inner()));
        for mut child in children {
            let pgid = child.id() as i32;
            process::kill_group(pgid, libc::SIGKILL);
            let _ = child.wait();
            process::leaders().remove(&pgid);
            crate::executor::guardian::release(pgid);
        }
    }
}

/// Where a command's output goes: its bytes into the build log, its lines to the
/// scheduler.
struct Forward {
    i: usize,
    log: Log,
    events: Sender<Event>,
}

impl process::Sink for Forward {
    fn bytes(&mut self, bytes: &[u8]) {
        self.log.write_all(bytes);
    }

    fn line(&mut self, line: String, is_err: bool) {
        let _ = self.events.send(Event::Output(self.i, line, is_err));
    }
}

/// The credential variables of this process, which commands never inherit.
fn credential_vars() -> &'static [std::ffi::OsString] {
    static VARS: OnceLock<Vec<std::ffi::OsString>> = OnceLock::new();
    VARS.get_or_init(crate::util::secrets::credential_vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_tail_says_how_many_lines_are_not_shown() {
        let log: String = (1..=5).map(|n| format!("line {n}\n")).collect();
        // All of it read, none cut: no note.
        assert_eq!(last_lines(&log, 0, false, 5), log.trim_end());
        assert_eq!(
            last_lines(&log, 0, false, 4),
            "[... the first line of the output is not shown ...]\nline 2\nline 3\nline 4\nline 5"
        );
        // Regression (issue 23): the last 200 of 5,002 lines did not say so.
        assert_eq!(
            last_lines(&log, 4997, false, 2),
            "[... the first 5000 lines of the output are not shown ...]\nline 4\nline 5"
        );
        // Read from inside a line: its rest is never shown, and it counts once.
        assert_eq!(
            last_lines("ne 1\nline 2\n", 7, true, 200),
            "[... the first 8 lines of the output are not shown ...]\nline 2"
        );
        assert_eq!(
            last_lines("no end in sight", 7, true, 200),
            "[... the first 8 lines of the output are not shown ...]\n"
        );
    }

    #[test]
    fn the_tail_of_a_log_longer_than_what_is_read_counts_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        // Longer than TAIL_BYTES, so its start is counted apart from its end.
        let lines = 2 * TAIL_BYTES as usize / 100;
        let log: String = (0..lines).map(|n| format!("{n:099}\n")).collect();
        std::fs::write(&path, &log).unwrap();
        let text = tail(&path).unwrap();
        let first = text.lines().next().unwrap();
        assert_eq!(
            first,
            format!(
                "[... the first {} lines of the output are not shown ...]",
                lines - LOG_TAIL
            )
        );
        assert_eq!(text.lines().count(), LOG_TAIL + 1);
        assert_eq!(text.lines().last(), log.lines().last());
    }
}
