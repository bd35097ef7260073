//! The messages of network builds: execution requests (client → worker, through
//! `jolt_exchange`) and replies (worker → clients, through `jolt_results`, routed by
//! task identity). Both are JSON objects with a `version`; a worker answers a request
//! it cannot read or whose version it does not speak with an `error` reply.
//!
//! A request names the workspace's recipe files by the digest of their bundle
//! ([`RecipeBundle`]), which the client uploads to the HTTP cache once, so that its
//! size does not grow with the workspace.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

use crate::recipe::limits::Limits;

/// The message format version this jolt speaks. Version 1 carried every recipe file
/// in every request; version 2 carries the digest of their bundle.
pub const VERSION: u32 = 2;

/// A recipe file, in a bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipeText {
    /// Relative to the workspace root.
    pub path: String,
    pub text: String,
}

/// The recipe files of a workspace as one blob: a JSON array of [`RecipeText`] in the
/// order they were read, named by the SHA-256 of its bytes and stored at
/// `{http.uri}/_recipes/{digest}.json`.
#[derive(Debug, Clone)]
pub struct RecipeBundle {
    pub digest: String,
    pub bytes: Vec<u8>,
}

/// The largest recipe bundle a worker accepts, which it stops downloading past: the
/// recipe text a workspace may hold ([`Limits::recipe_bytes`]) twice over, as JSON
/// writes a newline or a quote in two bytes (TOML allows no other control
/// characters), and 1 MiB for the paths.
pub const MAX_RECIPE_BUNDLE: u64 = 2 * Limits::DEFAULT.recipe_bytes + (1 << 20);

impl RecipeBundle {
    pub fn new(files: &[RecipeText]) -> RecipeBundle {
        let bytes = serde_json::to_vec(files).expect("strings serialise");
        RecipeBundle {
            digest: crate::util::hex(&Sha256::digest(&bytes)),
            bytes,
        }
    }

    /// The files of a bundle fetched for `digest`, which its bytes must match.
    pub fn files(digest: &str, bytes: &[u8]) -> Result<Vec<RecipeText>> {
        if crate::util::hex(&Sha256::digest(bytes)) != digest {
            bail!("the recipe bundle {digest} does not match its digest");
        }
        match serde_json::from_slice(bytes) {
            Ok(files) => Ok(files),
            Err(e) => bail!("the recipe bundle {digest} is malformed: {e}"),
        }
    }
}

/// What a worker needs to build one task anywhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    /// The identity the client computed; the worker must compute the same.
    pub identity: String,
    /// The task's name.
    pub task: String,
    /// The qualified reference (name and every parameter) to build.
    pub reference: String,
    /// The digest of the workspace's [`RecipeBundle`].
    pub recipes: String,
    /// Taints (salt, `-f`) by qualified reference.
    #[serde(default)]
    pub taints: BTreeMap<String, String>,
    /// Identities of every requirement in the task's closure, by qualified reference.
    #[serde(default)]
    pub pins: BTreeMap<String, String>,
    /// Git commits the client resolved, by qualified reference.
    #[serde(default)]
    pub commits: BTreeMap<String, String>,
    /// Values of the environment variables the identities depend on.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// SHA-256 of the source snapshot at `{http.uri}/_sources/{digest}.tar`, a tar of
    /// the task's influence files; `None` when it has none.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Who asks: `host:pid`.
    #[serde(default)]
    pub client: String,
    /// The HTTP cache's archive of this artifact is unusable: build it (or take it
    /// from the worker's own cache) and upload it over the bad one.
    #[serde(default)]
    pub replace: bool,
    /// The fleet: a digest of the client's HTTP cache URI
    /// (`store::http::HttpCache::fleet`), which the worker puts in its replies so
    /// that clients of another cache on the same broker ignore them, and which
    /// keys the task's lock (see [`Request::lock_key`]). Empty from an older client.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cache: String,
    /// The client's HTTP cache URI, without credentials, for messages.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cache_uri: String,
    /// Which HTTP cache the client uses, proved: the random name (32 hex digits) of
    /// the mark it stored there, `_recipes/fleet-{mark}.json`, before its first
    /// request. A worker of another fleet digest looks for it in its own cache: one
    /// cache named two ways holds it, another cache does not, and the request is
    /// refused. Empty from an older client, whose requests are served as before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cache_mark: String,
}

