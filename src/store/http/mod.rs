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
//!
//! [`HttpCache`] and its requests are here; what they stand on is in files of its
//! own: the threads transfers run on and their interruption (`threads`), the agent's
//! resolver (`resolver`), and the readers and writers a body passes through
//! (`bodies`).

use anyhow::{bail, Context, Result};
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::error::usage;
use crate::store::artifact::Manifest;

mod bodies;
mod resolver;
mod threads;

use bodies::{Bounded, Counting, PackedBody};
use resolver::CacheResolver;
pub use threads::is_interrupted;
use threads::{interruptible, TransferThreads};

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

/// Artifacts whose archive is at most this large are packed in memory and sent
/// with a `Content-Length`; larger ones stream.
const PACKED_IN_MEMORY: usize = 1 << 20;

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
                crate::util::base64(format!("{user}:{}", password.unwrap_or_default()).as_bytes())
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
}
