//! A worker's workshop: where it builds the requests it serves. It keeps the local
//! cache, the recipe bundles it has parsed (fetched from the HTTP cache by digest,
//! parsed once, kept by size) and the workspace of the last request without a
//! source snapshot (built in again while it is as written); it rebuilds a request's
//! workspace, recomputes the identity, and lets the executor serve the goal. The
//! protocol around it (locks, replies, deliveries) is `mod.rs`'s.

use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::console;
use crate::executor::{self, Mode, Services, Status};
use crate::graph::hashes::FileHashes;
use crate::graph::GraphOptions;
use crate::recipe::Recipes;
use crate::remote::messages::{Missing, RecipeBundle, ReplyKind, Request, MAX_RECIPE_BUNDLE};
use crate::remote::shared;
use crate::store::http::HttpCache;
use crate::store::local::LocalCache;

/// Where a worker builds (see the module's documentation).
pub(super) struct Workshop {
    pub(super) cache: LocalCache,
    pub(super) http: HttpCache,
    /// Recipe bundles parsed, newest first.
    parsed: Mutex<Vec<Arc<Parsed>>>,
    /// The workspace of the last request without a source snapshot, kept for the
    /// next one of the same recipe bundle.
    kept: Mutex<Option<KeptWorkspace>>,
}

impl Drop for Workshop {
    fn drop(&mut self) {
        if let Some(k) = self.kept.get_mut().ok().and_then(|k| k.take()) {
            let _ = crate::util::fs::remove_dir_all(&k.dir);
        }
    }
}

/// A workspace kept between requests: a recipe bundle's files as written, and
/// nothing else. A request of the same bundle without a source snapshot is built in
/// it as it is, where a fresh directory cost a `mkdir`, the recipe files written, and
/// all of it deleted again: on ext4 deleting and allocating inodes at this rate is
/// much of a trivial task's cost. One that is not as written when the next request
/// comes (`Worker::intact`) is removed and a fresh one made.
pub(super) struct KeptWorkspace {
    dir: std::path::PathBuf,
    /// The digest of its recipe bundle.
    recipes: String,
    listing: Vec<Listed>,
}

/// What a workspace holds, to tell whether something changed it: the workspace
/// directory itself (path "") and each entry within, by path, inode, mode, size and
/// change time (which, unlike the modification time, no command can set back).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Listed {
    /// Relative to the workspace ("" for the workspace itself): the sort key.
    path: PathBuf,
    inode: u64,
    mode: u32,
    size: u64,
    /// Seconds and nanoseconds.
    changed: (i64, i64),
}

/// Lists `dir`, itself first, then what it holds, in a stable order.
pub(super) fn listing(dir: &Path) -> Result<Vec<Listed>> {
    use std::os::unix::fs::MetadataExt;
    let listed = |path: PathBuf, meta: &std::fs::Metadata| Listed {
        path,
        inode: meta.ino(),
        mode: meta.mode(),
        size: meta.len(),
        changed: (meta.ctime(), meta.ctime_nsec()),
    };
    let mut out = vec![listed(std::path::PathBuf::new(), &dir.symlink_metadata()?)];
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            let meta = path.symlink_metadata()?;
            if meta.is_dir() {
                pending.push(path.clone());
            }
            let rel = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
            out.push(listed(rel, &meta));
        }
    }
    out.sort();
    Ok(out)
}

/// A recipe bundle as a worker keeps it: its files, and their tasks as parsed.
pub(super) struct Parsed {
    digest: String,
    /// The recipe text it holds (its parsed tasks take about as much again).
    bytes: usize,
    recipes: Recipes,
}

/// At most how much recipe text the parsed bundles a worker keeps hold in all (their
/// parsed tasks take about as much again); the newest is kept whatever its size.
/// By size, not by count: a fleet serving ten workspaces fetched and parsed their
/// bundles again and again when a worker kept 8, though they took kilobytes.
pub(super) const PARSED_BYTES: usize = 8 << 20;

/// How many of the parsed bundles (their sizes, newest first) a worker keeps:
/// [`PARSED_BYTES`] in all, and always the newest.
pub(super) fn kept(sizes: impl Iterator<Item = usize>) -> usize {
    let mut total = 0;
    let n = sizes
        .take_while(|&bytes| {
            total += bytes;
            total <= PARSED_BYTES
        })
        .count();
    n.max(1)
}

/// Writes `text` to `path`, making its directory.
pub(super) fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    Ok(std::fs::write(path, text)?)
}

