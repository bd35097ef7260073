//! Recipes: finding the workspace, reading `jolt.toml` and its includes, and turning
//! each `[task.NAME]` table into a validated [`Task`].
//!
//! The raw definition of a task is kept as read ([`TaskDef`]); its canonical form,
//! without the keys that cannot change what a task produces (description, weight,
//! scheduling hints, help texts), is hashed into the task's `Definition` influence.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::usage;
use crate::util::{hex, one_line};
use limits::Limits;
use param::Param;

pub mod limits;
pub mod param;
pub mod placeholder;
pub mod taskref;

/// The recipe file that marks the workspace root.
pub const ROOT_FILE: &str = "jolt.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDef {
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    task: BTreeMap<String, TaskDef>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The kind of a task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Task,
    Alias,
    Resource,
    /// A git repository checked out at a commit.
    Git,
    /// A downloaded file, verified by its SHA-256 and optionally extracted.
    Download,
}

impl Kind {
    /// Whether tasks of this kind produce an artifact.
    pub fn has_artifact(self) -> bool {
        matches!(self, Kind::Task | Kind::Git | Kind::Download)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Task => "task",
            Kind::Alias => "alias",
            Kind::Resource => "resource",
            Kind::Git => "git",
            Kind::Download => "download",
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A task table as written in a recipe. Keys that do not influence the artifact are
/// not serialised, so they stay out of the definition hash.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDef {
    #[serde(default, skip_serializing)]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, toml::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Glob strings, or `{ files, optional }` tables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub influence: Vec<toml::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub influence_env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<OneOrMany>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<toml::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environ: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub strings: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub paths: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<OneOrMany>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_git: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extract: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire: Option<OneOrMany>,
    /// The shell the task's commands run in; left out of the definition (and so of
    /// identities) when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<OneOrMany>,
    #[serde(default, skip_serializing)]
    pub cacheable: Option<bool>,
    #[serde(default, skip_serializing)]
    pub selfsustained: bool,
    #[serde(default, skip_serializing)]
    pub weight: i64,
    #[serde(default, skip_serializing)]
    pub unstable: bool,
    #[serde(default, skip_serializing)]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing)]
    pub routing_key: Option<String>,
    #[serde(default, skip_serializing)]
    pub fast: bool,
    #[serde(default, skip_serializing)]
    pub expires: Option<toml::Value>,
}

/// A publish rule: copy `files` (a glob relative to `cwd`) into the artifact at `dest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRule {
    pub files: String,
    pub cwd: Option<String>,
    pub dest: Option<String>,
    pub flatten: bool,
}

/// An influence rule: files (a glob relative to the workspace root, placeholders
/// allowed) hashed into the identity. A pattern that matches no file is an error
/// unless it is `optional`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfluenceRule {
    pub files: String,
    pub optional: bool,
}

/// When an artifact may be evicted from the local cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expires {
    /// Evictable as soon as the cache is over its size limit (the default).
    Immediately,
    /// Never evicted automatically.
    Never,
    /// Evictable once older than this many seconds.
    After(u64),
    /// Evictable once unused for this many seconds.
    UnusedFor(u64),
}

/// Where a built-in kind's artifact comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `kind = "git"`: `rev` (branch, tag or full commit) of the repository at `url`.
    Git {
        url: String,
        rev: String,
        keep_git: bool,
    },
    /// `kind = "download"`: the first of `urls` (mirrors of one file) that answers,
    /// whose SHA-256 must be `sha256`.
    Download {
        urls: Vec<String>,
        sha256: String,
        extract: bool,
    },
}

/// A validated task.
#[derive(Debug)]
pub struct Task {
    pub name: String,
    pub def: TaskDef,
    pub kind: Kind,
    pub params: BTreeMap<String, Param>,
    pub run: Vec<String>,
    pub acquire: Vec<String>,
    pub release: Vec<String>,
    pub publish: Vec<PublishRule>,
    pub influence: Vec<InfluenceRule>,
    /// For the kinds `git` and `download`.
    pub source: Option<Source>,
    pub cacheable: bool,
    /// The shell its commands run in: `SHELL -e -c CMD` (`/bin/sh` unless set).
    pub shell: String,
    pub timeout: Option<Duration>,
    pub expires: Expires,
    /// The recipe file, relative to the workspace root.
    pub file: PathBuf,
    /// The line of the task's table in that file, when found.
    pub line: Option<usize>,
    /// SHA-256 of the canonical definition (`def` without the keys that cannot
    /// change the output).
    pub definition_hash: String,
}

