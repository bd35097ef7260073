//! The command line, as clap sees it. Nothing here knows how commands work: `lib.rs`
//! turns these structs into calls of the command modules.

use clap::{
    Arg, ArgAction, Args, Command, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum,
};
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "jolt",
    version,
    about = "A build and task executor with shared artifact caches"
)]
pub struct Cli {
    /// A config file, or a `section.key=value` override (repeatable)
    #[arg(short = 'c', long = "config", value_name = "FILE|KEY=VALUE")]
    pub config: Vec<String>,
    /// More output (-vv for debug output)
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Colour warnings, errors and finished lines: auto (on a terminal, unless
    /// NO_COLOR is set), always, never
    #[arg(long, global = true, value_enum, value_name = "WHEN", default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

/// The ids under which a subcommand holds its own `-c` and `-v`.
const SUB_CONFIG: &str = "sub_config";
const SUB_VERBOSE: &str = "sub_verbose";

impl Cli {
    /// The command line as clap sees it: `-c` and `-v` are accepted before and after
    /// the subcommand, and their occurrences add up in order.
    ///
    /// They are not clap `global` arguments: clap keeps a global argument's values
    /// from the last level that has any, so `jolt -c a.toml build -c k=v` lost
    /// `a.toml` (and `-v build -v` counted 1). Each subcommand gets arguments of its
    /// own instead, read after the top level's.
    pub fn command_line() -> Command {
        fn with_own(command: Command) -> Command {
            command
                .arg(
                    Arg::new(SUB_CONFIG)
                        .short('c')
                        .long("config")
                        .value_name("FILE|KEY=VALUE")
                        .action(ArgAction::Append)
                        .help("A config file, or a `section.key=value` override (repeatable)"),
                )
                .arg(
                    Arg::new(SUB_VERBOSE)
                        .short('v')
                        .long("verbose")
                        .action(ArgAction::Count)
                        .help("More output (-vv for debug output)"),
                )
                .mut_subcommands(with_own)
        }
        Self::command().mut_subcommands(with_own)
    }

    /// Parses arguments (the program's name first), as [`Cli::command_line`] says.
    pub fn parse_args(
        args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
    ) -> Result<Cli, clap::Error> {
        let matches = Self::command_line().try_get_matches_from(args)?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        let mut level = matches.subcommand();
        while let Some((_, sub)) = level {
            if let Some(values) = sub.get_many::<String>(SUB_CONFIG) {
                cli.config.extend(values.cloned());
            }
            cli.verbose = cli.verbose.saturating_add(sub.get_count(SUB_VERBOSE));
            level = sub.subcommand();
        }
        Ok(cli)
    }
}

/// When the console uses colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum ColorChoice {
    #[default]
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Build tasks and their requirements
    Build(BuildArgs),
    /// Run a network worker that executes requests from the broker
    #[command(name = "amqp-worker")]
    AmqpWorker,
    /// Remove artifacts from the local cache
    Clean(CleanArgs),
    /// Get or set configuration values
    Config(ConfigArgs),
    /// List tasks, or the requirements of a task
    List(ListArgs),
    /// Show what jolt knows about a task
    #[command(alias = "info")]
    Inspect(InspectArgs),
    /// Print the dependency tree of a task
    Display(DisplayArgs),
    /// Fetch artifacts from the HTTP cache without building
    Download(DownloadArgs),
    /// Maintain the HTTP cache's storage
    #[command(subcommand)]
    Cache(CacheCmd),
    /// Print the log of the last build (every line, whatever the verbosity)
    Log(LogArgs),
    /// For each pool, the requests waiting in the broker and the workers consuming
    Status(StatusArgs),
    /// Print a completion script for a shell: commands, flags and the workspace's
    /// task names (bash: `source <(jolt completions bash)`)
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: CompletionShell,
}

/// The shells `jolt completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Pools (routing keys) to show (default: amqp.routing_key and every routing key
    /// of the workspace's tasks)
    #[arg(value_name = "POOL")]
    pub pools: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// List the runs kept instead: log file and command line, oldest first
    #[arg(short, long)]
    pub list: bool,
}

#[derive(Debug, Subcommand)]
pub enum CacheCmd {
    /// Trim a directory the HTTP cache serves to a size, least recently used first
    Trim(TrimArgs),
}

#[derive(Debug, Args)]
pub struct TrimArgs {
    /// The directory nginx serves the cache from (its root for http.uri)
    pub dir: PathBuf,
    /// The size to trim to, e.g. 500G
    #[arg(long, value_name = "SIZE")]
    pub max_size: String,
    /// Keep running and trim every DURATION (e.g. 10m), as a sidecar
    #[arg(long, value_name = "DURATION")]
    pub every: Option<String>,
}