/// Removes every file and symlink under `ws` that is not in `keep` (paths relative
/// to `ws`), with what a kept symlink leads to inside `ws` kept too, as a source
/// snapshot holds it ([`crate::util::fs::with_link_targets`]); directories stay.
pub(super) fn keep_only(ws: &Path, keep: &[PathBuf]) -> Result<()> {
    let keep: HashSet<PathBuf> = crate::util::fs::with_link_targets(ws, keep)
        .into_iter()
        .collect();
    let mut extra = Vec::new();
    crate::util::fs::walk(ws, Path::new(""), &mut |rel, entry| {
        let kind = entry.file_type()?;
        if kind.is_dir() {
            return Ok(true);
        }
        if !keep.contains(rel) {
            extra.push(rel.to_path_buf());
        }
        Ok(false)
    })?;
    for rel in extra {
        console::debug(&format!("not in the task's identity: {}", rel.display()));
        std::fs::remove_file(ws.join(&rel))
            .with_context(|| format!("Cannot remove {}", ws.join(&rel).display()))?;
    }
    Ok(())
}

/// Whether a recipe path from a request stays inside the workspace.
pub(super) fn safe_relative(path: &str) -> bool {
    let p = Path::new(path);
    !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

pub(super) enum Outcome {
    /// A final reply of this kind, with the tail of the task's log and an error.
    Done {
        kind: ReplyKind,
        log: String,
        error: String,
    },
    /// The request's recipe bundle or source snapshot is not in the HTTP cache: an
    /// error reply that says so, for the client to store it again.
    Missing(Missing, String),
    /// Requirements no cache holds usable, by identity, and the error: the client
    /// builds them again ([`Missing::Requirements`]).
    RequirementsMissing(Vec<String>, String),
    Interrupted,
}

impl Outcome {
    /// An `error` reply saying `error`.
    fn error(error: String) -> Outcome {
        Outcome::Done {
            kind: ReplyKind::Error,
            log: String::new(),
            error,
        }
    }
}

/// A request's recipe bundle or source snapshot that the HTTP cache does not hold
/// (`remote::shared::Absent`: a trim took it, say), which the error reply names
/// ([`Reply::missing`]) so that the client stores it again.
#[derive(Debug)]
pub(super) struct Gone(Missing, anyhow::Error);

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.1)
    }
}

impl std::error::Error for Gone {}

/// `e` as a [`Gone`] `what` when it is an absent bundle or snapshot.
pub(super) fn gone(e: anyhow::Error, what: Missing) -> anyhow::Error {
    if shared::is_absent(&e) {
        Gone(what, e).into()
    } else {
        e
    }
}

impl Workshop {
    pub(super) fn new(cache: LocalCache, http: HttpCache) -> Workshop {
        Workshop {
            cache,
            http,
            parsed: Mutex::default(),
            kept: Mutex::default(),
        }
    }

    /// Rebuilds the client's workspace in `ws`: its recipe files, parsed, and the
    /// source snapshot.
    fn write_workspace(&self, request: &Request, ws: &Path, fresh: bool) -> Result<Recipes> {
        let recipes = self
            .recipes(&request.recipes, ws, fresh)
            .map_err(|e| gone(e, Missing::Recipes))?;
        if let Some(digest) = &request.snapshot {
            shared::fetch_snapshot(&self.http, digest, ws)
                .map_err(|e| gone(e, Missing::Snapshot))?;
        }
        Ok(recipes)
    }

    /// The recipe bundle `digest`, if this worker keeps it parsed.
    fn parsed(&self, digest: &str) -> Option<Arc<Parsed>> {
        let parsed = self.parsed.lock().expect("parsed");
        parsed.iter().find(|p| p.digest == digest).cloned()
    }

    /// The recipe bundle `digest`, written into `ws` and parsed. A bundle is fetched
    /// from the HTTP cache and parsed once; the newest stay in memory (at most
    /// [`PARSED_BYTES`] of recipe text, the newest always), so the next
    /// requests from one workspace cost neither a download nor a parse.
    fn recipes(&self, digest: &str, ws: &Path, write: bool) -> Result<Recipes> {
        if let Some(p) = self.parsed(digest) {
            if write {
                for file in p.recipes.files.iter() {
                    write_file(&ws.join(&file.path), &file.text)?;
                }
            }
            return Ok(p.recipes.rooted(ws));
        }
        let bytes = shared::fetch_recipes(&self.http, digest, MAX_RECIPE_BUNDLE)?;
        let texts = RecipeBundle::files(digest, &bytes)?;
        if let Some(bad) = texts.iter().find(|t| !safe_relative(&t.path)) {
            bail!("recipe path '{}' leaves the workspace", bad.path);
        }
        for recipe in &texts {
            write_file(&ws.join(&recipe.path), &recipe.text)?;
        }
        let recipes = Recipes::load(ws)?;
        let mut parsed = self.parsed.lock().expect("parsed");
        parsed.retain(|p| p.digest != digest);
        parsed.insert(
            0,
            Arc::new(Parsed {
                digest: digest.to_string(),
                bytes: recipes.files.iter().map(|f| f.text.len()).sum(),
                recipes: recipes.rooted(ws),
            }),
        );
        let keep = kept(parsed.iter().map(|p| p.bytes));
        parsed.truncate(keep);
        Ok(recipes)
    }

