//! The client side of network builds: one connection to RabbitMQ, one exclusive reply
//! queue bound to `jolt_results` by the identity of every task this client waits for
//! (bound without waiting for the broker's answer, and left bound until the queue
//! goes with the connection: a round trip per bind or unbind made a far broker cost
//! two round trips a task, one after another; only the identities of withdrawn
//! requests are unbound, see [`NetworkClient::withdraw`]), and a thread that owns
//! the connection: it reads replies and hands them to the
//! waiting jobs, and when the broker goes away it reconnects with capped back-off,
//! re-binds, and tells every waiting job (which then re-checks the HTTP cache and
//! sends its request again). Requests are published with publisher confirms, and
//! published again until the broker confirms them ([`NetworkClient::publish`]); the
//! thread also watches the request queues of requests no worker took, so that those
//! a queue lost with its node are sent again ([`NetworkClient::watch_pools`]).

use amiquip::{
    AmqpProperties, Channel, Confirm, ConsumerMessage, ConsumerOptions, FieldTable, Publish,
    QueueDeclareOptions,
};
use anyhow::{Context, Result};
use crossbeam_channel::{select, Receiver, RecvTimeoutError, Sender};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::AmqpSettings;
use crate::error::infra;
use crate::remote::amqp::RESULTS;
use crate::remote::messages::{RecipeBundle, Reply};
use crate::remote::shared;
use crate::store::http::HttpCache;
use crate::store::local::LocalCache;
use crate::util::hex;

/// How many fresh connections a request may take to be published before the
/// failure is taken as final (say, a request queue declared with other arguments).
const PUBLISH_ATTEMPTS: u32 = 5;

/// How long a publish waits for the broker's confirm before it takes the link for
/// broken and publishes again on a fresh connection.
const CONFIRM_WAIT: Duration = Duration::from_secs(10);

/// The longest a publish waits before it publishes a request the broker refused
/// again.
const NACKED_MAX: Duration = Duration::from_secs(5);

/// What a waiting job receives.
#[derive(Debug)]
pub enum Incoming {
    Reply(Reply),
    /// The connection was lost and is back: replies may have been missed.
    Reconnected,
}

struct Link {
    channel: Channel,
    queue: String,
    /// Routing keys whose request queue this connection has declared.
    declared: HashSet<String>,
    /// Identities the reply queue is bound to.
    bound: HashSet<String>,
    /// The delivery tag of the last publish on `channel` (publisher confirms number
    /// them from 1).
    published: u64,
}

struct Shared {
    /// The publishing channel, `None` while disconnected.
    link: Mutex<Option<Link>>,
    connected: Condvar,
    waiters: Mutex<HashMap<String, Vec<Sender<Incoming>>>>,
    stop: AtomicBool,
    /// A publish failed: the broker may have closed the publishing channel only, so
    /// the connection thread must start over.
    broken: AtomicBool,
    /// Identities whose requests were withdrawn: the connection thread unbinds them
    /// (see [`NetworkClient::withdraw`]).
    withdrawn: Mutex<Vec<String>>,
    /// This client's fleet (`HttpCache::fleet`): replies that name another are
    /// another fleet's, for the same identity, and ignored.
    fleet: String,
    /// The pools whose request queues the connection thread watches (see
    /// [`NetworkClient::watch_pools`]), with how many outages each has had.
    watched: Mutex<HashMap<String, Watch>>,
    /// Publishes waiting for the broker's confirm, by delivery tag: told true when
    /// acked, false when nacked; dropped (disconnected) with the connection.
    unconfirmed: Mutex<std::collections::BTreeMap<u64, Sender<bool>>>,
}

/// What the connection thread knows of a watched pool's request queue.
#[derive(Debug, Default, Clone, Copy)]
struct Watch {
    /// The queue was unreachable when last asked (its node is down).
    down: bool,
    /// Outages seen over: times the queue was unreachable and then reachable again.
    outages: u64,
}