impl Request {
    /// What a worker locks for this request: the identity within the fleet, so that
    /// fleets of different caches on one broker (which the README warns against,
    /// and tests do) neither wait for nor answer each other's builds. 64 hex digits,
    /// as an identity; the identity itself for a request of an older client.
    pub fn lock_key(&self) -> String {
        lock_key(&self.cache, &self.identity)
    }
}

/// What a worker locks for a request of the fleet `cache` for `identity` (see
/// [`Request::lock_key`]).
pub fn lock_key(cache: &str, identity: &str) -> String {
    if cache.is_empty() {
        return identity.to_string();
    }
    crate::util::hex(&Sha256::digest(format!("{cache}:{identity}").as_bytes()))
}

/// What a reply says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyKind {
    /// A worker took the request.
    Accepted,
    /// The worker is still at it (sent periodically).
    Running,
    /// The artifact is in the HTTP cache (or the task, not cacheable, ran).
    Success,
    /// The task failed; `log` holds the tail of its output.
    Failed,
    /// The request could not be handled (malformed, incompatible, identity mismatch).
    Error,
}

/// What a worker found missing from the HTTP cache: something the client stores
/// there for its requests, which a trim or an operator may remove during a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Missing {
    /// The request's recipe bundle (`_recipes/{digest}.json`).
    Recipes,
    /// The request's source snapshot (`_sources/{digest}.tar`).
    Snapshot,
    /// The client's fleet mark ([`Request::cache_mark`]): the worker uses another
    /// HTTP cache, or a trim took the mark from the client's.
    Mark,
    /// Artifacts of requirements ([`Reply::requirements`]): a trim, an operator or a
    /// cache shard that went down took them since the client looked. A miss: the
    /// client builds them again and sends the request once they are back.
    Requirements,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Missing::Recipes => "recipe bundle",
            Missing::Snapshot => "source snapshot",
            Missing::Mark => "fleet mark",
            Missing::Requirements => "requirements",
        })
    }
}

/// A worker's answer, published to `jolt_results` with the identity as routing key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub version: u32,
    pub identity: String,
    pub kind: ReplyKind,
    /// `host:pid` of the worker.
    pub worker: String,
    /// Seconds the execution took.
    #[serde(default)]
    pub duration: f64,
    /// The tail of the task's log.
    #[serde(default)]
    pub log: String,
    /// What went wrong.
    #[serde(default)]
    pub error: String,
    /// With `error`: the request's recipe bundle, source snapshot or fleet mark is not
    /// in the HTTP cache, and the client may store it again and resend the request (a
    /// mark only if its own cache lacks it too: else the worker uses another cache). Optional, and
    /// left out when `None`, so that replies stay version 2 both ways: a client that
    /// does not know it ignores it, and a worker that does not send it fails the task
    /// as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<Missing>,
    /// With `missing: "requirements"`: the identities of the requirements whose
    /// artifacts the HTTP cache does not hold (or holds unusable).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<String>,
    /// The request's [`Request::cache`]: a client ignores replies of another.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cache: String,
}

/// Why a request was refused: the identity when it could be read, and a message.
#[derive(Debug)]
pub struct Malformed {
    pub identity: Option<String>,
    pub message: String,
}

