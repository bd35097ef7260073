//! The commands: each turns its resolved arguments into calls of the domain modules.

mod build;
mod maintain;
mod query;
pub mod worker;
mod workspace;

use anyhow::Result;

use crate::cli::{Cli, Cmd};
use crate::config::Layers;
use crate::error::Exit;

/// Runs the parsed command line; returns the exit code.
pub fn dispatch(cli: Cli) -> Result<Exit> {
    if matches!(cli.command, Some(Cmd::AmqpWorker)) {
        crate::interrupt::install_worker();
    } else {
        crate::interrupt::install();
    }
    if matches!(
        cli.command,
        None | Some(Cmd::Build(_)) | Some(Cmd::AmqpWorker)
    ) {
        crate::interrupt::ignore_terminal_stops();
        // Before any thread starts: these commands run tasks.
        crate::executor::guardian::start();
        crate::executor::process::reap_orphans_if_init();
    }
    // The passwords first, so that the run log's command line (`-c amqp.host=...`)
    // shows none.
    let layers = Layers::load(&cli.config);
    if let Ok(layers) = &layers {
        layers.register_secrets();
    }
    if matches!(cli.command, None | Some(Cmd::Build(_))) {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if let Err(why) = crate::runlog::start(&args) {
            crate::console::debug(&why);
        }
    }
    let layers = layers?;
    // The settings, every key checked, for the commands that read any; `config` shows
    // and changes the layers as written, even values no command would run with: that
    // is how they are fixed.
    let config = || layers.settings();
    match cli.command {
        None => build::run(&config()?, crate::cli::BuildArgs::default()),
        Some(Cmd::Build(args)) => build::run(&config()?, args),
        Some(Cmd::AmqpWorker) => crate::commands::worker::run(&config()?),
        Some(Cmd::Download(args)) => build::download(&config()?, args),
        Some(Cmd::Cache(crate::cli::CacheCmd::Trim(args))) => maintain::trim(args),
        Some(Cmd::Clean(args)) => maintain::clean(&config()?, args),
        Some(Cmd::Config(args)) => maintain::config(&layers, args),
        Some(Cmd::List(args)) => query::list(&config()?, args),
        Some(Cmd::Inspect(args)) => query::inspect(&config()?, args),
        Some(Cmd::Display(args)) => query::display(&config()?, args),
        Some(Cmd::Log(args)) => query::log(args),
        Some(Cmd::Status(args)) => query::status(&config()?, args),
        Some(Cmd::Completions(args)) => query::completions(args),
    }
}
