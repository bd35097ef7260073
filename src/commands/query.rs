//! `list`, `inspect` and `display`: read-only views of recipes, graph and cache.

use anyhow::{Context, Result};
use std::collections::BTreeSet;

use super::workspace::Workspace;
use crate::cli::{DisplayArgs, DisplayFormat, InspectArgs, ListArgs};
use crate::config::Config;
use crate::console;
use crate::error::Exit;
use crate::graph::hashes::FileHashes;
use crate::graph::Resolved;
use crate::graph::{Graph, GraphOptions, Node};
use crate::recipe::Recipes;
use crate::store::http::HttpCache;
use crate::util::secrets::masked_url;

pub fn list(_config: &Config, args: ListArgs) -> Result<Exit> {
    let root = crate::recipe::find_root(&std::env::current_dir()?)?;
    let recipes = Recipes::load(&root)?;
    match args.task {
        None if args.names => {
            for name in recipes.tasks.keys() {
                console::print(name);
            }
        }
        None => {
            let width = recipes.tasks.keys().map(|k| k.len()).max().unwrap_or(0);
            for (name, task) in recipes.tasks.iter() {
                match &task.def.description {
                    Some(d) => console::print(&format!("{name:<width$}  {d}")),
                    None => console::print(name),
                }
            }
        }
        Some(task) => {
            let hashes = FileHashes::ephemeral(&recipes.root);
            let graph = crate::graph::build(&recipes, &hashes, &[task], &GraphOptions::default())?;
            let top = graph.requested[0];
            let names: BTreeSet<&str> = if args.all {
                graph
                    .closure(&[top])
                    .into_iter()
                    .filter(|&i| i != top)
                    .map(|i| graph.nodes[i].short.as_str())
                    .collect()
            } else {
                graph.nodes[top]
                    .deps
                    .iter()
                    .map(|&i| graph.nodes[i].short.as_str())
                    .collect()
            };
            for name in names {
                console::print(name);
            }
        }
    }
    Ok(Exit::Success)
}

pub fn inspect(config: &Config, args: InspectArgs) -> Result<Exit> {
    let ws = Workspace::open(config)?;
    let graph = ws.graph(
        std::slice::from_ref(&args.task),
        &GraphOptions {
            salt: args.salt,
            ..Default::default()
        },
    )?;
    let node = &graph.nodes[graph.requested[0]];
    let mut out = vec![node.short.clone()];
    if let Some(d) = &node.task.def.description {
        out.push(format!("  {d}"));
    }
    out.push(String::new());
    describe_definition(&graph, node, &mut out);
    describe_cache(config, &ws, node, &mut out)?;
    if args.influence {
        out.push("Influence".into());
        for line in &node.influence {
            out.push(format!("  {line}"));
        }
    }
    for line in out {
        console::print(&line);
    }
    Ok(Exit::Success)
}

