//! What a network build keeps in the HTTP cache beside the artifacts, under
//! `_recipes/` and `_sources/` (no task name has a part starting with `_`): the
//! recipe bundles that a client stores and its workers fetch
//! ([`RecipeBundle`](crate::remote::messages::RecipeBundle)), the source snapshots of
//! a client's inputs, and the fleet marks by which a worker that names the cache by
//! another URI finds that it is the same cache
//! ([`Request::cache_mark`](crate::remote::messages::Request::cache_mark)).
//!
//! They travel by the cache's general requests ([`HttpCache::has`],
//! [`HttpCache::get_bytes`], ...), with the artifacts' retries, credentials, deadlines
//! and interruption, so that `store/` knows artifacts only.

use anyhow::{bail, Result};
use std::path::Path;

use crate::store::http::{error_marker, HttpCache};

error_marker!(
    /// A recipe bundle or source snapshot the server does not hold (404, 410): a
    /// trim or an operator removed it, and its client may store it again.
    Absent,
    is_absent
);

/// Where the recipe bundle `digest` is, under the cache.
fn recipes_path(digest: &str) -> String {
    format!("_recipes/{digest}.json")
}

/// Where the source snapshot `digest` is, under the cache.
fn snapshot_path(digest: &str) -> String {
    format!("_sources/{digest}.tar")
}

/// Where a client's fleet mark is, under the cache: beside the recipe bundles, where
/// network clients may store.
fn mark_path(mark: &str) -> String {
    format!("_recipes/fleet-{mark}.json")
}

/// Uploads a recipe bundle under its digest, whether or not the cache has it: a
/// bundle is small, and a copy that went bad on the server (which workers refuse, as
/// it does not match its digest) is replaced by the next build.
pub fn store_recipes(http: &HttpCache, digest: &str, bytes: &[u8]) -> Result<()> {
    http.put_bytes(&recipes_path(digest), bytes.to_vec(), "application/json")
}

/// The bytes of the recipe bundle `digest`, at most `limit` of them; an [`Absent`]
/// error when the cache does not hold it.
pub fn fetch_recipes(http: &HttpCache, digest: &str, limit: u64) -> Result<Vec<u8>> {
    let path = recipes_path(digest);
    let url = http.url_of(&path);
    let Some(bytes) = http.get_bytes(&path, limit)? else {
        return Err(Absent(format!("{url}: the recipes are not in the HTTP cache")).into());
    };
    if bytes.len() as u64 > limit {
        bail!("{url}: the recipe bundle is larger than {limit} bytes (the limit)");
    }
    Ok(bytes)
}

/// Uploads the source snapshot `tar` under its digest unless the cache has it.
pub fn store_snapshot(http: &HttpCache, digest: &str, tar: &Path) -> Result<()> {
    let path = snapshot_path(digest);
    if http.has(&path)? {
        return Ok(());
    }
    http.put_file(&path, tar, "application/x-tar")
}

/// Unpacks the source snapshot `digest` into `dest`; an [`Absent`] error when the
/// cache does not hold it.
pub fn fetch_snapshot(http: &HttpCache, digest: &str, dest: &Path) -> Result<()> {
    let path = snapshot_path(digest);
    if !http.get_unpacked(&path, dest, digest)? {
        return Err(Absent(format!(
            "{}: the source snapshot is not in the HTTP cache",
            http.url_of(&path)
        ))
        .into());
    }
    Ok(())
}

/// The URL of a client's fleet mark, for the errors that name it.
pub fn mark_url(http: &HttpCache, mark: &str) -> String {
    http.url_of(&mark_path(mark))
}

/// Stores a client's fleet mark: a small JSON file naming the cache's fleet
/// ([`HttpCache::fleet`]), which proves to a worker that names this cache otherwise
/// that it is the same cache.
pub fn store_mark(http: &HttpCache, mark: &str) -> Result<()> {
    let body = serde_json::json!({ "cache": http.fleet() }).to_string();
    http.put_bytes(&mark_path(mark), body.into_bytes(), "application/json")
}

/// Whether the cache holds the fleet mark `mark` (one `HEAD`).
pub fn has_mark(http: &HttpCache, mark: &str) -> Result<bool> {
    http.has(&mark_path(mark))
}

/// Where the record that a worker started a delivery of the request `key` (64 hex
/// digits naming it, see `commands::worker`) is kept: beside the recipe bundles,
/// which `jolt cache trim` ages out with them.
fn started_path(key: &str) -> String {
    format!("_recipes/started-{key}.json")
}

/// Records that a worker starts delivery `n` of the request `key`.
pub fn store_started(http: &HttpCache, key: &str, n: u32) -> Result<()> {
    let body = serde_json::json!({ "delivery": n }).to_string();
    http.put_bytes(&started_path(key), body.into_bytes(), "application/json")
}

/// The last delivery of the request `key` a worker started ([`store_started`]), 0
/// when none did.
pub fn started(http: &HttpCache, key: &str) -> Result<u32> {
    let path = started_path(key);
    let Some(bytes) = http.get_bytes(&path, 1024)? else {
        return Ok(0);
    };
    let record: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a delivery record: {e}", http.url_of(&path)))?;
    match record["delivery"].as_u64() {
        Some(n) => Ok(n.min(u32::MAX as u64) as u32),
        None => bail!("{}: not a delivery record", http.url_of(&path)),
    }
}