/// How often the connection thread asks whether each watched request queue is
/// reachable.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A connection to the broker for one build.
pub struct NetworkClient {
    settings: AmqpSettings,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// When each source snapshot (by digest) was last stored.
    snapshots: Mutex<HashMap<String, Instant>>,
    /// When the build's recipe bundle was last stored in the HTTP cache; held while
    /// it is stored, so that the requests that need it wait for one upload.
    recipes_stored: Mutex<Option<Instant>>,
    /// When each pool's consumers are next counted (see [`NetworkClient::idle_pool`]).
    pool_checks: Mutex<HashMap<String, std::time::Instant>>,
    /// This build's fleet mark (`Request::cache_mark`), stored with the recipes.
    mark: String,
}

/// How long after its first request a pool's consumers are first counted.
pub const POOL_CHECK_AFTER: Duration = Duration::from_secs(5);

/// Replies for one identity, into a channel that may take those of others too;
/// unsubscribes when dropped.
pub struct Subscription<'a> {
    client: &'a NetworkClient,
    identity: String,
    tx: Sender<Incoming>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        self.client.unsubscribe(&self.identity, &self.tx);
    }
}

/// A connection with its two channels and the reply queue.
struct Opened {
    connection: amiquip::Connection,
    /// Publishes with publisher confirms, which come on `confirms`.
    publisher: Channel,
    confirms: Receiver<Confirm>,
    consumer: Channel,
    /// The reply queue's name.
    queue: String,
    /// The broker it reached (`AmqpSettings::address_of`).
    broker: String,
}

/// Opens the connection and its two channels; declares the reply queue.
fn open(settings: &AmqpSettings) -> Result<Opened> {
    let crate::remote::amqp::Connected {
        mut connection,
        broker,
    } = settings.connect()?;
    let on = || format!("RabbitMQ at {broker}");
    let publisher = connection.open_channel(None).with_context(on)?;
    let consumer = connection.open_channel(None).with_context(on)?;
    let queue = consumer
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
        )
        .with_context(on)?;
    let queue = queue.name().to_string();
    let confirms = publisher.listen_for_publisher_confirms().with_context(on)?;
    publisher.enable_publisher_confirms().with_context(on)?;
    publisher
        .exchange_declare(
            amiquip::ExchangeType::Direct,
            RESULTS,
            amiquip::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
        )
        .with_context(on)?;
    Ok(Opened {
        connection,
        publisher,
        confirms,
        consumer,
        queue,
        broker,
    })
}

impl NetworkClient {
    /// Connects to the broker for a build whose HTTP cache is the fleet `fleet`
    /// (`HttpCache::fleet`); an unreachable broker is an infrastructure error (exit 3).
    pub fn connect(settings: AmqpSettings, fleet: String) -> Result<NetworkClient> {
        let first = open(&settings).map_err(|e| infra(format!("{e:#}")))?;
        crate::console::info(&format!("Connected to the broker {}", first.broker));
        let shared = Arc::new(Shared {
            link: Mutex::new(None),
            connected: Condvar::new(),
            waiters: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            withdrawn: Mutex::new(Vec::new()),
            fleet,
            watched: Mutex::new(HashMap::new()),
            unconfirmed: Mutex::new(std::collections::BTreeMap::new()),
        });
        let thread = {
            let shared = shared.clone();
            let settings = settings.clone();
            std::thread::spawn(move || serve(settings, shared, first))
        };
        Ok(NetworkClient {
            settings,
            shared,
            thread: Some(thread),
            snapshots: Mutex::new(HashMap::new()),
            recipes_stored: Mutex::new(None),
            pool_checks: Mutex::new(HashMap::new()),
            mark: crate::remote::messages::new_mark(),
        })
    }

    pub fn settings(&self) -> &AmqpSettings {
        &self.settings
    }

    /// This build's fleet mark, which its requests carry (`Request::cache_mark`).
    pub fn mark(&self) -> &str {
        &self.mark
    }

    /// Waits for a connection (or a stop) and runs `f` on the publishing link.
    fn with_link<T>(&self, f: impl FnOnce(&mut Link) -> Result<T>) -> Result<T> {
        let mut guard = self.shared.link.lock().expect("link");
        loop {
            if crate::interrupt::is_set() || self.shared.stop.load(Ordering::Relaxed) {
                anyhow::bail!("interrupted");
            }
            if let Some(link) = guard.as_mut() {
                return f(link);
            }
            guard = self
                .shared
                .connected
                .wait_timeout(guard, Duration::from_millis(200))
                .expect("link")
                .0;
        }
    }

