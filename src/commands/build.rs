//! `jolt build`: graph, executor, then locations, copies and the report.

use anyhow::{Context, Result};
use serde::Serialize;
use std::time::Instant;

use super::workspace::Workspace;
use crate::cli::{BuildArgs, DownloadArgs};
use crate::config::Config;
use crate::console;
use crate::error::Exit;
use crate::error::{self, usage};
use crate::executor::{self, Mode, Network, Services, Status};
use crate::graph::{Graph, GraphOptions};
use crate::remote::client::NetworkClient;
use crate::remote::messages::{RecipeBundle, RecipeText};
use crate::store::artifact::{BUILD_LOG, MANIFEST};
use crate::store::http::HttpCache;
use crate::util::fs::format_duration;

#[derive(Serialize)]
struct TaskReport<'a> {
    name: &'a str,
    task: &'a str,
    qualified: &'a str,
    identity: &'a str,
    status: &'static str,
    goal: bool,
    duration: f64,
    /// Seconds from the build's start to the task's job, if one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<f64>,
    /// Where it ran: `local N`, `transfer N`, or `worker NAME` for a remote execution.
    #[serde(skip_serializing_if = "Option::is_none")]
    worker: Option<&'a str>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct BuildReport<'a> {
    result: &'static str,
    duration: f64,
    tasks: Vec<TaskReport<'a>>,
}

pub fn run(config: &Config, mut args: BuildArgs) -> Result<Exit> {
    let started = Instant::now();
    crate::runlog::limit(crate::runlog::Limits {
        per_task: config.jolt.log_tail,
        total: config.jolt.log_total,
    });
    if args.tasks.is_empty() {
        // As plain `jolt`: the task `jolt.default` names.
        args.tasks = vec![config.jolt.default.clone()];
    }
    // A dry run writes nothing: the cache is opened to read, the stat cache kept.
    let ws = if args.dry_run {
        Workspace::open_read_only(config)?
    } else {
        Workspace::open(config)?
    };
    let graph = match ws.graph(
        &args.tasks,
        &GraphOptions {
            salt: args.salt.clone(),
            force: args.force,
            ..Default::default()
        },
    ) {
        Ok(graph) => graph,
        // Ctrl-C while influence files were hashed.
        Err(_) if crate::interrupt::is_set() => {
            console::error("Interrupted by user");
            return Ok(Exit::Interrupted);
        }
        Err(e) => return Err(e),
    };
    let jobs = local_jobs(config, args.jobs)?;
    // Network builds have their own switches (as in Jolt): network.download decides
    // whether the goals come back, network.upload whether local-only artifacts go out.
    let (no_download, no_upload) = if args.network {
        (
            args.no_download || !config.network.download,
            args.no_upload || !config.network.upload,
        )
    } else {
        (args.no_download, args.no_upload)
    };
    let http = HttpCache::from_config(config, no_download, no_upload)?;
    let services = Services {
        cache: &ws.cache,
        http: http.as_ref(),
    };
    if !args.network {
        let opts = executor::Options {
            jobs,
            keep_going: args.keep_going,
            mode: Mode::Local,
            dry_run: args.dry_run,
            explain: args.explain,
            goals_absent: false,
        };
        let report = executor::run(&graph, &services, &ws.recipes.root, &opts)?;
        if args.dry_run {
            return Ok(Exit::Success);
        }
        let result = finish(&ws, &graph, &report, &args, started);
        // jolt ends next: freeing a large graph piece by piece would only take time
        // (none of these has a destructor with effects beyond memory and descriptors).
        std::mem::forget((report, graph, ws));
        return result;
    }
    let Some(http) = &http else {
        return Err(usage(
            "Network builds exchange artifacts through an HTTP cache: set http.uri",
        ));
    };
    let client = NetworkClient::connect(config.amqp.clone(), http.fleet())?;
    let net = Network {
        client: &client,
        recipes: RecipeBundle::new(
            &ws.recipes
                .files
                .iter()
                .map(|f| RecipeText {
                    path: f.path.to_string_lossy().into_owned(),
                    text: f.text.clone(),
                })
                .collect::<Vec<_>>(),
        ),
        jobs: config.amqp.jobs,
    };
    let opts = executor::Options {
        jobs,
        keep_going: args.keep_going,
        mode: Mode::Network(&net),
        dry_run: args.dry_run,
        explain: args.explain,
        goals_absent: false,
    };
    let report = executor::run(&graph, &services, &ws.recipes.root, &opts)?;
    if args.dry_run {
        return Ok(Exit::Success);
    }
    if http.is_down() {
        return Err(error::infra(format!(
            "HTTP cache {} is unreachable; network builds need it",
            http.uri()
        )));
    }
    finish(&ws, &graph, &report, &args, started)
}

