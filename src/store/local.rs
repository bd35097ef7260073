//! The local artifact cache: one directory per artifact, committed atomically, shared
//! safely by concurrent jolt processes, trimmed to a size in least-recently-used order.
//!
//! Layout under the cache root:
//!
//! ```text
//! <task>/<identity>/                  committed artifact (.manifest.json, .build.log, files)
//! <task>/.<identity>.<unique>.tmp/    artifact being staged (renamed on commit)
//! .locks/<identity>.lock              held (flock) while an artifact is built or removed
//! .refs/<pid>-<unique>                identities a live process uses; the file is flocked
//!                                     by its owner, so an unlockable file means "alive"
//! .tmp/                               build directories and non-cacheable artifacts
//! .stat/                              stat caches of influence-file hashes
//! ```
//!
//! An artifact's last use is its directory's modification time.

use anyhow::{Context, Result};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::recipe::Expires;
use crate::store::artifact::{Manifest, MANIFEST, MAX_MANIFEST};
use crate::util::fs::{self as fsutil, unique_suffix};

/// A committed artifact found by a scan.
#[derive(Debug)]
pub struct CachedArtifact {
    pub dir: PathBuf,
    pub identity: String,
    pub size: u64,
    pub last_used: SystemTime,
    pub created: u64,
    pub expires: Expires,
}

impl CachedArtifact {
    /// Whether the expiry policy allows evicting it now.
    pub fn expired(&self, now: u64) -> bool {
        let unused = SystemTime::now()
            .duration_since(self.last_used)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match self.expires {
            Expires::Immediately => true,
            Expires::Never => false,
            Expires::After(secs) => now.saturating_sub(self.created) >= secs,
            Expires::UnusedFor(secs) => unused >= secs,
        }
    }
}

/// An inter-process lock on one artifact; released on drop.
pub struct ArtifactLock {
    _file: File,
}

/// The local cache.
pub struct LocalCache {
    pub root: PathBuf,
    limit: u64,
    /// Where this process records what it uses; `None` when it could not be created.
    refs: Mutex<Option<File>>,
    /// The name of that file in `.refs`.
    refs_name: Option<std::ffi::OsString>,
    /// Our own uses, for trimming within this process.
    used: Mutex<HashSet<String>>,
    /// Opened only to look: nothing is created, recorded, touched or removed.
    read_only: bool,
    /// Size of the cache at the last scan plus what was committed since.
    estimate: Mutex<Option<u64>>,
}

