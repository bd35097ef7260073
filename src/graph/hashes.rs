//! Content hashes of influence files, remembered by a stat cache.
//!
//! A file whose size, mtime, ctime and inode match the remembered entry is not read
//! again. Entries for files modified in the last two seconds are not stored, so a file
//! changed twice within one timestamp tick is never mistaken for unchanged.
//!
//! On disk: `<cachedir>/.stat/<16 hex of sha256(workspace root)>`, one line per file:
//! `sha256 \t size \t mtime_ns \t ctime_ns \t inode \t relative path`.
//!
//! What a file was when its hash entered an identity is kept as a [`Seen`], so that
//! after a task's commands one `stat` tells whether the file is still that content
//! ([`Seen::still`]).

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::util::hex;

/// Seconds within which a modification time is considered too fresh to trust.
const RACY_SECS: i64 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Stat {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
}

impl Stat {
    fn of(meta: &std::fs::Metadata) -> Stat {
        Stat {
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            ino: meta.ino(),
        }
    }
}

/// An influence file's metadata when its hash was taken, kept when it proves the
/// content unchanged: a regular file not modified within [`RACY_SECS`] of then. A
/// symlink's hash covers its target's content, which its own metadata does not; a
/// file modified within the last tick of a coarse clock may change again without its
/// metadata changing: those are hashed again when checked.
#[derive(Clone, Debug)]
pub struct Seen(Option<Stat>);

impl Seen {
    /// Whether the file at `rel` under `root` still has the content whose hash is
    /// `hash`: the same metadata as seen, else the same hash (a file rewritten with
    /// the same content is unchanged). A file gone, or no longer readable, has changed.
    pub fn still(&self, root: &Path, rel: &Path, hash: &str) -> bool {
        let Ok(meta) = std::fs::symlink_metadata(root.join(rel)) else {
            return false;
        };
        if self.0.as_ref() == Some(&Stat::of(&meta)) {
            return true;
        }
        FileHashes::ephemeral(root)
            .hash_with(rel, Some(&meta))
            .is_ok_and(|now| now == hash)
    }
}

/// File hashes of one workspace, with their stat cache.
pub struct FileHashes {
    root: PathBuf,
    store: Option<PathBuf>,
    /// Keyed by the relative path as text (hashing a `Path` walks its components).
    entries: Mutex<HashMap<String, (Stat, String)>>,
    dirty: AtomicBool,
    reads: AtomicUsize,
}

impl FileHashes {
    /// Loads the stat cache of `root` from `cachedir` (a missing or unreadable one is empty).
    pub fn load(cachedir: &Path, root: &Path) -> FileHashes {
        let key = hex(&Sha256::digest(root.as_os_str().as_encoded_bytes()));
        let store = cachedir.join(".stat").join(&key[..16]);
        let mut entries = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(&store) {
            for line in text.lines() {
                let mut f = line.splitn(6, '\t');
                let parsed = (|| {
                    let hash = f.next()?.to_string();
                    let stat = Stat {
                        size: f.next()?.parse().ok()?,
                        mtime_ns: f.next()?.parse().ok()?,
                        ctime_ns: f.next()?.parse().ok()?,
                        ino: f.next()?.parse().ok()?,
                    };
                    Some((f.next()?.to_string(), (stat, hash)))
                })();
                if let Some((path, entry)) = parsed {
                    entries.insert(path, entry);
                }
            }
        }
        FileHashes {
            root: root.to_path_buf(),
            store: Some(store),
            entries: Mutex::new(entries),
            dirty: AtomicBool::new(false),
            reads: AtomicUsize::new(0),
        }
    }

    /// This hasher, remembering nothing on disk from now on.
    pub fn forgetful(mut self) -> FileHashes {
        self.store = None;
        self
    }

    /// A hasher that remembers nothing on disk.
    pub fn ephemeral(root: &Path) -> FileHashes {
        FileHashes {
            root: root.to_path_buf(),
            store: None,
            entries: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            reads: AtomicUsize::new(0),
        }
    }

    /// The SHA-256 of a file relative to the workspace root. A symlink hashes its
    /// target path and, when it leads to a file, that file's content: what a task
    /// reads through the link.
    #[cfg(test)]
    pub fn hash(&self, rel: &Path) -> Result<String> {
        self.hash_with(rel, None)
    }

