//! The graph builder: instantiates task references with their parameters,
//! requirements first (so index order is a topological order), checks the graph's
//! limits as it goes, then lists and hashes influence files and computes every
//! node's influence lines and identity.

use anyhow::Result;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use super::hashes::{FileHashes, Seen};
use super::model::{identity, Graph, GraphOptions, InfluenceFile, Node, Resolved, FORMAT};
use super::view::{expand_alias, find_among, visible};
use crate::error::usage;
use crate::recipe::limits::Limits;
use crate::recipe::placeholder::{self, DepKey, Placeholder};
use crate::recipe::taskref::{self, TaskRef};
use crate::recipe::{Kind, Recipes, Source, Task};
use crate::util::{did_you_mean, hex};

/// What a template expanded at graph time may hold besides parameters and
/// `{env.VAR}`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Static {
    Plain,
    /// `{root}` too (the url and rev of built-in kinds).
    WithRoot,
    /// A glob: alternations such as `{c,h}` stay.
    Glob,
}

/// An influence pattern listed and its files hashed ahead of time.
struct Prefetched {
    pattern: String,
    found: Vec<(PathBuf, Option<std::fs::Metadata>)>,
    /// The hash of each file of `found`, in its order (`None`: left to `identify`).
    hashed: Vec<Option<(String, Seen)>>,
}

/// Lists and hashes what `patterns` match (what fails is left out).
fn prefetch_patterns(root: &Path, hashes: &FileHashes, patterns: &[String]) -> Vec<Prefetched> {
    let mut out = Vec::new();
    for pattern in patterns {
        let Ok(found) = crate::util::globs::files_with_meta(root, pattern) else {
            continue;
        };
        let hashed = found
            .iter()
            .map(|(f, meta)| hashes.seen(f, meta.as_ref()).ok())
            .collect();
        out.push(Prefetched {
            pattern: pattern.clone(),
            found,
            hashed,
        });
    }
    out
}

/// At most how many threads list and hash influence files.
const PREFETCH_THREADS: usize = 8;

pub(super) struct Builder<'a> {
    recipes: &'a Recipes,
    hashes: &'a FileHashes,
    opts: &'a GraphOptions,
    forced: HashSet<String>,
    pub(super) nodes: Vec<Node>,
    index: HashMap<String, usize>,
    /// The references being instantiated, outermost first (a cycle's message)...
    stack: Vec<String>,
    /// ... and as a set, so that each new reference is checked in constant time: a
    /// search of `stack` made a chain's instantiation quadratic in its depth.
    open: HashSet<String>,
    globs: HashMap<String, Vec<(PathBuf, Option<std::fs::Metadata>)>>,
    /// The hashes of each pattern's files (aligned with `globs`), computed ahead of
    /// time by [`Builder::prefetch`].
    hashed: HashMap<String, Vec<Option<(String, Seen)>>>,
    /// Nodes whose influence and identity are still to be computed, in the order
    /// they were added (requirements first).
    pub(super) pending: Vec<usize>,
    env: BTreeMap<String, String>,
    /// The length of each node's longest requirement chain, itself included.
    depths: Vec<usize>,
}

/// Builds the graph of `goals`.
pub fn build(
    recipes: &Recipes,
    hashes: &FileHashes,
    goals: &[String],
    opts: &GraphOptions,
) -> Result<Graph> {
    let mut b = Builder::new(recipes, hashes, opts);
    if opts.force {
        for goal in goals {
            let (task, params) = b.resolve(goal, None)?;
            b.forced.insert(qualified(&task, &params));
        }
    }
    let mut requested = Vec::new();
    for goal in goals {
        requested.push(b.instantiate(goal, None)?);
    }
    // The graph's shape is known: its influence files are listed and hashed on
    // every core at once, then identities follow, requirements first.
    b.prefetch();
    for i in std::mem::take(&mut b.pending) {
        b.identify(i)?;
    }
    let mut graph = Graph {
        nodes: b.nodes,
        requested: requested.clone(),
        goals: Vec::new(),
        env: b.env,
    };
    for &g in &requested {
        for e in graph.expand_alias(g) {
            if !graph.goals.contains(&e) {
                graph.goals.push(e);
            }
        }
    }
    graph.compute_weights();
    Ok(graph)
}