/// A recipe file as read.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Relative to the workspace root.
    pub path: PathBuf,
    pub text: String,
}

/// All recipes of a workspace.
#[derive(Debug)]
pub struct Recipes {
    pub root: PathBuf,
    /// Shared, like `tasks`: a worker serves many requests from one parse.
    pub files: Arc<Vec<SourceFile>>,
    pub tasks: Arc<BTreeMap<String, Arc<Task>>>,
}

/// The nearest directory from `start` upwards that holds `jolt.toml`.
pub fn find_root(start: &Path) -> Result<PathBuf> {
    let mut dir = Some(start);
    while let Some(d) = dir {
        if d.join(ROOT_FILE).is_file() {
            return Ok(d.to_path_buf());
        }
        dir = d.parent();
    }
    Err(usage(format!(
        "No {ROOT_FILE} found in {} or any parent directory",
        start.display()
    )))
}

impl Recipes {
    /// Reads `root/jolt.toml` and everything it includes.
    pub fn load(root: &Path) -> Result<Recipes> {
        Recipes::load_within(root, &Limits::DEFAULT)
    }

    /// [`Recipes::load`], refusing recipes beyond `limits`: their bytes as they are
    /// read, their task definitions once a file is parsed.
    pub fn load_within(root: &Path, limits: &Limits) -> Result<Recipes> {
        let mut files: Vec<SourceFile> = Vec::new();
        let mut tasks: BTreeMap<String, Arc<Task>> = BTreeMap::new();
        let mut queue = vec![PathBuf::from(ROOT_FILE)];
        let mut bytes_left = limits.recipe_bytes;
        while let Some(rel) = queue.pop() {
            if files.iter().any(|f| f.path == rel) {
                continue;
            }
            let text = read_recipe(root, &rel, &mut bytes_left, limits)?;
            let def: FileDef = toml::from_str(&text).map_err(|e| {
                usage(format!(
                    "Syntax error in {} at {}",
                    rel.display(),
                    one_line(&e, &text)
                ))
            })?;
            if tasks.len() + def.task.len() > limits.tasks {
                return Err(usage(format!(
                    "{}: the recipes define more than {} tasks (the limit)",
                    rel.display(),
                    limits.tasks
                )));
            }
            let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            let mut included = Vec::new();
            for pattern in &def.include {
                let found = crate::util::globs::files(&root.join(&dir), pattern)
                    .with_context(|| format!("In {}", rel.display()))?;
                included.extend(found.into_iter().map(|p| dir.join(p)));
            }
            included.sort();
            included.reverse();
            queue.extend(included);
            let lines = task_lines(&text);
            for (name, task_def) in def.task {
                if let Some(existing) = tasks.get(&name) {
                    return Err(usage(format!(
                        "Task '{name}' is defined twice: in {} and in {}",
                        existing.file.display(),
                        rel.display()
                    )));
                }
                let line = lines.get(&name).copied();
                let task = Task::new(name.clone(), task_def, rel.clone(), line)?;
                tasks.insert(name, Arc::new(task));
            }
            files.push(SourceFile { path: rel, text });
        }
        Ok(Recipes {
            root: root.to_path_buf(),
            files: Arc::new(files),
            tasks: Arc::new(tasks),
        })
    }

    /// The same recipes, for a workspace at `root` (they share files and tasks).
    pub fn rooted(&self, root: &Path) -> Recipes {
        Recipes {
            root: root.to_path_buf(),
            files: self.files.clone(),
            tasks: self.tasks.clone(),
        }
    }
}