/// The parameters, requirements and definition sections of `inspect`.
fn describe_definition(graph: &Graph, node: &Node, out: &mut Vec<String>) {
    let task = &node.task;
    out.push("Parameters".into());
    if task.params.is_empty() {
        out.push("  None".into());
    }
    for (name, p) in &task.params {
        let help = p
            .help
            .as_deref()
            .map(|h| format!("{h} "))
            .unwrap_or_default();
        out.push(format!(
            "  {name:<16}  {help}{} = {}",
            p.describe(),
            node.params[name]
        ));
    }
    out.push("Requirements".into());
    if node.deps.is_empty() {
        out.push("  None".into());
    }
    for &d in &node.deps {
        out.push(format!("  {}", graph.nodes[d].short));
    }
    out.push("Definition".into());
    out.push(format!(
        "  File              {}{}",
        task.file.display(),
        task.line.map(|l| format!(" ({l})")).unwrap_or_default()
    ));
    out.push(format!("  Kind              {}", task.kind.name()));
    match &node.source {
        Some(Resolved::Git { url, commit, .. }) => out.push(format!(
            "  Source            {} at {commit}",
            masked_url(url)
        )),
        Some(Resolved::Download { urls, sha256, .. }) => out.push(format!(
            "  Source            {} (sha256 {sha256})",
            urls.iter()
                .map(|u| masked_url(u))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => {}
    }
}

/// The cache section of `inspect`: identity, and presence in both caches.
fn describe_cache(
    config: &Config,
    ws: &Workspace,
    node: &Node,
    out: &mut Vec<String>,
) -> Result<()> {
    out.push("Cache".into());
    out.push(format!("  Identity          {}", node.identity));
    if !node.task.cacheable {
        out.push("  Local             not cacheable".into());
        return Ok(());
    }
    let dir = ws.cache.artifact_dir(node.name(), &node.identity);
    let present = ws.cache.is_present(node.name(), &node.identity);
    out.push(format!("  Location          {}", dir.display()));
    out.push(format!(
        "  Local             {}",
        if present { "True" } else { "False" }
    ));
    if let Some(http) = HttpCache::from_config(config, false, true)? {
        let remote = match http.exists(node.name(), &node.identity) {
            Ok(true) => "True".to_string(),
            Ok(false) => "False".to_string(),
            Err(e) => format!("unknown ({e:#})"),
        };
        out.push(format!("  Remote            {remote}"));
        out.push(format!(
            "  URL               {}",
            http.url(node.name(), &node.identity)
        ));
    }
    Ok(())
}

pub fn display(_config: &Config, args: DisplayArgs) -> Result<Exit> {
    let root = crate::recipe::find_root(&std::env::current_dir()?)?;
    let recipes = Recipes::load(&root)?;
    let hashes = FileHashes::ephemeral(&root);
    let graph = crate::graph::build(&recipes, &hashes, &args.tasks, &GraphOptions::default())?;
    match args.format {
        DisplayFormat::Tree => {
            let mut printed = BTreeSet::new();
            for &g in &graph.requested {
                console::print(&graph.nodes[g].short);
                tree(&graph, g, "", args.prune, &mut printed);
            }
        }
        DisplayFormat::Dot => {
            console::print("digraph jolt {");
            for i in graph.closure(&graph.requested) {
                let n = &graph.nodes[i];
                console::print(&format!("  \"{}\";", n.short));
                for &d in &n.deps {
                    console::print(&format!(
                        "  \"{}\" -> \"{}\";",
                        n.short, graph.nodes[d].short
                    ));
                }
            }
            console::print("}");
        }
    }
    Ok(Exit::Success)
}

fn tree(graph: &Graph, i: usize, indent: &str, prune: bool, printed: &mut BTreeSet<usize>) {
    printed.insert(i);
    let deps = &graph.nodes[i].deps;
    for (k, &d) in deps.iter().enumerate() {
        let last = k + 1 == deps.len();
        let (branch, cont) = if last {
            ("└╴", "  ")
        } else {
            ("├╴", "│ ")
        };
        let name = &graph.nodes[d].short;
        if prune && printed.contains(&d) {
            console::print(&format!("{indent}{branch}[{name}]"));
            continue;
        }
        console::print(&format!("{indent}{branch}{name}"));
        tree(graph, d, &format!("{indent}{cont}"), prune, printed);
    }
}

/// `jolt log`: the last run's log, or (`-l`) the runs kept.
pub fn log(args: crate::cli::LogArgs) -> Result<Exit> {
    let runs = crate::runlog::runs();
    if args.list {
        for run in &runs {
            // Its first line only: a run's log may hold a task's millions of lines.
            let mut command = String::new();
            if let Ok(file) = std::fs::File::open(run) {
                let _ =
                    std::io::BufRead::read_line(&mut std::io::BufReader::new(file), &mut command);
            }
            console::print(&format!("{}  {}", run.display(), command.trim_end()));
        }
        return Ok(Exit::Success);
    }
    let Some(last) = runs.last() else {
        return Err(crate::error::usage(format!(
            "No build has been logged yet (logs go to {})",
            crate::runlog::dir().display()
        )));
    };
    let text =
        std::fs::read_to_string(last).with_context(|| format!("Cannot read {}", last.display()))?;
    console::print(text.trim_end_matches('\n'));
    Ok(Exit::Success)
}

/// `jolt status`: for each pool, the requests waiting and the workers consuming, as
/// the broker counts them (a passive declare: nothing is created).
pub fn status(config: &Config, args: crate::cli::StatusArgs) -> Result<Exit> {
    use crate::remote::amqp::Pool;
    let settings = config.amqp.clone();
    let mut pools: BTreeSet<String> = args.pools.into_iter().collect();
    if pools.is_empty() {
        pools.insert(settings.routing_key.clone());
        // In a workspace, the pools its tasks name too.
        let root = std::env::current_dir()
            .ok()
            .and_then(|cwd| crate::recipe::find_root(&cwd).ok());
        if let Some(recipes) = root.and_then(|r| Recipes::load(&r).ok()) {
            pools.extend(
                recipes
                    .tasks
                    .values()
                    .filter_map(|t| t.def.routing_key.clone()),
            );
        }
    }
    let crate::remote::amqp::Connected {
        mut connection,
        broker,
    } = settings
        .connect()
        .map_err(|e| crate::error::infra(format!("{e:#}")))?;
    // Verbose: what `status` prints is its pools, which scripts read.
    console::verbose(&format!("Connected to the broker {broker}"));
    for pool in &pools {
        let queue = crate::remote::amqp::task_queue(pool);
        let line = match settings.pool(&mut connection, pool)? {
            Pool::Counted(c) => format!(
                "pool {pool} (queue {queue}): {} requests waiting, {} workers consuming",
                c.waiting, c.consumers
            ),
            Pool::Missing => format!(
                "pool {pool} (queue {queue}): no queue yet (no request sent, no worker started)"
            ),
            Pool::Unavailable(why) => {
                format!("pool {pool} (queue {queue}): unavailable, the broker says: {why}")
            }
        };
        console::print(&line);
    }
    let _ = connection.close();
    Ok(Exit::Success)
}

/// The commands whose arguments are task names.
const TASK_COMMANDS: &str = "build inspect info display download clean list";

/// `jolt completions SHELL`: clap's script for commands and flags, and a few lines
/// of our own that complete task names from `jolt list --names` in the workspace the
/// shell is in.
pub fn completions(args: crate::cli::CompletionsArgs) -> Result<Exit> {
    use crate::cli::CompletionShell;
    let mut command = crate::cli::Cli::command_line();
    let mut script = Vec::new();
    let shell = match args.shell {
        CompletionShell::Bash | CompletionShell::Zsh => clap_complete::Shell::Bash,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut command, "jolt", &mut script);
    let mut script = String::from_utf8_lossy(&script).into_owned();
    match args.shell {
        CompletionShell::Bash | CompletionShell::Zsh => {
            if args.shell == CompletionShell::Zsh {
                // zsh runs the bash script through its bash compatibility.
                script.insert_str(0, "autoload -U +X bashcompinit && bashcompinit\n");
            }
            script.push_str(&format!(
                r#"
_jolt_tasks() {{
    _jolt "$@"
    local cur="${{COMP_WORDS[COMP_CWORD]}}" sub="" w i
    [[ "$cur" == -* ]] && return
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case "$w" in
            -c|--config) ((i++)) ;;
            -*) ;;
            *) sub="$w"; break ;;
        esac
    done
    case " {TASK_COMMANDS} " in
        *" $sub "*) COMPREPLY+=($(compgen -W "$(jolt list --names 2>/dev/null)" -- "$cur")) ;;
    esac
}}
complete -F _jolt_tasks -o bashdefault -o default jolt
"#
            ));
        }
        CompletionShell::Fish => {
            script.push_str(&format!(
                "complete -c jolt -n '__fish_seen_subcommand_from {TASK_COMMANDS}' -f -a '(jolt list --names 2>/dev/null)'\n"
            ));
        }
    }
    print!("{script}");
    Ok(Exit::Success)
}
