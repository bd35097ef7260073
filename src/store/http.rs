//! The shared HTTP artifact cache: `HEAD`, `GET` and `PUT` of
//! `{http.uri}/{task}/{identity}.tar`, served by any WebDAV-PUT capable server
//! (nginx with `dav_methods PUT; create_full_put_path on; client_max_body_size 0;`).
//! The same requests of any other path under the cache ([`HttpCache::has`],
//! [`HttpCache::get_bytes`], [`HttpCache::put_file`], ...) carry what a network build
//! keeps there (`remote::shared`), with the same retries, credentials and deadlines:
//! this module knows artifacts only.
//!
//! Transfers stream: an upload is packed by a thread into a pipe that a chunked `PUT`
//! reads (a packing error fails the request, so no truncated archive is stored);
//! an archive of at most [`PACKED_IN_MEMORY`] (most artifacts) and a file are sent
//! in one piece with a `Content-Length`; a download is
//! unpacked into a staging directory as it arrives and verified before the caller
//! commits it. Connection errors and 5xx
//! answers are retried with back-off; a cache that stays unreachable is marked down
//! and skipped for the rest of the process, so the caller warns once.

use anyhow::{bail, Context, Result};
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::error::usage;
use crate::store::artifact::Manifest;

/// Existence checks planning makes at once (`executor::presence`); connections to
/// the cache are kept open for reuse for these or for the transfers, whichever are
/// more.
pub const CONNECTIONS_PER_HOST: usize = 64;

/// Declares an error marker: a message-holding type that a caller finds anywhere in
/// an error's chain with its `is_...` function, to tell one kind of HTTP failure from
/// another.
macro_rules! error_marker {
    ($(#[$doc:meta])* $name:ident, $is:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name(pub String);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::error::Error for $name {}

        #[doc = concat!("Whether an error (anywhere in its chain) is a [`", stringify!($name), "`].")]
        pub fn $is(err: &anyhow::Error) -> bool {
            err.chain().any(|e| e.is::<$name>())
        }
    };
}
pub(crate) use error_marker;

error_marker!(
    /// An unreachable server: the caller may go on without the cache.
    Unreachable,
    is_unreachable
);
error_marker!(
    /// An archive that arrived whole but is unusable (corrupt, another artifact's,
    /// unsafe).
    Rejected,
    is_rejected
);
error_marker!(
    /// An upload the server refused (401, 403): the cache is there, and reading it
    /// may still work.
    UploadRefused,
    is_upload_refused
);

/// The fleet of the cache at `uri` (without credentials): see [`HttpCache::fleet`].
pub fn fleet_of(uri: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(uri.trim_end_matches('/').as_bytes());
    crate::util::hex(&digest[..8])
}

/// A client of the HTTP cache. Clones share their connections and what they found
/// (the server down, archives rejected).
#[derive(Clone)]
pub struct HttpCache {
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
    /// Downloads are enabled.
    pub download: bool,
    /// Uploads are enabled.
    pub upload: bool,
    /// Downloads and uploads at once (`http.transfers`).
    pub transfers: usize,
    retries: u32,
    /// The longest a request without a body (HEAD) may take, all told.
    deadline: Duration,
    down: Arc<AtomicBool>,
    /// The server refused an upload ([`HttpCache::refuse_uploads`]).
    uploads_refused: Arc<AtomicBool>,
    /// Artifact URLs whose archive failed verification: a builder replaces them.
    rejected: Arc<Mutex<std::collections::HashSet<String>>>,
}

/// A transfer given up because jolt was interrupted.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Whether an error (anywhere in its chain) is an [`Interrupted`] transfer.
pub fn is_interrupted(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<Interrupted>())
}

/// Runs a transfer on a thread of its own and waits for it, but returns
/// [`Interrupted`] within a tenth of a second of a Ctrl-C: a blocking read cannot be
/// interrupted, so the thread is left to end with the process (what it was writing
/// is a staging directory, which nothing commits).
fn interruptible<T: Send + 'static>(
    transfer: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    TransferThreads::shared().interruptible(transfer)
}

/// A transfer, which returns how to deliver its result: the thread counts itself
/// idle before it delivers, so the transfer that follows finds it idle.
type TransferJob = Box<dyn FnOnce() -> Delivery + Send>;
type Delivery = Box<dyn FnOnce() + Send>;

/// Threads that transfers run on, kept between transfers: a thread started and ended
/// per request (the mmap, mprotect and munmap of its stack) was about a tenth of a
/// network client's CPU. A transfer takes an idle thread, reserving it, or starts
/// one, so it never waits behind another; a thread idle for [`TRANSFER_THREAD_IDLE`]
/// ends. The process has one ([`TransferThreads::shared`]); a test makes its own,
/// so that what other tests transfer at the same time does not count.
struct TransferThreads {
    jobs: crossbeam_channel::Sender<TransferJob>,
    queue: crossbeam_channel::Receiver<TransferJob>,
    /// Threads waiting for a job and not reserved.
    idle: Arc<std::sync::atomic::AtomicUsize>,
    /// How long a thread waits for a job before it ends.
    keep: Duration,
}

