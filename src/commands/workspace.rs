//! The workspace a command works in: recipes, local cache and file hashes.

use anyhow::Result;

use crate::config::Config;
use crate::graph::hashes::FileHashes;
use crate::graph::{Graph, GraphOptions};
use crate::recipe::Recipes;
use crate::store::local::LocalCache;

/// A loaded workspace: recipes, local cache and file hashes.
pub struct Workspace {
    pub recipes: Recipes,
    pub cache: LocalCache,
    pub hashes: FileHashes,
}

impl Workspace {
    /// Finds the workspace around the current directory and opens the local cache.
    pub fn open(config: &Config) -> Result<Workspace> {
        Workspace::open_with(config, false)
    }

    /// [`Workspace::open`] for a look that changes nothing: the local cache is
    /// opened to read (nothing created, recorded or removed) and file hashes are not
    /// remembered.
    pub fn open_read_only(config: &Config) -> Result<Workspace> {
        Workspace::open_with(config, true)
    }

    fn open_with(config: &Config, read_only: bool) -> Result<Workspace> {
        let cwd = std::env::current_dir()?;
        let root = crate::recipe::find_root(&cwd)?;
        // The stat cache is read while the recipes are parsed: both take a while in
        // a large workspace. It lives in the cache directory, by its absolute path.
        let cachedir = std::path::absolute(&config.jolt.cachedir)
            .unwrap_or_else(|_| config.jolt.cachedir.clone());
        let (recipes, hashes) = std::thread::scope(|scope| {
            let hashes = scope.spawn(|| FileHashes::load(&cachedir, &root));
            let recipes = Recipes::load(&root);
            let hashes = hashes
                .join()
                .unwrap_or_else(|_| FileHashes::ephemeral(&root));
            (recipes, hashes)
        });
        let recipes = recipes?;
        if read_only {
            return Ok(Workspace {
                recipes,
                cache: LocalCache::read_only(&cachedir),
                hashes: hashes.forgetful(),
            });
        }
        let cache = LocalCache::from_config(&config.jolt)?;
        Ok(Workspace {
            recipes,
            cache,
            hashes,
        })
    }

    /// Builds the graph of `goals` and remembers the file hashes it computed.
    pub fn graph(&self, goals: &[String], opts: &GraphOptions) -> Result<Graph> {
        let graph = crate::graph::build(&self.recipes, &self.hashes, goals, opts)?;
        if let Err(e) = self.hashes.save() {
            crate::console::warn(&format!("{e:#}"));
        }
        Ok(graph)
    }
}
