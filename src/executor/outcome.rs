//! What becomes of nodes and jobs: a node's [`Status`] and the build's [`Report`]
//! (public), and what a pool thread tells the scheduler: [`Event`]s, a job's
//! [`Done`] or [`Failure`]. A leaf, as `plan` is: every file of the executor speaks
//! it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::console;
use crate::store::artifact::Manifest;

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
    pub(super) fn from_manifest(dir: PathBuf, m: Manifest) -> ArtifactInfo {
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

pub(super) struct Failure {
    pub(super) lines: Vec<String>,
    pub(super) interrupted: bool,
    /// The tail of the task's log.
    pub(super) log: Option<String>,
    /// The failure happened on a network worker.
    pub(super) remote: bool,
    /// Where the task's whole output was kept (see `runlog`).
    pub(super) kept: Option<PathBuf>,
    /// How long the task ran, where the scheduler did not see it start (a worker's
    /// figure for a network build).
    pub(super) took: Option<Duration>,
    /// An infrastructure failure that stops the build (exit 3) instead of failing
    /// the task, as its error message: the HTTP cache found unreachable in a network
    /// build, which needs it; the broker refusing a declaration.
    pub(super) infra: Option<String>,
}

impl Failure {
    pub(super) fn new(line: impl Into<String>) -> Failure {
        Failure::with_lines(vec![line.into()])
    }

    /// A failure that several lines explain.
    pub(super) fn with_lines(lines: Vec<String>) -> Failure {
        Failure {
            lines,
            interrupted: false,
            log: None,
            remote: false,
            kept: None,
            took: None,
            infra: None,
        }
    }

    pub(super) fn interrupted(line: impl Into<String>) -> Failure {
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

pub(super) enum Done {
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

pub(super) enum Event {
    Started(usize),
    /// A line a command of node `i` printed, on its standard error if `is_err`.
    Output {
        i: usize,
        line: String,
        is_err: bool,
    },
    /// A line of a remote task's log, always shown with the task's name.
    Replay(usize, String),
    Log(console::Level, String),
    /// A remote execution was accepted by a worker (named).
    RemoteRunning(usize, String),
    /// The HTTP cache answered a download's request (it has the artifact).
    Answered(usize),
    Done(usize, Result<Done, Failure>),
}

/// The name a failed task's kept output gets: `NAME-ID8`.
pub(super) fn kept_name(node: &crate::graph::Node) -> String {
    format!(
        "{}-{}",
        node.short,
        &node.identity[..node.identity.len().min(8)]
    )
}
