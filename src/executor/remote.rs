//! A network build's requests in flight, without a thread each.
//!
//! A pool thread prepares a node's request (its source snapshot stored, the recipes
//! stored once per build), subscribes to its replies and publishes it, then parks
//! the [`Call`] with the waiter and goes back to the pool. The waiter, one thread
//! for every call of the build, takes the replies and keeps the clocks: a worker's
//! `accepted` and `running` replies are news, a final reply hands the call back to
//! the pool ([`Next::Finish`]: the log replayed, a goal downloaded, an unusable
//! archive asked to be replaced, a recipe bundle or source snapshot that a worker
//! found missing stored again), and so do a reconnection ([`Next::Recheck`]: the
//! HTTP cache asked, the request sent again) and a worker's silence
//! ([`Next::Resend`]). The waiter itself never waits for the network, so a thousand
//! requests in flight cost a thousand small records, not a thousand threads.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

use super::job::Runner;
use super::outcome::{Done, Event, Failure};
use super::plan::{Mode, Network, Plan};
use super::Parked;
use crate::console;
use crate::graph::{Graph, Resolved};
use crate::interrupt;
use crate::remote::client::{Incoming, Subscription};
use crate::remote::messages::{Missing, Reply, ReplyKind, Request, VERSION};
use crate::remote::shared;
use crate::store::http::HttpCache;
use crate::util::fs::format_duration;

/// How many of a worker's progress intervals a client waits without news before it
/// takes the worker for dead and sends its request again.
const SILENT_INTERVALS: u32 = 4;

/// How many times a network client asks for an archive it rejected to be replaced.
const REPLACEMENTS: usize = 2;

/// How many times a call's recipe bundle or source snapshot is stored again for a
/// worker that found it missing from the HTTP cache (a trim took it, say) before
/// the worker's error fails the task.
const RESTORES: u32 = 3;

/// How many times a call is sent again, with no worker saying it runs the task,
/// before it fails (see `Runner::hopeless`).
const HOPELESS_RESENDS: u32 = 8;

/// How often the waiter looks at its clocks.
const TICK: Duration = Duration::from_millis(200);

/// How long a reply that came before its call was parked is kept for it.
const EARLY_KEPT: Duration = Duration::from_secs(60);

/// At most how many calls the note of those still in progress names.
const STILL_NAMED: usize = 3;

/// What a pool thread is handed.
pub(super) enum Job<'n> {
    /// A node to execute, download, upload or send, as planned.
    Run(usize, Plan),
    /// A parked call to go on with.
    Resume(Box<Call<'n>>, Next),
}

/// Why a call comes back from the waiter.
pub(super) enum Next {
    /// Its final reply came.
    Finish(Reply),
    /// The broker connection was lost and is back: the reply may be lost.
    Recheck,
    /// The worker that accepted the call fell silent: send it again.
    Resend,
}

/// A request of node `i` sent to the workers, and what is known of it.
pub(super) struct Call<'n> {
    pub i: usize,
    routing_key: String,
    request: Request,
    body: Vec<u8>,
    /// Held for its replies; dropping it unsubscribes.
    _subscription: Subscription<'n>,
    start: Instant,
    /// When its request was last published.
    published: Instant,
    /// When a worker last said it has the request; `None` before it accepted.
    last_news: Option<Instant>,
    replacements: usize,
    /// Times its bundle or snapshot was stored again (see [`RESTORES`]).
    restores: u32,
    /// Requests sent again since a worker last said it runs the task.
    resends: u32,
    /// When a worker last said it runs the task (or the call started).
    last_running: Instant,
}

