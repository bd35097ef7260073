//! The commands: each turns its resolved arguments into calls of the domain modules.

mod build;
mod maintain;
mod query;

use anyhow::Result;
use std::path::PathBuf;

use crate::cache::Cache;
use crate::cli::{Cli, Cmd};
use crate::config::Config;
use crate::error;
use crate::graph::{Graph, GraphOptions};
use crate::hashcache::FileHashes;
use crate::recipe::Recipes;

/// Default `jolt.cachesize`.
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;

/// Runs the parsed command line; returns the exit code.
pub fn dispatch(cli: Cli) -> Result<i32> {
    if matches!(cli.command, Some(Cmd::AmqpWorker)) {
        crate::interrupt::install_worker();
    } else {
        crate::interrupt::install();
    }
    if matches!(
        cli.command,
        None | Some(Cmd::Build(_)) | Some(Cmd::AmqpWorker)
    ) {
        // Before any thread starts: these commands run tasks.
        crate::guardian::start();
    }
    let config = Config::load(&cli.config)?;
    config.register_secrets();
    match cli.command {
        None => {
            let default = config
                .get("jolt.default")
                .unwrap_or_else(|| "default".into());
            build::run(
                &config,
                crate::cli::BuildArgs {
                    tasks: vec![default],
                    ..Default::default()
                },
            )
        }
        Some(Cmd::Build(args)) => build::run(&config, args),
        Some(Cmd::AmqpWorker) => crate::worker::run(&config),
        Some(Cmd::Download(args)) => build::download(&config, args),
        Some(Cmd::Clean(args)) => maintain::clean(&config, args),
        Some(Cmd::Config(args)) => maintain::config(&config, args),
        Some(Cmd::List(args)) => query::list(&config, args),
        Some(Cmd::Inspect(args)) => query::inspect(&config, args),
        Some(Cmd::Display(args)) => query::display(&config, args),
    }
}

/// A loaded workspace: recipes, local cache and file hashes.
pub struct Workspace {
    pub recipes: Recipes,
    pub cache: Cache,
    pub hashes: FileHashes,
}

impl Workspace {
    /// Finds the workspace around the current directory and opens the local cache.
    pub fn open(config: &Config) -> Result<Workspace> {
        let cwd = std::env::current_dir()?;
        let root = crate::recipe::find_root(&cwd)?;
        let recipes = Recipes::load(&root)?;
        let cache = open_cache(config)?;
        let hashes = FileHashes::load(&cache.root, &root);
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

/// Opens the local cache named by the configuration.
pub fn open_cache(config: &Config) -> Result<Cache> {
    let dir: PathBuf = config.cachedir();
    let limit = config
        .get_size("jolt.cachesize")?
        .unwrap_or(DEFAULT_CACHE_SIZE);
    Cache::open(&dir, limit).map_err(|e| {
        anyhow::Error::from(error::Coded {
            code: error::USAGE,
            message: format!("Cannot use the local cache {}: {e:#}", dir.display()),
        })
    })
}
