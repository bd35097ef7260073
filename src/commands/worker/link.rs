//! What one request sees of a worker's session: its connection and channels, its
//! locks, and the progress thread that says `running` while it builds.

use amiquip::{Channel, Connection};
use crossbeam_channel::Sender;
use std::sync::Mutex;

use super::acceptor::Acceptor;
use super::lock;

/// The AMQP side of a worker's session, as one request sees it.
pub(super) struct Link<'a> {
    pub(super) connection: &'a mut Connection,
    /// The consuming channel: a request queued again goes out on it, before the
    /// original's ack.
    pub(super) channel: &'a Channel,
    pub(super) publisher: &'a Mutex<Channel>,
    pub(super) acceptor: &'a Acceptor,
    pub(super) locks: &'a mut lock::Locks,
    pub(super) progress: &'a Progress<'a>,
}

/// The worker session's side of its progress thread.
pub(super) struct Progress<'a> {
    /// `true` when a build begins, `false` when it ends: the thread's timer.
    pub(super) running: Sender<bool>,
    /// The build under way, held while a `running` reply is published.
    pub(super) building: &'a Mutex<Option<Building>>,
}

/// A build the progress thread reports on.
pub(super) struct Building {
    pub(super) identity: String,
    /// The request's fleet ([`Request::cache`]).
    pub(super) cache: String,
    /// Whether its clients were told `accepted`.
    pub(super) announced: bool,
}