impl Request {
    /// Reads a request body, checking its version.
    pub fn parse(body: &[u8]) -> Result<Request, Malformed> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| Malformed {
            identity: None,
            message: format!("malformed request: {e}"),
        })?;
        let identity = value
            .get("identity")
            .and_then(|v| v.as_str())
            .filter(|s| is_hex(s, 64))
            .map(str::to_string);
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(VERSION as u64) {
            return Err(Malformed {
                identity,
                message: format!(
                    "incompatible request version {}; this worker speaks version {VERSION}",
                    version
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "(none)".into())
                ),
            });
        }
        let request: Request = serde_json::from_value(value).map_err(|e| Malformed {
            identity: identity.clone(),
            message: format!("malformed request: {e}"),
        })?;
        let bad = |what: String| Malformed {
            identity: identity.clone(),
            message: format!("malformed request: {what}"),
        };
        if identity.is_none() {
            return Err(bad("identity is not 64 hex digits".into()));
        }
        if !is_hex(&request.recipes, 64) {
            return Err(bad("recipes is not a sha256".into()));
        }
        // The task names the artifact's URL, asked before anything is built: it must
        // be a task name, the reference's.
        let named = request.reference.split(':').next() == Some(request.task.as_str());
        if !crate::recipe::taskref::valid_task_name(&request.task) || !named {
            return Err(bad(format!(
                "task '{}' is not the task of '{}'",
                request.task, request.reference
            )));
        }
        for (reference, pin) in &request.pins {
            if !is_hex(pin, 64) {
                return Err(bad(format!("identity of {reference} is not 64 hex digits")));
            }
        }
        for (reference, commit) in &request.commits {
            if !is_hex(commit, 40) {
                return Err(bad(format!("commit of {reference} is not 40 hex digits")));
            }
        }
        if let Some(digest) = &request.snapshot {
            if !is_hex(digest, 64) {
                return Err(bad("snapshot is not a sha256".into()));
            }
        }
        if !request.cache_mark.is_empty() && !is_hex(&request.cache_mark, 32) {
            return Err(bad("cache_mark is not 32 hex digits".into()));
        }
        Ok(request)
    }
}

/// A fresh fleet mark ([`Request::cache_mark`]): 32 random hex digits, from
/// `/dev/urandom`, or where a chroot has none, a digest of this process, the time
/// and a counter (it must be unique, not secret).
pub fn new_mark() -> String {
    crate::util::hex(&crate::util::random_bytes())
}