const TRANSFER_THREAD_IDLE: Duration = Duration::from_secs(30);

impl TransferThreads {
    fn new(keep: Duration) -> TransferThreads {
        let (jobs, queue) = crossbeam_channel::unbounded();
        TransferThreads {
            jobs,
            queue,
            idle: Arc::default(),
            keep,
        }
    }

    /// The process's transfer threads.
    fn shared() -> &'static TransferThreads {
        static THREADS: std::sync::OnceLock<TransferThreads> = std::sync::OnceLock::new();
        THREADS.get_or_init(|| TransferThreads::new(TRANSFER_THREAD_IDLE))
    }

    /// See [`interruptible`].
    fn interruptible<T: Send + 'static>(
        &self,
        transfer: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.run(Box::new(move || {
            let result = transfer();
            Box::new(move || {
                let _ = tx.send(result);
            })
        }))?;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(result) => return result,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if crate::interrupt::is_set() {
                        return Err(Interrupted.into());
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    bail!("the transfer ended without a result")
                }
            }
        }
    }

    /// Hands `job` to an idle thread, or to a new one.
    fn run(&self, job: TransferJob) -> Result<()> {
        let reserved = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if reserved {
            let _ = self.jobs.send(job);
            return Ok(());
        }
        let (queue, idle, keep) = (self.queue.clone(), self.idle.clone(), self.keep);
        std::thread::Builder::new()
            .name("transfer".into())
            .spawn(move || {
                let mut job = job;
                loop {
                    let deliver = job();
                    idle.fetch_add(1, Ordering::AcqRel);
                    deliver();
                    job = match queue.recv_timeout(keep) {
                        Ok(job) => job,
                        Err(_) => {
                            // Leave unless a transfer reserved this thread meanwhile
                            // (its job is then on its way).
                            let left = idle
                                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok();
                            // A thread that left must not take a job: it was sent
                            // for another, which it would drop.
                            if left {
                                return;
                            }
                            match queue.recv() {
                                Ok(job) => job,
                                Err(_) => return,
                            }
                        }
                    };
                }
            })
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("Cannot start a transfer: {e}"))
    }
}

/// How long [`CacheResolver`] keeps what a host name resolved to.
const RESOLVED_FOR: Duration = Duration::from_secs(10);

/// Resolves the cache's host for the HTTP agent. ureq resolves before it looks for a
/// pooled connection, and its resolver starts a thread for each lookup with a
/// deadline (every `HEAD`): a thread per request, for an address that never
/// changes. Here an IP address is taken as it is, and a host name's addresses are
/// kept for [`RESOLVED_FOR`].
#[derive(Debug, Default)]
struct CacheResolver {
    system: ureq::unversioned::resolver::DefaultResolver,
    /// Host and port -> addresses, and when they were looked up.
    known: Mutex<std::collections::HashMap<String, (ResolvedAddrs, std::time::Instant)>>,
    /// Lookups handed to the system resolver.
    lookups: std::sync::atomic::AtomicUsize,
}

type ResolvedAddrs = ureq::unversioned::resolver::ResolvedSocketAddrs;

impl ureq::unversioned::resolver::Resolver for CacheResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ResolvedAddrs, ureq::Error> {
        // "host:port", the port from the scheme where the URI has none, as ureq's
        // own resolver has it (for a proxy, socks5 is 1080).
        let Some(key) = uri
            .scheme()
            .zip(uri.authority())
            .and_then(|(scheme, authority)| {
                ureq::unversioned::resolver::DefaultResolver::host_and_port(scheme, authority)
            })
        else {
            return self.system.resolve(uri, config, timeout);
        };
        if let Ok(addr) = key.parse::<std::net::SocketAddr>() {
            let mut addrs = self.empty();
            addrs.push(addr);
            return Ok(addrs);
        }
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((addrs, at)) = known.get(&key) {
            if at.elapsed() < RESOLVED_FOR {
                return Ok(addrs.clone());
            }
        }
        drop(known);
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let addrs = self.system.resolve(uri, config, timeout)?;
        known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.insert(key, (addrs.clone(), std::time::Instant::now()));
        Ok(addrs)
    }
}

/// Artifacts whose archive is at most this large are packed in memory and sent
/// with a `Content-Length`; larger ones stream.
const PACKED_IN_MEMORY: usize = 1 << 20;

