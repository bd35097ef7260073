//! Exit codes and the typed errors that carry them.
//!
//! Most code returns `anyhow::Result`; where the kind of failure decides the exit
//! code (a recipe error, an unreachable server), the error is a [`Coded`] somewhere in
//! the chain, and [`exit_code`] finds it.

use std::fmt;

/// jolt's exit codes: stable, documented in the README, which scripts rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything went well, also when nothing had to run.
    Success = 0,
    /// A task failed (or an unclassified runtime error occurred).
    TaskFailed = 1,
    /// Usage, recipe or configuration error: unknown task or parameter, a syntax
    /// error, a cycle.
    Usage = 2,
    /// Infrastructure error: the broker or the HTTP cache is unreachable where it is
    /// required, or refuses the credentials.
    Infra = 3,
    /// Interrupted by the user (SIGINT) or terminated (SIGTERM).
    Interrupted = 130,
    /// Stopped, as when interrupted, because the reader of jolt's output went away
    /// (`EPIPE`: `jolt build | head -1`): 128 + SIGPIPE, what a shell reports for a
    /// command that SIGPIPE ended, and never 0, since the build did not finish.
    OutputClosed = 141,
}

impl Exit {
    /// The number the process exits with.
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.code())
    }
}

/// An error that decides the process exit code.
#[derive(Debug)]
pub struct Coded {
    pub code: Exit,
    pub message: String,
}

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Coded {}

/// A usage, recipe or configuration error (exit 2).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    Coded {
        code: Exit::Usage,
        message: message.into(),
    }
    .into()
}

/// An infrastructure error (exit 3).
pub fn infra(message: impl Into<String>) -> anyhow::Error {
    Coded {
        code: Exit::Infra,
        message: message.into(),
    }
    .into()
}

/// The exit code an error maps to: the first [`Coded`] in its chain, else 1.
pub fn exit_code(err: &anyhow::Error) -> Exit {
    err.chain()
        .find_map(|e| e.downcast_ref::<Coded>())
        .map(|c| c.code)
        .unwrap_or(Exit::TaskFailed)
}