/// Lowercase hex digits, as jolt writes digests (and as they appear in URLs).
pub(crate) fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `host:pid`, naming this process in messages.
pub fn whoami() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
    // or truncates, and we stop at the first NUL either way.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let host = match ok {
        true if len > 0 => String::from_utf8_lossy(&buf[..len]).into_owned(),
        _ => "unknown".to_string(),
    };
    format!("{host}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_are_refused_with_their_identity_when_readable() {
        let id = "a".repeat(64);
        let e = Request::parse(b"not json").unwrap_err();
        assert!(e.identity.is_none());
        let e = Request::parse(format!("{{\"version\": 99, \"identity\": \"{id}\"}}").as_bytes())
            .unwrap_err();
        assert_eq!(e.identity.as_deref(), Some(id.as_str()));
        assert!(e.message.contains("incompatible"));
        let e = Request::parse(format!("{{\"version\": 2, \"identity\": \"{id}\"}}").as_bytes())
            .unwrap_err();
        assert!(e.message.contains("malformed"));
        // Version 1 carried the recipe files themselves.
        let e = Request::parse(
            format!("{{\"version\": 1, \"identity\": \"{id}\", \"recipes\": []}}").as_bytes(),
        )
        .unwrap_err();
        assert!(
            e.message
                .contains("incompatible request version 1; this worker speaks version 2"),
            "{}",
            e.message
        );
    }

    #[test]
    fn requests_with_unusable_identities_are_refused() {
        let id = "c".repeat(64);
        let body = |extra: &str| {
            format!(
                "{{\"version\": 2, \"identity\": \"{id}\", \"task\": \"t\", \"reference\": \"t\", \"recipes\": \"{id}\"{extra}}}"
            )
        };
        assert!(Request::parse(body("").as_bytes()).is_ok());
        let short = format!("{{\"version\": 2, \"identity\": \"\", \"task\": \"t\", \"reference\": \"t\", \"recipes\": \"{id}\"}}");
        assert!(Request::parse(short.as_bytes()).is_err());
        let texts = format!("{{\"version\": 2, \"identity\": \"{id}\", \"task\": \"t\", \"reference\": \"t\", \"recipes\": [{{\"path\": \"jolt.toml\", \"text\": \"\"}}]}}");
        assert!(Request::parse(texts.as_bytes()).is_err());
        let path = format!("{{\"version\": 2, \"identity\": \"{id}\", \"task\": \"t\", \"reference\": \"t\", \"recipes\": \"../x\"}}");
        assert!(Request::parse(path.as_bytes()).is_err());
        // The task must be the reference's, and a task name.
        let other = body("").replace("\"task\": \"t\"", "\"task\": \"../jolt/t\"");
        assert!(Request::parse(other.as_bytes()).is_err());
        let other = body("").replace("\"task\": \"t\"", "\"task\": \"u\"");
        assert!(Request::parse(other.as_bytes()).is_err());
        // Digests are lowercase, as in URLs.
        let upper = body("").replace(&id, &id.to_uppercase());
        assert!(Request::parse(upper.as_bytes()).is_err());
        assert!(Request::parse(body(", \"pins\": {\"a\": \"../../x\"}").as_bytes()).is_err());
        assert!(
            Request::parse(body(", \"commits\": {\"a\": \"main; rm -rf /\"}").as_bytes()).is_err()
        );
        assert!(Request::parse(body(", \"snapshot\": \"../x\"").as_bytes()).is_err());
        // The mark names a file in the worker's cache.
        assert!(Request::parse(body(", \"cache_mark\": \"../../x\"").as_bytes()).is_err());
    }

    #[test]
    fn a_request_without_a_fleet_mark_is_an_older_clients_and_still_parses() {
        let id = "e".repeat(64);
        let old = format!(
            "{{\"version\": 2, \"identity\": \"{id}\", \"task\": \"t\", \"reference\": \"t\", \"recipes\": \"{id}\", \"cache\": \"0123456789abcdef\"}}"
        );
        let request = Request::parse(old.as_bytes()).unwrap();
        assert_eq!(request.cache_mark, "");
        let text = serde_json::to_string(&request).unwrap();
        assert!(!text.contains("cache_mark"), "{text}");
        let mark = new_mark();
        assert!(is_hex(&mark, 32), "{mark}");
        assert_ne!(mark, new_mark());
        let new = old.replace(
            "\"cache\": ",
            &format!("\"cache_mark\": \"{mark}\", \"cache\": "),
        );
        assert_eq!(Request::parse(new.as_bytes()).unwrap().cache_mark, mark);
    }

    #[test]
    fn requests_round_trip() {
        let r = Request {
            version: VERSION,
            identity: "b".repeat(64),
            task: "t".into(),
            reference: "t:p=1".into(),
            recipes: RecipeBundle::new(&[RecipeText {
                path: "jolt.toml".into(),
                text: "[task.t]".into(),
            }])
            .digest,
            taints: BTreeMap::new(),
            pins: BTreeMap::new(),
            commits: BTreeMap::new(),
            env: BTreeMap::new(),
            snapshot: None,
            client: whoami(),
            replace: false,
            cache: "0123456789abcdef".into(),
            cache_uri: "http://cache/".into(),
            cache_mark: new_mark(),
        };
        let back = Request::parse(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back.reference, "t:p=1");
    }

    #[test]
    fn a_recipe_bundle_is_named_by_its_content_and_checked_against_it() {
        let files = [RecipeText {
            path: "jolt.toml".into(),
            text: "[task.t]\nrun = \"true\"\n".into(),
        }];
        let bundle = RecipeBundle::new(&files);
        assert_eq!(bundle.digest, RecipeBundle::new(&files).digest);
        let back = RecipeBundle::files(&bundle.digest, &bundle.bytes).unwrap();
        assert_eq!(back[0].text, files[0].text);
        let mut forged = bundle.bytes.clone();
        forged[3] ^= 1;
        let e = RecipeBundle::files(&bundle.digest, &forged).unwrap_err();
        assert!(e.to_string().contains("does not match its digest"), "{e}");
    }

    #[test]
    fn what_a_worker_found_missing_is_optional_in_a_version_2_reply() {
        let id = "d".repeat(64);
        let old = format!(
            "{{\"version\": 2, \"identity\": \"{id}\", \"kind\": \"error\", \"worker\": \"w:1\", \"error\": \"gone\"}}"
        );
        let reply: Reply = serde_json::from_str(&old).unwrap();
        assert_eq!(reply.missing, None);
        let text = serde_json::to_string(&reply).unwrap();
        assert!(!text.contains("missing"), "{text}");
        let new = old.replace(
            "\"error\": \"gone\"",
            "\"error\": \"gone\", \"missing\": \"snapshot\"",
        );
        let reply: Reply = serde_json::from_str(&new).unwrap();
        assert_eq!(reply.missing, Some(Missing::Snapshot));
        assert!(serde_json::to_string(&reply)
            .unwrap()
            .contains("\"missing\":\"snapshot\""));
    }
}
