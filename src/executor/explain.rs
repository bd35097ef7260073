//! What `--explain` and `--dry-run` say of a planned build: for each task that
//! executes, how its influence differs from its newest earlier artifact; for each
//! task, what would happen to it.

use std::collections::BTreeMap;

use super::outcome::Status;
use super::plan::Plan;
use crate::console;
use crate::graph::Graph;
use crate::store::local::LocalCache;

/// The lines only `old` has (`- LINE`), then those only `new` has (`+ LINE`), each
/// in its order; a line repeated counts as many times.
pub(super) fn explain_diff(old: &[String], new: &[String]) -> Vec<String> {
    fn count(lines: &[String]) -> std::collections::HashMap<&str, usize> {
        let mut n = std::collections::HashMap::new();
        for l in lines {
            *n.entry(l.as_str()).or_default() += 1;
        }
        n
    }
    let (mut in_old, mut in_new) = (count(old), count(new));
    let mut out = Vec::new();
    for l in old {
        match in_new.get_mut(l.as_str()) {
            Some(k) if *k > 0 => *k -= 1,
            _ => out.push(format!("- {l}")),
        }
    }
    for l in new {
        match in_old.get_mut(l.as_str()) {
            Some(k) if *k > 0 => *k -= 1,
            _ => out.push(format!("+ {l}")),
        }
    }
    out
}

/// `--explain`: for each task that executes, the influence lines that differ from
/// the newest artifact of the same task and parameters in the local cache (`-`
/// old, `+` new), or that there is none.
pub(super) fn explain(graph: &Graph, plan: &[Plan], cache: &LocalCache) {
    for (i, node) in graph.nodes.iter().enumerate() {
        if !matches!(plan[i], Plan::Execute | Plan::Remote) {
            continue;
        }
        let Some(old) = cache.newest_other(node.name(), &node.params, &node.identity) else {
            console::info(&format!(
                "Explain {}: no earlier artifact of this task and parameters in the local cache",
                node.label()
            ));
            continue;
        };
        console::info(&format!(
            "Explain {}: differs from {} of {}:",
            node.label(),
            &old.identity[..old.identity.len().min(8)],
            old.created
        ));
        for line in explain_diff(&old.influence, &node.influence) {
            console::info(&format!("  {line}"));
        }
    }
}

/// `--dry-run`: says what would happen to each task of the graph, requirements
/// first, and how many of each.
pub(super) fn tell_plan(graph: &Graph, plan: &[Plan], status: &[Status]) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        if node.is_alias() || node.is_resource() {
            continue;
        }
        let what = match (plan[i], status[i]) {
            (_, Status::Failed) => "missing",
            (Plan::Available, _) => "cached",
            (Plan::Download, _) => "download",
            (Plan::Upload, _) => "upload",
            (Plan::Execute, _) => "execute",
            (Plan::Remote, _) => "remote",
            (Plan::Unplanned | Plan::Group, _) => "skip",
        };
        *counts.entry(what).or_default() += 1;
        console::info(&format!("{what} ({})", node.label()));
    }
    let counts: Vec<String> = counts.iter().map(|(w, n)| format!("{n} {w}")).collect();
    console::info(&format!("Dry run: {}; nothing was run", counts.join(", ")));
}
