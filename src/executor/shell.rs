//! What runs a task's commands shares: one command's settings ([`Shell`]), those of
//! all the commands of one execution ([`TaskShell`]), the process groups that ended
//! ([`Groups`], killed and reaped when the execution ends), where output goes
//! ([`Forward`]), and the variables commands never inherit.

use crossbeam_channel::Sender;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::outcome::Event;
use super::process;
use super::tasklog::Log;

/// One shell command to run for a node.
pub(super) struct Shell<'a> {
    pub(super) cmd: &'a str,
    pub(super) cwd: &'a Path,
    pub(super) env: &'a [(String, String)],
    pub(super) deadline: Option<Instant>,
    pub(super) log: &'a Log,
    /// Ctrl-C kills it (releases of resources run to their end instead).
    pub(super) interruptible: bool,
    /// Where its process group goes when it ends.
    pub(super) groups: &'a Groups,
}

/// What every command of one execution shares.
pub(super) struct TaskShell<'a> {
    pub(super) deadline: Option<Instant>,
    pub(super) log: &'a Log,
    pub(super) groups: &'a Groups,
}

impl TaskShell<'_> {
    /// A command of this execution, with the defaults (interruptible).
    pub(super) fn at<'a>(
        &'a self,
        cmd: &'a str,
        cwd: &'a Path,
        env: &'a [(String, String)],
    ) -> Shell<'a> {
        Shell {
            cmd,
            cwd,
            env,
            deadline: self.deadline,
            log: self.log,
            interruptible: true,
            groups: self.groups,
        }
    }
}

/// The commands of one execution that have ended, their leaders not yet reaped: a
/// zombie keeps its pid, so the number of its process group cannot be taken by
/// another process before the group is killed. Dropping it (when the execution
/// ends, also by a panic) kills what is left of every group, reaps the leaders and
/// tells the guardian.
#[derive(Default)]
pub(super) struct Groups(Mutex<Vec<std::process::Child>>);

impl Groups {
    pub(super) fn keep(&self, child: std::process::Child) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(child);
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        let children = std::mem::take(self.0.get_mut().unwrap_or_else(|e| e.into_inner()));
        for mut child in children {
            let pgid = child.id() as i32;
            process::kill_group(pgid, libc::SIGKILL);
            let _ = child.wait();
            process::leaders().remove(&pgid);
            crate::executor::guardian::release(pgid);
        }
    }
}

/// Where a command's output goes: its bytes into the build log, its lines to the
/// scheduler.
pub(super) struct Forward {
    pub(super) i: usize,
    pub(super) log: Log,
    pub(super) events: Sender<Event>,
}

impl process::Sink for Forward {
    fn bytes(&mut self, bytes: &[u8]) {
        self.log.write_all(bytes);
    }

    fn line(&mut self, line: String, is_err: bool) {
        let _ = self.events.send(Event::Output {
            i: self.i,
            line,
            is_err,
        });
    }
}

/// The credential variables of this process, which commands never inherit.
pub(super) fn credential_vars() -> &'static [std::ffi::OsString] {
    static VARS: OnceLock<Vec<std::ffi::OsString>> = OnceLock::new();
    VARS.get_or_init(crate::util::secrets::credential_vars)
}
