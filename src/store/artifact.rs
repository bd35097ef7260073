//! Artifacts: the `.manifest.json` that describes one, and the publish rules that fill one.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::error::usage;
use crate::recipe::Expires;

/// The file in every artifact that describes it.
pub const MANIFEST: &str = ".manifest.json";
/// The captured output of the task that produced the artifact.
pub const BUILD_LOG: &str = ".build.log";

/// The largest manifest jolt reads (a task with a million influence files stays
/// well below).
pub const MAX_MANIFEST: u64 = 256 << 20;

/// Reads a regular file of at most `limit` bytes. Anything else (a fifo, a device, a
/// symlink to either, a file that grows without end) is an error, never a block or
/// an unbounded read.
pub fn read_small(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = crate::util::fs::open_regular(path)?;
    let mut data = Vec::new();
    file.take(limit + 1).read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        return Err(std::io::Error::other(format!("larger than {limit} bytes")));
    }
    Ok(data)
}

/// The most of a task's output a worker sends back with a reply.
pub const REPLAYED_OUTPUT: u64 = 1 << 20;

/// The last `limit` bytes of a regular file (see [`crate::util::fs::open_regular`]),
/// and where in the file they start.
pub fn read_end(path: &Path, limit: u64) -> std::io::Result<(u64, Vec<u8>)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = crate::util::fs::open_regular(path)?;
    let start = file.metadata()?.len().saturating_sub(limit);
    file.seek(SeekFrom::Start(start))?;
    let mut data = Vec::new();
    file.take(limit).read_to_end(&mut data)?;
    Ok((start, data))
}

/// The end of a build log for a reply: at most `limit` bytes, from a line's start,
/// after a line saying how much was cut. `None` when it cannot be read as a regular
/// file (never through a link, never blocking on a fifo).
pub fn output_tail(path: &Path, limit: u64) -> Option<String> {
    let (start, data) = read_end(path, limit).ok()?;
    if start == 0 {
        return Some(String::from_utf8_lossy(&data).into_owned());
    }
    // Cut at the first whole line.
    let from = data.iter().position(|&b| b == b'\n').map_or(0, |p| p + 1);
    let cut = start + from as u64;
    Some(format!(
        "[... the first {cut} bytes of the output are not shown ...]\n{}",
        String::from_utf8_lossy(&data[from..])
    ))
}

/// The content of `.manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub task: String,
    pub identity: String,
    pub parameters: BTreeMap<String, String>,
    pub influence: Vec<String>,
    pub environ: BTreeMap<String, String>,
    pub strings: BTreeMap<String, String>,
    pub paths: BTreeMap<String, String>,
    /// Published files, relative to the artifact root, sorted.
    pub files: Vec<String>,
    /// What each published file holds, by path: an artifact whose files differ is
    /// not this artifact (see [`check_contents`]). A manifest of a jolt before this
    /// field has none, and its artifact counts as absent where it is checked.
    #[serde(default)]
    pub contents: BTreeMap<String, Content>,
    /// UTC timestamp of the commit, `YYYY-MM-DDTHH:MM:SSZ`.
    pub created: String,
    /// Bytes of the published files.
    pub size: u64,
    pub expires: Expires,
    /// Seconds the task took to execute.
    #[serde(default)]
    pub duration: f64,
    /// The jolt version that produced it.
    #[serde(default)]
    pub jolt: String,
}

/// What one published file holds: a regular file's digest, size and executable
/// bit, or a symlink's target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    /// The SHA-256 of a regular file's bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default)]
    pub size: u64,
    /// `0o755` or `0o644`: only the executable bit is kept, as unpacking does.
    #[serde(default)]
    pub mode: u32,
    /// A symlink's target, as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

