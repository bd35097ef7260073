//! Glob expansion relative to a directory: `src/**/*.c`, `include/**`, `a.txt`.
//!
//! Only the literal prefix of a pattern is walked, so `src/app/*.c` lists one
//! directory. `*` does not cross `/`; `**` matches any depth; `.git` is never entered.

use anyhow::{Context, Result};
use globset::{GlobBuilder, GlobMatcher};
use std::fs::Metadata;
use std::path::{Path, PathBuf};

use crate::error::usage;

fn has_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// A compiled glob relative to some base directory.
pub struct Pattern {
    /// The directory (relative to the base) where matching starts.
    pub prefix: PathBuf,
    matcher: Matcher,
}

enum Matcher {
    /// No wildcard: the prefix itself (a directory means everything in it).
    Literal,
    /// One last component with only `*` and `?` (`src/*.c`): names in the prefix
    /// directory are matched without a regex, the common case made cheap.
    Name(String),
    Glob(GlobMatcher),
}

/// Matches a file name against `*` and `?` wildcards.
fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl Pattern {
    pub fn new(pattern: &str) -> Result<Pattern> {
        let pattern = pattern.trim_start_matches("./");
        if pattern.starts_with('/') || pattern.split('/').any(|c| c == "..") {
            return Err(usage(format!(
                "Glob '{pattern}' must be relative and stay inside its directory"
            )));
        }
        let mut prefix = PathBuf::new();
        let mut rest = Vec::new();
        for comp in pattern.split('/').filter(|c| !c.is_empty()) {
            if rest.is_empty() && !has_meta(comp) {
                prefix.push(comp);
            } else {
                rest.push(comp);
            }
        }
        if rest.is_empty() {
            return Ok(Pattern {
                prefix,
                matcher: Matcher::Literal,
            });
        }
        if let [name] = rest[..] {
            if !name.contains(['[', '{', '\\']) && name != "**" {
                return Ok(Pattern {
                    prefix,
                    matcher: Matcher::Name(name.to_string()),
                });
            }
        }
        let glob = GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| usage(format!("Invalid glob '{pattern}': {e}")))?;
        Ok(Pattern {
            prefix,
            matcher: Matcher::Glob(glob.compile_matcher()),
        })
    }

    /// Whether a path relative to the base matches.
    pub fn is_match(&self, rel: &Path) -> bool {
        match &self.matcher {
            Matcher::Glob(m) => m.is_match(rel),
            Matcher::Literal => rel.starts_with(&self.prefix),
            Matcher::Name(name) => {
                rel.parent() == Some(self.prefix.as_path())
                    && rel
                        .file_name()
                        .is_some_and(|f| wildcard(name.as_bytes(), f.as_encoded_bytes()))
            }
        }
    }

    /// Matching paths relative to `base`, sorted. With `files_only`, directories
    /// are descended into instead of returned (a literal directory means all its files).
    pub fn expand(&self, base: &Path, files_only: bool) -> Result<Vec<PathBuf>> {
        Ok(self
            .expand_with_meta(base, files_only)?
            .into_iter()
            .map(|(p, _)| p)
            .collect())
    }

    /// Like [`Pattern::expand`], with the (not followed) metadata of files where the
    /// walk got it cheaply, relative to their directory.
    pub fn expand_with_meta(
        &self,
        base: &Path,
        files_only: bool,
    ) -> Result<Vec<(PathBuf, Option<Metadata>)>> {
        let start = base.join(&self.prefix);
        if let Matcher::Name(name) = &self.matcher {
            let mut out = Vec::new();
            let entries = match std::fs::read_dir(&start) {
                Ok(e) => e,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    return Ok(out)
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("Cannot read {}", start.display()))
                }
            };
            for entry in entries {
                let entry = entry?;
                let file_name = entry.file_name();
                if file_name == ".git" || !wildcard(name.as_bytes(), file_name.as_encoded_bytes()) {
                    continue;
                }
                if files_only && entry.file_type()?.is_dir() {
                    walk(base, &self.prefix.join(&file_name), &mut |rel, is_dir| {
                        if !is_dir {
                            out.push((rel.to_path_buf(), None));
                        }
                        true
                    })?;
                } else {
                    out.push((self.prefix.join(file_name), entry.metadata().ok()));
                }
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            return Ok(out);
        }
        let mut out: Vec<PathBuf> = Vec::new();
        let meta = match std::fs::symlink_metadata(&start) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("Cannot read {}", start.display())),
        };
        if matches!(self.matcher, Matcher::Literal) {
            if meta.is_dir() && files_only {
                walk(base, &self.prefix, &mut |rel, is_dir| {
                    if !is_dir {
                        out.push(rel.to_path_buf());
                    }
                    true
                })?;
            } else {
                out.push(self.prefix.clone());
            }
        } else if meta.is_dir() {
            walk(base, &self.prefix, &mut |rel, is_dir| {
                if self.is_match(rel) && !(is_dir && files_only) {
                    if is_dir {
                        out.push(rel.to_path_buf());
                        return false;
                    }
                    out.push(rel.to_path_buf());
                }
                true
            })?;
        }
        out.sort();
        Ok(out.into_iter().map(|p| (p, None)).collect())
    }
}

