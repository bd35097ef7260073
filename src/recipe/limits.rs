//! The limits of what recipes and the graph built from them may hold, checked before
//! the work they would cost: recipe bytes while a file is read, task definitions once
//! a file is parsed, task references as they are resolved, and tasks and
//! requirement depth as nodes are created.
//!
//! A worker builds whatever recipes a request names, and anyone who may upload a
//! bundle writes them: without limits, a 62 MB bundle (a chain of 1.2 million tasks)
//! took a worker from 82 MB to 4 GB in 30 s, and a four-line recipe whose task
//! requires itself with a parameter that doubles (`c:p={p}{p}`) exhausts any
//! machine. Each limit is far above a real workspace, and together they bound what a
//! request can make a worker hold. Measured in a debug build: 100,000 minimal task
//! definitions parse in 146 MB (16 MiB of them, 1.1 million, took 1.5 GB: hence a
//! limit on definitions beside the one on bytes); a graph of 131,071 tasks (a
//! parameter tree, shallow) builds in 300 MB, so one at the task limit in about
//! 230 MB. They are constants, not settings: a client and its workers must agree on
//! them, and no workspace has asked for more.

/// The limits, as one value so that tests can lower them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of recipe text in a workspace, all files together.
    pub recipe_bytes: u64,
    /// Task definitions in a workspace's recipes, and task instances (nodes) in a
    /// graph.
    pub tasks: usize,
    /// Tasks in the longest requirement chain of a graph, its ends included.
    pub depth: usize,
    /// Bytes of a task reference, every parameter included (`name:p=v,...`).
    pub reference: usize,
}

impl Limits {
    /// The limits every build and worker applies.
    pub const DEFAULT: Limits = Limits {
        // A large monorepo's recipes are a few hundred kilobytes.
        recipe_bytes: 16 << 20,
        // 2.5 times the 40,000-task chain jolt is built to handle.
        tasks: 100_000,
        // That chain, with room.
        depth: 50_000,
        // A name with a few dozen parameters; a reference that grows with each
        // level of a chain stops within a few thousand levels.
        reference: 4096,
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}