    /// [`FileHashes::hash`] with the file's (not followed) metadata when the caller has it.
    pub fn hash_with(&self, rel: &Path, meta: Option<&std::fs::Metadata>) -> Result<String> {
        let full = self.root.join(rel);
        let owned;
        let meta = match meta {
            Some(m) => m,
            None => {
                owned = std::fs::symlink_metadata(&full)
                    .with_context(|| format!("Cannot read influence file {}", rel.display()))?;
                &owned
            }
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full)?;
            let mut digest = Sha256::new();
            digest.update(target.as_os_str().as_encoded_bytes());
            if let Ok(followed) = std::fs::metadata(&full) {
                if followed.is_file() {
                    digest.update(b"\0");
                    digest.update(self.content(rel, &full, &followed)?.as_bytes());
                }
            }
            return Ok(format!("symlink:{}", hex(&digest.finalize())));
        }
        if !meta.is_file() {
            anyhow::bail!(
                "influence file {} is not a regular file (a {})",
                rel.display(),
                crate::util::fs::kind_of(meta)
            );
        }
        self.content(rel, &full, meta)
    }

    /// [`FileHashes::hash_with`], and what the file was when hashed.
    pub fn seen(&self, rel: &Path, meta: Option<&std::fs::Metadata>) -> Result<(String, Seen)> {
        let owned;
        let meta = match meta {
            Some(m) => m,
            None => {
                owned = std::fs::symlink_metadata(self.root.join(rel))
                    .with_context(|| format!("Cannot read influence file {}", rel.display()))?;
                &owned
            }
        };
        let hash = self.hash_with(rel, Some(meta))?;
        let stat = Stat::of(meta);
        let settled = meta.is_file() && stat.mtime_ns / 1_000_000_000 < now_secs() - RACY_SECS;
        Ok((hash, Seen(settled.then_some(stat))))
    }

    /// The SHA-256 of a regular file's content, from the stat cache when `meta` (the
    /// file's, or for a symlink its target's) matches the remembered entry.
    fn content(&self, rel: &Path, full: &Path, meta: &std::fs::Metadata) -> Result<String> {
        let stat = Stat::of(meta);
        let key = rel.to_string_lossy();
        if let Some((known, hash)) = self.entries.lock().expect("hash cache").get(key.as_ref()) {
            if *known == stat {
                return Ok(hash.clone());
            }
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        let hash = hash_file(full)
            .with_context(|| format!("Cannot read influence file {}", rel.display()))?;
        if stat.mtime_ns / 1_000_000_000 < now_secs() - RACY_SECS
            && !key.contains(['\t', '\n'])
            && rel.to_str().is_some()
        {
            self.entries
                .lock()
                .expect("hash cache")
                .insert(key.into_owned(), (stat, hash.clone()));
            self.dirty.store(true, Ordering::Relaxed);
        }
        Ok(hash)
    }

    /// How many files this hasher has read (the others were answered from the stat cache).
    #[cfg(test)]
    pub fn files_read(&self) -> usize {
        self.reads.load(Ordering::Relaxed)
    }

    /// Writes the stat cache back when it changed.
    pub fn save(&self) -> Result<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let entries = self.entries.lock().expect("hash cache");
        let mut text = String::with_capacity(entries.len() * 120);
        for (path, (s, hash)) in entries.iter() {
            if !self.root.join(path).exists() {
                continue;
            }
            text.push_str(&format!(
                "{hash}\t{}\t{}\t{}\t{}\t{}\n",
                s.size, s.mtime_ns, s.ctime_ns, s.ino, path
            ));
        }
        if let Some(dir) = store.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::util::fs::write_atomic(store, text.as_bytes())
            .with_context(|| format!("Cannot write {}", store.display()))
    }
}

/// The clock, in whole seconds since the epoch.
fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The SHA-256 of a file's content, in hex.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    // O_NONBLOCK: a fifo put in the file's place must not block the build.
    let mut file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if crate::interrupt::is_set() {
            // A large file takes a while: Ctrl-C must not wait for it.
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "interrupted",
            ));
        }
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_files_are_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, root) = (dir.path().join("cache"), dir.path().join("ws"));
        std::fs::create_dir_all(&root).unwrap();
        let file = root.join("a.txt");
        std::fs::write(&file, "one").unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let first = FileHashes::load(&cache, &root);
        let h = first.hash(Path::new("a.txt")).unwrap();
        first.save().unwrap();

        assert_eq!(first.files_read(), 1);

        // A second process answers from the stat cache without reading the file.
        let second = FileHashes::load(&cache, &root);
        assert_eq!(second.hash(Path::new("a.txt")).unwrap(), h);
        assert_eq!(second.files_read(), 0);

        // A change is seen even when the size stays the same.
        std::fs::write(&file, "two").unwrap();
        let third = FileHashes::load(&cache, &root);
        assert_ne!(third.hash(Path::new("a.txt")).unwrap(), h);
        assert_eq!(third.files_read(), 1);
    }

    #[test]
    fn a_file_seen_is_still_itself_until_its_content_changes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let rel = Path::new("in.txt");
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        let write = |text: &str| {
            std::fs::write(root.join(rel), text).unwrap();
            let file = std::fs::File::options()
                .write(true)
                .open(root.join(rel))
                .unwrap();
            file.set_modified(old).unwrap();
        };
        write("A");
        let hashes = FileHashes::ephemeral(root);
        let (hash, seen) = hashes.seen(rel, None).unwrap();
        assert_eq!(hash, hashes.hash(rel).unwrap());
        assert!(
            seen.0.is_some(),
            "a settled file is checked by its metadata"
        );
        let still = |seen: &Seen| seen.still(root, rel, &hash);
        assert!(still(&seen));
        // Rewritten with the same content: new metadata, same hash.
        write("A");
        assert!(still(&seen));
        // Same size, same mtime, other content: the ctime tells.
        write("B");
        assert!(!still(&seen));
        write("A");
        assert!(still(&seen));
        std::fs::remove_file(root.join(rel)).unwrap();
        assert!(!still(&seen));

        // A file modified just now is hashed again, whatever its metadata says.
        std::fs::write(root.join(rel), "A").unwrap();
        let (_, fresh) = hashes.seen(rel, None).unwrap();
        assert!(fresh.0.is_none());
        assert!(still(&fresh));
        std::fs::write(root.join(rel), "C").unwrap();
        assert!(!still(&fresh));
    }
}