impl<'n> Runner<'n> {
    /// Has a network worker execute node `i`: publishes its request and parks the
    /// call with the waiter. `Ok(None)`: the waiter has it, its `Done` comes later.
    pub(super) fn remote(&self, i: usize) -> Result<Option<Done>, Failure> {
        let (Mode::Network(net), Some(http), Some(parked)) = (self.mode, self.http, &self.parked)
        else {
            return Err(Failure::new(
                "internal error: remote execution outside a network build",
            ));
        };
        let node = &self.graph.nodes[i];
        let request = self.request(i, net, http)?;
        let routing_key = node
            .task
            .def
            .routing_key
            .clone()
            .unwrap_or_else(|| net.client.settings().routing_key.clone());
        let call = Call {
            i,
            routing_key,
            body: serde_json::to_vec(&request).map_err(anyhow::Error::from)?,
            request,
            _subscription: net.client.subscribe_into(&node.identity, &parked.replies)?,
            start: Instant::now(),
            published: Instant::now(),
            last_news: None,
            replacements: 0,
            restores: 0,
            resends: 0,
            last_running: Instant::now(),
        };
        net.client.publish(&call.routing_key, &call.body)?;
        self.log(
            console::Level::Info,
            format!("Remote execution started ({})", node.label()),
        );
        crate::testhooks::pause_before_parking();
        let _ = parked.calls.send(Box::new(call));
        Ok(None)
    }

    /// Goes on with a parked call, on a pool thread; `None` when it is parked again.
    pub(super) fn resume(&self, call: Box<Call<'n>>, next: Next) -> Option<Result<Done, Failure>> {
        let reply = match next {
            Next::Finish(reply) => Some(reply),
            Next::Recheck => {
                // Replies may have been lost with the connection: the HTTP cache says
                // whether the artifact was built meanwhile.
                let node = &self.graph.nodes[call.i];
                let built = node.task.cacheable
                    && self
                        .http
                        .is_some_and(|h| h.exists(node.name(), &node.identity).unwrap_or(false));
                built.then(|| Reply {
                    version: VERSION,
                    identity: node.identity.clone(),
                    kind: ReplyKind::Success,
                    worker: String::new(),
                    duration: call.start.elapsed().as_secs_f64(),
                    log: String::new(),
                    error: String::new(),
                    missing: None,
                    requirements: Vec::new(),
                    cache: String::new(),
                })
            }
            Next::Resend => {
                if let Some(failure) = self.hopeless(&call) {
                    return Some(Err(failure));
                }
                None
            }
        };
        match reply {
            Some(reply) => self.finish(call, reply),
            None => self.send_again(call).err().map(Err),
        }
    }

    /// A call sent again [`HOPELESS_RESENDS`] times with no worker saying it runs the
    /// task, for at least four heartbeats (a stopped holder's connection is closed
    /// by then): every worker took it for a duplicate of a build nobody runs, say
    /// because a queue holding its lock was declared by something else. Failing it
    /// beats sending it for ever.
    fn hopeless(&self, call: &Call<'n>) -> Option<Failure> {
        let Mode::Network(net) = self.mode else {
            return None;
        };
        let heartbeats = Duration::from_secs(u64::from(net.client.settings().heartbeat) * 4);
        let silent = call.last_running.elapsed();
        if call.resends < HOPELESS_RESENDS || silent < heartbeats {
            return None;
        }
        let node = &self.graph.nodes[call.i];
        Some(Failure::new(format!(
            "No worker runs {}: its request was sent {} times over {}, and the workers took it for a duplicate of a build that never reports progress (is a queue jolt_lock_{} held by something other than a jolt worker?)",
            node.label(),
            call.resends + 1,
            format_duration(silent),
            call.request.lock_key()
        )))
    }

    /// Publishes a call's request again and parks it.
    fn send_again(&self, mut call: Box<Call<'n>>) -> Result<(), Failure> {
        let (Mode::Network(net), Some(parked)) = (self.mode, &self.parked) else {
            return Err(Failure::new("internal error: no network build"));
        };
        call.published = Instant::now();
        call.resends += 1;
        net.client.publish(&call.routing_key, &call.body)?;
        call.last_news = None;
        crate::testhooks::pause_before_parking();
        let _ = parked.calls.send(call);
        Ok(())
    }

