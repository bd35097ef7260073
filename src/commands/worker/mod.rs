//! `jolt amqp-worker`: takes execution requests from RabbitMQ one at a time and
//! builds them. This file serves the protocol: a request refused, locked, answered
//! from the HTTP cache or built, its deliveries counted, its replies sent, and only
//! then acked; `workshop` builds it; `lock` holds task locks on shard queues;
//! `acceptor` says `accepted` and learns whether anyone still waits; `deliveries`
//! counts deliveries; `link` is what one request sees of the session. The protocol,
//! step by step, and why no client waits forever: `docs/architecture.md`, "A
//! worker's protocol".

use amiquip::{
    AmqpProperties, AmqpValue, Channel, ConsumerMessage, ConsumerOptions, Delivery, FieldTable,
    Publish,
};
use anyhow::{bail, Context, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{AmqpSettings, Config};
use crate::console;
use crate::error::usage;
use crate::error::Exit;
use crate::interrupt;
use crate::remote::amqp::{task_queue, Connected, RESULTS};
use crate::remote::messages::{whoami, Missing, Reply, ReplyKind, Request, VERSION};
use crate::remote::shared;
use crate::store::http::HttpCache;
use crate::store::local::LocalCache;
use crate::util::fs::format_duration;

mod acceptor;
mod deliveries;
mod link;
mod lock;
mod workshop;
use acceptor::{accepted_after, Acceptor};
use deliveries::{deliveries, DELIVERIES, MAX_DELIVERIES};
use link::{Building, Link, Progress};
use workshop::{Outcome, Workshop};

struct Worker {
    settings: AmqpSettings,
    http: HttpCache,
    /// The fleet of this worker's HTTP cache, as its URI names it
    /// (`HttpCache::fleet`).
    fleet: String,
    /// Fleet marks of clients (`Request::cache_mark`) found in this worker's HTTP
    /// cache, newest first, at most [`MARKS_KEPT`]: a client of another fleet digest
    /// that uses this cache all the same (see [`Worker::fleet_of`]).
    marks: Mutex<VecDeque<String>>,
    /// Where requests are built: the local cache, parsed bundles, a kept workspace.
    workshop: Workshop,
    me: String,
    /// Final replies that could not be sent (the connection went): sent first on the
    /// next connection.
    unsent: Mutex<Vec<Reply>>,
    /// The `reply_to` of requests whose `accepted` reached a client, and when: a
    /// request with one of them within [`REQUESTER_KEPT`] is built without asking
    /// again (see [`Worker::waited_for`]).
    requesters: Mutex<HashMap<String, Instant>>,
}

/// Runs the worker until SIGTERM (drain) or SIGINT.
pub fn run(config: &Config) -> Result<Exit> {
    warn_of_credentials_in_files(config);
    let settings = config.amqp.clone();
    let http = HttpCache::for_worker(config)?
        .ok_or_else(|| usage("amqp-worker needs an HTTP cache: set http.uri"))?;
    if !http.upload {
        return Err(usage(
            "Artifact upload must be enabled for workers: remove http.upload/jolt.upload = false",
        ));
    }
    let cache = LocalCache::from_config(&config.jolt)?;
    cache
        .check_writable()
        .map_err(|e| usage(format!("{e:#}")))?;
    let worker = Worker {
        workshop: Workshop::new(cache, http.clone()),
        fleet: http.fleet(),
        marks: Mutex::default(),
        http,
        me: whoami(),
        settings,
        unsent: Mutex::default(),
        requesters: Mutex::default(),
    };
    console::info(&format!(
        "Worker {} serves routing key '{}' from {}",
        worker.me,
        worker.settings.routing_key,
        worker.settings.address()
    ));
    let mut backoff = Duration::from_secs(1);
    loop {
        if interrupt::draining() || interrupt::is_set() {
            console::info("Worker stopped");
            return Ok(if interrupt::is_set() {
                Exit::Interrupted
            } else {
                Exit::Success
            });
        }
        match worker.session(&mut backoff) {
            Ok(()) => continue,
            // Refused credentials do not heal by retrying.
            Err(e) if crate::error::exit_code(&e) == Exit::Infra => return Err(e),
            Err(e) => {
                console::warn(&format!(
                    "{e:#}; reconnecting in {}",
                    format_duration(backoff).trim_start_matches('0')
                ));
                let until = Instant::now() + backoff;
                while Instant::now() < until && !interrupt::draining() && !interrupt::is_set() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Tasks run as the worker's user, and read every file it reads: a credential in its
/// configuration files is theirs (README: "Security notes"). Only the environment
/// keeps credentials from them.
fn warn_of_credentials_in_files(config: &Config) {
    for c in &config.credentials_in_files {
        let (key, file, variable) = (c.key, c.file.display(), c.variable);
        console::warn(&if c.in_url {
            format!("The password in {key} comes from {file}, which the tasks this worker runs can read: give it in {variable} instead")
        } else {
            format!("{key} comes from {file}, which the tasks this worker runs can read: give it in {variable} instead")
        });
    }
}

fn publish_reply(publisher: &Mutex<Channel>, reply: &Reply) -> Result<()> {
    let body = serde_json::to_vec(reply)?;
    publisher
        .lock()
        .expect("publisher")
        .basic_publish(
            RESULTS,
            Publish::with_properties(
                &body,
                reply.identity.as_str(),
                AmqpProperties::default().with_content_type("application/json".into()),
            ),
        )
        .context("Cannot publish a reply")
}

impl Worker {
    fn reply(&self, identity: &str, kind: ReplyKind) -> Reply {
        Reply {
            version: VERSION,
            identity: identity.to_string(),
            kind,
            worker: self.me.clone(),
            duration: 0.0,
            log: String::new(),
            error: String::new(),
            missing: None,
            requirements: Vec::new(),
            cache: String::new(),
        }
    }

    /// A reply to `request`, naming its fleet, so that clients of another cache
    /// ignore it.
    fn reply_to(&self, request: &Request, kind: ReplyKind) -> Reply {
        Reply {
            cache: request.cache.clone(),
            ..self.reply(&request.identity, kind)
        }
    }

    /// One connection's worth of work; returns `Ok` when asked to stop. An error
    /// once connected names the broker it came from.
    fn session(&self, backoff: &mut Duration) -> Result<()> {
        let Connected { connection, broker } = self.settings.connect()?;
        *backoff = Duration::from_secs(1);
        self.serve_connection(connection, &broker)
            .map_err(|e| match crate::error::exit_code(&e) {
                // Already names it.
                Exit::Infra => e,
                _ => e.context(format!("RabbitMQ at {broker}")),
            })
    }

    /// [`Worker::session`] on the connection to `broker`.
    fn serve_connection(&self, mut connection: amiquip::Connection, broker: &str) -> Result<()> {
        let channel = connection.open_channel(None)?;
        self.settings
            .declare(&channel, &self.settings.routing_key)?;
        channel.qos(0, 1, false)?;
        let publisher = Mutex::new(connection.open_channel(None)?);
        // Final replies a lost connection kept from their clients.
        let unsent = std::mem::take(&mut *self.unsent.lock().expect("unsent"));
        for (n, reply) in unsent.iter().enumerate() {
            if let Err(e) = publish_reply(&publisher, reply) {
                self.unsent
                    .lock()
                    .expect("unsent")
                    .extend(unsent[n..].iter().cloned());
                return Err(e);
            }
            console::info(&format!(
                "Reply {:?} for {} sent after reconnecting",
                reply.kind,
                reply.identity.get(..8).unwrap_or(&reply.identity)
            ));
        }
        let acceptor = Acceptor::open(&mut connection)?;
        let queue = channel.queue_declare_passive(task_queue(&self.settings.routing_key))?;
        let consumer = queue.consume(ConsumerOptions::default())?;
        let mut locks = lock::Locks::new();
        console::info(&format!(
            "Connected to {broker}; waiting for requests on {}",
            task_queue(&self.settings.routing_key)
        ));
        // Ok(true): asked to stop; Ok(false): interrupted mid-task, the request left
        // unacked for another worker.
        let building = Mutex::new(None);
        let stopped = std::thread::scope(|scope| {
            let (running, builds) = crossbeam_channel::bounded::<bool>(1);
            let progress = Progress {
                running,
                building: &building,
            };
            scope.spawn(|| self.report_progress(&publisher, builds, &building));
            loop {
                if interrupt::draining() || interrupt::is_set() {
                    // A request delivered meanwhile stays unacked, and goes back to
                    // the queue with the connection.
                    crate::remote::amqp::cancel_consumer(consumer, |_| {});
                    return Ok(true);
                }
                match consumer.receiver().recv_timeout(Duration::from_millis(250)) {
                    Ok(ConsumerMessage::Delivery(delivery)) => {
                        let mut link = Link {
                            connection: &mut connection,
                            channel: &channel,
                            publisher: &publisher,
                            acceptor: &acceptor,
                            locks: &mut locks,
                            progress: &progress,
                        };
                        if !self.handle(&mut link, &delivery)? {
                            drop(consumer);
                            return Ok(false);
                        }
                        if let Err(e) = consumer.ack(delivery) {
                            bail!(
                                "Cannot acknowledge the request (the broker took it back, e.g. after its consumer_timeout): {e}"
                            );
                        }
                    }
                    Ok(other) => bail!("The broker ended the consumer ({other:?})"),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        bail!("Lost the connection to the broker")
                    }
                }
            }
        })?;
        if stopped {
            let _ = publisher.into_inner().map(|p| p.close());
            let _ = acceptor.channel.close();
            drop(locks);
            let _ = channel.close();
        }
        let _ = connection.close();
        Ok(())
    }

    /// The session's progress thread: while a build runs (from the `true` sent on
    /// `builds` until the `false` that follows), tells the clients of the build in
    /// `building` `accepted` after [`ACCEPTED_AFTER`] (unless they were told when
    /// the request was taken), then every `amqp.progress` that it still runs
    /// (`running`). One thread for the
    /// session, where one per request cost a thread start and end per task. It
    /// publishes holding `building`, which the build's end clears before its final
    /// reply: no `running` comes after it.
    fn report_progress(
        &self,
        publisher: &Mutex<Channel>,
        builds: Receiver<bool>,
        building: &Mutex<Option<Building>>,
    ) {
        // How long until the next reply, while a build runs.
        let mut wait: Option<Duration> = None;
        loop {
            let next = match wait {
                Some(wait) => builds.recv_timeout(wait),
                None => builds.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match next {
                Ok(true) => {
                    // A build its clients were told of says `running` next.
                    let announced = building
                        .lock()
                        .expect("building")
                        .as_ref()
                        .is_some_and(|b| b.announced);
                    wait = Some(if announced {
                        self.settings.progress
                    } else {
                        accepted_after().min(self.settings.progress)
                    });
                }
                Ok(false) => wait = None,
                Err(RecvTimeoutError::Timeout) => {
                    let mut current = building.lock().expect("building");
                    if let Some(build) = current.as_mut() {
                        let kind = if build.announced {
                            ReplyKind::Running
                        } else {
                            build.announced = true;
                            ReplyKind::Accepted
                        };
                        let reply = Reply {
                            cache: build.cache.clone(),
                            ..self.reply(&build.identity, kind)
                        };
                        let _ = publish_reply(publisher, &reply);
                    }
                    wait = Some(self.settings.progress);
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Serves one request; returns false when the worker was interrupted mid-task
    /// (the request stays unacked), true when the request may be acked.
    ///
    /// The order of the steps is what keeps every client answered: see the module
    /// documentation.
    fn handle(&self, link: &mut Link, delivery: &Delivery) -> Result<bool> {
        let request = match Request::parse(&delivery.body) {
            Ok(r) => r,
            Err(bad) => {
                console::warn(&format!("Refusing a request: {}", bad.message));
                if let Some(identity) = bad.identity {
                    let mut reply = self.reply(&identity, ReplyKind::Error);
                    reply.error = bad.message;
                    publish_reply(link.publisher, &reply)?;
                }
                return Ok(true);
            }
        };
        let id8 = request.identity.get(..8).unwrap_or(&request.identity);
        if !self.wait_for_cache() {
            return Ok(false);
        }
        match self.fleet_of(&request) {
            Fleet::Own => {}
            Fleet::Other(reply) => {
                publish_reply(link.publisher, &reply)?;
                return Ok(true);
            }
            Fleet::Interrupted => return Ok(false),
        }
        // A delivery that no worker started came back without a worker's death: a
        // promoted mirror marks every waiting request redelivered, and a quorum queue
        // returns what a node's loss or restart took. Only started ones count.
        if delivery.redelivered && self.started(&request) >= deliveries(delivery) {
            return self.redelivered(link, delivery, &request).map(|()| true);
        }
        if delivery.redelivered {
            console::info(&format!(
                "Request for {} {id8} from {}: redelivered, but no worker started it (a broker failover): not counted as a delivery",
                request.reference, request.client
            ));
        }
        self.record_started(&request, deliveries(delivery));
        let lock = match self.lock(link, &request)? {
            Some(lock) => lock,
            None => return self.duplicate(link, &request).map(|()| true),
        };
        let cached = if request.replace {
            self.to_replace(&request)
        } else {
            self.in_http_cache(&request)
        };
        match cached {
            Cached::Absent => {}
            Cached::Answer(reply) => {
                if !link.locks.release(lock) {
                    bail!("Cannot release the lock of {} {id8}", request.reference);
                }
                publish_reply(link.publisher, &reply)?;
                return Ok(true);
            }
            // Leave the request unacked for another worker; the lock goes with the
            // connection, which the session closes.
            Cached::Interrupted => return Ok(false),
        }
        console::info(&format!(
            "Request for {} {id8} from {}{}",
            request.reference,
            request.client,
            match deliveries(delivery) {
                1 => String::new(),
                n => format!(" (delivery {n} of at most {MAX_DELIVERIES})"),
            }
        ));
        let Some(announced) = self.waited_for(link, delivery, &request)? else {
            console::info(&format!(
                "{} {id8}: nobody waits for it, its client {} is gone; dropping the request",
                request.reference, request.client
            ));
            if !link.locks.release(lock) {
                bail!("Cannot release the lock of {} {id8}", request.reference);
            }
            return Ok(true);
        };
        let start = Instant::now();
        let outcome = self.build_reporting_progress(link.progress, &request, announced);
        let mut reply = match outcome {
            Outcome::Interrupted => return Ok(false),
            Outcome::Missing(what, error) => {
                let mut r = self.reply_to(&request, ReplyKind::Error);
                r.error = error;
                r.missing = Some(what);
                r
            }
            Outcome::RequirementsMissing(identities, error) => {
                let mut r = self.reply_to(&request, ReplyKind::Error);
                r.error = error;
                r.missing = Some(Missing::Requirements);
                r.requirements = identities;
                r
            }
            Outcome::Done { kind, log, error } => {
                let mut r = self.reply_to(&request, kind);
                r.log = log;
                r.error = error;
                r
            }
        };
        reply.duration = start.elapsed().as_secs_f64();
        // Release the lock before the final reply. A duplicate that finds the lock
        // held is then sure that this reply is still to come, and its client, bound
        // before it published, will get it; one that finds the lock free finds the
        // artifact in the HTTP cache. A lock that cannot be released went with the
        // connection: the reply is sent once the worker has reconnected (its clients
        // still wait for it), and the request, unacked, comes back and is answered
        // from the HTTP cache.
        if !link.locks.release(lock) {
            self.unsent.lock().expect("unsent").push(reply);
            bail!(
                "Lost the lock of {} {id8} with the connection; its reply goes out after reconnecting",
                request.reference
            );
        }
        console::info(&format!(
            "Reply {:?} for {} {id8} after {}",
            reply.kind,
            request.reference,
            format_duration(start.elapsed())
        ));
        if let Err(e) = publish_reply(link.publisher, &reply) {
            self.unsent.lock().expect("unsent").push(reply);
            return Err(e);
        }
        Ok(true)
    }

    /// Locks the request's identity (see [`lock`]); `None` when another worker holds
    /// it.
    fn lock(&self, link: &mut Link, request: &Request) -> Result<Option<lock::Lock>> {
        crate::testhooks::pause_before_lock();
        for _ in 0..LOCK_TRIES {
            match link
                .locks
                .take(link.connection, link.acceptor, &request.lock_key())?
            {
                lock::Taken::Held(lock) => return Ok(Some(lock)),
                lock::Taken::Duplicate => return Ok(None),
                lock::Taken::Again => {}
            }
        }
        bail!(
            "Cannot lock {} {}: its shard's holder never answers",
            request.reference,
            request.identity.get(..8).unwrap_or(&request.identity)
        )
    }

    /// Whether the HTTP cache holds the request's artifact already, asked with the
    /// lock held: a holder uploads before it lets go, so whoever locks after it
    /// finds the artifact here and answers `success` without building it again.
    /// Asked once, so the build that follows a miss does not ask again
    /// (`executor::Options::goals_absent`). A cache that fails the check fails the
    /// request with an `error` reply and holds the next ones (`wait_for_cache`).
    fn in_http_cache(&self, request: &Request) -> Cached {
        let id8 = request.identity.get(..8).unwrap_or(&request.identity);
        match self.http.exists(&request.task, &request.identity) {
            Ok(false) => Cached::Absent,
            Err(e) if crate::store::http::is_interrupted(&e) => Cached::Interrupted,
            Ok(true) => {
                console::info(&format!(
                    "{} {id8} is in the HTTP cache already",
                    request.reference
                ));
                Cached::Answer(self.reply_to(request, ReplyKind::Success))
            }
            Err(e) => Cached::Answer(self.cache_failed(request, &e)),
        }
    }

    /// The HTTP cache failed a check for the request: an `error` reply, and an
    /// unreachable cache holds the next requests (`wait_for_cache`).
    fn cache_failed(&self, request: &Request, e: &anyhow::Error) -> Reply {
        if crate::store::http::is_unreachable(e) {
            self.http.mark_down();
        }
        console::error(&format!("{e:#}"));
        let mut reply = self.reply_to(request, ReplyKind::Error);
        reply.error = format!("{e:#}");
        reply
    }

    /// Whether the request's client uses this worker's HTTP cache. One that names
    /// this worker's fleet does, and so does an older client's (without a mark).
    /// Otherwise its mark must be in this worker's cache: clients and workers may
    /// name one cache differently (a swarm's clients by a host's address, its
    /// workers by the service's name), which a digest of the URI cannot tell from
    /// two caches. A request of another cache is refused, with an `error` reply
    /// that names both caches: served, it would fail at its recipe bundle, or, were
    /// the same bundle in this cache, be built and uploaded there, where its client
    /// will never find it. A mark found is remembered, so a build costs a worker one
    /// `HEAD`; one not found is asked again, since a client stores a mark that a
    /// trim took once more (it says `missing: "mark"`).
    fn fleet_of(&self, request: &Request) -> Fleet {
        let mark = &request.cache_mark;
        if mark.is_empty() || request.cache.is_empty() || request.cache == self.fleet {
            return Fleet::Own;
        }
        if self.marks.lock().expect("marks").contains(mark) {
            return Fleet::Own;
        }
        match shared::has_mark(&self.http, mark) {
            Ok(true) => {
                let mut marks = self.marks.lock().expect("marks");
                marks.push_front(mark.clone());
                marks.truncate(MARKS_KEPT);
                Fleet::Own
            }
            Ok(false) => {
                let id8 = request.identity.get(..8).unwrap_or(&request.identity);
                let message = format!(
                    "the request is another fleet's: its client uses the HTTP cache {} (fleet {}), this worker {} (fleet {}), which does not hold the client's mark {}; give each fleet (the clients and workers of one HTTP cache) a broker vhost of its own (amqp.vhost)",
                    request.cache_uri,
                    request.cache,
                    self.http.uri(),
                    self.fleet,
                    shared::mark_url(&self.http, mark)
                );
                console::error(&format!(
                    "Refusing {} {id8} from {}: {message}",
                    request.reference, request.client
                ));
                let mut reply = self.reply_to(request, ReplyKind::Error);
                reply.error = message;
                reply.missing = Some(Missing::Mark);
                Fleet::Other(reply)
            }
            Err(e) if crate::store::http::is_interrupted(&e) => Fleet::Interrupted,
            Err(e) => Fleet::Other(self.cache_failed(request, &e)),
        }
    }

    /// A request to replace the HTTP cache's archive, which its client rejected: the
    /// worker downloads it and checks it itself, since anyone may send such a
    /// request. A good copy is left alone, and the request answered `success`; a bad
    /// or missing one is built again (the executor does not take the copy).
    fn to_replace(&self, request: &Request) -> Cached {
        let id8 = request.identity.get(..8).unwrap_or(&request.identity);
        let checked = self.workshop.cache.scratch("replaced").and_then(|staging| {
            let fetched = self.http.fetch(&request.task, &request.identity, &staging);
            let _ = crate::util::fs::remove_dir_all(&staging);
            fetched
        });
        match checked {
            Ok(Some(_)) => {
                console::info(&format!(
                    "{} {id8}: the HTTP cache's archive is intact, left alone",
                    request.reference
                ));
                Cached::Answer(self.reply_to(request, ReplyKind::Success))
            }
            Ok(None) => Cached::Absent,
            Err(e) if crate::store::http::is_interrupted(&e) => Cached::Interrupted,
            Err(e) if crate::store::http::is_rejected(&e) => {
                console::info(&format!(
                    "{} {id8}: the HTTP cache's archive is unusable ({e:#}): replacing it",
                    request.reference
                ));
                Cached::Absent
            }
            Err(e) => Cached::Answer(self.cache_failed(request, &e)),
        }
    }

    /// Whether anyone still waits for the request, asked before it is built:
    /// `Some(announced)` when someone does, `announced` when the asking told the
    /// clients `accepted`; `None` when nobody does (its client is gone, and no other
    /// client waits for the identity), and the request is dropped.
    ///
    /// Asked by publishing `accepted` `mandatory` to the clients bound to the
    /// identity (the broker returns it when no queue is bound, [`Acceptor`]), and
    /// not asked again within [`REQUESTER_KEPT`] for a request with the same
    /// `reply_to` (the requester's reply queue): most requests then cost the broker
    /// no `accepted`, which clients need only for a task that runs long enough to
    /// show (the progress thread sends it after [`ACCEPTED_AFTER`]). A client that
    /// goes away may so have the requests a worker takes within [`REQUESTER_KEPT`]
    /// of an answer to one of its requests built; as the answer says that some
    /// client waits for the identity, not which, another client waiting for some
    /// of the same tasks keeps renewing it. Nothing is ever published to
    /// `reply_to`, which a forged request may set to any queue.
    fn waited_for(
        &self,
        link: &Link,
        delivery: &Delivery,
        request: &Request,
    ) -> Result<Option<bool>> {
        let requester = delivery.properties.reply_to().as_deref();
        if let Some(queue) = requester {
            let mut requesters = self.requesters.lock().expect("requesters");
            if requesters
                .get(queue)
                .is_some_and(|t| t.elapsed() < requester_kept())
            {
                return Ok(Some(false));
            }
            requesters.retain(|_, t| t.elapsed() < requester_kept());
        }
        let accepted = self.reply_to(request, ReplyKind::Accepted);
        if !link.acceptor.accept(&accepted)? {
            return Ok(None);
        }
        if let Some(queue) = requester {
            self.requesters
                .lock()
                .expect("requesters")
                .insert(queue.to_string(), Instant::now());
        }
        Ok(Some(true))
    }

    /// Builds the request while the session's progress thread tells its clients
    /// that it runs: `accepted` after [`ACCEPTED_AFTER`] unless `announced`, and
    /// `running` every `amqp.progress`.
    fn build_reporting_progress(
        &self,
        progress: &Progress,
        request: &Request,
        announced: bool,
    ) -> Outcome {
        *progress.building.lock().expect("building") = Some(Building {
            identity: request.identity.clone(),
            cache: request.cache.clone(),
            announced,
        });
        let _ = progress.running.send(true);
        let outcome = self.workshop.build(request);
        // Waits for a `running` being published: the final reply comes after it.
        *progress.building.lock().expect("building") = None;
        let _ = progress.running.send(false);
        outcome
    }

    /// Holds the request while the HTTP cache is down (an earlier request found it
    /// so): the worker probes it with back-off, and serves the request once it
    /// answers, rather than failing every request that comes meanwhile. False when
    /// interrupted or asked to stop (the request stays unacked, for another worker).
    fn wait_for_cache(&self) -> bool {
        if !self.http.is_down() {
            return true;
        }
        console::warn(&format!(
            "HTTP cache {} is down: waiting for it before serving requests",
            self.http.uri()
        ));
        let mut backoff = Duration::from_secs(1);
        loop {
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                if interrupt::is_set() || interrupt::draining() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if self.http.probe() {
                console::info(&format!("HTTP cache {} answers again", self.http.uri()));
                return true;
            }
            backoff = (backoff * 2).min(CACHE_PROBE_MAX);
        }
    }

    /// A request another worker holds the lock of. Its client bound its reply queue
    /// before publishing, so the holder's final reply, sent after the lock is
    /// released, reaches it. Still, the client hears from this worker: `success`
    /// when the artifact is in the HTTP cache already, else `accepted`, so that it
    /// watches for the holder's progress and sends the request again should the
    /// holder die without answering.
    fn duplicate(&self, link: &Link, request: &Request) -> Result<()> {
        let id8 = request.identity.get(..8).unwrap_or(&request.identity);
        // A client that asks for a replacement has rejected what the cache holds.
        let built = !request.replace
            && self
                .http
                .exists(&request.task, &request.identity)
                .unwrap_or(false);
        console::info(&format!(
            "{} {id8} is being built by another worker: {}",
            request.reference,
            if built {
                "it is in the HTTP cache already"
            } else {
                "dropping this duplicate request"
            }
        ));
        let kind = if built {
            ReplyKind::Success
        } else {
            ReplyKind::Accepted
        };
        publish_reply(link.publisher, &self.reply_to(request, kind))
    }

    /// A request that was delivered before and never acknowledged: the worker that
    /// had it died (or crashed on it), or the broker took it back. It is queued again
    /// with its delivery count, and refused with an error reply once it has been
    /// delivered [`MAX_DELIVERIES`] times, so that a request that crashes workers
    /// cannot take the fleet down one worker after another. The copy goes out on
    /// the consuming channel, ahead of the original's ack.
    fn redelivered(&self, link: &Link, delivery: &Delivery, request: &Request) -> Result<()> {
        let id8 = request.identity.get(..8).unwrap_or(&request.identity);
        let n = deliveries(delivery).saturating_add(1);
        if n > MAX_DELIVERIES {
            return self.refuse_redelivered(link, request, n);
        }
        console::warn(&format!(
            "Request for {} {id8} from {} (redelivered): queued again as delivery {n} of at most {MAX_DELIVERIES}",
            request.reference, request.client
        ));
        let mut headers = FieldTable::new();
        headers.insert(DELIVERIES.to_string(), AmqpValue::LongInt(n as i32));
        let mut properties = AmqpProperties::default()
            .with_delivery_mode(2)
            .with_priority(delivery.properties.priority().unwrap_or(0))
            .with_content_type("application/json".into())
            .with_headers(headers);
        if let Some(reply_to) = delivery.properties.reply_to() {
            properties = properties.with_reply_to(reply_to.clone());
        }
        link.channel
            .basic_publish(
                crate::remote::amqp::REQUESTS,
                Publish::with_properties(
                    &delivery.body,
                    self.settings.routing_key.as_str(),
                    properties,
                ),
            )
            .context("Cannot queue a redelivered request again")
    }

    /// The name of a request's delivery record in the HTTP cache: its identity,
    /// client and build.
    fn started_key(request: &Request) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [&request.identity, &request.client, &request.cache_mark] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        crate::util::hex(&h.finalize())
    }

    /// The last delivery of `request` that a worker started (on a classic queue:
    /// see [`Worker::record_started`]); when the HTTP cache cannot say, `u32::MAX`, so
    /// that every redelivery counts, as it did before the record.
    fn started(&self, request: &Request) -> u32 {
        crate::remote::shared::started(&self.http, &Self::started_key(request)).unwrap_or_else(
            |e| {
                console::debug(&format!("reading a delivery record: {e:#}"));
                u32::MAX
            },
        )
    }

    /// Records in the HTTP cache that this worker starts delivery `n` of `request`
    /// (a small PUT beside the recipe bundles). A redelivery of a delivery no worker
    /// recorded is a broker failover (a promoted mirror marks every waiting request
    /// redelivered), not a worker's death, and does not count against
    /// [`MAX_DELIVERIES`]. A record that cannot be stored only makes a later failover
    /// count as a death.
    fn record_started(&self, request: &Request, n: u32) {
        if let Err(e) =
            crate::remote::shared::store_started(&self.http, &Self::started_key(request), n)
        {
            console::debug(&format!("storing a delivery record: {e:#}"));
        }
    }

    /// Refuses a request delivered `n` times, more than [`MAX_DELIVERIES`], with an
    /// error reply.
    fn refuse_redelivered(&self, link: &Link, request: &Request, n: u32) -> Result<()> {
        let id8 = request.identity.get(..8).unwrap_or(&request.identity);
        let message = format!(
            "the request was delivered {n} times without an answer: it crashed or lost the workers that took it"
        );
        console::error(&format!(
            "Refusing {} {id8} (redelivered): {message}",
            request.reference
        ));
        let mut reply = self.reply_to(request, ReplyKind::Error);
        reply.error = message;
        publish_reply(link.publisher, &reply)
    }
}

/// How long a requester whose request's `accepted` reached a client is taken to be
/// there still (see [`Worker::waited_for`]).
const REQUESTER_KEPT: Duration = Duration::from_millis(250);

/// [`REQUESTER_KEPT`], or what a test says ([`crate::testhooks::requester_kept`]).
fn requester_kept() -> Duration {
    crate::testhooks::requester_kept().unwrap_or(REQUESTER_KEPT)
}

/// How many times a worker tries to lock an identity whose shard's holder does not
/// answer (each try waits up to 10 s) before it gives the request back.
const LOCK_TRIES: usize = 12;

/// The longest a worker waits between two probes of an HTTP cache that is down.
const CACHE_PROBE_MAX: Duration = Duration::from_secs(60);

/// Whose request it is ([`Worker::fleet_of`]).
enum Fleet {
    /// This worker's fleet's: served.
    Own,
    /// Of another HTTP cache (or the check failed): the `error` reply.
    Other(Reply),
    Interrupted,
}

/// How many fleet marks found in its HTTP cache a worker remembers: the builds it
/// serves at once.
const MARKS_KEPT: usize = 64;

/// What the HTTP cache says of a request's artifact.
enum Cached {
    Absent,
    /// Present (`success`), or the cache failed (`error`).
    Answer(Reply),
    Interrupted,
}