    /// Whether the pool `routing_key`, which has requests no worker accepted yet, has
    /// no worker at all: counted [`POOL_CHECK_AFTER`] after the first call for it and
    /// then every `every`, once for all its requests (by re-declaring its queue, as
    /// publishing does). `Some(requests waiting)` when none consumes it.
    pub fn idle_pool(&self, routing_key: &str, every: Duration) -> Option<u32> {
        let now = std::time::Instant::now();
        {
            let mut checks = self.pool_checks.lock().expect("pool checks");
            let next = checks
                .entry(routing_key.to_string())
                .or_insert(now + POOL_CHECK_AFTER);
            if now < *next {
                return None;
            }
            *next = now + every;
        }
        let counts = self
            .with_link(|link| self.settings.declare(&link.channel, routing_key))
            .map_err(|e| crate::console::debug(&format!("counting pool {routing_key}: {e:#}")))
            .ok()?;
        (counts.consumers == 0).then_some(counts.waiting)
    }

    /// Watches the request queues of `pools` (those with requests no worker took),
    /// and no others; returns how many outages each has had: how many times the
    /// connection thread found it unreachable (a cluster node that holds it is down)
    /// and later reachable again. Requests waiting in it then may be lost (a classic
    /// queue's requests survive its node's crash only if they reached its disk), and
    /// those sent while it was down were dropped: the caller sends them again. Never
    /// waits for the broker.
    pub fn watch_pools<'p>(
        &self,
        pools: impl IntoIterator<Item = &'p str>,
    ) -> HashMap<String, u64> {
        let mut watched = self.shared.watched.lock().expect("watched");
        let pools: HashSet<&str> = pools.into_iter().collect();
        watched.retain(|pool, _| pools.contains(pool.as_str()));
        pools
            .into_iter()
            .map(|p| {
                let w = watched.entry(p.to_string()).or_default();
                (p.to_string(), w.outages)
            })
            .collect()
    }

    /// Starts sending the replies for `identity` into `tx` (and, after a reconnect,
    /// one [`Incoming::Reconnected`] however many identities `tx` takes).
    pub fn subscribe_into(
        &self,
        identity: &str,
        tx: &Sender<Incoming>,
    ) -> Result<Subscription<'_>> {
        let tx = tx.clone();
        self.shared
            .waiters
            .lock()
            .expect("waiters")
            .entry(identity.to_string())
            .or_default()
            .push(tx.clone());
        // Bind now; after a reconnect the connection thread binds every waiter again.
        // Without waiting: the broker applies the bind before the request this job
        // publishes next on the same channel, so no reply can come before it; a bind
        // it refuses closes the channel, which that publish finds out.
        let bound = self.with_link(|link| {
            if link.bound.insert(identity.to_string()) {
                link.channel.queue_bind_nowait(
                    &link.queue,
                    RESULTS,
                    identity,
                    FieldTable::new(),
                )?;
            }
            Ok(())
        });
        if let Err(e) = bound {
            crate::console::debug(&format!("bind {identity}: {e:#}"));
        }
        Ok(Subscription {
            client: self,
            identity: identity.to_string(),
            tx,
        })
    }

    fn unsubscribe(&self, identity: &str, own: &Sender<Incoming>) {
        let mut waiters = self.shared.waiters.lock().expect("waiters");
        let last = match waiters.get_mut(identity) {
            Some(list) => {
                list.retain(|tx| !tx.same_channel(own));
                list.is_empty()
            }
            None => false,
        };
        if last {
            // The binding stays (see the module's documentation): replies for an
            // identity nobody waits for are dropped on arrival.
            waiters.remove(identity);
        }
    }

    /// The requests for `identities` are withdrawn (the build stops): their bindings
    /// go, so that a worker that takes one before this client ends finds nobody
    /// waiting for it and drops it, instead of building it while the client waits
    /// for the tasks that run. Unbound by the connection thread, a few round trips at
    /// a time between replies (`queue.unbind` has no `nowait`).
    pub fn withdraw(&self, identities: impl IntoIterator<Item = String>) {
        self.shared
            .withdrawn
            .lock()
            .expect("withdrawn")
            .extend(identities);
    }

    /// Publishes a request (persistent, with the configured priority, and `reply_to`
    /// naming this client's reply queue so that a worker can tell whether the client
    /// is still there), declaring the request queue of its routing key first, and
    /// waits for the broker's confirm (it has the request in the queue, on disk or
    /// on a quorum of nodes): a request nacked is published again after a back-off
    /// (up to [`NACKED_MAX`]) until the broker takes it, one not confirmed within
    /// [`CONFIRM_WAIT`] or whose connection went first is published again on a fresh
    /// connection. Waits while the broker is away.
    pub fn publish(&self, routing_key: &str, body: &[u8]) -> Result<()> {
        let priority = self.settings.priority;
        let mut failures = 0;
        let mut nacked = Duration::from_millis(100);
        loop {
            let sent = self.with_link(|link| {
                if !link.declared.contains(routing_key) {
                    self.settings.declare(&link.channel, routing_key)?;
                    link.declared.insert(routing_key.to_string());
                }
                let (tx, rx) = crossbeam_channel::bounded(1);
                link.published += 1;
                self.shared
                    .unconfirmed
                    .lock()
                    .expect("unconfirmed")
                    .insert(link.published, tx);
                link.channel
                    .basic_publish(
                        crate::remote::amqp::REQUESTS,
                        Publish::with_properties(
                            body,
                            routing_key,
                            AmqpProperties::default()
                                .with_delivery_mode(2)
                                .with_priority(priority)
                                .with_reply_to(link.queue.clone())
                                .with_content_type("application/json".into()),
                        ),
                    )
                    .map_err(anyhow::Error::from)?;
                Ok(rx)
            });
            let confirmed = match sent {
                Ok(rx) => match rx.recv_timeout(CONFIRM_WAIT) {
                    Ok(true) => return Ok(()),
                    Ok(false) => {
                        // Refused (a full queue with `overflow = reject-publish`, say):
                        // published again after a while, until the broker takes it.
                        crate::console::debug(&format!(
                            "the broker refused (nacked) a request to pool {routing_key}; publishing it again in {} ms",
                            nacked.as_millis()
                        ));
                        std::thread::sleep(nacked);
                        nacked = (nacked * 2).min(NACKED_MAX);
                        continue;
                    }
                    Err(RecvTimeoutError::Timeout) => Err(anyhow::anyhow!(
                        "the broker did not confirm the request within {} s",
                        CONFIRM_WAIT.as_secs()
                    )),
                    Err(RecvTimeoutError::Disconnected) => {
                        // The connection went (the connection thread opens the next):
                        // publish again on it, within the attempts.
                        failures += 1;
                        if failures >= PUBLISH_ATTEMPTS {
                            return Err(anyhow::anyhow!(
                                "Cannot send a request to RabbitMQ at {}: the connection went {failures} times before the broker confirmed it",
                                self.settings.address()
                            ));
                        }
                        continue;
                    }
                },
                Err(e) => Err(e),
            };
            match confirmed {
                Ok(()) => return Ok(()),
                Err(e) if crate::interrupt::is_set() => return Err(e),
                // The broker refused a declaration: retrying cannot help.
                Err(e) if crate::error::exit_code(&e) == crate::error::Exit::Infra => {
                    return Err(e)
                }
                Err(e) => {
                    // Start over on a fresh connection; an error that survives that
                    // is final.
                    failures += 1;
                    if failures >= PUBLISH_ATTEMPTS {
                        return Err(e.context(format!(
                            "Cannot send a request to RabbitMQ at {}",
                            self.settings.address()
                        )));
                    }
                    crate::console::debug(&format!("publish failed, reconnecting: {e:#}"));
                    self.shared.link.lock().expect("link").take();
                    self.shared.broken.store(true, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    /// Stores the recipe bundle and the build's fleet mark in the HTTP cache unless
    /// this client did already: once per build, before its first request; and again
    /// for a worker that found either missing (`again`: when the request it answered
    /// was published) unless they were stored after that, so that the requests a
    /// trim failed at once cost one upload.
    pub fn store_recipes(
        &self,
        bundle: &RecipeBundle,
        http: &HttpCache,
        again: Option<Instant>,
    ) -> Result<()> {
        let mut stored = self.recipes_stored.lock().expect("recipes_stored");
        if !stored_since(*stored, again) {
            shared::store_recipes(http, &bundle.digest, &bundle.bytes)
                .with_context(|| "Cannot upload the recipes")?;
            shared::store_mark(http, &self.mark).with_context(|| "Cannot upload the fleet mark")?;
            *stored = Some(Instant::now());
        }
        Ok(())
    }

    /// Packs `files` (relative to `root`) into a source snapshot, uploads it to the
    /// HTTP cache once per digest (and again, as [`NetworkClient::store_recipes`]
    /// does the bundle, for a worker that found it missing), and returns the digest.
    pub fn snapshot(
        &self,
        root: &Path,
        files: &[PathBuf],
        http: &HttpCache,
        cache: &LocalCache,
        again: Option<Instant>,
    ) -> Result<String> {
        struct Hashing<W> {
            inner: W,
            hasher: Sha256,
        }
        impl<W: Write> Write for Hashing<W> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let n = self.inner.write(buf)?;
                self.hasher.update(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.inner.flush()
            }
        }
        let scratch = cache.scratch("snapshot")?;
        let result = (|| {
            let path = scratch.join("sources.tar");
            let file = std::fs::File::create(&path)?;
            let mut out = Hashing {
                inner: std::io::BufWriter::new(file),
                hasher: Sha256::new(),
            };
            crate::store::archive::pack_files(
                root,
                &crate::util::fs::with_link_targets(root, files),
                &mut out,
            )?;
            out.flush()?;
            let digest = hex(&out.hasher.finalize());
            let stored = self
                .snapshots
                .lock()
                .expect("snapshots")
                .get(&digest)
                .copied();
            if stored_since(stored, again) {
                return Ok(digest);
            }
            shared::store_snapshot(http, &digest, &path)
                .with_context(|| "Cannot upload the source snapshot")?;
            self.snapshots
                .lock()
                .expect("snapshots")
                .insert(digest.clone(), Instant::now());
            Ok(digest)
        })();
        let _ = crate::util::fs::remove_dir_all(&scratch);
        result
    }
}

/// Whether something this client last stored at `stored` (`None`: never) needs no
/// upload now: it was stored, and after `since` when a worker found it missing in
/// answer to a request published at `since`.
fn stored_since(stored: Option<Instant>, since: Option<Instant>) -> bool {
    match (stored, since) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(at), Some(since)) => at > since,
    }
}

impl Drop for NetworkClient {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The connection thread: reads replies, reconnects when the broker goes away.
fn serve(settings: AmqpSettings, shared: Arc<Shared>, first: Opened) {
    let mut next = Some(first);
    let mut reconnected = false;
    let mut backoff = Duration::from_millis(250);
    while !shared.stop.load(Ordering::Relaxed) {
        let Opened {
            mut connection,
            publisher,
            confirms,
            consumer: consumer_channel,
            queue,
            broker,
        } = match next.take() {
            Some(c) => c,
            None => match open(&settings) {
                Ok(c) => c,
                Err(e) => {
                    crate::console::debug(&format!("reconnect: {e:#}"));
                    sleep_unless_stopped(&shared, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(250);
        // Bind every identity someone waits for, then let publishers in.
        let Some((consumer, bound)) =
            bind_and_consume(&shared, &publisher, &consumer_channel, &queue)
        else {
            drop(connection);
            continue;
        };
        *shared.link.lock().expect("link") = Some(Link {
            channel: publisher,
            queue: queue.clone(),
            declared: HashSet::new(),
            bound,
            published: 0,
        });
        shared.connected.notify_all();
        if reconnected {
            crate::console::warn(&format!("Reconnected to RabbitMQ at {broker}"));
            let mut told: Vec<Sender<Incoming>> = Vec::new();
            for list in shared.waiters.lock().expect("waiters").values() {
                for tx in list {
                    if !told.iter().any(|t| t.same_channel(tx)) {
                        let _ = tx.send(Incoming::Reconnected);
                        told.push(tx.clone());
                    }
                }
            }
        }
        dispatch_replies(
            &settings,
            &shared,
            &consumer,
            &consumer_channel,
            &queue,
            Live {
                broker: &broker,
                connection: &mut connection,
                confirms: &confirms,
            },
        );
        let link = shared.link.lock().expect("link").take();
        // Publishes not confirmed on this connection are published again.
        shared.unconfirmed.lock().expect("unconfirmed").clear();
        if shared.stop.load(Ordering::Relaxed) {
            // Close cleanly: amiquip complains about channels dropped unclosed, and
            // about consumers dropped before their cancellation reached them.
            crate::remote::amqp::cancel_consumer(consumer, |_| {});
            if let Some(link) = link {
                let _ = link.channel.close();
            }
            let _ = consumer_channel.close();
            let _ = connection.close();
            return;
        }
        drop(consumer);
        drop(link);
        drop(consumer_channel);
        drop(connection);
        reconnected = true;
    }
}

/// Binds the reply queue to every identity someone waits for, and starts
/// consuming it; `None` when the broker refused either (the connection is done).
fn bind_and_consume<'c>(
    shared: &Shared,
    publisher: &Channel,
    consumer_channel: &'c Channel,
    queue: &str,
) -> Option<(amiquip::Consumer<'c>, HashSet<String>)> {
    let identities: Vec<String> = shared
        .waiters
        .lock()
        .expect("waiters")
        .keys()
        .cloned()
        .collect();
    for identity in &identities {
        publisher
            .queue_bind(queue, RESULTS, identity.as_str(), FieldTable::new())
            .ok()?;
    }
    let consumer = consumer_channel
        .basic_consume(
            queue,
            ConsumerOptions {
                no_ack: true,
                exclusive: true,
                ..Default::default()
            },
        )
        .ok()?;
    Some((consumer, identities.into_iter().collect()))
}

/// The connection the connection thread serves: the broker it reached, and the
/// publisher confirms of its publishing channel.
struct Live<'a> {
    broker: &'a str,
    connection: &'a mut amiquip::Connection,
    confirms: &'a Receiver<Confirm>,
}

/// Hands every reply to the jobs waiting for its identity, every publisher confirm
/// to the publish that waits for it, and every
/// [`WATCH_EVERY`] asks whether the watched request queues are reachable, until the
/// build stops, a publish breaks the link, or the connection goes.
fn dispatch_replies(
    settings: &AmqpSettings,
    shared: &Shared,
    consumer: &amiquip::Consumer,
    channel: &Channel,
    queue: &str,
    live: Live,
) {
    let Live {
        broker,
        connection,
        confirms,
    } = live;
    let mut next_watch = Instant::now() + WATCH_EVERY;
    loop {
        if shared.stop.load(Ordering::Relaxed) || shared.broken.swap(false, Ordering::Relaxed) {
            return;
        }
        if !unbind_withdrawn(shared, channel, queue) {
            return;
        }
        if Instant::now() >= next_watch {
            next_watch = Instant::now() + WATCH_EVERY;
            if !watch(settings, shared, connection) {
                return;
            }
        }
        // Short, so a finished build does not wait long for this thread to stop.
        let message = select! {
            recv(consumer.receiver()) -> m => m.map_err(|_| RecvTimeoutError::Disconnected),
            recv(confirms) -> confirm => {
                if let Ok(confirm) = confirm {
                    confirmed(shared, confirm);
                }
                continue;
            }
            default(Duration::from_millis(20)) => Err(RecvTimeoutError::Timeout),
        };
        match message {
            Ok(ConsumerMessage::Delivery(delivery)) => {
                match serde_json::from_slice::<Reply>(&delivery.body) {
                    Ok(reply) if !reply.cache.is_empty() && reply.cache != shared.fleet => {
                        crate::console::debug(&format!(
                            "ignoring a reply of another fleet for {} (cache {})",
                            reply.identity, reply.cache
                        ));
                    }
                    Ok(reply) => {
                        let waiters = shared.waiters.lock().expect("waiters");
                        for tx in waiters.get(&reply.identity).into_iter().flatten() {
                            let _ = tx.send(Incoming::Reply(reply.clone()));
                        }
                    }
                    Err(e) => crate::console::warn(&format!("ignoring an unreadable reply: {e}")),
                }
            }
            Ok(other) => {
                crate::console::warn(&format!(
                    "Lost the connection to RabbitMQ at {broker} ({other:?}); reconnecting"
                ));
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Tells the publishes that `confirm` acks or nacks.
fn confirmed(shared: &Shared, confirm: Confirm) {
    let (payload, acked) = match confirm {
        Confirm::Ack(p) => (p, true),
        Confirm::Nack(p) => (p, false),
    };
    let mut unconfirmed = shared.unconfirmed.lock().expect("unconfirmed");
    let tags: Vec<u64> = if payload.multiple {
        unconfirmed
            .range(..=payload.delivery_tag)
            .map(|(tag, _)| *tag)
            .collect()
    } else {
        vec![payload.delivery_tag]
    };
    for tag in tags {
        if let Some(tx) = unconfirmed.remove(&tag) {
            let _ = tx.send(acked);
        }
    }
}

/// Asks whether each watched request queue is reachable (a passive declare, on a
/// channel of its own, which a missing or unreachable queue closes) and counts the
/// outages that end; false when the connection went.
fn watch(settings: &AmqpSettings, shared: &Shared, connection: &mut amiquip::Connection) -> bool {
    let pools: Vec<String> = shared
        .watched
        .lock()
        .expect("watched")
        .keys()
        .cloned()
        .collect();
    for pool in pools {
        let reachable = match settings.pool(connection, &pool) {
            Ok(crate::remote::amqp::Pool::Unavailable(why)) => {
                crate::console::debug(&format!("the request queue of pool {pool}: {why}"));
                false
            }
            Ok(_) => true,
            Err(e) => {
                crate::console::debug(&format!("watching pool {pool}: {e:#}"));
                return false;
            }
        };
        if let Some(w) = shared.watched.lock().expect("watched").get_mut(&pool) {
            if w.down && reachable {
                w.outages += 1;
            }
            w.down = !reachable;
        }
    }
    true
}

/// How many withdrawn identities the connection thread unbinds between two looks
/// at the replies.
const UNBINDS_AT_A_TIME: usize = 16;

/// Unbinds up to [`UNBINDS_AT_A_TIME`] withdrawn identities from the reply queue,
/// on the consuming channel; false when the broker refused (the connection is
/// done). An identity someone waits for again keeps its binding: the unbinding
/// holds the link, so a job that subscribes to it binds it after.
fn unbind_withdrawn(shared: &Shared, channel: &Channel, queue: &str) -> bool {
    let batch: Vec<String> = {
        let mut withdrawn = shared.withdrawn.lock().expect("withdrawn");
        let n = withdrawn.len().min(UNBINDS_AT_A_TIME);
        withdrawn.drain(..n).collect()
    };
    for identity in batch {
        let mut link = shared.link.lock().expect("link");
        let Some(link) = link.as_mut() else {
            return true;
        };
        let waited = shared
            .waiters
            .lock()
            .expect("waiters")
            .contains_key(&identity);
        if waited || !link.bound.remove(&identity) {
            continue;
        }
        if channel
            .queue_unbind(queue, RESULTS, identity.as_str(), FieldTable::new())
            .is_err()
        {
            return false;
        }
    }
    true
}

fn sleep_unless_stopped(shared: &Shared, total: Duration) {
    let until = std::time::Instant::now() + total;
    while std::time::Instant::now() < until && !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_or_snapshot_is_stored_again_unless_stored_since_the_request() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        // (last stored, request published when a worker found it missing) -> stored.
        let table = [
            (None, None, false),
            (Some(t0), None, true),
            (None, Some(t0), false),
            (Some(t0), Some(t1), false),
            (Some(t1), Some(t0), true),
        ];
        for (stored, since, fresh) in table {
            assert_eq!(stored_since(stored, since), fresh, "{stored:?} {since:?}");
        }
    }
}
