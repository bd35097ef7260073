//! The graph's data: the [`Graph`] of a build, its [`Node`]s (one task instance
//! each: parameters, requirements, influence and identity), and the options that
//! salt identities. A leaf: the builder makes these, the views walk them.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use super::hashes::Seen;
use crate::recipe::limits::Limits;
use crate::recipe::{Kind, Task};
use crate::util::hex;

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
    pub(super) direct: OnceLock<Vec<usize>>,
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

/// Bumped only when the way identities are computed changes.
pub const FORMAT: u32 = 1;

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

/// The SHA-256 of influence lines, each terminated by a newline.
pub fn identity(lines: &[String]) -> String {
    let mut hasher = Sha256::new();
    for line in lines {
        hasher.update(line.as_bytes());
        hasher.update(b"\n");
    }
    hex(&hasher.finalize())
}