#[derive(Debug, Args, Default)]
pub struct BuildArgs {
    /// Tasks to build: name or name:param=value,... (default: the task jolt.default
    /// names, `default` unless configured)
    #[arg(value_name = "TASK")]
    pub tasks: Vec<String>,
    /// Number of tasks to run at once (default: number of CPUs)
    #[arg(short, long)]
    pub jobs: Option<usize>,
    /// Run tasks on network workers
    #[arg(short, long)]
    pub network: bool,
    /// Rebuild the goals even if cached
    #[arg(short, long)]
    pub force: bool,
    /// Salt every task's identity
    #[arg(short, long)]
    pub salt: Option<String>,
    /// Say why each task that executes does: its influence lines that differ from its
    /// newest artifact with the same parameters in the local cache
    #[arg(long)]
    pub explain: bool,
    /// Say what would happen to each task (cached, download, execute, remote, skip)
    /// without running anything or writing to any cache
    #[arg(long)]
    pub dry_run: bool,
    /// Keep building independent tasks after a failure
    #[arg(short, long)]
    pub keep_going: bool,
    /// Copy the goals' artifacts into this directory
    #[arg(long, value_name = "DIR")]
    pub copy: Option<PathBuf>,
    /// Do not download artifacts from the HTTP cache
    #[arg(long)]
    pub no_download: bool,
    /// Do not upload artifacts to the HTTP cache
    #[arg(long)]
    pub no_upload: bool,
    /// Write a JSON report of every task to FILE
    #[arg(long, value_name = "FILE")]
    pub result: Option<PathBuf>,
    /// Write a Chrome trace (Perfetto, chrome://tracing) of the build to FILE: one
    /// lane per local slot or remote worker, an event per executed, downloaded or
    /// uploaded task
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CleanArgs {
    /// Tasks whose artifacts to remove (default: every artifact)
    #[arg(value_name = "TASK")]
    pub tasks: Vec<String>,
    /// Also remove the artifacts of the tasks' requirements
    #[arg(short, long)]
    pub deps: bool,
    /// Only remove artifacts whose expiry policy allows it
    #[arg(short, long)]
    pub expired: bool,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// section.key
    pub key: Option<String>,
    /// New value
    pub value: Option<String>,
    /// List all values
    #[arg(short, long)]
    pub list: bool,
    /// Delete the key
    #[arg(short, long)]
    pub delete: bool,
    /// Use the system-wide file /etc/jolt/config.toml
    #[arg(short, long)]
    pub global: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    pub task: Option<String>,
    /// All requirements, transitively
    #[arg(short, long)]
    pub all: bool,
    /// Task names only, one a line (for shell completion)
    #[arg(long, hide = true)]
    pub names: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    pub task: String,
    /// Print the influence lines behind the identity
    #[arg(short, long)]
    pub influence: bool,
    /// Salt, as for build -s
    #[arg(short, long)]
    pub salt: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum DisplayFormat {
    #[default]
    Tree,
    Dot,
}

#[derive(Debug, Args)]
pub struct DisplayArgs {
    #[arg(required = true)]
    pub tasks: Vec<String>,
    /// Output format
    #[arg(long, value_enum, default_value_t = DisplayFormat::Tree)]
    pub format: DisplayFormat,
    /// Show each subtree only once
    #[arg(short, long)]
    pub prune: bool,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    #[arg(required = true)]
    pub tasks: Vec<String>,
    /// Copy the artifacts into this directory
    #[arg(long, value_name = "DIR")]
    pub copy: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_verbose_add_up_across_the_subcommand() {
        let cli = Cli::parse_args([
            "jolt", "-c", "a.toml", "-v", "build", "-c", "k=v", "-v", "t", "--config", "b",
        ])
        .unwrap();
        assert_eq!(cli.config, ["a.toml", "k=v", "b"]);
        assert_eq!(cli.verbose, 2);
        let cli =
            Cli::parse_args(["jolt", "cache", "trim", "-c", "x", "d", "--max-size", "1G"]).unwrap();
        assert_eq!(cli.config, ["x"]);
        let cli = Cli::parse_args(["jolt", "-c", "only", "amqp-worker"]).unwrap();
        assert_eq!(cli.config, ["only"]);
        assert!(matches!(cli.command, Some(Cmd::AmqpWorker)));
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command_line().debug_assert();
    }
}
