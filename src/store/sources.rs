//! The built-in kinds that provision sources and tools: `git` (a repository checked
//! out at a commit) and `download` (a file verified by its SHA-256, optionally
//! extracted). Their artifacts are ordinary artifacts, cached and shared like any
//! other.
//!
//! A git revision is resolved to a commit when the graph is built (`git ls-remote`;
//! a full commit needs no network), and the commit is part of the identity, so a
//! moving branch gives a new identity and a pinned commit is never fetched again
//! once cached.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{infra, usage};
use crate::util::hex;

/// How long `git ls-remote` may take.
const LS_REMOTE_TIMEOUT: Duration = Duration::from_secs(120);

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

static RESOLVED: Mutex<Option<HashMap<(String, String), String>>> = Mutex::new(None);

/// Resolves `rev` (branch, tag, `HEAD` or full commit) of the repository at `url` to
/// a commit. Errors name the task, the URL and the revision: exit 2 for an unknown
/// revision, 3 when git is missing or the repository cannot be reached.
pub fn resolve_git(task: &str, url: &str, rev: &str) -> Result<String> {
    if is_commit(rev) {
        return Ok(rev.to_ascii_lowercase());
    }
    if rev.len() >= 4 && rev.len() < 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(usage(format!(
            "Task '{task}': abbreviated commit '{rev}' of {url}: give the full 40-character commit, a branch or a tag"
        )));
    }
    let key = (url.to_string(), rev.to_string());
    if let Some(commit) = RESOLVED
        .lock()
        .expect("git cache")
        .get_or_insert_with(HashMap::new)
        .get(&key)
    {
        return Ok(commit.clone());
    }
    let out = ls_remote(task, url, rev)?;
    let url = &crate::util::secrets::masked_url(url);
    let refs: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once('\t')).collect();
    let find = |name: &str| {
        refs.iter()
            .find(|(_, r)| *r == name)
            .map(|(c, _)| c.to_string())
    };
    let commit = find(&format!("refs/heads/{rev}"))
        .or_else(|| find(&format!("refs/tags/{rev}^{{}}")))
        .or_else(|| find(&format!("refs/tags/{rev}")))
        .or_else(|| find(rev))
        .ok_or_else(|| {
            usage(format!(
                "Task '{task}': unknown revision '{rev}' in git repository {url}"
            ))
        })?;
    RESOLVED
        .lock()
        .expect("git cache")
        .get_or_insert_with(HashMap::new)
        .insert(key, commit.clone());
    Ok(commit)
}