    pub(super) fn build(&self, request: &Request) -> Outcome {
        // An archive this worker found unusable for an earlier request may have been
        // replaced since: each request looks afresh.
        self.http.forget_rejections();
        let reusable = request.snapshot.is_none();
        let (ws, mut listed) = match self.workspace(request) {
            Ok(ws) => ws,
            Err(e) => return Outcome::error(format!("{e:#}")),
        };
        let fresh = listed.is_none();
        // A panic is a bug; it must end in an error reply, not in a dead worker.
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let recipes = self.write_workspace(request, &ws, fresh)?;
            if fresh && reusable {
                listed = listing(&ws).ok();
            }
            self.build_in(request, &ws, recipes)
        }))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("internal error: the worker panicked")));
        let outcome = built.unwrap_or_else(|e| {
            if crate::store::http::is_unreachable(&e) {
                // Fetching the recipes or the snapshot found the cache down: hold the
                // next requests until it answers (`wait_for_cache`).
                self.http.mark_down();
            }
            console::error(&format!("{e:#}"));
            match e.downcast_ref::<Gone>() {
                Some(Gone(what, _)) => Outcome::Missing(*what, format!("{e:#}")),
                None => Outcome::error(format!("{e:#}")),
            }
        });
        // Kept for the next request of its bundle, which checks it is as written.
        match listed {
            Some(listing) if reusable => {
                *self.kept.lock().expect("kept") = Some(KeptWorkspace {
                    dir: ws,
                    recipes: request.recipes.clone(),
                    listing,
                });
            }
            _ => {
                let _ = crate::util::fs::remove_dir_all(&ws);
            }
        }
        outcome
    }

    /// The workspace to build `request` in, with its listing when it is the kept one
    /// (moved under a new name): a request without a source snapshot uses the kept
    /// workspace of its recipe bundle if it is as written; anything else gets a
    /// fresh one.
    fn workspace(&self, request: &Request) -> Result<(std::path::PathBuf, Option<Vec<Listed>>)> {
        let kept = self.kept.lock().expect("kept").take();
        if let Some(k) = kept {
            let fits = request.snapshot.is_none() && k.recipes == request.recipes;
            // A new name for each request: a process an earlier build left running
            // (one that left its process group) and that writes by the old path,
            // `{root}`, does not reach this one.
            let renamed = self.cache.scratch_name("ws");
            if fits && self.intact(&k) && std::fs::rename(&k.dir, &renamed).is_ok() {
                if let Ok(listed) = listing(&renamed) {
                    return Ok((renamed, Some(listed)));
                }
                let _ = crate::util::fs::remove_dir_all(&renamed);
            }
            let _ = crate::util::fs::remove_dir_all(&k.dir);
        }
        Ok((self.cache.scratch("ws")?, None))
    }

    /// Whether the kept workspace `k` is as it was written: the same entries (path,
    /// inode, kind, size, change time), and each recipe file's text that of its
    /// bundle, read back (a change time is as coarse as the kernel's tick).
    fn intact(&self, k: &KeptWorkspace) -> bool {
        let Some(bundle) = self.parsed(&k.recipes) else {
            return false;
        };
        listing(&k.dir).is_ok_and(|now| now == k.listing)
            && bundle.recipes.files.iter().all(|file| {
                std::fs::read(k.dir.join(&file.path)).is_ok_and(|text| text == file.text.as_bytes())
            })
    }

    fn build_in(&self, request: &Request, ws: &Path, recipes: Recipes) -> Result<Outcome> {
        let hashes = FileHashes::ephemeral(ws);
        let opts = GraphOptions {
            taints: request
                .taints
                .clone()
                .into_iter()
                .collect::<HashMap<_, _>>(),
            pins: request.pins.clone().into_iter().collect::<HashMap<_, _>>(),
            env: Some(request.env.clone()),
            commits: request
                .commits
                .clone()
                .into_iter()
                .collect::<HashMap<_, _>>(),
            ..Default::default()
        };
        let graph = crate::graph::build(
            &recipes,
            &hashes,
            std::slice::from_ref(&request.reference),
            &opts,
        )?;
        let goal = graph.requested[0];
        let node = &graph.nodes[goal];
        if request.replace {
            // The client found the cache's archive unusable: do not serve it, replace it.
            self.http.reject(node.name(), &node.identity);
        }
        if node.identity != request.identity {
            bail!(
                "identity mismatch for {}: the client computed {}, this worker {}; do client and worker run the same jolt, recipes and sources?",
                request.reference,
                request.identity,
                node.identity
            );
        }
        if request.snapshot.is_some() {
            // The task sees only what its identity covers: its recipes and influence
            // files (a snapshot may hold more: anyone can upload one).
            let keep: Vec<PathBuf> = recipes
                .files
                .iter()
                .map(|f| f.path.clone())
                .chain(node.files.iter().map(|f| f.path.clone()))
                .collect();
            keep_only(ws, &keep)?;
        }
        let services = Services {
            cache: &self.cache,
            http: Some(&self.http),
        };
        let opts = executor::Options {
            jobs: 1,
            keep_going: false,
            mode: Mode::Worker,
            dry_run: false,
            explain: false,
            goals_absent: !request.replace,
        };
        let report = executor::run(&graph, &services, ws, &opts);
        // What this request used may be evicted once it is done: a worker's cache
        // must keep to jolt.cachesize over months, not grow with every artifact.
        self.cache.forget_uses();
        let report = report?;
        if report.interrupted {
            return Ok(Outcome::Interrupted);
        }
        // A cacheable requirement fails on a worker only when no cache holds it
        // usable (it is never built here): a miss, which the client builds again.
        let missing: Vec<usize> = (0..graph.nodes.len())
            .filter(|&i| {
                i != goal && graph.nodes[i].task.cacheable && report.status[i] == Status::Failed
            })
            .collect();
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|&i| graph.nodes[i].label()).collect();
            return Ok(Outcome::RequirementsMissing(
                missing
                    .iter()
                    .map(|&i| graph.nodes[i].identity.clone())
                    .collect(),
                format!("the HTTP cache does not hold {}", names.join(", ")),
            ));
        }
        let failed = (0..graph.nodes.len()).find(|&i| {
            matches!(
                report.status[i],
                Status::Failed | Status::Unstable | Status::Blocked
            )
        });
        Ok(match failed {
            // The goal's output goes back with the reply, replayed by the client.
            None if !report.failed() => {
                let output = report.logs[goal].clone().unwrap_or_default();
                Outcome::Done {
                    kind: ReplyKind::Success,
                    log: output,
                    error: String::new(),
                }
            }
            None => Outcome::Done {
                kind: ReplyKind::Failed,
                log: String::new(),
                error: "the task did not run".into(),
            },
            Some(i) => {
                let error = if i == goal {
                    "the task failed".to_string()
                } else {
                    format!("requirement {} is unavailable", graph.nodes[i].label())
                };
                Outcome::Done {
                    kind: ReplyKind::Failed,
                    log: report.logs[i].clone().unwrap_or_default(),
                    error,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workspace_keeps_only_what_the_identity_covers() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        for f in [
            "jolt.toml",
            "Makefile",
            "local.mk",
            "src/a.c",
            "src/b.c",
            "data/real",
        ] {
            write_file(&ws.join(f), "x").unwrap();
        }
        std::os::unix::fs::symlink("../data/real", ws.join("src/link")).unwrap();
        std::os::unix::fs::symlink("real", ws.join("data/other-link")).unwrap();
        let keep: Vec<PathBuf> = ["jolt.toml", "Makefile", "src/a.c", "src/link"]
            .iter()
            .map(PathBuf::from)
            .collect();
        keep_only(ws, &keep).unwrap();
        let mut left = Vec::new();
        crate::util::fs::walk(ws, Path::new(""), &mut |rel, e| {
            if !e.file_type()?.is_dir() {
                left.push(rel.display().to_string());
            }
            Ok(true)
        })
        .unwrap();
        left.sort();
        // What a kept symlink leads to stays; anything else the snapshot held goes.
        assert_eq!(
            left,
            ["Makefile", "data/real", "jolt.toml", "src/a.c", "src/link"]
        );
    }

    #[test]
    fn kept_bundles_are_bounded_by_size_not_count() {
        // Regression (issue 25): at most 8 were kept, however small.
        assert_eq!(kept([1000; 200].into_iter()), 200);
        // Four bundles of 3 MiB: two fit in 8 MiB.
        assert_eq!(kept([3 << 20; 4].into_iter()), 2);
        // The newest is kept, however large.
        assert_eq!(kept([30 << 20, 1].into_iter()), 1);
        assert_eq!(kept(std::iter::empty()), 1);
    }
}