    /// A call's final reply: a failure fails the node; a success replays the task's
    /// output and downloads a goal. A goal whose archive this client rejects is asked
    /// for again, to be built anew and uploaded over the bad one (at most
    /// [`REPLACEMENTS`] times: a duplicate may have answered from the bad archive).
    /// `None` when the call is parked again.
    fn finish(&self, mut call: Box<Call<'n>>, reply: Reply) -> Option<Result<Done, Failure>> {
        let i = call.i;
        let node = &self.graph.nodes[i];
        // Any broker user can publish a reply: take its numbers with care.
        let duration = Duration::try_from_secs_f64(reply.duration)
            .unwrap_or_default()
            .min(Duration::from_secs(crate::util::fs::MAX_DURATION_SECS));
        if reply.kind == ReplyKind::Error && reply.missing == Some(Missing::Requirements) {
            // Only what this node sees can be built again for it: a reply naming
            // anything else fails the task as an error.
            let missing: Vec<usize> = self
                .graph
                .visible(i)
                .into_iter()
                .filter(|&d| reply.requirements.contains(&self.graph.nodes[d].identity))
                .collect();
            if !missing.is_empty() {
                return Some(Ok(Done::RequirementsMissing {
                    missing,
                    worker: reply.worker,
                    error: reply.error,
                }));
            }
        }
        if let Some(what) = reply.missing.filter(|_| reply.kind == ReplyKind::Error) {
            if call.restores < RESTORES && self.restorable(what) {
                return self.restore(call, what, &reply.worker).err().map(Err);
            }
        }
        if reply.kind != ReplyKind::Success {
            let mut failure = self.remote_failure(i, reply, duration);
            // A worker whose cache went away (an upload that failed, say) fails its
            // task; if this client cannot reach the cache either, the build stops.
            if let Some(http) = self.http.filter(|h| !h.probe()) {
                failure.infra =
                    Some(super::plan::cache_unreachable(http.uri(), self.mode).to_string());
            }
            return Some(Err(failure));
        }
        // The task's output, as a local task's would show (the worker sends at most
        // its last MiB, saying what it cut).
        for line in reply.log.lines() {
            self.send(Event::Replay(i, line.to_string()));
        }
        if !(node.task.cacheable && self.is_goal[i]) {
            return Some(Ok(Done::RemoteExecuted(None, duration)));
        }
        let Some(http) = self.http else {
            return Some(Err(Failure::new(
                "Network builds need an HTTP cache: set http.uri",
            )));
        };
        // A success of the recheck (no worker named) was seen in the cache here.
        let built_by = Some(reply.worker.as_str()).filter(|w| !w.is_empty());
        match self.download(i, built_by) {
            Err(f) => Some(Err(f)),
            Ok(Done::Downloaded(info) | Done::Reused(info)) => {
                Some(Ok(Done::RemoteExecuted(Some(info), duration)))
            }
            Ok(_)
                if http.is_rejected(node.name(), &node.identity)
                    && call.replacements < REPLACEMENTS =>
            {
                call.replacements += 1;
                self.log(
                    console::Level::Warning,
                    format!(
                        "The HTTP cache holds an unusable artifact of {} ({}): having it built again",
                        node.label(),
                        http.url(node.name(), &node.identity)
                    ),
                );
                call.request.replace = true;
                match serde_json::to_vec(&call.request) {
                    Ok(body) => call.body = body,
                    Err(e) => return Some(Err(anyhow::Error::from(e).into())),
                }
                self.send_again(call).err().map(Err)
            }
            Ok(_) => Some(Err(Failure::new(format!(
                "The artifact of {} could not be downloaded from {}",
                node.label(),
                http.url(node.name(), &node.identity)
            )))),
        }
    }

    /// Whether what a worker found missing is to be stored again: a recipe bundle or
    /// source snapshot always; the fleet mark only when this client's cache lacks it
    /// too (a trim took it). A mark that is here says that the worker uses another
    /// HTTP cache, and its refusal fails the task.
    fn restorable(&self, what: Missing) -> bool {
        match (what, self.mode, self.http) {
            (Missing::Mark, Mode::Network(net), Some(http)) => {
                matches!(shared::has_mark(http, net.client.mark()), Ok(false))
            }
            // Built again, not stored (see `finish`).
            (Missing::Requirements, ..) => false,
            _ => true,
        }
    }

