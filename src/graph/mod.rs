//! The task graph: task references instantiated with parameters, their requirements,
//! what each consumer sees of its requirements, and every node's influence lines and
//! identity.
//!
//! Nodes are created depth-first, so a node's requirements always have lower indices
//! than the node itself: index order is a topological order.

use anyhow::Result;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::error::usage;
use hashes::{FileHashes, Seen};

pub mod hashes;
use crate::recipe::limits::Limits;
use crate::recipe::placeholder::{self, DepKey, Placeholder};
use crate::recipe::taskref::{self, TaskRef};
use crate::recipe::{Kind, Recipes, Source, Task};
use crate::util::{did_you_mean, hex};

/// Bumped only when the way identities are computed changes.
pub const FORMAT: u32 = 1;

/// One task instance.
#[derive(Debug)]
pub struct Node {
    pub task: Arc<Task>,
    /// Every parameter, canonical, defaults included.
    pub params: BTreeMap<String, String>,
    /// Name and every parameter: the node's key.
    pub qualified: String,
    /// Name and the parameters that differ from their defaults: used in messages.
    pub short: String,
    /// Direct requirements, as declared (aliases included).
    pub deps: Vec<usize>,
    /// The requirements whose artifacts this node sees directly: `deps` with aliases
    /// expanded and resources left out. Computed on first use ([`visible`]).
    direct: OnceLock<Vec<usize>>,
    /// Resources acquired around this node's execution.
    pub resources: Vec<usize>,
    pub taint: Option<String>,
    /// Influence lines; the identity is their SHA-256.
    pub influence: Vec<String>,
    /// The influence files, sorted, in the order of their `File:` lines.
    pub files: Vec<InfluenceFile>,
    /// For the kinds `git` and `download`: where the artifact comes from.
    pub source: Option<Resolved>,
    pub identity: String,
    /// Scheduling priority: own weight plus the heaviest chain of consumers.
    pub weight: i64,
}

/// An influence file of a node.
#[derive(Debug)]
pub struct InfluenceFile {
    /// Relative to the workspace root.
    pub path: PathBuf,
    /// What the file was when its hash entered the identity.
    pub seen: Seen,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.task.name
    }

    /// The influence files, each with the hash its `File:` line gives it.
    pub fn file_hashes(&self) -> impl Iterator<Item = (&InfluenceFile, &str)> {
        let hashes = self.influence.iter().filter_map(|line| {
            let rest = line.strip_prefix("File: ")?;
            rest.split_once(": ").map(|(hash, _)| hash)
        });
        self.files.iter().zip(hashes)
    }

    /// `short id8`, the way log lines name a task.
    pub fn label(&self) -> String {
        format!(
            "{} {}",
            self.short,
            self.identity.get(..8).unwrap_or(&self.identity)
        )
    }

    pub fn is_alias(&self) -> bool {
        self.task.kind == Kind::Alias
    }

    pub fn is_resource(&self) -> bool {
        self.task.kind == Kind::Resource
    }
}

/// A built-in kind's source resolved for one node: placeholders expanded and, for
/// git, the revision (a branch, a tag) resolved to the commit it names now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Git {
        url: String,
        commit: String,
        keep_git: bool,
    },
    Download {
        urls: Vec<String>,
        sha256: String,
        extract: bool,
    },
}

/// The graph of a build.
#[derive(Debug)]
pub struct Graph {
    pub nodes: Vec<Node>,
    /// The goals as requested.
    pub requested: Vec<usize>,
    /// The goals with aliases replaced by what they require.
    pub goals: Vec<usize>,
    /// The environment variables tasks are influenced by, with the values used.
    pub env: BTreeMap<String, String>,
}

/// How identities are salted, and what a network worker is told.
#[derive(Debug, Default, Clone)]
pub struct GraphOptions {
    /// `-s`: a taint for every task.
    pub salt: Option<String>,
    /// `-f`: a fresh taint for the goals.
    pub force: bool,
    /// Taints by qualified reference, overriding `salt` and `force` (network requests).
    pub taints: HashMap<String, String>,
    /// Identities by qualified reference: such nodes take this identity instead of
    /// computing one, and their influence files are not read (network requests).
    pub pins: HashMap<String, String>,
    /// Values of the environment variables that influence tasks; `None` reads the
    /// process environment.
    pub env: Option<BTreeMap<String, String>>,
    /// Git commits by qualified reference, instead of resolving revisions (network
    /// requests carry the client's).
    pub commits: HashMap<String, String>,
    /// How many tasks the graph may hold, how deep and with references how long.
    pub limits: Limits,
}

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

struct Builder<'a> {
    recipes: &'a Recipes,
    hashes: &'a FileHashes,
    opts: &'a GraphOptions,
    forced: HashSet<String>,
    nodes: Vec<Node>,
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
    pending: Vec<usize>,
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
    fn new(recipes: &'a Recipes, hashes: &'a FileHashes, opts: &'a GraphOptions) -> Builder<'a> {
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
    fn instantiate(&mut self, reference: &str, consumer: Option<&str>) -> Result<usize> {
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
    fn identify(&mut self, i: usize) -> Result<()> {
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

/// The SHA-256 of influence lines, each terminated by a newline.
pub fn identity(lines: &[String]) -> String {
    let mut hasher = Sha256::new();
    for line in lines {
        hasher.update(line.as_bytes());
        hasher.update(b"\n");
    }
    hex(&hasher.finalize())
}

fn fresh_taint() -> String {
    let seed = format!(
        "{:?}{}",
        std::time::SystemTime::now(),
        crate::util::fs::unique_suffix()
    );
    hex(&Sha256::digest(seed.as_bytes()))[..16].to_string()
}

/// Node `i`, or, for an alias, what it groups (aliases of aliases included), in
/// declaration order. Iterative: alias chains may be deep.
fn expand_alias(nodes: &[Node], i: usize) -> Vec<usize> {
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
fn direct_artifacts(nodes: &[Node], i: usize) -> &[usize] {
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
fn designates(n: &Node, reference: &TaskRef) -> bool {
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
    use super::*;

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
