//! Trimming the HTTP cache's storage: the directory nginx serves (`{task}/{identity}.tar`,
//! `_sources/{digest}.tar`, whatever the protocol stores) kept within a size, least
//! recently used first.
//!
//! "Used" is a file's access time where the file system keeps it, else its
//! modification time. Under `relatime` (Linux's default) the access time moves only
//! when it is older than the modification time or a day old, so files read more than
//! once a day are ordered by day, and files written once and never read by their
//! writing. Sizes are the files' lengths.
//!
//! Others change the directory while it is trimmed: nginx renames uploads in, clients
//! and other trims remove files, an attacker who may write it swaps a directory for a
//! symlink. So every operation is relative to a directory handle opened one component
//! at a time without following symlinks (`openat` with `O_NOFOLLOW`, `unlinkat`): a
//! symlink anywhere below the directory is neither followed nor removed, and nothing
//! outside is ever touched, whatever changes meanwhile (and no path grows past
//! `PATH_MAX`). A file is removed only if it is still the one the scan saw (same inode
//! and modification time): one that nginx renamed into place meanwhile survives, but
//! for the instant between that check and the removal. A file that went or changed
//! meanwhile counts as such, so two trims at once remove no more than one would.
//! Hidden entries (a leading `.`, which no protocol path has) are never touched: an
//! nginx whose `client_body_temp_path` lies inside the root keeps its uploads in
//! progress there. A directory that cannot be read, or a file that cannot be removed,
//! is reported and left; the rest is trimmed.
//!
//! A recipe bundle, fleet mark or source snapshot (a file in a directory `_recipes`
//! or `_sources`, names no task may have) is kept, whatever the size, for
//! [`PROTOCOL_KEPT`] after its last upload or recorded read: a network build stores
//! its bundle and snapshots when it starts, and its workers read them at any time
//! until it ends, while least recently used first would take them before any
//! artifact. A build's client uploads its bundle once per build and each snapshot
//! once per build, so what a build in progress uses is not taken unless it has run
//! longer than that; should it be (or an operator remove it), the client stores it
//! again when a worker reports it missing (`executor::remote`). What is kept counts
//! in what the directory holds.

