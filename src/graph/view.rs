//! What a node sees of its requirements: the artifacts its commands get (its view),
//! walked on demand, and the requirement a `{deps.X}` placeholder names in it.

use anyhow::Result;
use std::collections::HashSet;

use super::model::Node;
use crate::error::usage;
use crate::recipe::taskref::TaskRef;

/// Node `i`, or, for an alias, what it groups (aliases of aliases included), in
/// declaration order. Iterative: alias chains may be deep.
pub(super) fn expand_alias(nodes: &[Node], i: usize) -> Vec<usize> {
    if !nodes[i].is_alias() {
        return vec![i];
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![i];
    while let Some(n) = stack.pop() {
        if !seen.insert(n) {
            continue;
        }
        if nodes[n].is_alias() {
            stack.extend(nodes[n].deps.iter().rev());
        } else {
            out.push(n);
        }
    }
    out
}

/// The requirements whose artifacts node `i` sees directly (aliases expanded,
/// resources left out), in declaration order, without repetitions.
pub(super) fn direct_artifacts(nodes: &[Node], i: usize) -> &[usize] {
    nodes[i].direct.get_or_init(|| {
        let mut direct = Vec::new();
        let mut seen = HashSet::new();
        for &d in &nodes[i].deps {
            for e in expand_alias(nodes, d) {
                if !nodes[e].is_resource() && seen.insert(e) {
                    direct.push(e);
                }
            }
        }
        direct
    })
}

/// Whether consumers of node `d` see through it to its own requirements.
pub fn transparent(node: &Node) -> bool {
    node.task.has_artifact() && !node.task.def.selfsustained
}

/// Per-thread scratch space of [`visible`], kept between calls so that a view costs
/// what it holds, not the size of the graph. Marks are generation numbers: a slot
/// holding the current generation is set, any other value is clear.
struct ViewScratch {
    generation: u32,
    /// Emitted into the view.
    seen: Vec<u32>,
    /// Walked into already (its view is emitted or excluded).
    entered: Vec<u32>,
    /// How many nodes on the walk's stack have this node as a direct requirement:
    /// while above 0, the node waits for the tail of the outermost one.
    excluded: Vec<u32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<ViewScratch> = const {
        std::cell::RefCell::new(ViewScratch {
            generation: 0,
            seen: Vec::new(),
            entered: Vec::new(),
            excluded: Vec::new(),
        })
    };
}

/// What node `i` sees of its requirements: artifacts of transitive requirements
/// (through requirements that are not selfsustained) first, direct ones last. That
/// is, the views of its direct requirements that are transparent, concatenated in
/// declaration order, each node at its first place, without its direct
/// requirements, which follow.
///
/// Computed on each call, never stored: a view is the whole transitive set, so
/// keeping every node's would cost memory in the square of a chain's depth (a
/// 40,000-task chain held 14 GB). The walk is depth-first without recursion and
/// enters each node once; its cost is the size of the subgraph below `i`.
/// Entering a node twice would add nothing: everything its view holds was emitted
/// the first time, or waits for the tail of a node still on the stack.
pub fn visible(nodes: &[Node], i: usize) -> Vec<usize> {
    SCRATCH.with(|scratch| {
        let s = &mut *scratch.borrow_mut();
        if s.seen.len() < nodes.len() {
            s.seen.resize(nodes.len(), 0);
            s.entered.resize(nodes.len(), 0);
            s.excluded.resize(nodes.len(), 0);
        }
        s.generation = s.generation.wrapping_add(1);
        if s.generation == 0 {
            s.seen.fill(0);
            s.entered.fill(0);
            s.generation = 1;
        }
        let generation = s.generation;
        let mut out = Vec::new();
        // A frame: a node and the index of the next direct requirement to walk into.
        let mut stack = vec![(i, 0usize)];
        s.entered[i] = generation;
        for &d in direct_artifacts(nodes, i) {
            s.excluded[d] += 1;
        }
        while let Some((n, next)) = stack.last_mut() {
            let direct = direct_artifacts(nodes, *n);
            if let Some(&d) = direct.get(*next) {
                *next += 1;
                if transparent(&nodes[d]) && s.entered[d] != generation {
                    s.entered[d] = generation;
                    for &e in direct_artifacts(nodes, d) {
                        s.excluded[e] += 1;
                    }
                    stack.push((d, 0));
                }
                continue;
            }
            stack.pop();
            for &d in direct {
                s.excluded[d] -= 1;
            }
            for &d in direct {
                if s.seen[d] != generation && s.excluded[d] == 0 {
                    s.seen[d] = generation;
                    out.push(d);
                }
            }
        }
        out
    })
}

/// Whether node `n` is what the reference `name:p=v,...` designates: the same task,
/// each given parameter equal to the node's once canonicalised, and every other
/// parameter at its default.
pub(super) fn designates(n: &Node, reference: &TaskRef) -> bool {
    if n.name() != reference.name {
        return false;
    }
    let mut given = HashSet::new();
    for (k, v) in &reference.params {
        let Some(decl) = n.task.params.get(k) else {
            return false;
        };
        match decl.normalize(n.name(), k, v) {
            Ok(value) if n.params.get(k) == Some(&value) => {
                given.insert(k.as_str());
            }
            _ => return false,
        }
    }
    n.params.iter().all(|(k, v)| {
        given.contains(k.as_str()) || n.task.params[k].default.as_deref() == Some(v.as_str())
    })
}

/// The node of `seen` (a node's view, see [`visible`]) that `name` refers to: a
/// task name, or a reference with parameters (in any order, defaults optional).
pub fn find_among(nodes: &[Node], seen: &[usize], name: &str) -> Result<usize> {
    if name.contains(':') {
        let reference = TaskRef::parse(name)?;
        return match seen
            .iter()
            .copied()
            .find(|&v| designates(&nodes[v], &reference))
        {
            Some(one) => Ok(one),
            None => Err(usage(format!("'{name}' is not a requirement"))),
        };
    }
    let by_name: Vec<usize> = seen
        .iter()
        .copied()
        .filter(|&v| nodes[v].name() == name)
        .collect();
    match by_name[..] {
        [one] => Ok(one),
        [] => Err(usage(format!("'{name}' is not a requirement"))),
        _ => {
            // Several parameter sets: the one with every parameter at its default,
            // if any, is what the bare name designates.
            let reference = TaskRef {
                name: name.to_string(),
                params: Vec::new(),
            };
            if let Some(&one) = by_name.iter().find(|&&v| designates(&nodes[v], &reference)) {
                return Ok(one);
            }
            Err(usage(format!(
                "'{name}' is ambiguous: name one of {}",
                by_name
                    .iter()
                    .map(|&i| nodes[i].qualified.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}
