//! Artifacts: the `.manifest.json` that describes one, and the publish rules that fill one.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::error::usage;
use crate::recipe::Expires;

/// The file in every artifact that describes it.
pub const MANIFEST: &str = ".manifest.json";
/// The captured output of the task that produced the artifact.
pub const BUILD_LOG: &str = ".build.log";

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

impl Manifest {
    /// Reads the manifest of an artifact directory.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text =
            std::fs::read(&path).with_context(|| format!("Cannot read {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("Corrupt {}", path.display()))
    }

    /// Writes the manifest into an artifact directory.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self)?;
        std::fs::write(dir.join(MANIFEST), text)
            .with_context(|| format!("Cannot write {}", dir.join(MANIFEST).display()))
    }
}

/// Lists the files under an artifact directory (without the manifest and the log),
/// relative and sorted, with their total size.
pub fn list_files(dir: &Path) -> Result<(Vec<String>, u64)> {
    fn visit(base: &Path, rel: &Path, out: &mut Vec<String>, size: &mut u64) -> Result<()> {
        let full = base.join(rel);
        for entry in
            std::fs::read_dir(&full).with_context(|| format!("Cannot read {}", full.display()))?
        {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            if rel.as_os_str().is_empty()
                && (entry.file_name() == MANIFEST || entry.file_name() == BUILD_LOG)
            {
                continue;
            }
            let meta = entry.metadata()?;
            if meta.is_dir() {
                visit(base, &path, out, size)?;
            } else {
                *size += meta.len();
                out.push(path.to_string_lossy().into_owned());
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    let mut size = 0;
    visit(dir, Path::new(""), &mut files, &mut size)?;
    files.sort();
    Ok((files, size))
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

/// Copies what a rule matches into the artifact directory; returns how many paths matched.
pub fn publish(task: &str, rule: &Rule, artifact: &Path) -> Result<usize> {
    let pattern = crate::globs::Pattern::new(&rule.files)
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
                crate::fsutil::copy_tree(&src, &artifact.join(d))?;
            }
            _ if rule.flatten => {
                let is_dir = std::fs::metadata(&src).map(|m| m.is_dir()).unwrap_or(false);
                let files = if is_dir {
                    crate::globs::files(&src, "**")?
                        .into_iter()
                        .map(|f| src.join(f))
                        .collect()
                } else {
                    vec![src]
                };
                for file in files {
                    let name = file.file_name().unwrap_or_default().to_owned();
                    crate::fsutil::copy_tree(&file, &base.join(name))?;
                }
            }
            _ => crate::fsutil::copy_tree(&src, &base.join(m))?,
        }
    }
    Ok(matches.len())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (files, _) = list_files(&art).unwrap();
        assert_eq!(
            files,
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
    fn empty_matches_and_escapes_are_errors() {
        let (_d, src, art) = setup();
        let err = publish("t", &rule(&src, "*.so", None, false), &art).unwrap_err();
        assert!(err.to_string().contains("matched no files"), "{err}");
        assert!(publish("t", &rule(&src, "a.txt", Some("../x"), false), &art).is_err());
    }
}
