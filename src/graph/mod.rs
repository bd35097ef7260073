//! The task graph: task references instantiated with parameters, their requirements,
//! what each consumer sees of its requirements, and every node's influence lines and
//! identity.
//!
//! Nodes are created depth-first, so a node's requirements always have lower indices
//! than the node itself: index order is a topological order.
//!
//! The files: `model`, the data (a leaf); `view`, what a node sees, walked on
//! demand; `builder`, which makes a graph from recipes and goals; [`hashes`], the
//! influence files' hashes. This file is the API the executor and commands use.

mod builder;
pub mod hashes;
mod model;
mod view;

pub use builder::build;
pub use model::{Graph, GraphOptions, Node, Resolved};
use view::{direct_artifacts, expand_alias};
pub use view::{find_among, transparent, visible};

impl Graph {
    /// A node with aliases replaced by what they require.
    pub fn expand_alias(&self, i: usize) -> Vec<usize> {
        expand_alias(&self.nodes, i)
    }

    /// The requirements whose artifacts node `i` sees directly (aliases expanded,
    /// resources left out).
    pub fn direct_artifacts(&self, i: usize) -> &[usize] {
        direct_artifacts(&self.nodes, i)
    }

    /// What node `i` sees of its requirements (see [`visible`]).
    pub fn visible(&self, i: usize) -> Vec<usize> {
        visible(&self.nodes, i)
    }