    /// `worker` found the call's recipe bundle, source snapshot or fleet mark missing
    /// from the HTTP cache (a trim took it, or an operator): it is stored again (the
    /// mark with the bundle), unless that
    /// happened since the request was published, and the request is sent again. A
    /// snapshot is packed again from the workspace; should its files have changed,
    /// the request names the new one, and the worker refuses the identity.
    fn restore(&self, mut call: Box<Call<'n>>, what: Missing, worker: &str) -> Result<(), Failure> {
        let (Mode::Network(net), Some(http)) = (self.mode, self.http) else {
            return Err(Failure::new("internal error: no network build"));
        };
        let node = &self.graph.nodes[call.i];
        call.restores += 1;
        self.log(
            console::Level::Warning,
            format!(
                "{worker} found the {what} of {} missing from the HTTP cache: storing it again",
                node.label()
            ),
        );
        match what {
            Missing::Requirements => {
                return Err(Failure::new("internal error: requirements are built again"));
            }
            Missing::Recipes | Missing::Mark => {
                net.client
                    .store_recipes(&net.recipes, http, Some(call.published))?;
            }
            Missing::Snapshot => {
                if call.request.snapshot.is_none() {
                    return Err(Failure::new(format!(
                        "{worker} asked for a source snapshot of {}, which has none",
                        node.label()
                    )));
                }
                let files: Vec<std::path::PathBuf> =
                    node.files.iter().map(|f| f.path.clone()).collect();
                let digest = net.client.snapshot(
                    self.root,
                    &files,
                    http,
                    self.cache,
                    Some(call.published),
                )?;
                if call.request.snapshot.as_deref() != Some(digest.as_str()) {
                    call.request.snapshot = Some(digest);
                    call.body = serde_json::to_vec(&call.request).map_err(anyhow::Error::from)?;
                }
            }
        }
        self.send_again(call)
    }

    /// A worker's failure or error reply: its log is shown, and it fails node `i`.
    fn remote_failure(&self, i: usize, reply: Reply, took: Duration) -> Failure {
        for line in reply.log.lines() {
            self.send(Event::Replay(i, line.to_string()));
        }
        let what = if reply.error.is_empty() {
            "the task failed".to_string()
        } else {
            reply.error.clone()
        };
        Failure {
            lines: vec![format!(
                "Remote execution failed on {}: {what}",
                reply.worker
            )],
            interrupted: false,
            log: Some(reply.log),
            remote: true,
            kept: None,
            took: Some(took),
            infra: None,
        }
    }

    /// The execution request of node `i`, with its source snapshot uploaded.
    fn request(&self, i: usize, net: &Network, http: &HttpCache) -> Result<Request, Failure> {
        let node = &self.graph.nodes[i];
        let mut pins = BTreeMap::new();
        let mut taints = BTreeMap::new();
        let mut commits = BTreeMap::new();
        for j in self.graph.closure(&[i]) {
            let n = &self.graph.nodes[j];
            if j != i {
                pins.insert(n.qualified.clone(), n.identity.clone());
            }
            if let Some(Resolved::Git { commit, .. }) = &n.source {
                commits.insert(n.qualified.clone(), commit.clone());
            }
            if let Some(t) = &n.taint {
                taints.insert(n.qualified.clone(), t.clone());
            }
        }
        net.client.store_recipes(&net.recipes, http, None)?;
        let snapshot = if node.files.is_empty() {
            None
        } else {
            let files: Vec<std::path::PathBuf> =
                node.files.iter().map(|f| f.path.clone()).collect();
            Some(
                net.client
                    .snapshot(self.root, &files, http, self.cache, None)?,
            )
        };
        Ok(Request {
            version: VERSION,
            identity: node.identity.clone(),
            task: node.name().to_string(),
            reference: node.qualified.clone(),
            recipes: net.recipes.digest.clone(),
            taints,
            pins,
            commits,
            env: self.graph.env.clone(),
            snapshot,
            client: crate::remote::messages::whoami(),
            replace: http.is_rejected(node.name(), &node.identity),
            cache: http.fleet(),
            cache_uri: http.uri().to_string(),
            cache_mark: net.client.mark().to_string(),
        })
    }
}