/// The error of a requirement chain beyond the depth limit.
fn too_deep(goal: &str, limits: &Limits) -> String {
    format!(
        "the requirements of '{goal}' form a chain of more than {} tasks (the limit)",
        limits.depth
    )
}

/// The error of a task reference beyond the length limit: `consumer` requires it, or
/// it is a goal.
fn too_long(reference: &str, consumer: Option<&Task>, limits: &Limits) -> anyhow::Error {
    let start: String = reference.chars().take(60).collect();
    let limit = limits.reference;
    usage(match consumer {
        Some(c) => format!(
            "{}: task '{}' requires a reference longer than {limit} bytes (the limit): {start}...",
            c.file.display(),
            c.name
        ),
        None => format!("The reference {start}... is longer than {limit} bytes (the limit)"),
    })
}

fn qualified(task: &Task, params: &BTreeMap<String, String>) -> String {
    let pairs: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    taskref::format(&task.name, &pairs)
}

impl<'a> Builder<'a> {
    pub(super) fn new(
        recipes: &'a Recipes,
        hashes: &'a FileHashes,
        opts: &'a GraphOptions,
    ) -> Builder<'a> {
        Builder {
            recipes,
            hashes,
            opts,
            forced: HashSet::new(),
            nodes: Vec::new(),
            index: HashMap::new(),
            stack: Vec::new(),
            open: HashSet::new(),
            globs: HashMap::new(),
            hashed: HashMap::new(),
            pending: Vec::new(),
            env: BTreeMap::new(),
            depths: Vec::new(),
        }
    }
}