    fn compute_weights(&mut self) {
        let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &d in n.deps.iter().chain(&n.resources) {
                if !consumers[d].contains(&i) {
                    consumers[d].push(i);
                }
            }
        }
        for i in (0..self.nodes.len()).rev() {
            let heaviest = consumers[i]
                .iter()
                .map(|&c| self.nodes[c].weight)
                .max()
                .unwrap_or(0);
            self.nodes[i].weight = self.nodes[i]
                .task
                .def
                .weight
                .saturating_add(heaviest.max(0));
        }
    }

    /// Every node reachable from `roots` through requirements, roots included, in index order.
    pub fn closure(&self, roots: &[usize]) -> Vec<usize> {
        let mut seen = vec![false; self.nodes.len()];
        let mut stack: Vec<usize> = roots.to_vec();
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut seen[i], true) {
                stack.extend(&self.nodes[i].deps);
            }
        }
        (0..self.nodes.len()).filter(|&i| seen[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::builder::Builder;
    use super::hashes::FileHashes;
    use super::view::direct_artifacts;
    use super::*;
    use crate::recipe::limits::Limits;
    use crate::recipe::Recipes;
    use anyhow::Result;

    fn graph(recipe: &str, goals: &[&str]) -> Result<Graph> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("jolt.toml"), recipe).unwrap();
        let recipes = Recipes::load(dir.path())?;
        let hashes = FileHashes::ephemeral(dir.path());
        let goals: Vec<String> = goals.iter().map(|s| s.to_string()).collect();
        build(&recipes, &hashes, &goals, &GraphOptions::default())
    }

    /// The graph of `goals` within `limits`, or the error that names the one exceeded.
    fn graph_within(recipe: &str, goal: &str, limits: Limits) -> Result<Graph, String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("jolt.toml"), recipe).unwrap();
        let recipes = Recipes::load(dir.path()).unwrap();
        let hashes = FileHashes::ephemeral(dir.path());
        let opts = GraphOptions {
            limits,
            ..Default::default()
        };
        build(&recipes, &hashes, &[goal.to_string()], &opts).map_err(|e| {
            assert_eq!(crate::error::exit_code(&e), crate::error::Exit::Usage);
            e.to_string()
        })
    }

    /// Tasks `t1` to `t{n}`, each requiring the one before.
    fn chain(n: usize) -> String {
        let mut recipe = "[task.t1]\n".to_string();
        for i in 2..=n {
            recipe += &format!("[task.t{i}]\nrequires = [\"t{}\"]\n", i - 1);
        }
        recipe
    }

    #[test]
    fn a_graph_may_hold_as_many_tasks_as_the_limit_and_no_more() {
        // A binary tree of parameter values: 15 tasks from four definitions.
        let tree = r#"
[task.l]
parameters.p = ""
requires = ["m:p={p}0", "m:p={p}1"]
[task.m]
parameters.p = ""
requires = ["n:p={p}0", "n:p={p}1"]
[task.n]
parameters.p = ""
requires = ["leaf:p={p}0", "leaf:p={p}1"]
[task.leaf]
parameters.p = ""
"#;
        let limits = |tasks| Limits {
            tasks,
            ..Limits::DEFAULT
        };
        assert_eq!(graph_within(tree, "l", limits(15)).unwrap().nodes.len(), 15);
        assert_eq!(
            graph_within(tree, "l", limits(14)).unwrap_err(),
            "jolt.toml: the graph of 'l' has more than 14 tasks (the limit)"
        );
    }

    #[test]
    fn a_requirement_chain_may_be_as_long_as_the_limit_and_no_longer() {
        let limits = |depth| Limits {
            depth,
            ..Limits::DEFAULT
        };
        assert_eq!(
            graph_within(&chain(6), "t6", limits(6))
                .unwrap()
                .nodes
                .len(),
            6
        );
        let too_deep =
            "jolt.toml: the requirements of 't6' form a chain of more than 5 tasks (the limit)";
        // Found while the chain is followed, before any node is made (else the
        // second node would exceed a limit of one task).
        assert_eq!(
            graph_within(&chain(6), "t6", limits(5)).unwrap_err(),
            too_deep
        );
        let one_task = Limits {
            tasks: 1,
            ..limits(5)
        };
        assert_eq!(
            graph_within(&chain(6), "t6", one_task).unwrap_err(),
            too_deep
        );
        // A chain made of nodes created for other requirements, one at a time, is
        // never followed in one go: each node knows its depth.
        let shared = chain(5) + "[task.t6]\nrequires = [\"t1\", \"t2\", \"t3\", \"t4\", \"t5\"]\n";
        assert_eq!(
            graph_within(&shared, "t6", limits(6)).unwrap().nodes.len(),
            6
        );
        assert_eq!(
            graph_within(&shared, "t6", limits(5)).unwrap_err(),
            too_deep
        );
    }

    #[test]
    fn a_reference_growing_with_each_requirement_stops_at_the_limit() {
        // Without a limit on references, it grows until memory runs out: a chain
        // under the depth limit, whose references double at every level.
        let recipe = "[task.c]\nparameters.p = \"x\"\nrequires = [\"c:p={p}{p}\"]\n";
        let limits = Limits {
            reference: 40,
            ..Limits::DEFAULT
        };
        assert_eq!(
            graph_within(recipe, "c", limits).unwrap_err(),
            "jolt.toml: task 'c' requires a reference longer than 40 bytes (the limit): \
             c:p=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx..."
        );
        assert_eq!(
            graph_within(recipe, &format!("c:p={}", "x".repeat(40)), limits).unwrap_err(),
            "The reference c:p=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... is longer than 40 bytes (the limit)"
        );
    }

    const HELLO: &str = r#"
[task.hello]
parameters.recipient = "world"
parameters.flags = { type = "list", default = [] }
parameters.loud = false
run = "echo {recipient}"