/// The waiter's ends.
pub(super) struct Waiter<'n> {
    pub calls: Receiver<Box<Call<'n>>>,
    pub replies: Receiver<Incoming>,
    /// Closed by the scheduler once nothing runs: the waiter ends.
    pub quit: Receiver<()>,
    pub jobs: Sender<Job<'n>>,
    pub events: Sender<Event>,
    /// Set when the build stops: requests no worker took are withdrawn.
    pub withdraw: Arc<AtomicBool>,
}

/// The channels between the pool and the waiter.
pub(super) fn channels<'n>(
    jobs: Sender<Job<'n>>,
    events: Sender<Event>,
    quit: Receiver<()>,
    withdraw: Arc<AtomicBool>,
) -> (Parked<'n>, Waiter<'n>) {
    let (calls_tx, calls_rx) = crossbeam_channel::unbounded();
    let (replies_tx, replies_rx) = crossbeam_channel::unbounded();
    (
        Parked {
            calls: calls_tx,
            replies: replies_tx,
        },
        Waiter {
            calls: calls_rx,
            replies: replies_rx,
            quit,
            jobs,
            events,
            withdraw,
        },
    )
}

impl<'n> Waiter<'n> {
    /// Waits for the replies of every parked call until the scheduler closes `quit`.
    pub fn run(self, graph: &Graph, net: &Network<'n>) {
        let settings = net.client.settings();
        let silence = settings.progress * SILENT_INTERVALS;
        let still = settings.timeout;
        // By identity; a node's identity is its own.
        let mut calls: HashMap<String, Box<Call<'n>>> = HashMap::new();
        // Replies that came before their call was parked (a request is published,
        // then parked; the worker may answer in between), with when they came.
        let mut early: HashMap<String, (Instant, Vec<Reply>)> = HashMap::new();
        // When the waiter last heard of a reconnection: a call published before it
        // and parked after it missed the news (its replies may be lost).
        let mut reconnected: Option<Instant> = None;
        let mut next_tick = Instant::now() + TICK;
        // When the waiter last said which calls are still in progress.
        let mut noted = Instant::now();
        // The outages of each watched pool's request queue, as last seen.
        let mut outages: HashMap<String, u64> = HashMap::new();
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            select! {
                recv(self.calls) -> call => {
                    if let Ok(call) = call {
                        if reconnected.is_some_and(|r| r > call.published) {
                            let _ = self.jobs.send(Job::Resume(call, Next::Recheck));
                            continue;
                        }
                        let identity = graph.nodes[call.i].identity.clone();
                        calls.insert(identity.clone(), call);
                        for reply in early.remove(&identity).map(|e| e.1).unwrap_or_default() {
                            self.on_reply(graph, &mut calls, reply);
                        }
                    }
                }
                recv(self.replies) -> incoming => match incoming {
                    Ok(Incoming::Reply(reply)) => {
                        if !calls.contains_key(&reply.identity) {
                            let e = early
                                .entry(reply.identity.clone())
                                .or_insert_with(|| (Instant::now(), Vec::new()));
                            e.1.push(reply);
                        } else {
                            self.on_reply(graph, &mut calls, reply);
                        }
                    }
                    Ok(Incoming::Reconnected) => {
                        reconnected = Some(Instant::now());
                        for (_, call) in calls.drain() {
                            let _ = self.jobs.send(Job::Resume(call, Next::Recheck));
                        }
                    }
                    Err(_) => {}
                },
                recv(self.quit) -> _ => return,
                default(wait) => {}
            }
            if interrupt::is_set() {
                for (_, call) in calls.drain() {
                    let failure = Failure::interrupted("Remote execution interrupted");
                    let _ = self.events.send(Event::Done(call.i, Err(failure)));
                }
            } else if self.withdraw.load(Ordering::Relaxed) {
                self.withdraw_unaccepted(net, &mut calls);
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                // Replies for calls that never came back (ended meanwhile).
                early.retain(|_, (came, _)| came.elapsed() < EARLY_KEPT);
                self.tick(graph, net, &mut calls, silence, still);
                self.after_outages(net, &mut calls, &mut outages);
                if noted.elapsed() >= still {
                    noted = Instant::now();
                    let long: Vec<(String, Duration)> = calls
                        .values()
                        .map(|c| (graph.nodes[c.i].label(), c.start.elapsed()))
                        .filter(|(_, ran)| *ran >= still)
                        .collect();
                    if let Some(note) = still_in_progress(long) {
                        let _ = self.events.send(Event::Log(console::Level::Info, note));
                    }
                }
            }
        }
    }

    /// The build stopped (a task failed, without `-k`): the requests no worker has
    /// taken are not waited for. They stay in the broker, unbound from this client's
    /// reply queue, so workers drop them as nobody waits for them
    /// (`commands::worker`). Those
    /// a worker said it runs (`accepted`, which a worker may send only once a build
    /// has run a quarter of a second) are waited for.
    fn withdraw_unaccepted(&self, net: &Network<'n>, calls: &mut HashMap<String, Box<Call<'n>>>) {
        let queued: Vec<String> = calls
            .iter()
            .filter(|(_, c)| c.last_news.is_none())
            .map(|(identity, _)| identity.clone())
            .collect();
        if queued.is_empty() {
            return;
        }
        let _ = self.events.send(Event::Log(
            console::Level::Info,
            format!(
                "Withdrawing {} no worker said it runs: the build stops",
                match queued.len() {
                    1 => "1 request".to_string(),
                    n => format!("{n} requests"),
                }
            ),
        ));
        for identity in &queued {
            if let Some(call) = calls.remove(identity) {
                let _ = self.events.send(Event::Done(call.i, Ok(Done::Withdrawn)));
            }
        }
        // A worker that takes one of them before this client ends then finds nobody
        // waiting for it, and drops it.
        net.client.withdraw(queued);
    }

    fn on_reply(&self, graph: &Graph, calls: &mut HashMap<String, Box<Call<'n>>>, reply: Reply) {
        let Some(call) = calls.get_mut(&reply.identity) else {
            return;
        };
        let label = graph.nodes[call.i].label();
        match reply.kind {
            ReplyKind::Accepted | ReplyKind::Running => {
                // The first news of a call, `accepted` or (for a client that was
                // not yet bound when a build said `accepted`, which a worker sends
                // once a build has run a while) `running`: a worker runs it.
                if call.last_news.is_none() {
                    let _ = self
                        .events
                        .send(Event::RemoteRunning(call.i, reply.worker.clone()));
                }
                if call.last_news.is_none() || reply.kind == ReplyKind::Accepted {
                    let _ = self.events.send(Event::Log(
                        console::Level::Verbose,
                        format!("Remote execution accepted by {} ({label})", reply.worker),
                    ));
                }
                call.last_news = Some(Instant::now());
                if reply.kind == ReplyKind::Running {
                    call.last_running = Instant::now();
                    call.resends = 0;
                }
            }
            _ => {
                if let Some(call) = calls.remove(&reply.identity) {
                    let _ = self.jobs.send(Job::Resume(call, Next::Finish(reply)));
                }
            }
        }
    }

    /// The requests no worker took of a pool whose request queue was unreachable and
    /// is back (a cluster node that held it died, and came back or its queue moved)
    /// are sent again: those waiting in it may be lost, and those sent meanwhile were
    /// dropped. Workers answer the copies of requests that were not lost from the
    /// HTTP cache or as duplicates.
    fn after_outages(
        &self,
        net: &Network<'n>,
        calls: &mut HashMap<String, Box<Call<'n>>>,
        seen: &mut HashMap<String, u64>,
    ) {
        let pools: std::collections::BTreeSet<&str> = calls
            .values()
            .filter(|c| c.last_news.is_none())
            .map(|c| c.routing_key.as_str())
            .collect();
        let now = net.client.watch_pools(pools);
        let mut over = Vec::new();
        for (pool, outages) in &now {
            if seen.get(pool).is_some_and(|before| outages > before) {
                over.push(pool.clone());
            }
        }
        *seen = now;
        for pool in over {
            let lost: Vec<String> = calls
                .iter()
                .filter(|(_, c)| c.last_news.is_none() && c.routing_key == pool)
                .map(|(identity, _)| identity.clone())
                .collect();
            let _ = self.events.send(Event::Log(
                console::Level::Warning,
                format!(
                    "The request queue of pool '{pool}' ({}) was unreachable and is back: sending again the {} no worker said it runs",
                    crate::remote::amqp::task_queue(&pool),
                    match lost.len() {
                        1 => "1 request".to_string(),
                        n => format!("{n} requests"),
                    }
                ),
            ));
            for identity in lost {
                if let Some(call) = calls.remove(&identity) {
                    let _ = self.jobs.send(Job::Resume(call, Next::Recheck));
                }
            }
        }
    }

    /// A pool no worker takes from is warned about; a call whose worker fell silent
    /// is sent again.
    fn tick(
        &self,
        graph: &Graph,
        net: &Network<'n>,
        calls: &mut HashMap<String, Box<Call<'n>>>,
        silence: Duration,
        still: Duration,
    ) {
        let unaccepted: std::collections::BTreeSet<&str> = calls
            .values()
            .filter(|c| c.last_news.is_none())
            .map(|c| c.routing_key.as_str())
            .collect();
        for pool in unaccepted {
            if let Some(waiting) = net.client.idle_pool(pool, still) {
                let _ = self.events.send(Event::Log(
                    console::Level::Warning,
                    format!(
                        "No worker takes requests of pool '{pool}' (queue {}, {waiting} waiting): start workers with amqp.routing_key = {pool}",
                        crate::remote::amqp::task_queue(pool),
                    ),
                ));
            }
        }
        let mut silent = Vec::new();
        for (identity, call) in calls.iter_mut() {
            let label = graph.nodes[call.i].label();
            if call.last_news.is_some_and(|t| t.elapsed() > silence) {
                let _ = self.events.send(Event::Log(
                    console::Level::Warning,
                    format!(
                        "No news from the worker running {label} for {}: sending the request again",
                        format_duration(silence)
                    ),
                ));
                silent.push(identity.clone());
            }
        }
        for identity in silent {
            if let Some(call) = calls.remove(&identity) {
                let _ = self.jobs.send(Job::Resume(call, Next::Resend));
            }
        }
    }
}