/// The text of the recipe file `rel`, taken from the `left` bytes the recipes may
/// still hold: a file larger than that is read no further than one byte past it.
fn read_recipe(root: &Path, rel: &Path, left: &mut u64, limits: &Limits) -> Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(root.join(rel))
        .and_then(|f| f.take(*left + 1).read_to_end(&mut bytes))
        .map_err(|e| usage(format!("Cannot read recipe {}: {e}", rel.display())))?;
    *left = left.checked_sub(bytes.len() as u64).ok_or_else(|| {
        usage(format!(
            "{}: the recipes are larger than {} bytes (the limit)",
            rel.display(),
            limits.recipe_bytes
        ))
    })?;
    String::from_utf8(bytes)
        .map_err(|e| usage(format!("Cannot read recipe {}: {e}", rel.display())))
}

/// The line of each `[task.NAME]` header of a recipe file, in one pass.
fn task_lines(text: &str) -> HashMap<String, usize> {
    let mut lines = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("[task.") else {
            continue;
        };
        let Some(header) = rest.trim_end().strip_suffix(']') else {
            continue;
        };
        let name = header
            .strip_prefix('"')
            .and_then(|h| h.strip_suffix('"'))
            .or_else(|| header.strip_prefix('\'').and_then(|h| h.strip_suffix('\'')))
            .unwrap_or(header);
        lines.entry(name.to_string()).or_insert(i + 1);
    }
    lines
}

impl Task {
    fn new(name: String, def: TaskDef, file: PathBuf, line: Option<usize>) -> Result<Task> {
        let bad = |what: String| usage(format!("Task '{name}' in {}: {what}", file.display()));
        if !crate::recipe::taskref::valid_name(&name) {
            return Err(bad(
                "invalid name: use letters, digits and _ - . /".to_string()
            ));
        }
        if crate::recipe::taskref::reserved(&name) {
            return Err(bad(
                "invalid name: names with a part starting with '_' are jolt's \
                 (the HTTP cache keeps _recipes/ and _sources/ beside the tasks)"
                    .to_string(),
            ));
        }
        let mut params = BTreeMap::new();
        for (pname, decl) in &def.parameters {
            if !pname.chars().all(|c| c.is_alphanumeric() || c == '_') {
                return Err(bad(format!("invalid parameter name '{pname}'")));
            }
            params.insert(pname.clone(), Param::from_toml(&name, pname, decl)?);
        }
        let run = def.run.clone().map(OneOrMany::into_vec).unwrap_or_default();
        let acquire = def
            .acquire
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        let release = def
            .release
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        let publish = match &def.publish {
            None => Vec::new(),
            Some(v) => parse_publish(v).map_err(bad)?,
        };
        let influence = parse_influence(&def.influence).map_err(bad)?;
        let timeout = match &def.timeout {
            None => None,
            Some(t) => Some(crate::util::fs::parse_duration(t).ok_or_else(|| {
                bad(format!(
                    "invalid timeout '{t}': expected e.g. 90s, 10m, 2h (at most 100 years)"
                ))
            })?),
        };
        let expires = match &def.expires {
            None => Expires::Immediately,
            Some(v) => parse_expires(v).map_err(bad)?,
        };
        let commands = Commands {
            run: &run,
            acquire: &acquire,
            release: &release,
            publish: &publish,
        };
        check_kind(&def, &commands).map_err(bad)?;
        let source = source(&def).map_err(bad)?;
        let cacheable = def.kind.has_artifact() && def.cacheable.unwrap_or(true);
        let shell = match def.shell.as_deref() {
            None => DEFAULT_SHELL.to_string(),
            Some(s) if valid_shell(s) => s.to_string(),
            Some(s) => {
                return Err(bad(format!(
                "invalid shell '{s}': name a command (bash) or give its absolute path (/bin/bash)"
            )))
            }
        };
        let definition_hash = definition_hash(&def);
        Ok(Task {
            name,
            kind: def.kind,
            def,
            params,
            run,
            acquire,
            release,
            publish,
            influence,
            source,
            cacheable,
            shell,
            timeout,
            expires,
            file,
            line,
            definition_hash,
        })
    }

    /// Whether this task produces an artifact that consumers see.
    pub fn has_artifact(&self) -> bool {
        self.kind.has_artifact()
    }
}