impl Builder<'_> {
    /// The value of an environment variable that influences a task, remembered.
    fn env_var(&mut self, var: &str) -> Option<String> {
        if let Some(v) = self.env.get(var) {
            return Some(v.clone());
        }
        let value = match &self.opts.env {
            Some(given) => given.get(var).cloned(),
            None => std::env::var(var).ok(),
        }?;
        self.env.insert(var.to_string(), value.clone());
        Some(value)
    }

    fn env_placeholder(&mut self, task: &str, var: &str) -> Result<String> {
        if crate::util::secrets::is_credential_var(var) {
            // Its value would land in influence lines, manifests and requests.
            return Err(usage(format!(
                "Task '{task}' may not use the credential variable {var} ({{env.{var}}})"
            )));
        }
        self.env_var(var).ok_or_else(|| {
            usage(format!(
                "Environment variable '{var}' used as {{env.{var}}} in task '{task}' is not set"
            ))
        })
    }

    /// Expands what is known when the graph is built: parameters, `{env.VAR}` and,
    /// where `what` allows it, `{root}`; any other placeholder is unknown.
    fn expand_static(
        &mut self,
        task: &str,
        params: &BTreeMap<String, String>,
        template: &str,
        what: Static,
    ) -> Result<String> {
        let root = self.recipes.root.clone();
        let mut resolve = |name: &str| match Placeholder::parse(name, &|p| params.contains_key(p)) {
            Placeholder::Param(p) => Ok(params.get(p).cloned()),
            Placeholder::Root if what == Static::WithRoot => Ok(Some(root.display().to_string())),
            Placeholder::Env(var) => self.env_placeholder(task, var).map(Some),
            Placeholder::Root
            | Placeholder::BuildDir
            | Placeholder::Artifact
            | Placeholder::Dep(..)
            | Placeholder::Unknown(_) => Ok(None),
        };
        match what {
            Static::Glob => placeholder::expand_glob(task, template, &mut resolve),
            _ => placeholder::expand(task, template, &mut resolve),
        }
    }

    /// Resolves a reference to its task and canonical parameters.
    fn resolve(
        &self,
        reference: &str,
        consumer: Option<&str>,
    ) -> Result<(Arc<Task>, BTreeMap<String, String>)> {
        let r = TaskRef::parse(reference)?;
        let task = self.recipes.tasks.get(&r.name).ok_or_else(|| {
            let hint = did_you_mean(&r.name, self.recipes.tasks.keys().map(String::as_str));
            match consumer {
                Some(c) => usage(format!("No such task '{}' (required by {c}){hint}", r.name)),
                None => usage(format!("No such task '{}'{hint}", r.name)),
            }
        })?;
        let mut params = BTreeMap::new();
        for (k, v) in &r.params {
            let decl = task.params.get(k).ok_or_else(|| {
                let hint = did_you_mean(k, task.params.keys().map(String::as_str));
                usage(format!("No such parameter '{k}' ({}){hint}", task.name))
            })?;
            params.insert(k.clone(), decl.normalize(&task.name, k, v)?);
        }
        for (k, decl) in &task.params {
            if params.contains_key(k) {
                continue;
            }
            match &decl.default {
                Some(d) => {
                    params.insert(k.clone(), d.clone());
                }
                None => {
                    let accepted = decl
                        .accepted()
                        .map(|a| format!(", accepted values are: {a}"))
                        .unwrap_or_default();
                    let help = decl
                        .help
                        .as_ref()
                        .map(|h| format!(" ({h})"))
                        .unwrap_or_default();
                    return Err(usage(format!(
                        "Required parameter '{k}' has not been set ({}){accepted}{help}",
                        task.name
                    )));
                }
            }
        }
        Ok((task.clone(), params))
    }

    /// Instantiates `reference` and, first, everything it requires. Depth-first without
    /// recursion (a requirement chain may be thousands of tasks deep): `frames` holds
    /// the tasks being instantiated, each with the requirements it has resolved so far.
    pub(super) fn instantiate(&mut self, reference: &str, consumer: Option<&str>) -> Result<usize> {
        struct Frame {
            task: Arc<Task>,
            params: BTreeMap<String, String>,
            qualified: String,
            next: usize,
            deps: Vec<usize>,
        }
        let (task, params) = self.resolve(reference, consumer)?;
        let goal = qualified(&task, &params);
        if let Some(&i) = self.index.get(&goal) {
            return Ok(i);
        }
        let limits = self.opts.limits;
        if goal.len() > limits.reference {
            return Err(too_long(&goal, None, &limits));
        }
        // What a limit's error names: the goal and the file that defines it.
        let file = task.file.clone();
        let exceeded = |what: String| usage(format!("{}: {what}", file.display()));
        self.stack.push(goal.clone());
        self.open.insert(goal.clone());
        let mut frames = vec![Frame {
            task,
            params,
            qualified: goal,
            next: 0,
            deps: Vec::new(),
        }];
        loop {
            let top = frames.last_mut().expect("a frame");
            if let Some(req) = top.task.def.requires.get(top.next) {
                top.next += 1;
                let expanded =
                    self.expand_static(&top.task.name, &top.params, req, Static::Plain)?;
                let (child, child_params) = self.resolve(&expanded, Some(&top.qualified))?;
                let child_qualified = qualified(&child, &child_params);
                if child_qualified.len() > limits.reference {
                    return Err(too_long(&child_qualified, Some(&top.task), &limits));
                }
                if let Some(&i) = self.index.get(&child_qualified) {
                    if !top.deps.contains(&i) {
                        top.deps.push(i);
                    }
                    continue;
                }
                if self.open.contains(&child_qualified) {
                    let pos = self
                        .stack
                        .iter()
                        .position(|q| *q == child_qualified)
                        .unwrap_or_default();
                    let mut cycle: Vec<&str> =
                        self.stack[pos..].iter().map(String::as_str).collect();
                    cycle.push(&child_qualified);
                    return Err(usage(format!("Dependency cycle: {}", cycle.join(" -> "))));
                }
                // Checked before the chain is followed any further: a chain of a
                // million tasks would otherwise be held whole before its first node.
                if frames.len() >= limits.depth {
                    return Err(exceeded(too_deep(reference, &limits)));
                }
                self.stack.push(child_qualified.clone());
                self.open.insert(child_qualified.clone());
                frames.push(Frame {
                    task: child,
                    params: child_params,
                    qualified: child_qualified,
                    next: 0,
                    deps: Vec::new(),
                });
                continue;
            }
            let frame = frames.pop().expect("a frame");
            if let Some(done) = self.stack.pop() {
                self.open.remove(&done);
            }
            if self.nodes.len() >= limits.tasks {
                return Err(exceeded(format!(
                    "the graph of '{reference}' has more than {} tasks (the limit)",
                    limits.tasks
                )));
            }
            // Requirements are nodes already: a chain through nodes made for other
            // requirements is as long as the deepest of them, plus one.
            let depth = 1 + frame
                .deps
                .iter()
                .map(|&d| self.depths[d])
                .max()
                .unwrap_or(0);
            if depth > limits.depth {
                return Err(exceeded(too_deep(reference, &limits)));
            }
            let i = self.add_node(frame.task, frame.params, frame.qualified, frame.deps)?;
            self.depths.push(depth);
            match frames.last_mut() {
                Some(parent) => {
                    if !parent.deps.contains(&i) {
                        parent.deps.push(i);
                    }
                }
                None => return Ok(i),
            }
        }
    }

    /// Adds a node whose requirements are all instantiated: its identity and checks.
    fn add_node(
        &mut self,
        task: Arc<Task>,
        params: BTreeMap<String, String>,
        qualified: String,
        deps: Vec<usize>,
    ) -> Result<usize> {
        let short_pairs: Vec<(&str, &str)> = params
            .iter()
            .filter(|(k, v)| task.params[*k].default.as_deref() != Some(v.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let short = taskref::format(&task.name, &short_pairs);
        let taint = match (&self.opts.salt, self.forced.contains(&qualified)) {
            _ if self.opts.taints.contains_key(&qualified) => {
                Some(self.opts.taints[&qualified].clone())
            }
            (salt, true) => Some(format!(
                "{}{}",
                salt.as_deref().map(|s| format!("{s}+")).unwrap_or_default(),
                fresh_taint()
            )),
            (Some(salt), false) => Some(salt.clone()),
            (None, false) => None,
        };
        let mut node = Node {
            task: task.clone(),
            params,
            qualified: qualified.clone(),
            short,
            resources: Vec::new(),
            deps,
            direct: OnceLock::new(),
            taint,
            influence: Vec::new(),
            files: Vec::new(),
            source: None,
            identity: String::new(),
            weight: task.def.weight,
        };
        for &d in &node.deps {
            for e in expand_alias(&self.nodes, d) {
                if self.nodes[e].is_resource() && !node.resources.contains(&e) {
                    node.resources.push(e);
                }
            }
        }
        let i = self.nodes.len();
        self.nodes.push(node);
        if let Some(pinned) = self.opts.pins.get(&qualified) {
            let node = &mut self.nodes[i];
            node.identity = pinned.clone();
            node.influence = vec![format!("Pinned: {pinned}")];
            self.index.insert(qualified, i);
            return Ok(i);
        }
        self.validate(i)?;
        self.nodes[i].source = self.source(i)?;
        self.pending.push(i);
        self.index.insert(qualified, i);
        Ok(i)
    }

    /// Computes node `i`'s influence and identity (its requirements have theirs).
    pub(super) fn identify(&mut self, i: usize) -> Result<()> {
        let (lines, files) = self.influence(i)?;
        let node = &mut self.nodes[i];
        node.identity = identity(&lines);
        node.influence = lines;
        node.files = files;
        Ok(())
    }

    /// Lists and hashes the influence files of every pending node on a few threads
    /// (a large graph's no-op build is mostly one `stat` per influence file). What
    /// fails here is left to [`Builder::identify`], which reports it for its task.
    fn prefetch(&mut self) {
        let mut patterns: Vec<String> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        for i in self.pending.clone() {
            let task = self.nodes[i].task.clone();
            let params = self.nodes[i].params.clone();
            for rule in &task.influence {
                if let Ok(p) = self.expand_static(&task.name, &params, &rule.files, Static::Glob) {
                    if !self.globs.contains_key(&p) && seen.insert(p.clone()) {
                        patterns.push(p);
                    }
                }
            }
        }
        let threads = crate::util::cpus().min(PREFETCH_THREADS);
        if patterns.len() < 2 * threads {
            return;
        }
        let root = &self.recipes.root;
        let hashes = self.hashes;
        let chunk = patterns.len().div_ceil(threads);
        let results: Vec<Vec<Prefetched>> = std::thread::scope(|scope| {
            let handles: Vec<_> = patterns
                .chunks(chunk)
                .map(|part| scope.spawn(move || prefetch_patterns(root, hashes, part)))
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        for Prefetched {
            pattern,
            found,
            hashed,
        } in results.into_iter().flatten()
        {
            self.hashed.insert(pattern.clone(), hashed);
            self.globs.insert(pattern, found);
        }
    }

    /// Expands a built-in kind's url and rev (parameters, `{root}`, `{env.VAR}`) and
    /// resolves a git revision to its commit.
    fn source(&mut self, i: usize) -> Result<Option<Resolved>> {
        let task = self.nodes[i].task.clone();
        let Some(source) = &task.source else {
            return Ok(None);
        };
        let params = self.nodes[i].params.clone();
        let expand = |b: &mut Self, template: &str| {
            b.expand_static(&task.name, &params, template, Static::WithRoot)
        };
        Ok(Some(match source {
            Source::Git { url, rev, keep_git } => {
                let url = expand(self, url)?;
                register_userinfo(&url);
                let rev = expand(self, rev)?;
                let qualified = &self.nodes[i].qualified;
                let commit = match self.opts.commits.get(qualified) {
                    Some(c) => c.clone(),
                    None => crate::store::sources::resolve_git(&task.name, &url, &rev)?,
                };
                Resolved::Git {
                    url,
                    commit,
                    keep_git: *keep_git,
                }
            }
            Source::Download {
                urls,
                sha256,
                extract,
            } => Resolved::Download {
                urls: urls
                    .iter()
                    .map(|u| expand(self, u).inspect(|u| register_userinfo(u)))
                    .collect::<Result<_>>()?,
                sha256: sha256.clone(),
                extract: *extract,
            },
        }))
    }

    /// Checks every placeholder of a node's commands, paths and publish rules.
    fn validate(&mut self, i: usize) -> Result<()> {
        let task = self.nodes[i].task.clone();
        let templates = templates(&task);
        // What the node sees, computed once for all its `{deps.X}`.
        let mut view: Option<Vec<usize>> = None;
        for Template {
            text: template,
            has_dirs,
            glob,
        } in templates
        {
            let names = placeholder::names(template)
                .map_err(|e| usage(format!("Task '{}': {e}", task.name)))?;
            for raw in names {
                if glob && placeholder::is_alternation(raw) {
                    continue;
                }
                // Placeholders nested in a name take parameters and {env.VAR}.
                let name = if raw.contains('{') {
                    let params = self.nodes[i].params.clone();
                    self.expand_static(&task.name, &params, raw, Static::Plain)?
                } else {
                    raw.to_string()
                };
                let name = name.as_str();
                let params = &self.nodes[i].params;
                let known = match Placeholder::parse(name, &|p| params.contains_key(p)) {
                    Placeholder::Param(_) | Placeholder::Root => true,
                    Placeholder::BuildDir | Placeholder::Artifact => has_dirs,
                    Placeholder::Env(var) => {
                        self.env_placeholder(&task.name, var)?;
                        true
                    }
                    Placeholder::Dep(dep, key) => {
                        let seen = view.get_or_insert_with(|| visible(&self.nodes, i));
                        let found = find_among(&self.nodes, seen, dep).map_err(|e| {
                            usage(format!(
                                "{e} in placeholder '{{{name}}}' of task '{}'",
                                task.name
                            ))
                        })?;
                        let dep_def = &self.nodes[found].task.def;
                        match key {
                            DepKey::Dir => true,
                            DepKey::String(k) => dep_def.strings.contains_key(k),
                            DepKey::Path(k) => dep_def.paths.contains_key(k),
                        }
                    }
                    Placeholder::Unknown(_) => false,
                };
                if known {
                    continue;
                }
                return Err(usage(format!(
                    "Unknown placeholder '{{{name}}}' in task '{}'",
                    task.name
                )));
            }
        }
        Ok(())
    }

    fn influence(&mut self, i: usize) -> Result<(Vec<String>, Vec<InfluenceFile>)> {
        let node = &self.nodes[i];
        let task = node.task.clone();
        let mut lines = vec![format!("Name: {}", task.name)];
        let influencing: Vec<String> = node
            .params
            .iter()
            .filter(|(k, _)| task.params[*k].influence)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !influencing.is_empty() {
            lines.push(format!("Parameters: {}", influencing.join(",")));
        }
        lines.push(format!("Definition: {}", task.definition_hash));
        let files = self.influence_files(i, &mut lines)?;
        for var in self.influence_vars(i)? {
            // A value's digest, not the value: the lines are kept in manifests,
            // which anyone may read from the HTTP cache, and a variable may hold a
            // token. The identity depends on the value as much.
            match self.env_var(&var) {
                Some(v) => lines.push(format!(
                    "Environment: {var}=sha256:{}",
                    crate::util::hex(&<sha2::Sha256 as sha2::Digest>::digest(v.as_bytes()))
                )),
                None => lines.push(format!("Environment: {var} is unset")),
            }
        }
        let node = &self.nodes[i];
        if let Some(Resolved::Git { commit, .. }) = &node.source {
            lines.push(format!("Git: {commit}"));
        }
        if let Some(taint) = &node.taint {
            lines.push(format!("Taint: {taint}"));
        }
        let mut reqs: Vec<&Node> = node.deps.iter().map(|&d| &self.nodes[d]).collect();
        reqs.sort_by(|a, b| a.qualified.cmp(&b.qualified));
        for dep in reqs {
            lines.push(format!("Requirement: {}: {}", dep.identity, dep.short));
        }
        lines.push(format!("Format: {FORMAT}"));
        Ok((lines, files))
    }
}

impl Builder<'_> {
    /// Node `i`'s influence files (sorted, relative to the root), each with its
    /// `File:` line. A pattern that matches nothing is an error unless optional.
    fn influence_files(&mut self, i: usize, lines: &mut Vec<String>) -> Result<Vec<InfluenceFile>> {
        let task = self.nodes[i].task.clone();
        let params = self.nodes[i].params.clone();
        let root = self.recipes.root.clone();
        let mut patterns = Vec::new();
        for rule in &task.influence {
            let pattern = self.expand_static(&task.name, &params, &rule.files, Static::Glob)?;
            if !self.globs.contains_key(&pattern) {
                let found = crate::util::globs::files_with_meta(&root, &pattern)
                    .map_err(|e| usage(format!("Task '{}': {e:#}", task.name)))?;
                self.globs.insert(pattern.clone(), found);
            }
            if self.globs[&pattern].is_empty() && !rule.optional {
                return Err(usage(format!(
                    "Task '{}': influence pattern '{pattern}' matches no file (write {{ files = \"{}\", optional = true }} if that is expected)",
                    task.name, rule.files
                )));
            }
            patterns.push(pattern);
        }
        type Entry<'e> = (Option<&'e std::fs::Metadata>, Option<&'e (String, Seen)>);
        let mut files: BTreeMap<&Path, Entry> = BTreeMap::new();
        for pattern in &patterns {
            let hashed = self.hashed.get(pattern);
            for (k, (path, meta)) in self.globs[pattern].iter().enumerate() {
                let hash = hashed.and_then(|h| h.get(k)).and_then(Option::as_ref);
                files.entry(path.as_path()).or_insert((meta.as_ref(), hash));
            }
        }
        let mut out = Vec::with_capacity(files.len());
        for (file, (meta, hashed)) in files {
            let (hash, seen) = match hashed {
                Some(h) => h.clone(),
                None => self
                    .hashes
                    .seen(file, meta)
                    .map_err(|e| usage(format!("Task '{}': {e:#}", task.name)))?,
            };
            lines.push(format!("File: {hash}: {}", file.display()));
            out.push(InfluenceFile {
                path: file.to_path_buf(),
                seen,
            });
        }
        Ok(out)
    }

    /// The environment variables node `i` is influenced by: its `influence_env`
    /// (expanded) and every `{env.VAR}` of its templates, sorted.
    fn influence_vars(&mut self, i: usize) -> Result<BTreeSet<String>> {
        let task = self.nodes[i].task.clone();
        let params = self.nodes[i].params.clone();
        let mut vars: BTreeSet<String> = BTreeSet::new();
        for template in &task.def.influence_env {
            let var = self.expand_static(&task.name, &params, template, Static::Plain)?;
            if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(usage(format!(
                    "Task '{}': influence_env '{template}' is not a variable name",
                    task.name
                )));
            }
            if crate::util::secrets::is_credential_var(&var) {
                return Err(usage(format!(
                    "Task '{}': influence_env may not name the credential variable {var}",
                    task.name
                )));
            }
            vars.insert(var);
        }
        for template in env_templates(&task) {
            vars.extend(env_names(template));
        }
        Ok(vars)
    }
}

/// A template of a task and what it may use.
struct Template<'a> {
    text: &'a str,
    /// `{builddir}` and `{artifact}` exist where it is expanded.
    has_dirs: bool,
    /// A glob: alternations (`{c,h}`) are the glob's.
    glob: bool,
}