impl Content {
    /// What the file or symlink `path` (never followed) holds; `interruptible`: an
    /// error as soon as Ctrl-C is pressed, however large the file.
    fn of(path: &Path, meta: &std::fs::Metadata, interruptible: bool) -> Result<Content> {
        use std::os::unix::fs::PermissionsExt;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path)
                .with_context(|| format!("Cannot read the link {}", path.display()))?;
            return Ok(Content {
                sha256: None,
                size: 0,
                mode: 0,
                link: Some(target.to_string_lossy().into_owned()),
            });
        }
        let mut file = crate::util::fs::open_regular(path)
            .with_context(|| format!("Cannot read {}", path.display()))?;
        let mut hasher = sha2::Sha256::new();
        let size = if interruptible {
            let mut buf = vec![0u8; 64 * 1024];
            let mut size = 0u64;
            loop {
                if crate::interrupt::is_set() {
                    anyhow::bail!("Interrupted while hashing {}", path.display());
                }
                let n = match std::io::Read::read(&mut file, &mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    read => read.with_context(|| format!("Cannot read {}", path.display()))?,
                };
                if n == 0 {
                    break size;
                }
                sha2::Digest::update(&mut hasher, &buf[..n]);
                size += n as u64;
            }
        } else {
            std::io::copy(&mut file, &mut HashWriter(&mut hasher))
                .with_context(|| format!("Cannot read {}", path.display()))?
        };
        Ok(Content {
            sha256: Some(crate::util::hex(&hasher.finalize())),
            size,
            mode: if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            },
            link: None,
        })
    }
}

/// Feeds what is written to a hasher.
struct HashWriter<'a>(&'a mut sha2::Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(self.0, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The published files of an artifact directory, what each holds, and their bytes.
pub fn describe(dir: &Path) -> Result<(BTreeMap<String, Content>, u64)> {
    describe_with(dir, false)
}

/// [`describe`]; `interruptible`: see [`Content::of`].
fn describe_with(dir: &Path, interruptible: bool) -> Result<(BTreeMap<String, Content>, u64)> {
    let mut contents = BTreeMap::new();
    let mut size = 0;
    walk_published(dir, &mut |rel, path, meta| {
        let content = Content::of(path, meta, interruptible)?;
        size += meta.len();
        contents.insert(rel, content);
        Ok(())
    })?;
    Ok((contents, size))
}

/// Checks that an artifact directory holds what its manifest says, file by file: a
/// file changed, added, removed or made (not) executable since the manifest was
/// written is an error naming it, and so is a manifest without contents (written
/// by a jolt before digests), which proves nothing.
pub fn check_contents(dir: &Path, manifest: &Manifest) -> Result<()> {
    check_contents_with(dir, manifest, false)
}

/// [`check_contents`], given up (an error) as soon as Ctrl-C is pressed: a check
/// nothing waits for but a build about to stop.
pub fn check_contents_interruptibly(dir: &Path, manifest: &Manifest) -> Result<()> {
    check_contents_with(dir, manifest, true)
}

fn check_contents_with(dir: &Path, manifest: &Manifest, interruptible: bool) -> Result<()> {
    if manifest.contents.is_empty() && !manifest.files.is_empty() {
        anyhow::bail!("its manifest records no file digests (written by an older jolt)");
    }
    let (contents, _) = describe_with(dir, interruptible)?;
    if contents == manifest.contents {
        return Ok(());
    }
    let changed = contents
        .keys()
        .chain(manifest.contents.keys())
        .find(|k| contents.get(*k) != manifest.contents.get(*k))
        .cloned()
        .unwrap_or_default();
    let how = match (contents.get(&changed), manifest.contents.get(&changed)) {
        (Some(_), None) => "is not in its manifest",
        (None, Some(_)) => "is missing",
        _ => "differs from its manifest",
    };
    anyhow::bail!("{changed} {how}")
}

impl Manifest {
    /// Reads the manifest of an artifact directory.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = read_small(&path, MAX_MANIFEST)
            .with_context(|| format!("Cannot read {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("Corrupt {}", path.display()))
    }

    /// Writes the manifest into an artifact directory.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self)?;
        std::fs::write(dir.join(MANIFEST), text)
            .with_context(|| format!("Cannot write {}", dir.join(MANIFEST).display()))
    }
}

/// Whether a consumer may take the variable `name` from an artifact's `environ`:
/// not jolt's own, and not one that makes the dynamic loader or the shell run
/// something else than what the consumer asked for.
fn environ_allowed(name: &str) -> bool {
    let loader =
        (name.starts_with("LD_") && name != "LD_LIBRARY_PATH") || name.starts_with("DYLD_");
    let shell = matches!(name, "BASH_ENV" | "ENV" | "IFS" | "SHELLOPTS" | "PS4");
    !(loader || shell || name.starts_with("JOLT_"))
}

impl Manifest {
    /// Checks what consumers will take from the manifest: `environ` names are
    /// variable names, neither jolt's own nor the loader's (`LD_PRELOAD`); the
    /// artifact-relative paths of `PATH`-like variables and of `paths` stay inside
    /// the artifact. Checked before a built artifact is committed and when a
    /// downloaded one is verified.
    pub fn check_metadata(&self) -> Result<()> {
        for (name, value) in &self.environ {
            let valid_name = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                anyhow::bail!("environ: '{name}' is not a variable name");
            }
            if !environ_allowed(name) {
                anyhow::bail!("environ: consumers may not be given {name}");
            }
            if value.contains('\0') {
                anyhow::bail!("environ: {name} holds a NUL byte");
            }
            if name.contains("PATH") {
                if let Some(bad) = value
                    .split(':')
                    .find(|p| !p.is_empty() && !crate::util::fs::stays_inside(0, Path::new(p)))
                {
                    anyhow::bail!(
                        "environ: {name} entry '{bad}' is not a path inside the artifact"
                    );
                }
            }
        }
        for (key, value) in &self.paths {
            if !crate::util::fs::stays_inside(0, Path::new(value)) {
                anyhow::bail!("paths: {key} = '{value}' is not a path inside the artifact");
            }
        }
        Ok(())
    }
}