/// Tasks run at once here: `-j`, else `jolt.jobs` (the CPUs for 0).
fn local_jobs(config: &Config, given: Option<usize>) -> Result<usize> {
    let max = crate::config::MAX_JOBS;
    match given {
        Some(j) if (1..=max).contains(&j) => Ok(j),
        Some(j) => Err(usage(format!(
            "-j {j}: tasks at once must be between 1 and {max}"
        ))),
        None => Ok(config.jolt.jobs),
    }
}

/// `jolt download`: fetch the goals' artifacts from the HTTP cache without building.
pub fn download(config: &Config, args: DownloadArgs) -> Result<Exit> {
    let started = Instant::now();
    let Some(http) = HttpCache::from_config(config, false, true)? else {
        return Err(usage("jolt download needs an HTTP cache: set http.uri"));
    };
    let ws = Workspace::open(config)?;
    let graph = ws.graph(&args.tasks, &GraphOptions::default())?;
    let services = Services {
        cache: &ws.cache,
        http: Some(&http),
    };
    let opts = executor::Options {
        jobs: 4,
        keep_going: true,
        mode: Mode::DownloadOnly,
        dry_run: false,
        explain: false,
        goals_absent: false,
    };
    let report = executor::run(&graph, &services, &ws.recipes.root, &opts)?;
    if http.is_down() {
        return Err(error::infra(format!(
            "HTTP cache {} is unreachable",
            http.uri()
        )));
    }
    let build_args = BuildArgs {
        tasks: args.tasks,
        copy: args.copy,
        ..Default::default()
    };
    finish(&ws, &graph, &report, &build_args, started)
}

/// Locations, copies, the summary and the report of a finished build.
fn finish(
    ws: &Workspace,
    graph: &Graph,
    report: &executor::Report,
    args: &BuildArgs,
    started: Instant,
) -> Result<Exit> {
    let mut code = Exit::Success;
    if report.interrupted {
        code = Exit::Interrupted;
    } else if report.failed() {
        code = Exit::TaskFailed;
    }
    // Every goal that is available gets its Location, also when others failed (-k);
    // copies are made only of a build that succeeded.
    for &g in &graph.goals {
        let node = &graph.nodes[g];
        let available = matches!(
            report.status[g],
            Status::Executed | Status::Cached | Status::Downloaded | Status::Uploaded
        );
        if node.task.cacheable && available {
            let dir = ws.cache.artifact_dir(node.name(), &node.identity);
            console::info(&format!("Location: {}", dir.display()));
            if let (Some(dest), Exit::Success) = (&args.copy, code) {
                copy_artifact(&dir, dest)?;
            }
        }
    }
    let failed: Vec<usize> = (0..graph.nodes.len())
        .filter(|&i| matches!(report.status[i], Status::Failed | Status::Unstable))
        .collect();
    if !failed.is_empty() {
        console::error("List of failed tasks");
        for &i in &failed {
            let suffix = if report.status[i] == Status::Unstable {
                " (unstable)"
            } else {
                ""
            };
            console::error(&format!("- {}{suffix}", graph.nodes[i].label()));
        }
    }
    if let Some(line) = summary(graph, report) {
        console::info(&line);
    }
    console::info(&format!(
        "Total execution time: {} ({} executed, {} downloaded, {} cached, {} failed)",
        format_duration(started.elapsed()),
        report.count(Status::Executed),
        report.count(Status::Downloaded),
        report.count(Status::Cached),
        report.count(Status::Failed) + report.count(Status::Unstable),
    ));
    if let Some(path) = &args.result {
        write_report(path, graph, report, code, started)?;
    }
    if let Some(path) = &args.trace {
        write_trace(path, graph, report)?;
    }
    Ok(code)
}

fn copy_artifact(dir: &std::path::Path, dest: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("Cannot create {}", dest.display()))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == MANIFEST || name == BUILD_LOG {
            continue;
        }
        crate::util::fs::copy_tree(&entry.path(), &dest.join(&name))?;
    }
    Ok(())
}