/// The shell commands run in when a task names none, by its path: a bare `sh` is
/// looked up in `PATH` by the child, one failed `exec` per directory before it.
pub const DEFAULT_SHELL: &str = "/bin/sh";

/// Whether `shell` names a command (found on `PATH`) or is an absolute path.
fn valid_shell(shell: &str) -> bool {
    let plain = |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
    match shell.strip_prefix('/') {
        Some(rest) => plain(rest),
        None => plain(shell) && !shell.contains('/'),
    }
}

/// What a task runs and publishes, as checked against its kind.
struct Commands<'a> {
    run: &'a [String],
    acquire: &'a [String],
    release: &'a [String],
    publish: &'a [PublishRule],
}

/// Refuses keys that do not belong to the task's kind.
fn check_kind(def: &TaskDef, c: &Commands) -> Result<(), String> {
    let runs = !c.run.is_empty() || !c.publish.is_empty();
    let resource = !c.acquire.is_empty() || !c.release.is_empty();
    match def.kind {
        Kind::Alias
            if runs
                || resource
                || def.cwd.is_some()
                || !def.influence.is_empty()
                || !def.environ.is_empty() =>
        {
            Err("an alias may only have requires, parameters and a description".into())
        }
        Kind::Resource if runs => {
            Err("a resource has acquire and release commands, not run or publish".into())
        }
        Kind::Git | Kind::Download if runs || resource => Err(format!(
            "a {} task has no run, publish, acquire or release",
            def.kind.name()
        )),
        Kind::Task if def.url.is_some() || def.rev.is_some() || def.sha256.is_some() => {
            Err("url, rev and sha256 belong to tasks of kind = \"git\" or \"download\"".into())
        }
        Kind::Task if resource => {
            Err("acquire and release belong to tasks of kind = \"resource\"".into())
        }
        _ => Ok(()),
    }
}

/// Where a `git` or `download` task's artifact comes from, as written.
fn source(def: &TaskDef) -> Result<Option<Source>, String> {
    let urls = def.url.clone().map(OneOrMany::into_vec).unwrap_or_default();
    match def.kind {
        Kind::Git => {
            let (Some(rev), [url]) = (def.rev.clone(), &urls[..]) else {
                return Err("a git task needs one url and a rev (branch, tag or commit)".into());
            };
            Ok(Some(Source::Git {
                url: url.clone(),
                rev,
                keep_git: def.keep_git.unwrap_or(false),
            }))
        }
        Kind::Download => {
            let sha256 = def.sha256.clone().unwrap_or_default().to_ascii_lowercase();
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("a download task needs sha256 = \"<64 hex digits>\"".into());
            }
            if urls.is_empty() {
                return Err("a download task needs a url (or a list of mirrors)".into());
            }
            Ok(Some(Source::Download {
                urls,
                sha256,
                extract: def.extract.unwrap_or(true),
            }))
        }
        _ => Ok(None),
    }
}

fn definition_hash(def: &TaskDef) -> String {
    let mut def = def.clone();
    for decl in def.parameters.values_mut() {
        if let toml::Value::Table(t) = decl {
            t.remove("help");
        }
    }
    let json = serde_json::to_vec(&def).unwrap_or_default();
    hex(&Sha256::digest(&json))
}

fn parse_publish(value: &toml::Value) -> Result<Vec<PublishRule>, String> {
    let items = match value {
        toml::Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    items
        .iter()
        .map(|item| match item {
            toml::Value::String(s) => Ok(PublishRule {
                files: s.clone(),
                cwd: None,
                dest: None,
                flatten: false,
            }),
            toml::Value::Table(t) => {
                let mut rule = PublishRule {
                    files: String::new(),
                    cwd: None,
                    dest: None,
                    flatten: false,
                };
                for (k, v) in t {
                    let s = || {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| format!("publish '{k}' must be a string"))
                    };
                    match k.as_str() {
                        "files" => rule.files = s()?,
                        "cwd" => rule.cwd = Some(s()?),
                        "dest" => rule.dest = Some(s()?),
                        "flatten" => {
                            rule.flatten = v
                                .as_bool()
                                .ok_or_else(|| "publish 'flatten' must be true or false".to_string())?
                        }
                        other => return Err(format!("unknown publish key '{other}'")),
                    }
                }
                if rule.files.is_empty() {
                    return Err("a publish rule needs 'files'".to_string());
                }
                Ok(rule)
            }
            other => Err(format!(
                "publish rules are glob strings or {{ files, cwd, dest, flatten }} tables, not {other}"
            )),
        })
        .collect()
}