/// Calls `found` with each published file or symlink of an artifact directory (its
/// path relative to `dir`, its path, its metadata), never following a link; any
/// other kind of entry is an error.
fn walk_published(
    dir: &Path,
    found: &mut dyn FnMut(String, &Path, &std::fs::Metadata) -> Result<()>,
) -> Result<()> {
    crate::util::fs::walk(dir, Path::new(""), &mut |path, entry| {
        let meta = entry.metadata()?;
        if path == Path::new(MANIFEST) || path == Path::new(BUILD_LOG) {
            // jolt's own: a regular file, or (the manifest, while staging) none yet.
            if !meta.is_file() {
                anyhow::bail!(
                    "{} in the artifact is a {}: it is jolt's, and must be a file",
                    path.display(),
                    crate::util::fs::kind_of(&meta)
                );
            }
            return Ok(false);
        }
        if meta.is_dir() {
            return Ok(true);
        }
        if !(meta.is_file() || meta.file_type().is_symlink()) {
            anyhow::bail!(
                "{} in the artifact is a {}: artifacts hold files, directories and symlinks",
                path.display(),
                crate::util::fs::kind_of(&meta)
            );
        }
        // Manifests name files as UTF-8: two names that only differ in bytes that
        // are not would have one entry.
        let Some(rel) = path.to_str() else {
            anyhow::bail!("{} in the artifact is not named in UTF-8", path.display());
        };
        found(rel.to_string(), &dir.join(path), &meta)?;
        Ok(false)
    })
}

/// A publish rule with its placeholders expanded.
#[derive(Debug)]
pub struct Rule {
    pub files: String,
    /// Absolute directory the glob is relative to.
    pub cwd: PathBuf,
    pub dest: Option<String>,
    pub flatten: bool,
}

/// A relative path that stays inside the directory it is joined to.
fn inside(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    p.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then(|| p.to_path_buf())
}