/// Every template of a task that is expanded when it runs.
fn templates(task: &Task) -> Vec<Template<'_>> {
    fn t(text: &str, has_dirs: bool) -> Template<'_> {
        Template {
            text,
            has_dirs,
            glob: false,
        }
    }
    let is_resource = task.kind == Kind::Resource;
    let mut out: Vec<Template> = task.run.iter().map(|c| t(c, true)).collect();
    out.extend(
        task.acquire
            .iter()
            .chain(&task.release)
            .map(|c| t(c, false)),
    );
    out.extend(task.def.cwd.iter().map(|c| t(c, !is_resource)));
    out.extend(task.def.env.values().map(|v| t(v, !is_resource)));
    for rule in &task.publish {
        out.push(Template {
            glob: true,
            ..t(&rule.files, true)
        });
        out.extend(rule.cwd.iter().chain(&rule.dest).map(|c| t(c, true)));
    }
    let metadata = task
        .def
        .environ
        .values()
        .chain(task.def.strings.values())
        .chain(task.def.paths.values());
    out.extend(metadata.map(|v| t(v, false)));
    out
}

/// Templates whose `{env.VAR}` placeholders influence the identity.
fn env_templates(task: &Task) -> impl Iterator<Item = &String> {
    task.run
        .iter()
        .chain(&task.acquire)
        .chain(&task.release)
        .chain(task.def.cwd.iter())
        .chain(task.def.env.values())
        .chain(task.def.environ.values())
        .chain(task.def.strings.values())
        .chain(task.def.paths.values())
        .chain(task.publish.iter().flat_map(|r| {
            std::iter::once(&r.files)
                .chain(r.cwd.iter())
                .chain(r.dest.iter())
        }))
}

/// A password in a source URL's userinfo is a secret like a configured one: no
/// output shows it.
fn register_userinfo(url: &str) {
    if let (_, Some((_, Some(password)))) = crate::util::secrets::strip_userinfo(url) {
        crate::util::secrets::register(&password);
    }
}

/// The variables named by `{env.VAR}` placeholders in a template, nested ones included.
fn env_names(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    for name in placeholder::names(template).unwrap_or_default() {
        if name.contains('{') {
            out.extend(env_names(name));
        } else if let Placeholder::Env(var) = Placeholder::parse(name, &|_| false) {
            out.push(var.to_string());
        }
    }
    out
}

fn fresh_taint() -> String {
    let seed = format!(
        "{:?}{}",
        std::time::SystemTime::now(),
        crate::util::fs::unique_suffix()
    );
    hex(&Sha256::digest(seed.as_bytes()))[..16].to_string()
}