/// Walks `base/dir`, calling `visit(relative path, is_dir)`; returning false from a
/// directory skips its contents. `.git` is never entered.
fn walk(base: &Path, dir: &Path, visit: &mut dyn FnMut(&Path, bool) -> bool) -> Result<()> {
    crate::util::fs::walk(base, dir, &mut |rel, entry| {
        if entry.file_name() == ".git" {
            return Ok(false);
        }
        let is_dir = entry.file_type()?.is_dir();
        Ok(visit(rel, is_dir) && is_dir)
    })
}

/// Expands one pattern to files relative to `base`.
pub fn files(base: &Path, pattern: &str) -> Result<Vec<PathBuf>> {
    Pattern::new(pattern)?.expand(base, true)
}

/// Expands one pattern to files relative to `base`, with metadata where cheap.
pub fn files_with_meta(base: &Path, pattern: &str) -> Result<Vec<(PathBuf, Option<Metadata>)>> {
    Pattern::new(pattern)?.expand_with_meta(base, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_recursive_and_flat_globs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in [
            "src/a.c",
            "src/b.h",
            "src/sub/c.c",
            "inc/x/y.h",
            ".git/config",
        ] {
            std::fs::create_dir_all(root.join(f).parent().unwrap()).unwrap();
            std::fs::write(root.join(f), "x").unwrap();
        }
        let names = |p: &str| -> Vec<String> {
            files(root, p)
                .unwrap()
                .into_iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names("src/*.c"), vec!["src/a.c"]);
        assert_eq!(names("src/**/*.c"), vec!["src/a.c", "src/sub/c.c"]);
        assert_eq!(names("inc/**"), vec!["inc/x/y.h"]);
        assert_eq!(names("inc"), vec!["inc/x/y.h"]);
        assert_eq!(names("src/b.h"), vec!["src/b.h"]);
        assert!(names("missing/*.c").is_empty());
        assert!(names("**/config").is_empty());
        assert!(files(root, "../x").is_err());
        assert_eq!(names("src/?.c"), vec!["src/a.c"]);
        assert_eq!(names("*/*.c"), vec!["src/a.c"]);
        assert!(!names("*").iter().any(|n| n.starts_with(".git")));
    }

    #[test]
    fn wildcards_match_names() {
        assert!(wildcard(b"*.c", b"main.c"));
        assert!(!wildcard(b"*.c", b"main.h"));
        assert!(wildcard(b"a*b*c", b"aXXbYc"));
        assert!(!wildcard(b"a*b*c", b"aXXbY"));
        assert!(wildcard(b"?", b"x"));
        assert!(wildcard(b"*", b""));
        assert!(wildcard(b"f*", b"f"));
    }
}