fn is_identity(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

impl LocalCache {
    /// Opens (creating) the cache at `root`, limited to `limit` bytes.
    pub fn open(root: &Path, limit: u64) -> Result<LocalCache> {
        // Commands get paths inside the cache while running elsewhere.
        let root = &std::path::absolute(root)
            .with_context(|| format!("Cannot use cache directory {}", root.display()))?;
        for sub in [".locks", ".refs", ".tmp"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("Cannot create cache directory {}", dir.display()))?;
        }
        let refs_name = std::ffi::OsString::from(unique_suffix());
        let refs_path = root.join(".refs").join(&refs_name);
        let refs = File::options()
            .create(true)
            .append(true)
            .open(&refs_path)
            .and_then(|f| f.lock().map(|()| f))
            .map_err(|e| {
                // A full disk must not fail a build that only reads the cache.
                crate::console::warn(&format!(
                    "Cannot record artifact use in {} ({e}): other jolt processes may evict artifacts this one uses",
                    refs_path.display()
                ))
            })
            .ok();
        let cache = LocalCache {
            root: root.to_path_buf(),
            limit,
            refs_name: refs.is_some().then_some(refs_name),
            refs: Mutex::new(refs),
            used: Mutex::new(HashSet::new()),
            estimate: Mutex::new(None),
            read_only: false,
        };
        // What dead processes left behind goes now, not at the next `jolt clean`.
        cache.clean_scratch();
        Ok(cache)
    }

    /// The cache at `root`, opened only to look at it (`jolt build --dry-run`):
    /// whatever it holds or lacks, nothing is created, recorded, touched or removed.
    pub fn read_only(root: &Path) -> LocalCache {
        LocalCache {
            root: root.to_path_buf(),
            limit: u64::MAX,
            refs: Mutex::new(None),
            refs_name: None,
            used: Mutex::new(HashSet::new()),
            estimate: Mutex::new(None),
            read_only: true,
        }
    }

    /// The newest readable artifact of `task` with these parameters, other than
    /// `identity` (for `--explain`). Reads only.
    pub fn newest_other(
        &self,
        task: &str,
        params: &std::collections::BTreeMap<String, String>,
        identity: &str,
    ) -> Option<Manifest> {
        let entries = std::fs::read_dir(self.root.join(task)).ok()?;
        entries
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                is_identity(&name) && name != identity
            })
            .filter_map(|e| Manifest::read(&e.path()).ok())
            .filter(|m| m.task == task && &m.parameters == params)
            .max_by(|a, b| a.created.cmp(&b.created))
    }

    /// Fails, naming the directory and this process's user, when the cache cannot be
    /// written: a worker must find that out at start, not fail every request (a
    /// volume made for another user, a cache left by root).
    pub fn check_writable(&self) -> Result<()> {
        for dir in [
            self.root.clone(),
            self.root.join(".locks"),
            self.root.join(".tmp"),
        ] {
            let probe = dir.join(format!(".probe-{}", unique_suffix()));
            let written = File::options()
                .write(true)
                .create_new(true)
                .open(&probe)
                .and_then(|_| std::fs::remove_file(&probe));
            if let Err(e) = written {
                // SAFETY: geteuid has no preconditions.
                let uid = unsafe { libc::geteuid() };
                anyhow::bail!(
                    "Cannot write the local cache {} as uid {uid} ({e}): give it a cache it can write (jolt.cachedir; chown a volume made for another user)",
                    dir.display()
                );
            }
        }
        Ok(())
    }

    /// Opens the local cache the configuration names (`jolt.cachedir`, limited to
    /// `jolt.cachesize`); a cache that cannot be used is a usage error (exit 2).
    pub fn from_config(config: &crate::config::JoltSettings) -> Result<LocalCache> {
        let dir = &config.cachedir;
        LocalCache::open(dir, config.cachesize).map_err(|e| {
            crate::error::usage(format!(
                "Cannot use the local cache {}: {e:#}",
                dir.display()
            ))
        })
    }

    /// Where the artifact of `task` with `identity` lives when committed.
    pub fn artifact_dir(&self, task: &str, identity: &str) -> PathBuf {
        self.root.join(task).join(identity)
    }

    /// Whether the artifact is committed and usable (see [`LocalCache::lookup`]).
    pub fn is_present(&self, task: &str, identity: &str) -> bool {
        self.lookup(task, identity).is_some()
    }

    /// The manifest of a committed artifact. An artifact whose manifest cannot be
    /// read, or names another artifact (a crash can leave one: commits are not
    /// synced), counts as absent, and is removed so that it can be built again,
    /// unless another process holds its lock (and may be replacing it right now).
    pub fn lookup(&self, task: &str, identity: &str) -> Option<Manifest> {
        let dir = self.artifact_dir(task, identity);
        let path = dir.join(MANIFEST);
        let error = match crate::store::artifact::read_small(&path, MAX_MANIFEST) {
            Ok(text) => match serde_json::from_slice::<Manifest>(&text) {
                Ok(m) if m.identity == identity && m.task == task => return Some(m),
                Ok(m) => format!("its manifest describes {} {}", m.task, m.identity),
                Err(e) => format!("its manifest is corrupt: {e}"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.is_dir() => {
                "it has no manifest".to_string()
            }
            // A symlink, a fifo, a device or a huge file where the manifest belongs.
            Err(e)
                if e.kind() == std::io::ErrorKind::Other
                    || e.raw_os_error() == Some(libc::ELOOP) =>
            {
                format!("its manifest is unusable: {e}")
            }
            Err(e) => {
                // Absent, or unreadable for now (say, out of file descriptors): no
                // reason to remove anything.
                crate::console::debug(&format!("{}: {e}", path.display()));
                return None;
            }
        };
        // Another process may be reading its files right now.
        if self.read_only || self.recorded_uses(true).contains(identity) {
            crate::console::debug(&format!(
                "{} is unusable ({error}) but in use",
                dir.display()
            ));
            return None;
        }
        if let Ok(Some(_lock)) = self.try_lock(identity) {
            match self.discard(&dir) {
                Ok(()) => crate::console::warn(&format!(
                    "Removed the unusable artifact {} ({error}); it will be built again",
                    dir.display()
                )),
                Err(e) => crate::console::debug(&format!("{e:#}")),
            }
        }
        None
    }

    /// Whether the committed artifact holds what its manifest says, file by file
    /// (every file hashed: see [`crate::store::artifact::check_contents`]). One that
    /// does not (changed since its commit, or of a jolt before digests) is removed,
    /// with a warning naming what differs, and counts as absent. Hold its lock.
    /// Ctrl-C stops the hashing: the artifact is kept, unchecked, and counts as
    /// absent for a build that stops.
    pub fn intact(&self, task: &str, identity: &str) -> bool {
        let dir = self.artifact_dir(task, identity);
        let checked = Manifest::read(&dir)
            .and_then(|m| crate::store::artifact::check_contents_interruptibly(&dir, &m));
        let Err(e) = checked else {
            return true;
        };
        if crate::interrupt::is_set() {
            return false;
        }
        match self.discard(&dir) {
            Ok(()) => crate::console::warn(&format!(
                "Removed the artifact {}: {e:#}; it will be built again",
                dir.display()
            )),
            Err(d) => crate::console::warn(&format!(
                "The artifact {} is not what it was built as ({e:#}), and cannot be removed: {d:#}",
                dir.display()
            )),
        }
        false
    }

    /// Moves an artifact directory to the trash and removes it (hold its lock).
    fn discard(&self, dir: &Path) -> Result<()> {
        let trash = self
            .root
            .join(".tmp")
            .join(format!("trash-{}", unique_suffix()));
        // Moving a directory to another parent rewrites its `..`: it must be
        // writable (a committed one is not).
        if let Ok(meta) = std::fs::symlink_metadata(dir) {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode();
            if meta.is_dir() && mode & 0o200 == 0 {
                let _ =
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700));
            }
        }
        match std::fs::rename(dir, &trash) {
            // A file or a symlink where the directory belongs goes as well.
            Ok(()) if !std::fs::symlink_metadata(&trash).is_ok_and(|m| m.is_dir()) => {
                std::fs::remove_file(&trash)
                    .with_context(|| format!("Cannot remove {}", trash.display()))
            }
            Ok(()) => fsutil::remove_dir_all(&trash),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("Cannot remove {}", dir.display())),
        }
    }

    /// Declares that this process uses these identities, so no process evicts them,
    /// and marks those present as just used.
    pub fn mark_used<'a>(
        &self,
        artifacts: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let now = SystemTime::now();
        let mut ids = Vec::new();
        for (task, identity) in artifacts {
            let dir = self.artifact_dir(task, identity);
            if let Ok(f) = File::open(&dir) {
                let _ = f.set_modified(now);
            }
            ids.push(identity);
        }
        self.record_uses(ids);
        Ok(())
    }

    /// Declares that this process uses these identities (in its `.refs` file), so
    /// that no process evicts them.
    fn record_uses<'a>(&self, identities: impl IntoIterator<Item = &'a str>) {
        let mut text = String::new();
        let mut used = self.used.lock().expect("cache refs");
        for identity in identities {
            if used.insert(identity.to_string()) {
                text.push_str(identity);
                text.push('\n');
            }
        }
        drop(used);
        if !text.is_empty() {
            let mut refs = self.refs.lock().expect("cache refs");
            if let Some(file) = refs.as_mut() {
                if let Err(e) = file.write_all(text.as_bytes()) {
                    // A full disk must not fail a build that only reads the cache:
                    // warn once, and record nothing more.
                    crate::console::warn(&format!(
                        "Cannot record artifact use in {} ({e}): other jolt processes may evict artifacts this one uses",
                        self.root.join(".refs").display()
                    ));
                    *refs = None;
                }
            }
        }
    }

    fn lock_file(&self, identity: &str) -> Result<File> {
        let path = self.root.join(".locks").join(format!("{identity}.lock"));
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("Cannot open lock {}", path.display()))
    }

    /// Takes the artifact's lock without waiting; `None` when another process holds it.
    pub fn try_lock(&self, identity: &str) -> Result<Option<ArtifactLock>> {
        loop {
            let file = self.lock_file(identity)?;
            match file.try_lock() {
                Ok(()) if self.still_named(identity, &file) => {
                    return Ok(Some(ArtifactLock { _file: file }))
                }
                Ok(()) => continue,
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).context("Cannot lock artifact")
                }
            }
        }
    }

    /// Takes the artifact's lock, waiting for another process to release it.
    #[cfg(test)]
    pub fn lock(&self, identity: &str) -> Result<ArtifactLock> {
        loop {
            let file = self.lock_file(identity)?;
            file.lock().context("Cannot lock artifact")?;
            if self.still_named(identity, &file) {
                return Ok(ArtifactLock { _file: file });
            }
        }
    }

    /// Whether the lock file we hold is still the one its path names: `clean`
    /// removes the lock files of artifacts that are gone, while holding them.
    fn still_named(&self, identity: &str, file: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        let path = self.root.join(".locks").join(format!("{identity}.lock"));
        match (std::fs::metadata(path), file.metadata()) {
            (Ok(named), Ok(held)) => named.ino() == held.ino() && named.dev() == held.dev(),
            _ => false,
        }
    }

    /// Creates an empty staging directory for an artifact (hold its lock).
    pub fn stage(&self, task: &str, identity: &str) -> Result<PathBuf> {
        let dir = self
            .root
            .join(task)
            .join(format!(".{identity}.{}.tmp", unique_suffix()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("Cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// A fresh scratch directory under the cache's `.tmp`.
    pub fn scratch(&self, prefix: &str) -> Result<PathBuf> {
        let dir = self.scratch_name(prefix);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("Cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// A new scratch path, as [`LocalCache::scratch`] names them, not created.
    pub fn scratch_name(&self, prefix: &str) -> PathBuf {
        let name: String = prefix
            .chars()
            .map(|c| {
                if c.is_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        // Named after this process's `.refs` file, whose lock tells whether the owner
        // lives (pids do not: caches are shared across containers).
        let owner = self.refs_name.as_ref().map_or_else(
            || format!("nolock-{}", std::process::id()),
            |n| n.to_string_lossy().into_owned(),
        );
        self.root
            .join(".tmp")
            .join(format!("{owner}~{name}-{}", unique_suffix()))
    }

    /// Renames a staged artifact into place (hold its lock) and trims the cache.
    pub fn commit(&self, staging: &Path, task: &str, identity: &str, size: u64) -> Result<PathBuf> {
        let dir = self.artifact_dir(task, identity);
        // Committed artifacts are read-only: a consumer (a task, a tool it runs) that
        // writes into one fails, where it changed what every later build uses.
        fsutil::make_read_only(staging)?;
        if let Err(e) = std::fs::rename(staging, &dir) {
            // A stale directory without a readable manifest holds the name (an
            // empty one is replaced by the rename itself): replace it.
            if std::fs::symlink_metadata(&dir).is_err() {
                return Err(e).with_context(|| format!("Cannot commit artifact {}", dir.display()));
            }
            self.discard(&dir)?;
            std::fs::rename(staging, &dir)
                .with_context(|| format!("Cannot commit artifact {}", dir.display()))?;
        }
        // Just written, so just used: no need to touch it.
        self.record_uses([identity]);
        let over = {
            let mut estimate = self.estimate.lock().expect("cache estimate");
            match estimate.as_mut() {
                Some(total) => {
                    *total += size;
                    *total > self.limit
                }
                None => true,
            }
        };
        if over {
            self.trim()?;
        }
        Ok(dir)
    }

    /// Identities used by live jolt processes (this one included).
    fn in_use(&self) -> HashSet<String> {
        let mut ids = self.used.lock().expect("cache refs").clone();
        ids.extend(self.recorded_uses(false));
        ids
    }

    /// Identities the `.refs` files of live processes record: all of them, or those
    /// of other processes only.
    fn recorded_uses(&self, others_only: bool) -> HashSet<String> {
        let mut ids = HashSet::new();
        let Ok(entries) = std::fs::read_dir(self.root.join(".refs")) else {
            return ids;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if others_only && self.refs_name.as_deref() == Some(entry.file_name().as_os_str()) {
                continue;
            }
            let Ok(mut file) = File::open(&path) else {
                continue;
            };
            match file.try_lock_shared() {
                Ok(()) => {
                    // Its owner is gone.
                    let _ = std::fs::remove_file(&path);
                }
                Err(_) => {
                    let mut text = String::new();
                    if file.read_to_string(&mut text).is_ok() {
                        ids.extend(text.lines().map(str::to_string));
                    }
                }
            }
        }
        ids
    }

    /// Every committed artifact; removes staging directories that nobody builds into.
    pub fn scan(&self) -> Vec<CachedArtifact> {
        let mut out = Vec::new();
        self.scan_dir(&self.root, "", &mut out);
        out
    }

    fn scan_dir(&self, dir: &Path, task: &str, out: &mut Vec<CachedArtifact>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            if let Some(staged) = name.strip_prefix('.') {
                if task.is_empty() {
                    continue;
                }
                // A staging directory whose lock is free belongs to a dead process.
                let identity = staged.split('.').next().unwrap_or("");
                if is_identity(identity) {
                    if let Ok(Some(_lock)) = self.try_lock(identity) {
                        let _ = fsutil::remove_dir_all(&path);
                    }
                }
                continue;
            }
            if is_identity(&name) && !task.is_empty() {
                let last_used = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let artifact = match Manifest::read(&path) {
                    Ok(m) => CachedArtifact {
                        dir: path,
                        identity: name,
                        size: m.size,
                        last_used,
                        created: fsutil::parse_timestamp(&m.created).unwrap_or(0),
                        expires: m.expires,
                    },
                    // Unusable (see `lookup`): listed so that trimming and
                    // cleaning remove it.
                    Err(_) => CachedArtifact {
                        size: fsutil::tree_size(&path),
                        dir: path,
                        identity: name,
                        last_used,
                        created: 0,
                        expires: Expires::Immediately,
                    },
                };
                out.push(artifact);
                continue;
            }
            let sub = if task.is_empty() {
                name
            } else {
                format!("{task}/{name}")
            };
            self.scan_dir(&path, &sub, out);
        }
    }

    /// Removes an artifact unless a live process uses it or holds its lock.
    pub fn remove(&self, artifact: &CachedArtifact, in_use: &HashSet<String>) -> Result<bool> {
        if in_use.contains(&artifact.identity) {
            return Ok(false);
        }
        let Some(_lock) = self.try_lock(&artifact.identity)? else {
            return Ok(false);
        };
        // A process may have started using it since `in_use` was read.
        if self.in_use().contains(&artifact.identity) {
            return Ok(false);
        }
        if !artifact.dir.exists() {
            return Ok(false);
        }
        // The lock file stays: another process may be waiting on it.
        self.discard(&artifact.dir)?;
        Ok(true)
    }

    /// Evicts least-recently-used artifacts until the cache fits its limit; artifacts in
    /// use, or whose expiry policy forbids it, stay.
    pub fn trim(&self) -> Result<()> {
        let mut artifacts = self.scan();
        let mut total: u64 = artifacts.iter().map(|a| a.size).sum();
        if total > self.limit {
            artifacts.sort_by_key(|a| a.last_used);
            let in_use = self.in_use();
            let now = fsutil::now_secs();
            for artifact in &artifacts {
                if total <= self.limit {
                    break;
                }
                if artifact.expired(now) && self.remove(artifact, &in_use)? {
                    crate::console::debug(&format!("evicted {}", artifact.dir.display()));
                    total -= artifact.size;
                }
            }
        }
        *self.estimate.lock().expect("cache estimate") = Some(total);
        Ok(())
    }

    /// Removes artifacts not in use: all of them, or only expired ones.
    pub fn clean(
        &self,
        only_expired: bool,
        filter: &dyn Fn(&CachedArtifact) -> bool,
    ) -> Result<usize> {
        let in_use = self.in_use();
        let now = fsutil::now_secs();
        let mut removed = 0;
        for artifact in self.scan() {
            if filter(&artifact)
                && (!only_expired || artifact.expired(now))
                && self.remove(&artifact, &in_use)?
            {
                removed += 1;
            }
        }
        self.clean_leftovers();
        Ok(removed)
    }

    /// Removes scratch directories of processes that are gone (best effort): their
    /// owner's `.refs` file is missing or no longer locked. Directories of owners
    /// without one (their disk was full) go when a day old.
    pub fn clean_scratch(&self) {
        let Ok(entries) = std::fs::read_dir(self.root.join(".tmp")) else {
            return;
        };
        let day_old = |entry: &std::fs::DirEntry| {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 86400)
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let gone = match name.split_once('~') {
                _ if name.starts_with("trash-") => true,
                Some((owner, _)) if owner.starts_with("nolock-") => day_old(&entry),
                Some((owner, _)) => match File::open(self.root.join(".refs").join(owner)) {
                    Ok(refs) => refs.try_lock_shared().is_ok(),
                    Err(_) => true,
                },
                // Named before owners were recorded: by age.
                None => day_old(&entry),
            };
            if gone {
                let _ = fsutil::remove_dir_all(&entry.path());
            }
        }
    }

    /// Forgets the artifacts this process recorded as in use, so that trimming may
    /// evict them: a long-running worker calls it after each request.
    pub fn forget_uses(&self) {
        self.used.lock().expect("cache refs").clear();
        if let Some(file) = self.refs.lock().expect("cache refs").as_ref() {
            let _ = file.set_len(0);
        }
    }

    /// Removes what `clean` leaves around artifacts it removed: emptied task
    /// directories, and the lock files of artifacts that are gone (taken first, so
    /// nobody holds them; a process that locked one meanwhile sees that its file is
    /// no longer the one the path names, and takes the new one).
    fn clean_leftovers(&self) {
        let present: HashSet<String> = self.scan().into_iter().map(|a| a.identity).collect();
        if let Ok(entries) = std::fs::read_dir(self.root.join(".locks")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(identity) = name.strip_suffix(".lock") else {
                    continue;
                };
                if present.contains(identity) {
                    continue;
                }
                if let Ok(Some(_lock)) = self.try_lock(identity) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let Ok(tasks) = std::fs::read_dir(&self.root) else {
            return;
        };
        for task in tasks.flatten() {
            let name = task.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            // Deepest first: `remove_dir` only removes what is empty.
            let mut dirs = vec![task.path()];
            let _ = crate::util::fs::walk(&task.path(), Path::new(""), &mut |rel, e| {
                if e.file_type()?.is_dir() {
                    dirs.push(task.path().join(rel));
                    return Ok(true);
                }
                Ok(false)
            });
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for dir in dirs {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(cache: &LocalCache, task: &str, id: &str, size: usize, expires: Expires) -> PathBuf {
        let _lock = cache.lock(id).unwrap();
        let staging = cache.stage(task, id).unwrap();
        std::fs::write(staging.join("data"), vec![b'x'; size]).unwrap();
        Manifest {
            task: task.into(),
            identity: id.into(),
            parameters: Default::default(),
            influence: vec![],
            environ: Default::default(),
            strings: Default::default(),
            paths: Default::default(),
            files: vec!["data".into()],
            contents: Default::default(),
            created: fsutil::format_timestamp(fsutil::now_secs()),
            size: size as u64,
            expires,
            duration: 0.0,
            jolt: String::new(),
        }
        .write(&staging)
        .unwrap();
        cache.commit(&staging, task, id, size as u64).unwrap()
    }

    fn id(n: u8) -> String {
        format!("{:064x}", n)
    }

    #[test]
    fn a_commit_replaces_a_stale_directory_or_file_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LocalCache::open(dir.path(), u64::MAX).unwrap();
        let stale = cache.artifact_dir("t", &id(1));
        std::fs::create_dir_all(stale.join("sub")).unwrap();
        std::fs::write(stale.join("sub/junk"), "old").unwrap();
        let dir1 = commit(&cache, "t", &id(1), 10, Expires::Immediately);
        assert!(dir1.join("data").exists() && !dir1.join("sub").exists());
        let file = cache.artifact_dir("t", &id(2));
        std::fs::write(&file, "not a directory").unwrap();
        let dir2 = commit(&cache, "t", &id(2), 10, Expires::Immediately);
        assert!(dir2.join("data").exists());
    }

    #[test]
    fn trimming_evicts_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let writer = LocalCache::open(dir.path(), 2500).unwrap();
        let a = commit(&writer, "a", &id(1), 1000, Expires::Immediately);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = commit(&writer, "b", &id(2), 1000, Expires::Immediately);
        drop(writer);
        // A new process that has not used a or b commits c: a, the oldest, goes.
        let other = LocalCache::open(dir.path(), 2500).unwrap();
        let c = commit(&other, "c", &id(3), 1000, Expires::Immediately);
        assert!(!a.exists());
        assert!(b.exists() && c.exists());
    }

    #[test]
    fn artifacts_in_use_or_never_expiring_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let user = LocalCache::open(dir.path(), 0).unwrap();
        let kept = commit(&user, "used", &id(1), 100, Expires::Immediately);
        let never = commit(&user, "never", &id(2), 100, Expires::Never);
        let other = LocalCache::open(dir.path(), 0).unwrap();
        let gone = commit(&other, "x", &id(3), 100, Expires::Immediately);
        assert!(kept.exists(), "used by a live process");
        assert!(never.exists(), "expires = never");
        assert!(gone.exists(), "used by the committing process itself");
        drop(user);
        other.trim().unwrap();
        assert!(!kept.exists(), "its user has exited");
        assert!(never.exists());
    }

    #[test]
    fn stale_staging_directories_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LocalCache::open(dir.path(), 1 << 30).unwrap();
        let staging = cache.stage("t", &id(9)).unwrap();
        cache.scan();
        assert!(!staging.exists());
        let _lock = cache.lock(&id(8)).unwrap();
        let busy = cache.stage("t", &id(8)).unwrap();
        let other = LocalCache::open(dir.path(), 1 << 30).unwrap();
        // flock is per open file: the other handle cannot take the lock.
        let _ = other.scan();
        assert!(busy.exists());
    }
}