/// The one line that says which calls are still in progress (their labels and how
/// long they have run), naming the longest running: one line every `amqp.timeout`,
/// however many there are (it was one line per call, hundreds at once). `None` when
/// there are none.
fn still_in_progress(mut calls: Vec<(String, Duration)>) -> Option<String> {
    calls.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let (label, ran) = calls.first()?;
    if calls.len() == 1 {
        return Some(format!(
            "Remote execution still in progress after {} ({label})",
            format_duration(*ran)
        ));
    }
    let named: Vec<String> = calls
        .iter()
        .take(STILL_NAMED)
        .map(|(label, ran)| format!("{label} ({})", format_duration(*ran)))
        .collect();
    let more = match calls.len().saturating_sub(STILL_NAMED) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Some(format!(
        "Remote executions still in progress: {}; the longest: {}{more}",
        calls.len(),
        named.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_still_in_progress_are_noted_in_one_line_naming_the_longest() {
        let m = |n: u64| Duration::from_secs(60 * n);
        assert_eq!(still_in_progress(Vec::new()), None);
        assert_eq!(
            still_in_progress(vec![("app 1a2b3c4d".into(), m(5))]).unwrap(),
            "Remote execution still in progress after 05min 00s (app 1a2b3c4d)"
        );
        // Regression (issue 23): a stuck client printed one line per call, 204 at once.
        let mut calls: Vec<(String, Duration)> = (0..204)
            .map(|n| (format!("t{n} 0000{n:04}"), m(5)))
            .collect();
        calls[17].1 = m(12);
        calls[150].1 = m(7);
        assert_eq!(
            still_in_progress(calls).unwrap(),
            "Remote executions still in progress: 204; the longest: t17 00000017 (12min 00s), t150 00000150 (07min 00s), t0 00000000 (05min 00s) and 201 more"
        );
        assert_eq!(
            still_in_progress(vec![("a 1".into(), m(6)), ("b 2".into(), m(9))]).unwrap(),
            "Remote executions still in progress: 2; the longest: b 2 (09min 00s), a 1 (06min 00s)"
        );
    }
}