[task.print]
requires = ["hello:recipient={recipient}"]
parameters.recipient = "world"
run = "cat {deps.hello}"
"#;

    #[test]
    fn equivalent_references_are_one_node() {
        let g = graph(
            HELLO,
            &[
                "hello",
                "hello:recipient=world",
                "hello:flags=b+a",
                "hello:flags=a+b,loud=no",
            ],
        )
        .unwrap();
        assert_eq!(g.nodes.len(), 2);
        assert_eq!(g.nodes[0].short, "hello");
        assert_eq!(g.nodes[1].short, "hello:flags=a+b");
    }

    #[test]
    fn files_hashed_ahead_give_the_identities_of_files_hashed_one_task_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut recipe = String::new();
        for t in 0..40 {
            let src = dir.path().join(format!("src/t{t}"));
            std::fs::create_dir_all(&src).unwrap();
            for f in 0..3 {
                std::fs::write(src.join(format!("f{f}.c")), format!("{t} {f}")).unwrap();
            }
            let requires = if t > 0 {
                format!("\"t{}\"", t - 1)
            } else {
                String::new()
            };
            recipe.push_str(&format!(
                "[task.t{t}]\nrequires = [{requires}]\ninfluence = [\"src/t{t}/*.c\"]\nrun = \"true\"\n"
            ));
        }
        std::fs::write(dir.path().join("jolt.toml"), recipe).unwrap();
        let recipes = Recipes::load(dir.path()).unwrap();
        let build_of = |goals: &[String]| {
            let hashes = FileHashes::ephemeral(dir.path());
            build(&recipes, &hashes, goals, &GraphOptions::default()).unwrap()
        };
        let goals: Vec<String> = (0..40).map(|t| format!("t{t}")).collect();
        let all = build_of(&goals);
        // One task's graph lists its few patterns one at a time, without threads.
        let alone = build_of(&goals[..1]);
        let t0 = all.nodes.iter().find(|n| n.name() == "t0").unwrap();
        assert_eq!(t0.identity, alone.nodes[0].identity);
        assert_eq!(t0.influence, alone.nodes[0].influence);
        assert_eq!(
            t0.influence
                .iter()
                .filter(|l| l.starts_with("File: "))
                .count(),
            3
        );
        let t39 = all.nodes.iter().find(|n| n.name() == "t39").unwrap();
        let sequential = {
            let hashes = FileHashes::ephemeral(dir.path());
            let opts = GraphOptions::default();
            let mut b = Builder::new(&recipes, &hashes, &opts);
            let i = b.instantiate("t39", None).unwrap();
            for p in std::mem::take(&mut b.pending) {
                b.identify(p).unwrap();
            }
            b.nodes[i].identity.clone()
        };
        assert_eq!(t39.identity, sequential);
    }

    #[test]
    fn parameters_change_identity_and_requirements_follow() {
        let g = graph(HELLO, &["print", "print:recipient=john"]).unwrap();
        let hellos: Vec<&Node> = g.nodes.iter().filter(|n| n.name() == "hello").collect();
        assert_eq!(hellos.len(), 2);
        assert_ne!(hellos[0].identity, hellos[1].identity);
        let print = &g.nodes[g.goals[1]];
        assert!(print
            .influence
            .iter()
            .any(|l| l.starts_with("Requirement: ") && l.ends_with(": hello:recipient=john")));
    }

    #[test]
    fn bad_references_are_usage_errors() {
        let msg = |goal: &str| format!("{}", graph(HELLO, &[goal]).unwrap_err());
        assert_eq!(msg("nope"), "No such task 'nope'");
        assert_eq!(msg("hello:x=1"), "No such parameter 'x' (hello)");
        assert_eq!(msg("helo"), "No such task 'helo' (did you mean 'hello'?)");
        let required = |recipe: &str| format!("{}", graph(recipe, &["t"]).unwrap_err());
        assert_eq!(
            required(
                "[task.t]\nparameters.arch = { values = [\"x86\", \"arm\"], help = \"CPU\" }\n"
            ),
            "Required parameter 'arch' has not been set (t), accepted values are: x86, arm (CPU)"
        );
        assert_eq!(
            required("[task.t]\nparameters.n = { type = \"int\", min = 1, max = 8 }\n"),
            "Required parameter 'n' has not been set (t), accepted values are: an integer from 1 to 8"
        );
        assert_eq!(
            required("[task.t]\nparameters.name = {}\n"),
            "Required parameter 'name' has not been set (t)"
        );
        assert_eq!(
            msg("hello:recipent=x"),
            "No such parameter 'recipent' (hello) (did you mean 'recipient'?)"
        );
        assert!(msg("hello:loud=maybe").starts_with("Illegal value 'maybe'"));
    }

    #[test]
    fn cycles_name_their_tasks() {
        let err = graph(
            "[task.a]\nrequires=[\"b\"]\n[task.b]\nrequires=[\"c\"]\n[task.c]\nrequires=[\"a\"]\n",
            &["a"],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "Dependency cycle: a -> b -> c -> a");
    }

    #[test]
    fn unknown_placeholders_are_rejected() {
        let err = graph("[task.a]\nrun = \"echo {nope}\"\n", &["a"]).unwrap_err();
        assert_eq!(err.to_string(), "Unknown placeholder '{nope}' in task 'a'");
        let err = graph("[task.a]\nrun = \"cat {deps.b}\"\n", &["a"]).unwrap_err();
        assert!(
            err.to_string().contains("'b' is not a requirement"),
            "{err}"
        );
    }

    #[test]
    fn selfsustained_tasks_hide_their_requirements() {
        let g = graph(
            r#"
[task.a]
[task.b]
requires = ["a"]
[task.s]
requires = ["a"]
selfsustained = true
[task.c1]
requires = ["b"]
[task.c2]
requires = ["s"]
"#,
            &["c1", "c2"],
        )
        .unwrap();
        let names =
            |i: usize| -> Vec<&str> { g.visible(i).iter().map(|&v| g.nodes[v].name()).collect() };
        assert_eq!(names(g.goals[0]), vec!["a", "b"]);
        assert_eq!(names(g.goals[1]), vec!["s"]);
    }

    /// A node's view as it was computed before views were walked on each call:
    /// every requirement's view kept, and concatenated.
    fn materialized_views(nodes: &[Node]) -> Vec<Vec<usize>> {
        let mut views: Vec<Vec<usize>> = Vec::new();
        // Nodes are created requirements first.
        for n in 0..nodes.len() {
            let direct = direct_artifacts(nodes, n);
            let mut out: Vec<usize> = Vec::new();
            for &d in direct {
                if transparent(&nodes[d]) {
                    for &t in &views[d] {
                        if !direct.contains(&t) && !out.contains(&t) {
                            out.push(t);
                        }
                    }
                }
            }
            out.extend(direct);
            views.push(out);
        }
        views
    }

    #[test]
    fn views_walked_on_each_call_are_the_views_concatenated() {
        // Random graphs with diamonds, repeated requirements, selfsustained tasks
        // and aliases: every node's view, in order, as the definition gives it.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        for _ in 0..40 {
            let count = 2 + next(30) as usize;
            let mut recipe = String::new();
            for t in 0..count {
                recipe.push_str(&format!("[task.t{t}]\n"));
                let mut requires = Vec::new();
                for _ in 0..(if t == 0 { 0 } else { next(5) }) {
                    requires.push(format!("\"t{}\"", next(t as u64)));
                }
                if !requires.is_empty() {
                    requires.sort();
                    requires.dedup();
                    recipe.push_str(&format!("requires = [{}]\n", requires.join(", ")));
                }
                match next(8) {
                    0 => recipe.push_str("selfsustained = true\n"),
                    1 if !requires.is_empty() => recipe.push_str("kind = \"alias\"\n"),
                    _ => {}
                }
            }
            let last = format!("t{}", count - 1);
            let g = graph(&recipe, &[&last]).unwrap();
            let expected = materialized_views(&g.nodes);
            for (i, view) in expected.iter().enumerate() {
                assert_eq!(&g.visible(i), view, "node {i} of\n{recipe}");
            }
        }
    }

    #[test]
    fn aliases_are_spliced_and_weights_follow_consumers() {
        let g = graph(
            r#"
[task.a]
weight = 1
[task.b]
[task.all]
kind = "alias"
requires = ["a", "b"]
[task.top]
requires = ["all"]
weight = 10
"#,
            &["all", "top"],
        )
        .unwrap();
        let goal_names: Vec<&str> = g.goals.iter().map(|&i| g.nodes[i].name()).collect();
        assert_eq!(goal_names, vec!["a", "b", "top"]);
        assert_eq!(g.visible(g.goals[2]).len(), 2);
        let a = g.nodes.iter().find(|n| n.name() == "a").unwrap();
        assert_eq!(a.weight, 11);
    }
}