/// A writer into memory that fails once more than `limit` bytes were written.
struct Bounded {
    bytes: Vec<u8>,
    limit: usize,
    full: bool,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.full = true;
            return Err(std::io::Error::other("larger than the in-memory limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The body of a streamed upload: the read end of the packer's pipe. At the end of
/// the pipe it returns the packer's error, if any, so a half-packed archive is never
/// sent as complete (the request fails and the server discards it).
struct PackedBody {
    pipe: std::io::PipeReader,
    done: crossbeam_channel::Receiver<Result<(), String>>,
    /// Where the packer's error is kept for the caller.
    failed: Arc<Mutex<Option<String>>>,
}

impl Read for PackedBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.pipe.read(buf)?;
        if n == 0 {
            if let Ok(Err(e)) = self.done.recv() {
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                return Err(std::io::Error::other(e));
            }
        }
        Ok(n)
    }
}

/// Counts bytes read through it.
/// Counts bytes read through it, and keeps the first read error's text: a transfer
/// that stalled must mark the server down, not pass for a corrupt archive.
struct Counting<R> {
    inner: R,
    count: u64,
    failed: Option<String>,
    /// Hashes what is read, where the bytes must have a digest.
    hasher: Option<sha2::Sha256>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.count += n as u64;
                if let Some(h) = &mut self.hasher {
                    sha2::Digest::update(h, &buf[..n]);
                }
                Ok(n)
            }
            Err(e) => {
                self.failed.get_or_insert_with(|| e.to_string());
                Err(e)
            }
        }
    }
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The certificates of a PEM file of CA certificates (`http.ca_file`); a file that
/// cannot be read or holds none is a configuration error.
fn ca_file(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>> {
    let file = path.display();
    let pem =
        std::fs::read(path).map_err(|e| usage(format!("Cannot read http.ca_file {file}: {e}")))?;
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(usage(format!(
            "http.ca_file {file} holds no PEM certificate"
        )));
    }
    Ok(certs)
}

impl HttpCache {
    /// The cache named by `http.uri`, if any. `no_download`/`no_upload` are the
    /// command-line switches, which win over the configuration.
    pub fn from_config(
        config: &Config,
        no_download: bool,
        no_upload: bool,
    ) -> Result<Option<HttpCache>> {
        let agent = format!("jolt/{}", env!("CARGO_PKG_VERSION"));
        Self::with_agent(config, no_download, no_upload, agent)
    }

    /// A worker's cache: its requests say so in their `User-Agent` (`jolt/<version>
    /// (worker)`), so that the cache's log tells a fleet's requests from its clients'.
    pub fn for_worker(config: &Config) -> Result<Option<HttpCache>> {
        let agent = format!("jolt/{} (worker)", env!("CARGO_PKG_VERSION"));
        Self::with_agent(config, false, false, agent)
    }