use anyhow::{Context, Result};
use rustix::fs::{openat, statat, unlinkat, AtFlags, Dir, FileType, Mode, OFlags, Stat, CWD};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a recipe bundle or source snapshot is kept after its last upload (its
/// modification time) or read (its access time, where recorded): a day, the
/// granularity of access times under `relatime`.
pub const PROTOCOL_KEPT: Duration = Duration::from_secs(24 * 60 * 60);

/// A file of the cache as the scan saw it.
struct Entry {
    path: PathBuf,
    size: u64,
    /// Access time, nanoseconds since the epoch.
    used: i64,
    inode: u64,
    /// Modification time, nanoseconds since the epoch.
    modified: i64,
}

/// What a trim reports as it goes; paths are relative to the trimmed directory.
#[derive(Debug)]
pub enum Event<'a> {
    /// A directory is about to be read.
    Reading(&'a Path),
    /// A file is about to be checked and removed.
    Checking(&'a Path),
    /// A file was removed; its size.
    Removed(&'a Path, u64),
    /// A directory that cannot be read: left as it is.
    Unreadable(&'a Path, io::Error),
    /// A file that cannot be removed: left as it is.
    Unremovable(&'a Path, io::Error),
}

/// What one trim did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Removed files, relative to the directory, with their sizes, oldest first.
    pub removed: Vec<(PathBuf, u64)>,
    pub freed: u64,
    /// What the directory holds afterwards, as far as this trim knows.
    pub left: u64,
}

/// Trims `dir` to `max_size` bytes, least recently used first, telling `report` what
/// it does. Only a `dir` that cannot be read at all is an error.
pub fn trim(dir: &Path, max_size: u64, report: &mut dyn FnMut(Event)) -> Result<Trimmed> {
    let root: OwnedFd = openat(CWD, dir, dir_flags() - OFlags::NOFOLLOW, Mode::empty())
        .map_err(io::Error::from)
        .with_context(|| format!("Cannot scan {}", dir.display()))?;
    let mut entries =
        scan(&root, report).with_context(|| format!("Cannot scan {}", dir.display()))?;
    entries.sort_by_key(|e| e.used);
    let mut total: u64 = entries.iter().map(|e| e.size).sum();
    let mut trimmed = Trimmed::default();
    let now = nanos_since_epoch(SystemTime::now());
    for e in entries.iter().filter(|e| !protocol_in_use(e, now)) {
        if total <= max_size {
            break;
        }
        report(Event::Checking(&e.path));
        match remove(root.as_fd(), e) {
            Ok(Outcome::Removed) => {
                total -= e.size;
                trimmed.freed += e.size;
                trimmed.removed.push((e.path.clone(), e.size));
                report(Event::Removed(&e.path, e.size));
                remove_empty_parents(root.as_fd(), &e.path);
            }
            // Another trim or a client removed it: it no longer counts.
            Ok(Outcome::Gone) => total -= e.size,
            // A fresh file took its place: it counts as what it is now.
            Ok(Outcome::Replaced(size)) => total = total - e.size + size,
            Err(err) => report(Event::Unremovable(&e.path, err)),
        }
    }
    trimmed.left = total;
    Ok(trimmed)
}

/// Whether `e` is a recipe bundle or source snapshot uploaded or read within
/// [`PROTOCOL_KEPT`] before `now` (nanoseconds since the epoch).
fn protocol_in_use(e: &Entry, now: i64) -> bool {
    let dir = e.path.parent().and_then(Path::file_name);
    let protocol = matches!(dir.and_then(OsStr::to_str), Some("_recipes" | "_sources"));
    let kept = i64::try_from(PROTOCOL_KEPT.as_nanos()).unwrap_or(i64::MAX);
    protocol && e.used.max(e.modified) > now.saturating_sub(kept)
}

/// `t` in nanoseconds since the epoch, as [`fields`] gives file times.
fn nanos_since_epoch(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// Opens `rel` below `root` one component at a time, never following a symlink.
fn open_under(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let mut fd = openat(root, ".", dir_flags(), Mode::empty())?;
    for component in rel.components() {
        let Component::Normal(name) = component else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a plain path",
            ));
        };
        fd = openat(&fd, name, dir_flags(), Mode::empty())?;
    }
    Ok(fd)
}

/// The fields of a `stat` the trim needs (their C types differ between rustix's
/// backends, hence the casts).
#[allow(clippy::unnecessary_cast)]
fn fields(st: &Stat) -> (u64, u64, i64, i64) {
    let nanos = |secs: i64, nsec: i64| secs.saturating_mul(1_000_000_000).saturating_add(nsec);
    (
        st.st_ino as u64,
        st.st_size.max(0) as u64,
        nanos(st.st_atime as i64, st.st_atime_nsec as i64),
        nanos(st.st_mtime as i64, st.st_mtime_nsec as i64),
    )
}

/// Collects the regular files below `root`. Whatever vanishes during the scan is left
/// out; a subdirectory that cannot be read is reported and left out.
fn scan(root: &OwnedFd, report: &mut dyn FnMut(Event)) -> io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let top = rel.as_os_str().is_empty();
        if !top {
            report(Event::Reading(&rel));
        }
        let opened = open_under(root.as_fd(), &rel).and_then(|fd| {
            let stat_fd = fd.try_clone()?;
            Ok((Dir::new(fd)?, stat_fd))
        });
        let (listing, here) = match opened {
            Ok(opened) => opened,
            Err(e) if top => return Err(e),
            Err(e) if gone(&e) => continue,
            Err(e) => {
                report(Event::Unreadable(&rel, e));
                continue;
            }
        };
        for entry in listing {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if top => return Err(e.into()),
                Err(e) => {
                    report(Event::Unreadable(&rel, e.into()));
                    break;
                }
            };
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name.as_bytes().starts_with(b".") {
                continue; // `.`, `..` and hidden entries
            }
            let path = rel.join(name);
            let st = match statat(&here, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(e) if gone(&e.into()) => continue,
                Err(e) => {
                    report(Event::Unreadable(&path, e.into()));
                    continue;
                }
            };
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => dirs.push(path),
                FileType::RegularFile => {
                    let (inode, size, used, modified) = fields(&st);
                    entries.push(Entry {
                        path,
                        size,
                        used,
                        inode,
                        modified,
                    });
                }
                _ => {}
            }
        }
    }
    Ok(entries)
}

enum Outcome {
    Removed,
    Gone,
    Replaced(u64),
}

