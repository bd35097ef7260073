//! The work a pool thread does for one node: execute it (commands, publish, commit,
//! upload), download it, upload it, or have a network worker execute it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use crossbeam_channel::Sender;

use super::outcome::{ArtifactInfo, Done, Event, Failure};
use super::plan::{http_warning, Mode, Plan};
use super::shell::{credential_vars, Forward, Groups, Shell, TaskShell};
use super::slots::Slots;
use super::tasklog::{tail, Log};
use super::{fetch, guardian, process};
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

/// How long a resource's release commands may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(300);

/// How much earlier than the clock a file's modification time may read (file
/// systems stamp with a coarse clock): a file changed this close to a task's start
/// counts as written by the task.
const OUTPUT_SLACK: Duration = Duration::from_millis(50);

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

    /// The environment of node `i`'s commands; `view` is what `i` sees
    /// ([`graph::visible`]).
    fn environment(
        &self,
        i: usize,
        view: &[usize],
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
        for &d in view {
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
            view: self.graph.visible(i),
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
        let env = self.environment(x.i, &x.view, x.builddir, x.staging)?;
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
                    fetch::download_source(node, (x.builddir, x.staging), &x.log, &|line| {
                        self.log(console::Level::Info, line)
                    })
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
            let result = self
                .environment(r, &self.graph.visible(r), x.builddir, x.staging)
                .and_then(|renv| {
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
            let released = self
                .environment(r, &self.graph.visible(r), x.builddir, x.staging)
                .and_then(|renv| {
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
            self.check_influence(x.i, &x.view, &published, &[x.builddir, x.staging], began)?;
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
        view: &[usize],
        published: &[PathBuf],
        scratch: &[&Path],
        began: std::time::SystemTime,
    ) -> Result<(), Failure> {
        let node = &self.graph.nodes[i];
        let root = fsutil::normalize(self.root);
        let mut elsewhere: Vec<PathBuf> = scratch.iter().map(|p| fsutil::normalize(p)).collect();
        for &d in view {
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
        Err(Failure::with_lines(lines))
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
        let sh = &node.task.shell;
        let mut command = Command::new(sh);
        command.arg("-e");
        if Path::new(sh).file_name().is_some_and(|n| n == "bash") {
            // What a pipeline's earlier commands return counts too.
            command.args(["-o", "pipefail"]);
        }
        command
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
            Failure::new(match e.kind() {
                // The directory is checked before: what is missing is the shell.
                std::io::ErrorKind::NotFound if shell.cwd.is_dir() => format!(
                    "Cannot run the shell '{sh}' of {}: {e}; install it where the task runs",
                    node.short
                ),
                _ => format!(
                    "Cannot run command in {} ({}): {e}",
                    shell.cwd.display(),
                    node.short
                ),
            })
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

/// One execution of a node: where it builds, where it stages, since when, its log.
struct Execution<'a> {
    i: usize,
    /// What the node sees ([`graph::visible`]), walked once for its environment
    /// and its publish rules' checks.
    view: Vec<usize>,
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
