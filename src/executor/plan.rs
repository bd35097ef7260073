//! What a build is: its mode and options, the services it may use, and what the
//! planner decides for each node (a [`Plan`], one of three lanes of the pool).
//! The executor's files all speak this vocabulary; it imports none of them.

use crate::remote::client::NetworkClient;
use crate::remote::messages::RecipeBundle;
use crate::store::http::{self as http_cache, HttpCache};
use crate::store::local::LocalCache;

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Plan {
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
pub(super) enum Choice {
    Plan(Plan),
    /// In the HTTP cache, and not needed here.
    InHttpCache,
    /// It must come from a cache, and none holds it.
    NotBuilt,
}

impl Plan {
    /// Which ready queue and limit the job uses: [`LOCAL`] executions, [`TRANSFER`]
    /// (downloads and uploads) or [`REMOTE`] executions.
    pub(super) fn lane(self) -> usize {
        match self {
            Plan::Execute => LOCAL,
            Plan::Remote => REMOTE,
            _ => TRANSFER,
        }
    }
}

/// The lanes of the pool: each has its ready queue and its limit (`-j`,
/// `http.transfers`, `amqp.jobs`).
pub(super) const LOCAL: usize = 0;
pub(super) const TRANSFER: usize = 1;
pub(super) const REMOTE: usize = 2;
pub(super) const LANES: usize = 3;

/// The services a build uses.
pub struct Services<'a> {
    pub cache: &'a LocalCache,
    pub http: Option<&'a HttpCache>,
}

/// The error that stops a build which needs the HTTP cache (`jolt download`, network
/// builds) when the cache is unreachable (`why`): exit 3.
pub(super) fn cache_unreachable(why: &str, mode: Mode) -> anyhow::Error {
    let what = match mode {
        Mode::DownloadOnly => "nothing can be downloaded",
        _ => "network builds need it",
    };
    crate::error::infra(format!(
        "The HTTP cache is unreachable ({why}): {what}; stopping"
    ))
}

/// The HTTP cache, when a build in `mode` may ask it what it holds: it is up, and a
/// local build or `jolt download` may download.
pub(super) fn usable_http<'s>(services: &Services<'s>, mode: Mode) -> Option<&'s HttpCache> {
    let local = matches!(mode, Mode::Local | Mode::DownloadOnly);
    services
        .http
        .filter(|h| (h.download || !local) && !h.is_down())
}

/// Warns once that the HTTP cache is unreachable, or about any other HTTP failure.
pub(super) fn http_warning(http: &HttpCache, what: &str, err: &anyhow::Error) -> Option<String> {
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

/// The build's first download, which goes alone: a failing cache costs one
/// request, not one per transfer slot.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe {
    /// No download has started.
    NotYet,
    /// Node `i`'s download started and the cache has not answered it.
    Waiting(usize),
    /// The cache answered: transfers go at once.
    Answered,
}