fn parse_influence(items: &[toml::Value]) -> Result<Vec<InfluenceRule>, String> {
    items
        .iter()
        .map(|item| match item {
            toml::Value::String(s) => Ok(InfluenceRule {
                files: s.clone(),
                optional: false,
            }),
            toml::Value::Table(t) => {
                let mut rule = InfluenceRule {
                    files: String::new(),
                    optional: false,
                };
                for (k, v) in t {
                    match (k.as_str(), v) {
                        ("files", toml::Value::String(s)) => rule.files = s.clone(),
                        ("optional", toml::Value::Boolean(b)) => rule.optional = *b,
                        ("files", _) => return Err("influence 'files' must be a string".into()),
                        ("optional", _) => {
                            return Err("influence 'optional' must be true or false".into())
                        }
                        (other, _) => return Err(format!("unknown influence key '{other}'")),
                    }
                }
                if rule.files.is_empty() {
                    return Err("an influence rule needs 'files'".into());
                }
                Ok(rule)
            }
            other => Err(format!(
                "influence entries are glob strings or {{ files, optional }} tables, not {other}"
            )),
        })
        .collect()
}

fn parse_expires(value: &toml::Value) -> Result<Expires, String> {
    let duration = |v: &toml::Value| -> Result<u64, String> {
        v.as_str()
            .and_then(crate::util::fs::parse_duration)
            .map(|d| d.as_secs())
            .ok_or_else(|| {
                format!("invalid expires duration {v}: expected e.g. \"7d\" (at most 100 years)")
            })
    };
    match value {
        toml::Value::String(s) if s == "never" => Ok(Expires::Never),
        toml::Value::String(s) if s == "immediately" => Ok(Expires::Immediately),
        toml::Value::Table(t) if t.len() == 1 => {
            let (k, v) = t.iter().next().expect("one entry");
            match k.as_str() {
                "after" => Ok(Expires::After(duration(v)?)),
                "unused_for" => Ok(Expires::UnusedFor(duration(v)?)),
                _ => Err(format!("unknown expires policy '{k}'")),
            }
        }
        other => Err(format!(
            "invalid expires {other}: expected \"never\", \"immediately\", {{ after = \"7d\" }} or {{ unused_for = \"30d\" }}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(text: &str) -> Result<Task> {
        let def: TaskDef = toml::from_str(text)?;
        Task::new("t".into(), def, PathBuf::from(ROOT_FILE), None)
    }

    #[test]
    fn definition_ignores_scheduling_keys() {
        let a = task("run = \"echo hi\"").unwrap();
        let b =
            task("run = \"echo hi\"\nweight = 5\ndescription = \"x\"\nunstable = true").unwrap();
        let c = task("run = \"echo ho\"").unwrap();
        assert_eq!(a.definition_hash, b.definition_hash);
        assert_ne!(a.definition_hash, c.definition_hash);
    }

    #[test]
    fn publish_rules_accept_strings_and_tables() {
        let t = task("publish = [\"*.txt\", { files = \"a\", cwd = \"{builddir}\", dest = \"d/\", flatten = true }]").unwrap();
        assert_eq!(t.publish.len(), 2);
        assert_eq!(t.publish[1].dest.as_deref(), Some("d/"));
        assert!(t.publish[1].flatten);
        assert!(task("publish = [{ file = \"a\" }]").is_err());
    }

    #[test]
    fn expires_policies_parse() {
        assert_eq!(task("expires = \"never\"").unwrap().expires, Expires::Never);
        assert_eq!(
            task("expires = { after = \"7d\" }").unwrap().expires,
            Expires::After(7 * 86400)
        );
        assert_eq!(
            task("expires = { unused_for = \"1h\" }").unwrap().expires,
            Expires::UnusedFor(3600)
        );
        assert!(task("expires = \"soon\"").is_err());
    }

    #[test]
    fn kinds_are_validated() {
        assert!(task("kind = \"alias\"\nrequires = [\"a\"]").is_ok());
        assert!(task("kind = \"alias\"\nrun = \"x\"").is_err());
        assert!(task("kind = \"resource\"\nacquire = \"x\"").is_ok());
        assert!(task("acquire = \"x\"").is_err());
        assert!(task("timeout = \"forever\"").is_err());
    }

    #[test]
    fn task_headers_are_found_with_their_lines() {
        let lines = task_lines(
            "[task.a]\nrun = 'x'\n\n[task.\"tools/gcc\"]\n  [task.'b.c']\n[task.a.env]\n",
        );
        assert_eq!(lines.get("a"), Some(&1));
        assert_eq!(lines.get("tools/gcc"), Some(&4));
        assert_eq!(lines.get("b.c"), Some(&5));
    }

    #[test]
    fn source_kinds_are_validated() {
        let git = task("kind = \"git\"\nurl = \"file:///r.git\"\nrev = \"main\"").unwrap();
        assert!(matches!(git.source, Some(Source::Git { .. })));
        assert!(git.cacheable);
        assert!(task("kind = \"git\"\nurl = \"file:///r.git\"").is_err());
        let sha = "a".repeat(64);
        let dl = task(&format!("kind = \"download\"\nurl = [\"http://a/x.tgz\", \"http://b/x.tgz\"]\nsha256 = \"{sha}\"")).unwrap();
        assert!(
            matches!(dl.source, Some(Source::Download { ref urls, extract: true, .. }) if urls.len() == 2)
        );
        assert!(task("kind = \"download\"\nurl = \"http://a/x\"\nsha256 = \"abc\"").is_err());
        assert!(task("kind = \"download\"\nurl = \"http://a/x\"\nrun = \"x\"").is_err());
        assert!(task("url = \"http://a/x\"").is_err());
    }

    #[test]
    fn recipes_beyond_the_limits_are_refused_before_they_are_parsed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join(ROOT_FILE),
            "include = [\"more.toml\"]\n[task.a]\n",
        )
        .unwrap();
        std::fs::write(root.join("more.toml"), "[task.b]\n[task.c]\n").unwrap();
        let load = |limits| Recipes::load_within(root, &limits).map(|r| r.tasks.len());
        let bytes = |recipe_bytes| Limits {
            recipe_bytes,
            ..Limits::DEFAULT
        };
        // The bytes of all files count.
        assert_eq!(load(bytes(51)).unwrap(), 3);
        let err = load(bytes(50)).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), crate::error::Exit::Usage);
        assert_eq!(
            err.to_string(),
            "more.toml: the recipes are larger than 50 bytes (the limit)"
        );
        let tasks = |tasks| Limits {
            tasks,
            ..Limits::DEFAULT
        };
        assert_eq!(load(tasks(3)).unwrap(), 3);
        let err = load(tasks(2)).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), crate::error::Exit::Usage);
        assert_eq!(
            err.to_string(),
            "more.toml: the recipes define more than 2 tasks (the limit)"
        );
    }

    #[test]
    fn a_recipe_file_is_read_no_further_than_its_limit() {
        // A FIFO nobody ever closes: reading it to its end would never return.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join(ROOT_FILE);
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            // Fails once the reader has gone.
            while f.write_all(b"# filler\n").is_ok() {}
        });
        let limits = Limits {
            recipe_bytes: 1000,
            ..Limits::DEFAULT
        };
        let err = Recipes::load_within(dir.path(), &limits).unwrap_err();
        assert_eq!(
            err.to_string(),
            "jolt.toml: the recipes are larger than 1000 bytes (the limit)"
        );
        writer.join().unwrap();
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let text = "[task.a]\nrun = \"x\"\nbogus = \n";
        let err = toml::from_str::<FileDef>(text).unwrap_err();
        assert!(
            one_line(&err, text).starts_with("line 3"),
            "{}",
            one_line(&err, text)
        );
    }
}
