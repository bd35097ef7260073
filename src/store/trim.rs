//! Trimming the HTTP cache's storage: the directory nginx serves (`{task}/{identity}.tar`,
//! `_sources/{digest}.tar`, whatever the protocol stores) kept within a size, least
//! recently used first.
//!
//! "Used" is a file's access time where the file system keeps it, else its
//! modification time. Under `relatime` (Linux's default) the access time moves only
//! when it is older than the modification time or a day old, so files read more than
//! once a day are ordered by day, and files written once and never read by their
//! writing. Symlinks are never followed nor removed, and nothing outside the
//! directory is touched. A file is removed only if it is still the one the scan saw
//! (same inode and modification time): one that nginx renamed into place meanwhile
//! (a PUT lands in a temporary file outside, then moves in) survives. Hidden entries
//! (a leading `.`, which no protocol path has) are never touched: an nginx whose
//! `client_body_temp_path` lies inside the root keeps its uploads in progress there.

use anyhow::{Context, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A file of the cache as the scan saw it.
struct Entry {
    path: PathBuf,
    size: u64,
    used: SystemTime,
    inode: u64,
    modified: i64,
}

/// What one trim did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Removed files, relative to the directory, with their sizes, oldest first.
    pub removed: Vec<(PathBuf, u64)>,
    pub freed: u64,
    /// What the directory holds afterwards.
    pub left: u64,
}

/// Trims `dir` to `max_size` bytes, least recently used first.
pub fn trim(dir: &Path, max_size: u64) -> Result<Trimmed> {
    trim_with(dir, max_size, &mut |_| {})
}

/// [`trim`], calling `about_to_remove` with each file's path just before it is
/// checked and removed (tests race a rename against it).
fn trim_with(dir: &Path, max_size: u64, about_to_remove: &mut dyn FnMut(&Path)) -> Result<Trimmed> {
    let mut entries = Vec::new();
    scan(dir, &mut entries).with_context(|| format!("Cannot scan {}", dir.display()))?;
    entries.sort_by_key(|e| e.used);
    let mut total: u64 = entries.iter().map(|e| e.size).sum();
    let mut trimmed = Trimmed::default();
    for e in &entries {
        if total <= max_size {
            break;
        }
        let full = dir.join(&e.path);
        about_to_remove(&full);
        // Still the file the scan saw? A PUT may have replaced it since.
        let same = std::fs::symlink_metadata(&full).is_ok_and(|m| {
            m.is_file()
                && m.ino() == e.inode
                && m.mtime_nsec() + m.mtime() * 1_000_000_000 == e.modified
        });
        if !same {
            continue;
        }
        match std::fs::remove_file(&full) {
            Ok(()) => {
                total -= e.size;
                trimmed.freed += e.size;
                trimmed.removed.push((e.path.clone(), e.size));
                remove_empty_parents(dir, &e.path);
            }
            Err(e2) if e2.kind() == std::io::ErrorKind::NotFound => {}
            Err(e2) => return Err(e2).with_context(|| format!("Cannot remove {}", full.display())),
        }
    }
    trimmed.left = total;
    Ok(trimmed)
}

/// Collects the files under `dir`. Hidden entries (a leading `.`: no task name or
/// protocol path has one, while nginx's temporary files and directories may) are left
/// alone, and so is whatever vanishes during the scan: nginx, a client or another
/// trim may remove files and directories meanwhile.
fn scan(dir: &Path, entries: &mut Vec<Entry>) -> std::io::Result<()> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel_dir) = dirs.pop() {
        let listing = match std::fs::read_dir(dir.join(&rel_dir)) {
            Ok(listing) => listing,
            Err(e) if gone(&e) && !rel_dir.as_os_str().is_empty() => continue,
            Err(e) => return Err(e),
        };
        for entry in listing {
            let entry = entry?;
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let rel = rel_dir.join(entry.file_name());
            // Not following symlinks: DirEntry's type and metadata are lstat's.
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                dirs.push(rel);
            } else if meta.is_file() {
                let used = meta
                    .accessed()
                    .or_else(|_| meta.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                entries.push(Entry {
                    path: rel,
                    size: meta.len(),
                    used,
                    inode: meta.ino(),
                    modified: meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
                });
            }
        }
    }
    Ok(())
}

/// Removes the directories of `rel` that are empty now, up to (not including) `dir`.
fn remove_empty_parents(dir: &Path, rel: &Path) {
    let mut parent = rel.parent();
    while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
        if std::fs::remove_dir(dir.join(p)).is_err() {
            return;
        }
        parent = p.parent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, rel: &str, size: usize, age_secs: u64) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![b'x'; size]).unwrap();
        let when = SystemTime::now() - std::time::Duration::from_secs(age_secs);
        let times = std::fs::FileTimes::new()
            .set_accessed(when)
            .set_modified(when);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_times(times)
            .unwrap();
    }

    #[test]
    fn the_least_recently_used_go_first_until_the_size_fits() {
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "a/1.tar", 100, 300);
        file(dir.path(), "b/2.tar", 100, 200);
        file(dir.path(), "_sources/3.tar", 100, 100);
        file(dir.path(), "a/4.tar", 100, 0);
        let t = trim(dir.path(), 250).unwrap();
        let removed: Vec<_> = t.removed.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(
            removed,
            vec![PathBuf::from("a/1.tar"), PathBuf::from("b/2.tar")]
        );
        assert_eq!((t.freed, t.left), (200, 200));
        assert!(!dir.path().join("b").exists(), "an emptied directory goes");
        assert!(dir.path().join("a/4.tar").exists());
        assert_eq!(trim(dir.path(), 250).unwrap().removed.len(), 0);
    }

    #[test]
    fn a_file_renamed_into_place_during_the_trim_survives() {
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "a/1.tar", 100, 300);
        file(dir.path(), "a/2.tar", 100, 200);
        let fresh = dir.path().join("put-tmp");
        let t = trim_with(dir.path(), 0, &mut |path| {
            if path.ends_with("1.tar") {
                // nginx finishing a PUT of the same object: a new file moves in.
                std::fs::write(&fresh, b"new").unwrap();
                std::fs::rename(&fresh, path).unwrap();
            }
        })
        .unwrap();
        assert_eq!(t.removed, vec![(PathBuf::from("a/2.tar"), 100)]);
        assert_eq!(std::fs::read(dir.path().join("a/1.tar")).unwrap(), b"new");
    }

    #[test]
    fn symlinks_are_neither_followed_nor_removed() {
        let outside = tempfile::tempdir().unwrap();
        file(outside.path(), "precious", 1000, 1000);
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "a/1.tar", 100, 10);
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("precious"), dir.path().join("p.tar"))
            .unwrap();
        let t = trim(dir.path(), 0).unwrap();
        assert_eq!(t.removed.len(), 1);
        assert!(outside.path().join("precious").exists());
        assert!(dir.path().join("p.tar").symlink_metadata().is_ok());
    }

    #[test]
    fn hidden_entries_such_as_nginx_temporary_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "a/1.tar", 100, 10);
        // An old nginx.conf kept client_body_temp_path inside the root: a PUT being
        // received lives there until nginx renames it into place.
        file(dir.path(), ".tmp/0000000001", 100, 1000);
        file(dir.path(), "a/.partial", 100, 1000);
        let t = trim(dir.path(), 0).unwrap();
        assert_eq!(t.removed, vec![(PathBuf::from("a/1.tar"), 100)]);
        assert!(dir.path().join(".tmp/0000000001").exists());
        assert!(dir.path().join("a/.partial").exists());
    }
}