/// Removes `e` if it is still the file the scan saw.
fn remove(root: BorrowedFd<'_>, e: &Entry) -> io::Result<Outcome> {
    let parent = e.path.parent().unwrap_or(Path::new(""));
    let name = e.path.file_name().unwrap_or_default();
    let dir = match open_under(root, parent) {
        Ok(dir) => dir,
        Err(err) if gone(&err) => return Ok(Outcome::Gone),
        Err(err) => return Err(err),
    };
    let st = match statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(err) if gone(&err.into()) => return Ok(Outcome::Gone),
        Err(err) => return Err(err.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(Outcome::Gone);
    }
    let (inode, size, _, modified) = fields(&st);
    if inode != e.inode || modified != e.modified {
        return Ok(Outcome::Replaced(size));
    }
    match unlinkat(&dir, name, AtFlags::empty()) {
        Ok(()) => Ok(Outcome::Removed),
        Err(err) if gone(&err.into()) => Ok(Outcome::Gone),
        Err(err) => Err(err.into()),
    }
}

/// Removes the directories of `rel` that are empty now, up to (not including) the
/// trimmed directory.
fn remove_empty_parents(root: BorrowedFd<'_>, rel: &Path) {
    let mut dir = rel.parent();
    while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
        let parent = d.parent().unwrap_or(Path::new(""));
        let removed = open_under(root, parent).and_then(|fd| {
            unlinkat(&fd, d.file_name().unwrap_or_default(), AtFlags::REMOVEDIR)
                .map_err(io::Error::from)
        });
        if removed.is_err() {
            return;
        }
        dir = Some(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

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

    fn quiet(dir: &Path, max: u64) -> Trimmed {
        trim(dir, max, &mut |_| {}).unwrap()
    }

    fn paths(t: &Trimmed) -> Vec<PathBuf> {
        t.removed.iter().map(|(p, _)| p.clone()).collect()
    }

    #[test]
    fn the_least_recently_used_go_first_until_the_size_fits() {
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "a/1.tar", 100, 300);
        file(dir.path(), "b/2.tar", 100, 200);
        file(dir.path(), "_sources/3.tar", 100, 100);
        file(dir.path(), "a/4.tar", 100, 0);
        let t = quiet(dir.path(), 250);
        assert_eq!(
            paths(&t),
            vec![PathBuf::from("a/1.tar"), PathBuf::from("b/2.tar")]
        );
        assert_eq!((t.freed, t.left), (200, 200));
        assert!(!dir.path().join("b").exists(), "an emptied directory goes");
        assert!(dir.path().join("a/4.tar").exists());
        assert_eq!(quiet(dir.path(), 250).removed.len(), 0);
    }

    #[test]
    fn recipe_bundles_and_snapshots_are_kept_a_day_after_their_last_upload_or_read() {
        let day = PROTOCOL_KEPT.as_secs();
        let dir = tempfile::tempdir().unwrap();
        // Regression (issue 24): least recently used first took a running build's
        // bundle and snapshot before anything else, and workers still needed them.
        file(dir.path(), "cache/_recipes/in-use.json", 100, day - 60);
        // A network client's fleet mark goes with its bundle.
        let mark = "cache/_recipes/fleet-0123456789abcdef0123456789abcdef.json";
        file(dir.path(), mark, 100, day - 60);
        file(dir.path(), "cache/_sources/in-use.tar", 100, 3600);
        file(dir.path(), "cache/_recipes/old.json", 100, day + 60);
        file(dir.path(), "cache/_sources/old.tar", 100, day + 120);
        file(dir.path(), "cache/a/1.tar", 100, 10);
        // Uploaded long ago and read an hour ago: read since, kept.
        file(dir.path(), "cache/_sources/read.tar", 100, 3 * day);
        let read = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("cache/_sources/read.tar"))
            .unwrap()
            .set_times(std::fs::FileTimes::new().set_accessed(read))
            .unwrap();
        // A task's files are not the protocol's (no task name starts with '_').
        file(dir.path(), "cache/_recipes/x/deeper.tar", 100, 10);
        let t = quiet(dir.path(), 0);
        let mut removed = paths(&t);
        removed.sort();
        assert_eq!(
            removed,
            vec![
                PathBuf::from("cache/_recipes/old.json"),
                PathBuf::from("cache/_recipes/x/deeper.tar"),
                PathBuf::from("cache/_sources/old.tar"),
                PathBuf::from("cache/a/1.tar"),
            ]
        );
        assert_eq!(t.left, 400, "what is kept counts");
        for kept in [
            "_recipes/in-use.json",
            "_recipes/fleet-0123456789abcdef0123456789abcdef.json",
            "_sources/in-use.tar",
            "_sources/read.tar",
        ] {
            assert!(dir.path().join("cache").join(kept).exists(), "{kept}");
        }
    }

    #[test]
    fn a_file_renamed_into_place_during_the_trim_survives() {
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "a/1.tar", 100, 300);
        file(dir.path(), "a/2.tar", 100, 200);
        let fresh = dir.path().join("put-tmp");
        let root = dir.path().to_path_buf();
        let t = trim(dir.path(), 0, &mut |event| {
            if let Event::Checking(path) = event {
                if path.ends_with("1.tar") {
                    // nginx finishing a PUT of the same object: a new file moves in.
                    std::fs::write(&fresh, b"new").unwrap();
                    std::fs::rename(&fresh, root.join(path)).unwrap();
                }
            }
        })
        .unwrap();
        assert_eq!(t.removed, vec![(PathBuf::from("a/2.tar"), 100)]);
        assert_eq!(t.left, 3, "the fresh file counts as what it is");
        assert_eq!(std::fs::read(dir.path().join("a/1.tar")).unwrap(), b"new");
    }

    #[test]
    fn two_trims_at_once_remove_no_more_than_one_would() {
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "a/1.tar", 100, 400);
        file(dir.path(), "a/2.tar", 100, 300);
        file(dir.path(), "a/3.tar", 100, 200);
        file(dir.path(), "a/4.tar", 100, 100);
        let root = dir.path().to_path_buf();
        let t = trim(dir.path(), 250, &mut |event| {
            if let Event::Checking(path) = event {
                if path.ends_with("1.tar") {
                    // The other trim, a step ahead, removes the second oldest.
                    std::fs::remove_file(root.join("a/2.tar")).unwrap();
                }
            }
        })
        .unwrap();
        assert_eq!(paths(&t), vec![PathBuf::from("a/1.tar")]);
        assert_eq!(t.left, 200);
        assert!(dir.path().join("a/3.tar").exists());
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
        let t = quiet(dir.path(), 0);
        assert_eq!(t.removed.len(), 1);
        assert!(outside.path().join("precious").exists());
        assert!(dir.path().join("p.tar").symlink_metadata().is_ok());
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_during_the_scan_is_not_followed() {
        let outside = tempfile::tempdir().unwrap();
        file(outside.path(), "keep/precious.tar", 100, 1000);
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "victim/keep/v.tar", 100, 10);
        file(dir.path(), "other/o.tar", 100, 10);
        let root = dir.path().to_path_buf();
        let target = outside.path().to_path_buf();
        let mut unreadable = vec![];
        let t = trim(dir.path(), 0, &mut |event| match event {
            Event::Reading(rel) if rel == Path::new("victim") => {
                std::fs::rename(root.join("victim"), root.join(".gone")).unwrap();
                std::os::unix::fs::symlink(&target, root.join("victim")).unwrap();
            }
            Event::Unreadable(rel, _) => unreadable.push(rel.to_path_buf()),
            _ => {}
        })
        .unwrap();
        assert!(outside.path().join("keep/precious.tar").exists());
        assert_eq!(paths(&t), vec![PathBuf::from("other/o.tar")]);
        assert_eq!(unreadable, vec![PathBuf::from("victim")]);
        assert!(root.join("victim").symlink_metadata().is_ok());
    }

    #[test]
    fn hidden_entries_such_as_nginx_temporary_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "a/1.tar", 100, 10);
        // An old nginx.conf kept client_body_temp_path inside the root: a PUT being
        // received lives there until nginx renames it into place.
        file(dir.path(), ".tmp/0000000001", 100, 1000);
        file(dir.path(), "a/.partial", 100, 1000);
        let t = quiet(dir.path(), 0);
        assert_eq!(t.removed, vec![(PathBuf::from("a/1.tar"), 100)]);
        assert!(dir.path().join(".tmp/0000000001").exists());
        assert!(dir.path().join("a/.partial").exists());
    }

    #[test]
    fn trees_deeper_than_path_max_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let part = "d".repeat(100);
        let mut fd: OwnedFd = openat(CWD, dir.path(), dir_flags(), Mode::empty()).unwrap();
        for _ in 0..60 {
            rustix::fs::mkdirat(&fd, part.as_str(), Mode::from_raw_mode(0o755)).unwrap();
            fd = openat(&fd, part.as_str(), dir_flags(), Mode::empty()).unwrap();
        }
        let f = openat(
            &fd,
            "deep.tar",
            OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        rustix::io::write(&f, b"deep").unwrap();
        let t = quiet(dir.path(), 0);
        assert_eq!((t.removed.len(), t.freed), (1, 4));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