    fn with_agent(
        config: &Config,
        no_download: bool,
        no_upload: bool,
        user_agent: String,
    ) -> Result<Option<HttpCache>> {
        let http = &config.http;
        let Some(uri) = &http.uri else {
            return Ok(None);
        };
        // Credentials in the URL become the Authorization header; the URL jolt
        // shows and requests never holds them.
        let (uri, userinfo) = crate::util::secrets::strip_userinfo(uri.trim());
        let uri = uri.trim_end_matches('/').to_string();
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            return Err(usage(format!(
                "Invalid http.uri '{}': expected http:// or https://",
                crate::util::secrets::masked_url(&uri)
            )));
        }
        let (user, password) = match (http.username.clone(), userinfo) {
            (Some(user), _) => (Some(user), http.password.clone()),
            (None, Some((user, password))) => (Some(user), http.password.clone().or(password)),
            (None, None) => (None, None),
        };
        let authorization = user.map(|user| {
            format!(
                "Basic {}",
                base64(format!("{user}:{}", password.unwrap_or_default()).as_bytes())
            )
        });
        let roots = match &http.ca_file {
            Some(file) => ureq::tls::RootCerts::new_with_certs(&ca_file(file)?),
            // Mozilla's roots, built in: the static binary needs no system store.
            None => ureq::tls::RootCerts::WebPki,
        };
        let idle = http.transfers.max(CONNECTIONS_PER_HOST);
        let agent_config = ureq::Agent::config_builder()
            .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
            .http_status_as_error(false)
            .timeout_connect(Some(http.connect_timeout))
            .timeout_per_read(Some(http.timeout))
            .timeout_per_write(Some(http.timeout))
            .max_redirects(5)
            // Both limits: ureq keeps 10 idle connections in all by default, so
            // the transfers past the tenth each reconnected (a round trip more).
            .max_idle_connections(idle)
            .max_idle_connections_per_host(idle)
            .user_agent(user_agent)
            .build();
        let agent = ureq::Agent::with_parts(
            agent_config,
            ureq::unversioned::transport::DefaultConnector::new(),
            CacheResolver::default(),
        );
        Ok(Some(HttpCache {
            agent,
            base: uri,
            authorization,
            download: config.jolt.download && http.download && !no_download,
            upload: config.jolt.upload && http.upload && !no_upload,
            transfers: http.transfers,
            retries: http.retries,
            deadline: http.connect_timeout + http.timeout,
            down: Arc::default(),
            uploads_refused: Arc::default(),
            rejected: Arc::default(),
        }))
    }

    /// The cache's base URI.
    pub fn uri(&self) -> &str {
        &self.base
    }

    /// The URL of an artifact.
    pub fn url(&self, task: &str, identity: &str) -> String {
        format!("{}/{task}/{identity}.tar", self.base)
    }

    /// Whether an earlier request found the server unreachable.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Marks the server down; returns true the first time, so one warning is printed.
    pub fn mark_down(&self) -> bool {
        !self.down.swap(true, Ordering::Relaxed)
    }

    /// Remembers that the cache's archive of an artifact is unusable, so that it is
    /// neither downloaded again nor kept when this process builds the artifact.
    pub fn reject(&self, task: &str, identity: &str) {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.url(task, identity));
    }

    /// Forgets which archives were found unusable: another worker may have replaced
    /// them. A long-running worker calls it between requests.
    pub fn forget_rejections(&self) {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Asks a server marked down whether it answers again (any answer but a 5xx);
    /// if so, it is up again. A refusal counts as an answer: nginx refuses a `HEAD`
    /// of a directory without an index (403), credentials or not, and a refusal of
    /// the credentials is reported by the request that needs them.
    pub fn probe(&self) -> bool {
        self.down.store(false, Ordering::Relaxed);
        let url = format!("{}/", self.base);
        let answered = self
            .answer(&url, &mut || {
                self.with_auth(self.agent.head(&url))
                    .config()
                    .timeout_global(Some(self.deadline))
                    .build()
                    .call()
            })
            .is_ok();
        if !answered {
            self.down.store(true, Ordering::Relaxed);
        }
        answered
    }

    /// What a `PUT` answer means. Sent with [`HttpCache::answer`]: a refusal is
    /// [`UploadRefused`], not the cache unreachable, since reading it may still work.
    fn put_outcome(&self, url: &str, status: ureq::http::StatusCode) -> Result<()> {
        match status.as_u16() {
            200 | 201 | 204 => Ok(()),
            401 | 403 if self.authorization.is_some() => Err(UploadRefused(format!(
                "{url}: upload refused ({status}): the server refused the credentials"
            ))
            .into()),
            401 | 403 => Err(UploadRefused(format!(
                "{url}: upload refused ({status}); set http.username and http.password (or JOLT_HTTP_PASSWORD)"
            ))
            .into()),
            code => bail!("{url}: PUT answered {code}"),
        }
    }

    /// Whether an upload was refused in this build ([`HttpCache::refuse_uploads`]).
    pub fn uploads_refused(&self) -> bool {
        self.uploads_refused.load(Ordering::Relaxed)
    }

    /// Remembers that the server refuses this client's uploads, so that a build
    /// that may go on without them tries no more; true the first time, when the
    /// caller says so.
    pub fn refuse_uploads(&self) -> bool {
        !self.uploads_refused.swap(true, Ordering::Relaxed)
    }

    /// The fleet this cache serves, as requests and replies name it: the first 16
    /// hex digits of the SHA-256 of its URI (without credentials). Clients and
    /// workers that name one cache by different URIs (a swarm's service name, a
    /// host's address) get different digests: a client's requests carry its own,
    /// which the worker repeats in its replies and its lock, and a worker of
    /// another digest looks for the client's fleet mark (`remote::shared`) in its
    /// own cache before it serves the request.
    pub fn fleet(&self) -> String {
        fleet_of(&self.base)
    }

    /// Whether the cache's archive of an artifact was found unusable.
    pub fn is_rejected(&self, task: &str, identity: &str) -> bool {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&self.url(task, identity))
    }

    /// Sends a request built by `make`, as [`HttpCache::answer`] does; a refusal of
    /// the credentials is [`Unreachable`] too.
    fn send(
        &self,
        url: &str,
        make: &mut dyn FnMut() -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let resp = self.answer(url, make)?;
        if matches!(resp.status().as_u16(), 401 | 403) && self.authorization.is_some() {
            return Err(Unreachable(format!(
                "{url}: the server refused the credentials ({})",
                resp.status()
            ))
            .into());
        }
        Ok(resp)
    }

    /// Sends a request built by `make` until the server answers. A refused
    /// connection or a 5xx answer is tried again (`http.retries`, with back-off);
    /// one that still fails or a timeout (a server that hangs or stalls is not
    /// asked again) is [`Unreachable`]: the caller marks the cache down and goes on
    /// without it.
    fn answer(
        &self,
        url: &str,
        make: &mut dyn FnMut() -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        if self.is_down() {
            return Err(Unreachable(format!("{url}: the HTTP cache is down")).into());
        }
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            let last = attempt >= self.retries;
            match make() {
                Ok(resp) if resp.status().is_server_error() && !last => {
                    crate::console::debug(&format!("{url}: {}, retrying", resp.status()));
                }
                Ok(resp) if resp.status().is_server_error() => {
                    return Err(Unreachable(format!(
                        "{url}: the server answered {}",
                        resp.status()
                    ))
                    .into())
                }
                Ok(resp) => return Ok(resp),
                // A hung server, or one whose certificate is refused, is not asked
                // again.
                Err(
                    e @ (ureq::Error::Timeout(_)
                    | ureq::Error::Tls(_)
                    | ureq::Error::Rustls(_)
                    | ureq::Error::Pem(_)),
                ) => {
                    return Err(Unreachable(format!("{url}{}: {e}", self.through(url))).into());
                }
                Err(e) if last => {
                    let unreachable = matches!(
                        e,
                        ureq::Error::Io(_)
                            | ureq::Error::ConnectionFailed
                            | ureq::Error::HostNotFound
                    );
                    let message = format!("{url}{}: {e}", self.through(url));
                    if unreachable {
                        return Err(Unreachable(message).into());
                    }
                    bail!(message);
                }
                Err(e) => crate::console::debug(&format!("{url}: {e}, retrying")),
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
            attempt += 1;
        }
    }

    /// " (through the proxy SCHEME://HOST:PORT)" when the agent reaches `url` by a
    /// proxy (from `ALL_PROXY`, `HTTPS_PROXY` or `HTTP_PROXY`), for the errors of a
    /// request that did not get through: the proxy may be what failed. Without the
    /// proxy's credentials.
    fn through(&self, url: &str) -> String {
        let Some(proxy) = self.agent.config().proxy() else {
            return String::new();
        };
        if url
            .parse::<ureq::http::Uri>()
            .is_ok_and(|uri| proxy.is_no_proxy(&uri))
        {
            return String::new();
        }
        format!(
            " (through the proxy {}://{}:{})",
            proxy.uri().scheme_str().unwrap_or("http"),
            proxy.host(),
            proxy.port()
        )
    }

    fn with_auth<B>(&self, mut req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        if let Some(auth) = &self.authorization {
            req = req.header("Authorization", auth);
        }
        req
    }

    /// `HEAD`: whether the cache holds a usable archive of the artifact (one found
    /// unusable counts as absent).
    pub fn exists(&self, task: &str, identity: &str) -> Result<bool> {
        let (me, task, identity) = (self.clone(), task.to_string(), identity.to_string());
        interruptible(move || me.exists_now(&task, &identity))
    }

    fn exists_now(&self, task: &str, identity: &str) -> Result<bool> {
        if self.is_rejected(task, identity) {
            return Ok(false);
        }
        self.head(&self.url(task, identity))
    }

    fn head(&self, url: &str) -> Result<bool> {
        let resp = self.send(url, &mut || {
            self.with_auth(self.agent.head(url))
                .config()
                .timeout_global(Some(self.deadline))
                .build()
                .call()
        })?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 | 410 => Ok(false),
            code @ (401 | 403) => Err(Unreachable(format!(
                "{url}: HEAD answered {code}: reading the cache needs credentials (http.username, JOLT_HTTP_PASSWORD)"
            ))
            .into()),
            code => bail!("{url}: HEAD answered {code}"),
        }
    }

    /// [`HttpCache::get_unpacked_checked`], calling `found` once the server
    /// answered 200.
    fn get_unpacked_then(&self, url: &str, dest: &Path, found: &mut dyn FnMut()) -> Result<bool> {
        self.get_unpacked_checked(url, dest, found, None)
    }

    /// `GET` of a tar, unpacked into the empty directory `dest` as it arrives.
    /// `Ok(false)` when the cache does not hold it. An archive that arrived whole
    /// but is unusable, or whose bytes do not hash to `digest`, is a [`Rejected`]
    /// error (what was unpacked stays in `dest`, which the caller discards).
    fn get_unpacked_checked(
        &self,
        url: &str,
        dest: &Path,
        found: &mut dyn FnMut(),
        digest: Option<&str>,
    ) -> Result<bool> {
        let mut resp = self.send(url, &mut || self.with_auth(self.agent.get(url)).call())?;
        match resp.status().as_u16() {
            200 => found(),
            404 | 410 => return Ok(false),
            code => bail!("{url}: GET answered {code}"),
        }
        let expected: Option<u64> = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut body = Counting {
            inner: resp.body_mut().as_reader(),
            count: 0,
            failed: None,
            hasher: digest.map(|_| sha2::Digest::new()),
        };
        let unpacked = crate::store::archive::unpack(&mut body, dest);
        // Drain what the tar reader left (end-of-archive padding) to count every byte.
        let _ = std::io::copy(&mut body, &mut std::io::sink());
        if let Some(e) = body.failed {
            // The server stalled or the connection broke mid-transfer.
            return Err(Unreachable(format!(
                "{url}: the transfer broke after {} bytes: {e}",
                body.count
            ))
            .into());
        }
        if let Some(len) = expected {
            if body.count != len {
                bail!("{url}: truncated download ({} of {len} bytes)", body.count);
            }
        }
        if let Err(e) = unpacked {
            return Err(anyhow::Error::new(Rejected(format!("{e:#}")))
                .context(format!("{url}: corrupt archive")));
        }
        if let (Some(digest), Some(hasher)) = (digest, body.hasher) {
            let actual = crate::util::hex(&sha2::Digest::finalize(hasher));
            if actual != digest {
                return Err(Rejected(format!(
                    "{url}: the archive's SHA-256 is {actual}, not the {digest} it is named by"
                ))
                .into());
            }
        }
        Ok(true)
    }

    /// `GET`: unpacks the artifact into the empty directory `staging` and verifies it.
    /// `Ok(None)` when the cache does not hold it.
    pub fn fetch(&self, task: &str, identity: &str, staging: &Path) -> Result<Option<Manifest>> {
        self.fetch_then(task, identity, staging, Box::new(|| {}))
    }

    /// [`HttpCache::fetch`], calling `found` once the server has the artifact (a
    /// `GET` that answers 404 is a miss: no `HEAD` is needed before it).
    pub fn fetch_then(
        &self,
        task: &str,
        identity: &str,
        staging: &Path,
        mut found: Box<dyn FnMut() + Send>,
    ) -> Result<Option<Manifest>> {
        let me = self.clone();
        let (task, identity, staging) = (
            task.to_string(),
            identity.to_string(),
            staging.to_path_buf(),
        );
        interruptible(move || me.fetch_now(&task, &identity, &staging, &mut *found))
    }

    fn fetch_now(
        &self,
        task: &str,
        identity: &str,
        staging: &Path,
        found: &mut dyn FnMut(),
    ) -> Result<Option<Manifest>> {
        let url = self.url(task, identity);
        let result = self
            .get_unpacked_then(&url, staging, found)
            .and_then(|found| {
                if !found {
                    return Ok(None);
                }
                crate::store::archive::verify(staging, task, identity)
                    .map(Some)
                    .map_err(|e| {
                        anyhow::Error::new(Rejected(format!("{e:#}")))
                            .context(format!("{url}: rejected"))
                    })
            });
        match &result {
            Err(e) if is_rejected(e) => self.reject(task, identity),
            Ok(Some(_)) => {
                self.rejected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&url);
            }
            _ => {}
        }
        result
    }

    /// `PUT`: streams the artifact directory as a tar (chunked transfer encoding)
    /// while a thread packs it, so nothing is staged on disk or held in memory.
    pub fn store(&self, task: &str, identity: &str, dir: &Path) -> Result<()> {
        let me = self.clone();
        let (task, identity, dir) = (task.to_string(), identity.to_string(), dir.to_path_buf());
        interruptible(move || me.store_now(&task, &identity, &dir))
    }

    fn store_now(&self, task: &str, identity: &str, dir: &Path) -> Result<()> {
        let url = self.url(task, identity);
        let entries = crate::store::archive::entries(dir)?;
        crate::store::archive::check_links(dir, &entries)
            .with_context(|| format!("{url}: not uploaded"))?;
        // A small artifact (most are) goes in one piece, packed here: no packer
        // thread, no pipe, no chunked encoding.
        let mut small = Bounded {
            bytes: Vec::new(),
            limit: PACKED_IN_MEMORY,
            full: false,
        };
        let sent = match crate::store::archive::pack_entries(dir, entries, &mut small) {
            Ok(()) => self.answer(&url, &mut || {
                self.with_auth(self.agent.put(&url))
                    .header("Content-Type", "application/x-tar")
                    .send(&small.bytes[..])
            })?,
            Err(e) if !small.full => {
                bail!("{url}: cannot pack {}: {e:#}", dir.display())
            }
            // Larger: streamed.
            Err(_) => self.put_streamed(&url, dir)?,
        };
        self.put_outcome(&url, sent.status())?;
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&url);
        Ok(())
    }

    /// `PUT` of the artifact directory `dir`, packed by a thread into a pipe that the
    /// request reads (chunked).
    fn put_streamed(&self, url: &str, dir: &Path) -> Result<ureq::http::Response<ureq::Body>> {
        // A packing error is ours, not the server's: it must not mark the cache down.
        let packing: Arc<Mutex<Option<String>>> = Arc::default();
        let sent = self.answer(url, &mut || {
            let (reader, writer) = std::io::pipe().map_err(ureq::Error::Io)?;
            let (done_tx, done_rx) = crossbeam_channel::bounded::<Result<(), String>>(1);
            let dir = dir.to_path_buf();
            // Dropped when the packer has ended, its end of the pipe closed.
            let (ended_tx, ended) = crossbeam_channel::bounded::<()>(0);
            TransferThreads::shared()
                .run(Box::new(move || {
                    let mut out = BufWriter::with_capacity(256 * 1024, writer);
                    let result = crate::store::archive::pack(&dir, &mut out)
                        .and_then(|()| out.flush().map_err(anyhow::Error::from))
                        .map_err(|e| format!("{e:#}"));
                    // Report before the pipe closes, so the reader knows how it ended.
                    let _ = done_tx.send(result);
                    Box::new(move || drop(ended_tx))
                }))
                .map_err(|e| ureq::Error::Io(std::io::Error::other(format!("{e:#}"))))?;
            let body = PackedBody {
                pipe: reader,
                done: done_rx,
                failed: packing.clone(),
            };
            let result = self
                .with_auth(self.agent.put(url))
                .header("Content-Type", "application/x-tar")
                .send(ureq::SendBody::from_owned_reader(body));
            let _ = ended.recv();
            match packing.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                Some(e) => Err(ureq::Error::Io(std::io::Error::other(e.clone()))),
                None => result,
            }
        });
        let packed = packing.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(e) = packed {
            bail!("{url}: cannot pack {}: {e}", dir.display());
        }
        sent
    }

    /// The URL of `path` under the cache (`{http.uri}/{path}`): what the general
    /// requests below are sent to, for the errors of a caller that names it.
    pub fn url_of(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    /// `HEAD` of `path` under the cache: whether the server holds it.
    pub fn has(&self, path: &str) -> Result<bool> {
        let (me, url) = (self.clone(), self.url_of(path));
        interruptible(move || me.head(&url))
    }

    /// The body of a `GET` of `path` under the cache, `None` when the server does
    /// not hold it (404, 410). At most `limit + 1` bytes are read: a body longer
    /// than `limit` arrives one byte too long, for the caller to refuse in its words.
    pub fn get_bytes(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let (me, url) = (self.clone(), self.url_of(path));
        interruptible(move || {
            let mut resp = me.send(&url, &mut || me.with_auth(me.agent.get(&url)).call())?;
            match resp.status().as_u16() {
                200 => {}
                404 | 410 => return Ok(None),
                code => bail!("{url}: GET answered {code}"),
            }
            let mut bytes = Vec::new();
            resp.body_mut()
                .as_reader()
                .take(limit + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| Unreachable(format!("{url}: the transfer broke: {e}")))?;
            Ok(Some(bytes))
        })
    }

    /// `GET` of the tar at `path` under the cache, unpacked into `dest` as it
    /// arrives; its bytes must hash to `digest` (SHA-256, hex), else it is
    /// [`Rejected`]. `Ok(false)` when the server does not hold it.
    pub fn get_unpacked(&self, path: &str, dest: &Path, digest: &str) -> Result<bool> {
        let (me, url) = (self.clone(), self.url_of(path));
        let (dest, digest) = (dest.to_path_buf(), digest.to_string());
        interruptible(move || me.get_unpacked_checked(&url, &dest, &mut || {}, Some(&digest)))
    }

    /// `PUT` of the file `file` to `path` under the cache.
    pub fn put_file(&self, path: &str, file: &Path, content_type: &'static str) -> Result<()> {
        let (me, url, file) = (self.clone(), self.url_of(path), file.to_path_buf());
        interruptible(move || {
            let resp = me.answer(&url, &mut || {
                let body = std::fs::File::open(&file).map_err(ureq::Error::Io)?;
                me.with_auth(me.agent.put(&url))
                    .header("Content-Type", content_type)
                    .send(body)
            })?;
            me.put_outcome(&url, resp.status())
        })
    }

    /// `PUT` of `bytes` to `path` under the cache.
    pub fn put_bytes(&self, path: &str, bytes: Vec<u8>, content_type: &'static str) -> Result<()> {
        let (me, url) = (self.clone(), self.url_of(path));
        interruptible(move || {
            let resp = me.answer(&url, &mut || {
                me.with_auth(me.agent.put(&url))
                    .header("Content-Type", content_type)
                    .send(&bytes[..])
            })?;
            me.put_outcome(&url, resp.status())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_reuse_their_threads_and_never_wait_for_one() {
        // Threads of the test's own: other tests transfer on the process's at the
        // same time, and would take its idle thread or make it start more.
        let threads = TransferThreads::new(TRANSFER_THREAD_IDLE);
        // One after another: one thread serves them all (it was a thread each). A
        // thread counts itself idle before it delivers, so this holds however the
        // threads are scheduled.
        let ids: Vec<std::thread::ThreadId> = (0..50)
            .map(|_| {
                threads
                    .interruptible(|| Ok(std::thread::current().id()))
                    .unwrap()
            })
            .collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "{} threads for 50 transfers",
            distinct.len()
        );
        // At once: each gets a thread, none waits for another to end (each waits
        // here until all eight run).
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|scope| {
            let waiting: Vec<_> = (0..8)
                .map(|_| {
                    let (started, threads) = (started.clone(), &threads);
                    scope.spawn(move || {
                        threads.interruptible(move || {
                            started.fetch_add(1, Ordering::SeqCst);
                            let deadline = std::time::Instant::now() + Duration::from_secs(60);
                            while started.load(Ordering::SeqCst) < 8 {
                                if std::time::Instant::now() > deadline {
                                    return Ok(false);
                                }
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            Ok(true)
                        })
                    })
                })
                .collect();
            for w in waiting {
                assert!(
                    w.join().unwrap().unwrap(),
                    "a transfer waited for another's thread"
                );
            }
        });
    }

    #[test]
    fn a_thread_that_ends_idle_takes_no_transfer_with_it() {
        // Threads that end after 50 ms without a job.
        let threads = TransferThreads::new(Duration::from_millis(50));
        for round in 0..20 {
            // Two transfers at once make two threads, which then idle out; more
            // transfers follow, each reserving a thread that is still there.
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    scope.spawn(|| {
                        threads
                            .interruptible(|| {
                                std::thread::sleep(Duration::from_millis(10));
                                Ok(())
                            })
                            .unwrap()
                    });
                }
            });
            std::thread::sleep(Duration::from_millis(20 + 10 * (round % 8)));
            for _ in 0..5 {
                // Regression (issue 23): a thread that had ended its wait took the
                // next job sent to the queue and dropped it: "the transfer ended
                // without a result", for a worker idle 30 s.
                threads.interruptible(|| Ok(())).unwrap();
            }
        }
    }

    #[test]
    fn a_failed_packer_fails_the_upload_body_instead_of_ending_it() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        writer.write_all(b"half an archive").unwrap();
        tx.send(Err("disk error".to_string())).unwrap();
        drop(writer);
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let mut body = PackedBody {
            pipe: reader,
            done: rx,
            failed: failed.clone(),
        };
        let mut sink = Vec::new();
        let err = body.read_to_end(&mut sink).unwrap_err();
        assert_eq!(err.to_string(), "disk error");
        assert_eq!(failed.lock().unwrap().as_deref(), Some("disk error"));

        let (reader, writer) = std::io::pipe().unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        tx.send(Ok(())).unwrap();
        drop(writer);
        let mut body = PackedBody {
            pipe: reader,
            done: rx,
            failed,
        };
        assert_eq!(body.read_to_end(&mut sink).unwrap(), 0);
    }

    /// Serves `requests` PUTs on a loopback port, answering 201; returns the port and
    /// the framing header of each request (`content-length` or `transfer-encoding`)
    /// with the body's length.
    fn put_server(requests: usize) -> (u16, std::thread::JoinHandle<Vec<(String, usize)>>) {
        use std::io::BufRead;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while seen.len() < requests {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                while seen.len() < requests {
                    let mut framing = String::new();
                    let mut length = None;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap() == 0 {
                            break;
                        }
                        let lower = line.trim_end().to_ascii_lowercase();
                        if lower.is_empty() {
                            break;
                        }
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            framing = "content-length".into();
                            length = Some(v.trim().parse::<usize>().unwrap());
                        } else if lower.starts_with("transfer-encoding:") {
                            framing = "transfer-encoding".into();
                        }
                    }
                    if framing.is_empty() {
                        break; // the connection ended
                    }
                    let body = match length {
                        Some(n) => {
                            let mut body = vec![0; n];
                            reader.read_exact(&mut body).unwrap();
                            n
                        }
                        None => {
                            // Chunked: size lines, chunks, and a last empty chunk.
                            let mut total = 0;
                            loop {
                                line.clear();
                                reader.read_line(&mut line).unwrap();
                                let size = usize::from_str_radix(line.trim(), 16).unwrap();
                                let mut chunk = vec![0; size + 2];
                                reader.read_exact(&mut chunk).unwrap();
                                total += size;
                                if size == 0 {
                                    break;
                                }
                            }
                            total
                        }
                    };
                    seen.push((framing, body));
                    stream
                        .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
                        .unwrap();
                }
            }
            seen
        });
        (port, server)
    }

    #[test]
    fn a_small_artifact_goes_up_in_one_piece_and_a_large_one_streams() {
        let (port, server) = put_server(2);
        let mut config = crate::config::Config::default();
        config.http.uri = Some(format!("http://127.0.0.1:{port}/cache"));
        let http = HttpCache::from_config(&config, false, false)
            .unwrap()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::create_dir(&small).unwrap();
        std::fs::write(small.join("out"), "small\n").unwrap();
        http.store("t", &"a".repeat(64), &small).unwrap();
        let large = dir.path().join("large");
        std::fs::create_dir(&large).unwrap();
        std::fs::write(large.join("out"), vec![7u8; PACKED_IN_MEMORY + 1]).unwrap();
        http.store("t", &"b".repeat(64), &large).unwrap();
        let seen = server.join().unwrap();
        // Regression: every upload was chunked, packed by a second thread into a pipe.
        assert_eq!(seen[0].0, "content-length", "{seen:?}");
        assert!(seen[0].1 < 10_000, "{seen:?}");
        assert_eq!(seen[1].0, "transfer-encoding", "{seen:?}");
        assert!(seen[1].1 > PACKED_IN_MEMORY, "{seen:?}");
    }

    #[test]
    fn the_resolver_takes_addresses_as_they_are_and_keeps_host_names_a_while() {
        use ureq::unversioned::resolver::Resolver;
        let resolver = CacheResolver::default();
        let config = ureq::config::Config::default();
        // A deadline: ureq's own resolver starts a thread for each such lookup.
        let timeout = ureq::unversioned::transport::NextTimeout {
            after: ureq::unversioned::transport::time::Duration::from_secs(10),
            ..Default::default()
        };
        let resolve = |uri: &str| {
            let uri: ureq::http::Uri = uri.parse().unwrap();
            resolver.resolve(&uri, &config, timeout).unwrap().to_vec()
        };
        assert_eq!(
            resolve("http://127.0.0.1:8080/cache/t/x.tar"),
            vec!["127.0.0.1:8080".parse::<std::net::SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve("https://[::1]/cache"),
            vec!["[::1]:443".parse::<std::net::SocketAddr>().unwrap()]
        );
        // A proxy's port, where its URI has none, is its scheme's.
        assert_eq!(
            resolve("socks5://10.1.2.3"),
            vec!["10.1.2.3:1080".parse::<std::net::SocketAddr>().unwrap()]
        );
        assert_eq!(resolver.lookups.load(Ordering::Relaxed), 0);
        let first = resolve("http://localhost:8080/a");
        assert!(first.iter().all(|a| a.port() == 8080), "{first:?}");
        assert_eq!(resolve("http://localhost:8080/b"), first);
        // Regression: one lookup, and one thread, per request.
        assert_eq!(resolver.lookups.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    }
}