fn write_report(
    path: &std::path::Path,
    graph: &Graph,
    report: &executor::Report,
    code: Exit,
    started: Instant,
) -> Result<()> {
    let tasks = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| report.status[*i] != Status::Unneeded && !n.is_alias() && !n.is_resource())
        .map(|(i, n)| TaskReport {
            name: &n.short,
            task: n.name(),
            qualified: &n.qualified,
            identity: &n.identity,
            status: report.status[i].name(),
            goal: graph.goals.contains(&i),
            duration: report.duration[i].map(|d| d.as_secs_f64()).unwrap_or(0.0),
            start: span(report, i).map(|s| s.start.as_secs_f64()),
            worker: span(report, i).map(|s| s.lane.as_str()),
            error: report.errors.get(i).and_then(|e| e.as_deref()),
        })
        .collect();
    let result = match code {
        Exit::Success => "SUCCESS",
        Exit::Interrupted => "INTERRUPTED",
        _ => "FAILED",
    };
    let text = serde_json::to_vec_pretty(&BuildReport {
        result,
        duration: started.elapsed().as_secs_f64(),
        tasks,
    })?;
    crate::util::fs::write_private(path, &text)
        .with_context(|| format!("Cannot write {}", path.display()))
}

fn span(report: &executor::Report, i: usize) -> Option<&executor::Span> {
    report.spans.get(i).and_then(|s| s.as_ref())
}

/// Writes the build as a Chrome trace: complete events (`"ph": "X"`, `ts` and `dur`
/// in microseconds) on one thread per lane, named by metadata events.
fn write_trace(path: &std::path::Path, graph: &Graph, report: &executor::Report) -> Result<()> {
    let mut lanes: Vec<&str> = report
        .spans
        .iter()
        .flatten()
        .map(|s| s.lane.as_str())
        .collect();
    lanes.sort_unstable();
    lanes.dedup();
    let tid = |lane: &str| lanes.binary_search(&lane).map_or(0, |k| k + 1);
    let mut events: Vec<serde_json::Value> = lanes
        .iter()
        .map(|lane| {
            serde_json::json!({
                "name": "thread_name", "ph": "M", "pid": 1, "tid": tid(lane),
                "args": { "name": lane },
            })
        })
        .collect();
    for (i, s) in report.spans.iter().enumerate() {
        let Some(s) = s else { continue };
        let node = &graph.nodes[i];
        events.push(serde_json::json!({
            "name": node.short,
            "cat": s.kind,
            "ph": "X",
            "pid": 1,
            "tid": tid(&s.lane),
            "ts": s.start.as_micros() as u64,
            "dur": s.end.saturating_sub(s.start).as_micros() as u64,
            "args": {
                "identity": node.identity,
                "status": report.status[i].name(),
                "lane": s.lane,
            },
        }));
    }
    let text = serde_json::to_vec(&serde_json::json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
    }))?;
    crate::util::fs::write_private(path, &text)
        .with_context(|| format!("Cannot write {}", path.display()))
}

/// How many tasks the summary names as the slowest.
const SLOWEST: usize = 3;

/// The cache hit rate of the tasks the build needed, and the slowest executions.
fn summary(graph: &Graph, report: &executor::Report) -> Option<String> {
    let hits = report.count(Status::Cached) + report.count(Status::Downloaded);
    let executed = report.count(Status::Executed);
    let needed = hits
        + executed
        + report.count(Status::Failed)
        + report.count(Status::Unstable)
        + report.count(Status::Uploaded);
    if needed == 0 {
        return None;
    }
    let mut line = format!("Cache hits: {hits} of {needed} ({}%)", hits * 100 / needed);
    let mut slow: Vec<(usize, std::time::Duration)> = (0..graph.nodes.len())
        .filter(|&i| report.status[i] == Status::Executed)
        .filter_map(|i| report.duration[i].map(|d| (i, d)))
        .collect();
    slow.sort_by_key(|s| std::cmp::Reverse(s.1));
    if !slow.is_empty() {
        let names: Vec<String> = slow
            .iter()
            .take(SLOWEST)
            .map(|(i, d)| {
                let took = if d.as_secs() < 60 {
                    format!("{:.1}s", d.as_secs_f64())
                } else {
                    format_duration(*d)
                };
                format!("{} {took}", graph.nodes[*i].short)
            })
            .collect();
        line.push_str(&format!("; slowest: {}", names.join(", ")));
    }
    Some(line)
}