/// Copies what a rule matches into the artifact directory; returns the paths it
/// matched (files or directories, absolute).
pub fn publish(task: &str, rule: &Rule, artifact: &Path) -> Result<Vec<PathBuf>> {
    let pattern = crate::util::globs::Pattern::new(&rule.files)
        .map_err(|e| usage(format!("Task '{task}': publish rule: {e:#}")))?;
    let matches = pattern.expand(&rule.cwd, false)?;
    if matches.is_empty() {
        anyhow::bail!(
            "Publish rule '{}' matched no files in {} ({task})",
            rule.files,
            rule.cwd.display()
        );
    }
    let dest = match &rule.dest {
        None => None,
        Some(d) => Some((
            inside(d).ok_or_else(|| {
                anyhow::anyhow!("Publish destination '{d}' leaves the artifact ({task})")
            })?,
            d.ends_with('/') || d.is_empty() || d == ".",
        )),
    };
    let base = match &dest {
        Some((d, _)) => artifact.join(d),
        None => artifact.to_path_buf(),
    };
    for m in &matches {
        let src = rule.cwd.join(m);
        match &dest {
            Some((d, false)) if matches.len() == 1 => {
                crate::util::fs::copy_tree(&src, &artifact.join(d))?;
            }
            _ if rule.flatten => {
                let is_dir = std::fs::metadata(&src).map(|m| m.is_dir()).unwrap_or(false);
                let files = if is_dir {
                    crate::util::globs::files(&src, "**")?
                        .into_iter()
                        .map(|f| src.join(f))
                        .collect()
                } else {
                    vec![src]
                };
                for file in files {
                    let name = file.file_name().unwrap_or_default().to_owned();
                    crate::util::fs::copy_tree(&file, &base.join(name))?;
                }
            }
            _ => crate::util::fs::copy_tree(&src, &base.join(m))?,
        }
    }
    Ok(matches.into_iter().map(|m| rule.cwd.join(m)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank_manifest() -> Manifest {
        Manifest {
            task: "t".into(),
            identity: "i".into(),
            parameters: Default::default(),
            influence: vec![],
            environ: Default::default(),
            strings: Default::default(),
            paths: Default::default(),
            files: vec![],
            contents: Default::default(),
            created: String::new(),
            size: 0,
            expires: crate::recipe::Expires::Immediately,
            duration: 0.0,
            jolt: String::new(),
        }
    }

    #[test]
    fn contents_name_each_file_changed_added_removed_or_made_executable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let art = dir.path();
        std::fs::create_dir_all(art.join("bin")).unwrap();
        std::fs::write(art.join("bin/tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(art.join("bin/tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(art.join("data.txt"), "A\n").unwrap();
        std::os::unix::fs::symlink("data.txt", art.join("link")).unwrap();
        std::fs::write(art.join(BUILD_LOG), "output\n").unwrap();
        let (contents, size) = describe(art).unwrap();
        assert_eq!(size, 10 + 2 + "data.txt".len() as u64);
        assert_eq!(
            contents.keys().collect::<Vec<_>>(),
            ["bin/tool", "data.txt", "link"]
        );
        assert_eq!(
            contents["data.txt"].sha256.as_deref(),
            Some("06f961b802bc46ee168555f066d28f4f0e9afdf3f88174c1ee6f9de004fc30a0")
        );
        assert_eq!(
            (contents["bin/tool"].mode, contents["data.txt"].mode),
            (0o755, 0o644)
        );
        assert_eq!(contents["link"].link.as_deref(), Some("data.txt"));
        let manifest = Manifest {
            files: contents.keys().cloned().collect(),
            contents,
            ..blank_manifest()
        };
        check_contents(art, &manifest).unwrap();
        // The build log is jolt's, not the artifact's.
        std::fs::write(art.join(BUILD_LOG), "other output\n").unwrap();
        check_contents(art, &manifest).unwrap();
        let error = |manifest: &Manifest| check_contents(art, manifest).unwrap_err().to_string();
        std::fs::write(art.join("data.txt"), "B\n").unwrap();
        assert_eq!(error(&manifest), "data.txt differs from its manifest");
        std::fs::write(art.join("data.txt"), "A\n").unwrap();
        std::fs::set_permissions(art.join("data.txt"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        assert_eq!(error(&manifest), "data.txt differs from its manifest");
        std::fs::set_permissions(art.join("data.txt"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        std::fs::write(art.join("extra"), "").unwrap();
        assert_eq!(error(&manifest), "extra is not in its manifest");
        std::fs::remove_file(art.join("extra")).unwrap();
        std::fs::remove_file(art.join("link")).unwrap();
        std::os::unix::fs::symlink("bin/tool", art.join("link")).unwrap();
        assert_eq!(error(&manifest), "link differs from its manifest");
        std::fs::remove_file(art.join("link")).unwrap();
        assert_eq!(error(&manifest), "link is missing");
        // A manifest of an older jolt, without digests, proves nothing.
        let old = Manifest {
            contents: Default::default(),
            ..manifest
        };
        assert!(error(&old).contains("no file digests"), "{}", error(&old));
    }

    #[test]
    fn a_file_name_that_is_not_utf8_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        // Regression (found by an attacking helper): a\xff and a\xfe had one entry,
        // a\u{fffd}, so either could be changed unseen.
        for name in [&b"a\xff"[..], b"a\xfe"] {
            std::fs::write(dir.path().join(std::ffi::OsStr::from_bytes(name)), "x").unwrap();
        }
        let error = describe(dir.path()).unwrap_err().to_string();
        assert!(error.contains("not named in UTF-8"), "{error}");
    }

    #[test]
    fn a_long_output_is_cut_at_a_line_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, "one\ntwo\nthree\n").unwrap();
        assert_eq!(output_tail(&log, 100).unwrap(), "one\ntwo\nthree\n");
        assert_eq!(
            output_tail(&log, 9).unwrap(),
            "[... the first 8 bytes of the output are not shown ...]\nthree\n"
        );
        assert!(output_tail(&dir.path().join("none"), 9).is_none());
    }

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for f in ["a.txt", "b.txt", "dir1/c.txt", "dir1/sub/d.txt"] {
            std::fs::create_dir_all(src.join(f).parent().unwrap()).unwrap();
            std::fs::write(src.join(f), f).unwrap();
        }
        let art = dir.path().join("art");
        std::fs::create_dir_all(&art).unwrap();
        (dir, src, art)
    }

    fn rule(src: &Path, files: &str, dest: Option<&str>, flatten: bool) -> Rule {
        Rule {
            files: files.into(),
            cwd: src.to_path_buf(),
            dest: dest.map(str::to_string),
            flatten,
        }
    }

    #[test]
    fn rules_copy_rename_and_flatten() {
        let (_d, src, art) = setup();
        publish("t", &rule(&src, "*.txt", None, false), &art).unwrap();
        publish("t", &rule(&src, "a.txt", Some("renamed.txt"), false), &art).unwrap();
        publish("t", &rule(&src, "dir1", Some("into/"), false), &art).unwrap();
        publish("t", &rule(&src, "dir1", Some("flat/"), true), &art).unwrap();
        let (contents, _) = describe(&art).unwrap();
        assert_eq!(
            contents.keys().collect::<Vec<_>>(),
            vec![
                "a.txt",
                "b.txt",
                "flat/c.txt",
                "flat/d.txt",
                "into/dir1/c.txt",
                "into/dir1/sub/d.txt",
                "renamed.txt"
            ]
        );
    }

    #[test]
    fn metadata_that_would_reach_outside_is_refused() {
        let manifest = |environ: &[(&str, &str)], paths: &[(&str, &str)]| Manifest {
            environ: environ
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            paths: paths
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..blank_manifest()
        };
        let ok = manifest(
            &[
                ("PATH", "bin:tools/../bin"),
                ("LD_LIBRARY_PATH", "lib"),
                ("CC", "/usr/bin/gcc"),
            ],
            &[("include", "inc")],
        );
        ok.check_metadata().unwrap();
        for (environ, paths) in [
            (vec![("PATH", "../../..")], vec![]),
            (vec![("PATH", "bin:/usr/bin")], vec![]),
            (vec![("LD_PRELOAD", "evil.so")], vec![]),
            (vec![("JOLT_BUILDDIR", "/tmp")], vec![]),
            (vec![("BAD NAME", "x")], vec![]),
            (vec![], vec![("p", "/etc/passwd")]),
            (vec![], vec![("p", "a/../../b")]),
        ] {
            let m = manifest(&environ, &paths);
            assert!(m.check_metadata().is_err(), "{environ:?} {paths:?}");
        }
    }

    #[test]
    fn empty_matches_and_escapes_are_errors() {
        let (_d, src, art) = setup();
        let err = publish("t", &rule(&src, "*.so", None, false), &art).unwrap_err();
        assert!(err.to_string().contains("matched no files"), "{err}");
        assert!(publish("t", &rule(&src, "a.txt", Some("../x"), false), &art).is_err());
    }
}
