//! Small file-system helpers shared by the cache, the executor and the config.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name that is unique among all processes and threads on this host for a while.
pub fn unique_suffix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{}-{:x}", std::process::id(), n, nanos)
}

/// Writes a file by writing a sibling temporary file and renaming it into place.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, data, 0o644)
}

/// Like [`write_atomic`], creating the file with `mode` (before the umask): 0o600
/// for a file that may hold secrets.
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = sibling(path, &format!(".tmp-{}", unique_suffix()));
    let result = (|| {
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` and its missing parents with mode 0700 (before the umask), and
/// makes `dir` 0700 if it was there otherwise: for directories of logs and results.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if std::fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Opens `path` for writing from its start, as a file only its owner may read: a
/// new one is created 0600, an existing regular file made 0600 before anything is
/// written to it. Not atomic, so that a fifo or `/dev/stdout` works.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let meta = file.metadata()?;
    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Writes `data` to `path` through [`create_private`].
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    create_private(path)?.write_all(data)
}

/// `path` with `suffix` appended to its file name.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Whether a relative path, followed from `depth` directories below some root,
/// stays under that root (`..` may climb, but never above it).
pub fn stays_inside(depth: usize, path: &Path) -> bool {
    use std::path::Component;
    let mut depth = depth as i64;
    for c in path.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// `path` with `.` and `..` resolved lexically (symlinks are not followed).
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Opens a file to read that must be a regular one: never through a symlink, never
/// blocking on a fifo or a device put in its place (a task may have put it there).
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// Removes a directory tree; a missing one is fine. Directories made read-only
/// inside it (a task may: Go's module cache does) are made writable first.
pub fn remove_dir_all(path: &Path) -> Result<()> {
    let removed = match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path);
            std::fs::remove_dir_all(path)
        }
        other => other,
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("Cannot remove {}", path.display())),
    }
}

/// `files` (relative to `root`) and the files their symlinks lead to inside `root`:
/// a symlink's identity covers its target's content, so a source snapshot carries
/// the target too, and a worker's workspace keeps it.
pub fn with_link_targets(root: &Path, files: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = files.to_vec();
    let Ok(canonical_root) = std::fs::canonicalize(root) else {
        return out;
    };
    for file in files {
        let full = root.join(file);
        let is_link = std::fs::symlink_metadata(&full).is_ok_and(|m| m.file_type().is_symlink());
        let target = std::fs::canonicalize(&full).ok().filter(|t| t.is_file());
        if let (true, Some(target)) = (is_link, target) {
            if let Ok(rel) = target.strip_prefix(&canonical_root) {
                out.push(rel.to_path_buf());
            }
        }
    }
    out
}

/// Takes the write bits off `root` and every file and directory under it (links are
/// not followed, and keep theirs): what a committed artifact is made of.
pub fn make_read_only(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let read_only = |path: &Path, meta: &std::fs::Metadata| -> Result<()> {
        let mode = meta.permissions().mode();
        if mode & 0o222 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o222))
                .with_context(|| format!("Cannot make {} read-only", path.display()))?;
        }
        Ok(())
    };
    let mut dirs = Vec::new();
    walk(root, Path::new(""), &mut |rel, entry| {
        let meta = entry.metadata()?;
        if meta.is_dir() {
            dirs.push((root.join(rel), meta));
            return Ok(true);
        }
        if meta.is_file() {
            let path = root.join(rel);
            // A file linked elsewhere too (a task's `ln` of a workspace file) is
            // copied first: its other names are not the artifact's to change.
            if std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
                let copy = path.with_file_name(format!(".{}.unlinked", unique_suffix()));
                std::fs::copy(&path, &copy)
                    .and_then(|_| std::fs::rename(&copy, &path))
                    .with_context(|| format!("Cannot copy {}", path.display()))?;
            }
            read_only(&path, &std::fs::symlink_metadata(&path)?)?;
        }
        Ok(false)
    })?;
    // Directories once their entries are done (a directory without its write bit
    // can still be read).
    for (dir, meta) in dirs.iter().rev() {
        read_only(dir, meta)?;
    }
    read_only(root, &std::fs::symlink_metadata(root)?)
}

/// Gives the owner full access to every directory under `root` (links are not
/// followed); what cannot be changed is left as it is.
fn make_dirs_writable(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let mode = meta.permissions().mode();
        if mode & 0o700 != 0o700 {
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode | 0o700));
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(entry.path());
            }
        }
    }
}

/// Removes a directory that is most often empty (a task's build directory): one
/// `rmdir`, and the whole tree only when that fails.
pub fn remove_dir_mostly_empty(path: &Path) -> Result<()> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => remove_dir_all(path),
    }
}

/// Walks the tree under `base/start` without recursion (trees may be thousands of
/// directories deep), calling `visit(path relative to base, entry)` for each entry
/// (symlinks are not followed); a directory is entered when `visit` returns true.
pub fn walk(
    base: &Path,
    start: &Path,
    visit: &mut dyn FnMut(&Path, &std::fs::DirEntry) -> Result<bool>,
) -> Result<()> {
    let mut dirs = vec![start.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let full = base.join(&dir);
        let entries =
            std::fs::read_dir(&full).with_context(|| format!("Cannot read {}", full.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("Cannot read {}", full.display()))?;
            let rel = dir.join(entry.file_name());
            if visit(&rel, &entry)? && entry.file_type()?.is_dir() {
                dirs.push(rel);
            }
        }
    }
    Ok(())
}

/// Copies a file or a directory tree, keeping symlinks as symlinks and the
/// executable bits of files.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    copy_entry(src, dst)?;
    if std::fs::symlink_metadata(src)?.is_dir() {
        walk(src, Path::new(""), &mut |rel, _| {
            copy_entry(&src.join(rel), &dst.join(rel))?;
            Ok(true)
        })?;
    }
    Ok(())
}

/// Copies one entry: a symlink as a symlink, a directory as an empty one, a file
/// with its content and executable bits; anything else is an error.
fn copy_entry(src: &Path, dst: &Path) -> Result<()> {
    let meta =
        std::fs::symlink_metadata(src).with_context(|| format!("Cannot read {}", src.display()))?;
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src)?;
        let _ = std::fs::remove_file(dst);
        std::os::unix::fs::symlink(&target, dst)
            .with_context(|| format!("Cannot create symlink {}", dst.display()))?;
    } else if meta.is_dir() {
        std::fs::create_dir_all(dst).with_context(|| format!("Cannot create {}", dst.display()))?;
    } else if meta.is_file() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::copy(src, dst)
            .with_context(|| format!("Cannot copy {} to {}", src.display(), dst.display()))?;
        // A copy is its owner's to change, even of a file of a read-only artifact
        // (and `--copy` into the same place again must be able to overwrite it).
        let mode = meta.permissions().mode() | 0o200;
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("Cannot copy {} to {}", src.display(), dst.display()))?;
    } else {
        anyhow::bail!(
            "Cannot copy {}: not a regular file (a {})",
            src.display(),
            kind_of(&meta)
        );
    }
    Ok(())
}

/// What kind of file system object `meta` describes, for messages.
pub fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() {
        "file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else {
        "device"
    }
}

/// Bytes used by the files under `path` (directories and symlinks count their entry size).
pub fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.len();
    if meta.is_dir() {
        let _ = walk(path, Path::new(""), &mut |_, entry| {
            total += entry.metadata().map(|m| m.len()).unwrap_or(0);
            Ok(true)
        });
    }
    total
}

/// Seconds since the Unix epoch, as a UTC timestamp `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_timestamp(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Parses what [`format_timestamp`] writes.
pub fn parse_timestamp(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.splitn(3, ':').map(|p| p.parse::<u64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // Manifests come from other machines: out-of-range fields are no timestamp.
    let valid = (1970..=9999).contains(&y)
        && (1..=12).contains(&m)
        && (1..=31).contains(&day)
        && hh < 24
        && mm < 60
        && ss < 61;
    if !valid {
        return None;
    }
    let days = days_from_civil(y, m, day);
    Some(days as u64 * 86400 + hh * 3600 + mm * 60 + ss)
}

/// Now, in seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// Howard Hinnant's civil calendar algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// The longest duration a recipe or the configuration may give (100 years): longer
/// ones are typing errors, and they would overflow the clocks they are added to.
pub const MAX_DURATION_SECS: u64 = 100 * 365 * 86400;

/// Parses durations such as `90s`, `10m`, `2h`, `7d`, `1w`, `1h30m`; `None` for
/// anything else, and for durations over [`MAX_DURATION_SECS`].
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0u64;
    let mut number = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        if c == ' ' {
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphabetic() {
                unit.push(n);
                chars.next();
            } else {
                break;
            }
        }
        let n: u64 = number.parse().ok()?;
        number.clear();
        let factor = match unit.as_str() {
            "s" | "sec" | "secs" => 1,
            "m" | "min" | "mins" => 60,
            "h" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86400,
            "w" | "week" | "weeks" => 7 * 86400,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(factor)?)?;
    }
    if !number.is_empty() {
        total = total.checked_add(number.parse::<u64>().ok()?)?;
    }
    (total <= MAX_DURATION_SECS).then(|| std::time::Duration::from_secs(total))
}

/// Formats a duration the way Jolt does: `05s`, `02min 05s`, `01h 02min 05s`.
pub fn format_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{:02}h {:02}min {:02}s", s / 3600, (s / 60) % 60, s % 60)
    } else if s >= 60 {
        format!("{:02}min {:02}s", s / 60, s % 60)
    } else {
        format!("{s:02}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_tree_leaves_a_file_it_shares_by_a_hard_link_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (art, outside) = (dir.path().join("art"), dir.path().join("workspace.txt"));
        std::fs::create_dir_all(art.join("sub")).unwrap();
        std::fs::write(&outside, "mine\n").unwrap();
        // Regression (found by an attacking helper): a task's `ln` of a workspace
        // file into its artifact made the user's file read-only.
        std::fs::hard_link(&outside, art.join("sub/linked.txt")).unwrap();
        std::fs::write(art.join("own.txt"), "own\n").unwrap();
        make_read_only(&art).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&outside), 0o644);
        assert_eq!(
            (
                mode(&art),
                mode(&art.join("sub")),
                mode(&art.join("sub/linked.txt"))
            ),
            (0o555, 0o555, 0o444)
        );
        assert_eq!(mode(&art.join("own.txt")), 0o444);
        assert_eq!(
            std::fs::read_to_string(art.join("sub/linked.txt")).unwrap(),
            "mine\n"
        );
        remove_dir_all(&art).unwrap();
        assert!(!art.exists());
    }

    #[test]
    fn timestamps_round_trip() {
        for secs in [0u64, 951782400, 1_800_000_000, 4_102_444_800] {
            assert_eq!(parse_timestamp(&format_timestamp(secs)), Some(secs));
        }
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_timestamp(951782400), "2000-02-29T00:00:00Z");
        for bad in [
            "9223372036854775807-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2020-13-01T00:00:00Z",
            "2020-01-01T99:00:00Z",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("10m").unwrap().as_secs(), 600);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("7d").unwrap().as_secs(), 7 * 86400);
        assert_eq!(parse_duration("45").unwrap().as_secs(), 45);
        assert!(parse_duration("soon").is_none());
        // Too long to be meant, or to add to a clock: refused, never wrapped.
        assert!(parse_duration("18446744073709551615s").is_none());
        assert!(parse_duration("99999999999999999w").is_none());
        assert!(parse_duration("101y").is_none());
        assert_eq!(parse_duration("5200w").unwrap().as_secs(), 5200 * 7 * 86400);
        assert_eq!(format_duration(std::time::Duration::from_secs(5)), "05s");
        assert_eq!(
            format_duration(std::time::Duration::from_secs(125)),
            "02min 05s"
        );
        assert_eq!(
            format_duration(std::time::Duration::from_secs(3725)),
            "01h 02min 05s"
        );
    }
}