/// What `git ls-remote URL REV REV^{}` prints; a missing git, an unreachable
/// repository or one that takes too long is an infrastructure error.
fn ls_remote(task: &str, url: &str, rev: &str) -> Result<String> {
    let shown = crate::util::secrets::masked_url(url);
    let mut child = Command::new("git")
        .args(["ls-remote", "--", url, rev, &format!("{rev}^{{}}")])
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            infra(format!(
                "Task '{task}': cannot run git to resolve '{rev}' of {shown}: {e} (is git installed?)"
            ))
        })?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > LS_REMOTE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(infra(format!(
                "Task '{task}': git ls-remote {shown} took longer than {}s (revision '{rev}')",
                LS_REMOTE_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().map(|mut o| o.read_to_string(&mut out));
    child.stderr.take().map(|mut e| e.read_to_string(&mut err));
    if !status.success() {
        let reason = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("git ls-remote failed")
            .trim()
            .to_string();
        return Err(infra(format!(
            "Task '{task}': cannot reach git repository {shown} (revision '{rev}'): {reason}"
        )));
    }
    Ok(out)
}

/// Single-quotes a string for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The commands that check out `commit` of `url` in the current directory.
pub fn git_commands(url: &str, commit: &str, keep_git: bool) -> Vec<String> {
    let url = shell_quote(url);
    let mut commands = vec![
        "git init -q .".to_string(),
        // A shallow fetch of the commit where the server allows it, else every
        // branch and tag.
        format!(
            "git fetch -q --depth 1 -- {url} {commit} 2>/dev/null || git fetch -q -- {url} '+refs/heads/*:refs/remotes/origin/*' '+refs/tags/*:refs/tags/*'"
        ),
        format!("git -c advice.detachedHead=false checkout -q --detach {commit}"),
        format!("test \"$(git rev-parse HEAD)\" = {commit}"),
    ];
    if !keep_git {
        commands.push("rm -rf .git".to_string());
    }
    commands
}

/// The name a downloaded file gets: the last segment of its URL.
pub fn file_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or("");
    if name.is_empty() || name == "." || name == ".." {
        "download".to_string()
    } else {
        name.to_string()
    }
}

/// Fetches `url` (http, https or file) into `dest`, hashing while streaming; returns
/// the SHA-256.
pub fn fetch(url: &str, dest: &Path) -> Result<String> {
    let mut out =
        std::fs::File::create(dest).with_context(|| format!("Cannot create {}", dest.display()))?;
    let mut hasher = Sha256::new();
    let mut copy = |reader: &mut dyn Read| -> Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = reader
                .read(&mut buf)
                .with_context(|| format!("{url}: download interrupted"))?;
            if n == 0 {
                return Ok(());
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
    };
    if let Some(path) = url.strip_prefix("file://") {
        let mut file = std::fs::File::open(path).with_context(|| format!("{url}: cannot open"))?;
        copy(&mut file)?;
    } else if url.starts_with("http://") || url.starts_with("https://") {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(format!("jolt/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let mut resp = agent
            .get(url)
            .call()
            .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
        if resp.status() != 200 {
            bail!("{url}: the server answered {}", resp.status());
        }
        let mut body = resp.body_mut().as_reader();
        copy(&mut body)?;
    } else {
        bail!("{url}: only http://, https:// and file:// URLs can be downloaded");
    }
    out.flush()?;
    Ok(hex(&hasher.finalize()))
}

/// Extracts an archive by its name's suffix (`.tar`, `.tar.gz`, `.tgz`, `.tar.xz`,
/// `.txz`, `.zip`) into `dest`; no entry may leave `dest`. Returns false when the
/// name is no archive it knows.
pub fn extract(archive: &Path, name: &str, dest: &Path) -> Result<bool> {
    let open = || -> Result<BufReader<std::fs::File>> {
        Ok(BufReader::with_capacity(
            256 * 1024,
            std::fs::File::open(archive)
                .with_context(|| format!("Cannot open {}", archive.display()))?,
        ))
    };
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
        crate::store::archive::unpack(flate2::read::GzDecoder::new(open()?), dest)?;
    } else if lower.ends_with(".tar.xz") || lower.ends_with(".txz") {
        crate::store::archive::unpack(lzma_rust2::XzReader::new(open()?, true), dest)?;
    } else if lower.ends_with(".tar") {
        crate::store::archive::unpack(open()?, dest)?;
    } else if lower.ends_with(".zip") {
        unzip(archive, dest)?;
    } else {
        return Ok(false);
    }
    Ok(true)
}

fn unzip(archive: &Path, dest: &Path) -> Result<()> {
    let mut links = Vec::new();
    let file = std::fs::File::open(archive)?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).context("Unreadable zip archive")?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).context("Unreadable zip entry")?;
        let raw = entry.name().map(|n| n.to_string()).unwrap_or_default();
        let Some(rel) = entry.enclosed_name() else {
            bail!("zip entry '{raw}' escapes the archive's directory");
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let target = dest.join(&rel);
        crate::store::archive::check_parents(&rel, &links)?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mode = entry.unix_mode().unwrap_or(0o644);
        if entry.is_dir() {
            std::fs::create_dir_all(&target)?;
        } else if mode & 0o170000 == 0o120000 {
            let mut link = String::new();
            entry.read_to_string(&mut link)?;
            if !crate::store::archive::link_stays_inside(&rel, Path::new(&link)) {
                bail!("zip symlink '{raw}' -> '{link}' points outside the archive's directory");
            }
            std::os::unix::fs::symlink(&link, &target)
                .with_context(|| format!("zip entry '{raw}' is duplicated"))?;
            links.push(rel.to_path_buf());
        } else {
            let mut out = std::fs::File::options()
                .write(true)
                .create_new(true)
                .open(&target)
                .with_context(|| format!("zip entry '{raw}' is duplicated"))?;
            std::io::copy(&mut entry, &mut out)
                .with_context(|| format!("zip entry '{raw}' is corrupt"))?;
            let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
            out.set_permissions(std::fs::Permissions::from_mode(perm))?;
        }
    }
    crate::store::archive::verify_links(dest, &links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_quotes() {
        assert_eq!(
            file_name("https://x.org/a/cmake-3.30.tar.gz?x=1"),
            "cmake-3.30.tar.gz"
        );
        assert_eq!(file_name("https://x.org/"), "download");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn full_commits_need_no_network_and_short_ones_are_refused() {
        let c = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(resolve_git("t", "file:///nowhere", c).unwrap(), c);
        assert!(resolve_git("t", "file:///nowhere", "0123abc").is_err());
    }

    #[test]
    fn zip_entries_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let make = |name: &str, entries: &[(&str, Option<&str>)]| {
            let path = dir.path().join(name);
            let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
            for (entry, link) in entries {
                match link {
                    Some(target) => w
                        .add_symlink(*entry, *target, zip::write::SimpleFileOptions::default())
                        .unwrap(),
                    None => {
                        w.start_file(*entry, zip::write::SimpleFileOptions::default())
                            .unwrap();
                        w.write_all(b"x").unwrap();
                    }
                }
            }
            w.finish().unwrap();
            path
        };
        let ok = make("ok.zip", &[("bin/tool", None), ("link", Some("bin/tool"))]);
        let out = dir.path().join("out");
        assert!(extract(&ok, "ok.zip", &out).unwrap());
        assert_eq!(std::fs::read_to_string(out.join("link")).unwrap(), "x");
        for (name, entries) in [
            ("up.zip", vec![("../evil", None)]),
            ("link.zip", vec![("l", Some("../../etc"))]),
            ("abs.zip", vec![("l", Some("/etc/passwd"))]),
        ] {
            let bad = make(name, &entries);
            let out = dir.path().join(format!("out-{name}"));
            assert!(extract(&bad, name, &out).is_err(), "{name} accepted");
        }
    }
}
