//! Task locks: which worker of the fleet builds an identity, without a broker object
//! created and deleted per task (declaring and deleting a queue costs RabbitMQ about
//! 3 ms of CPU; a consumer, about 0.15 ms).
//!
//! What is locked is a request's lock key, its identity within its fleet
//! (`messages::Request::lock_key`, 64 hex digits as an identity; "identity" below).
//! Identities hash onto [`SHARDS`] shard queues, `jolt_shard_<xyz>`, declared by a
//! worker that finds one missing (its consumer refused with 404: a declaration of a
//! queue that exists costs the broker about 0.3 ms, as much as the lock itself) and
//! left to expire when unused. A worker locks an identity by consuming its shard
//! queue exclusively, which the broker grants to one consumer at a time and drops
//! with its connection. The shard's holder answers other workers' questions about
//! the identity it holds (the holder thread, [`Locks`]), so a collision, another
//! identity of the same shard, costs a question and not a wait:
//!
//! - *Shard lock*: consume `jolt_shard_<s>` exclusively; then make sure no worker holds
//!   the identity by its own lock (a `mandatory` probe to `jolt_lock_<key>`,
//!   returned when that queue does not exist). Questions that come before the probe
//!   has answered wait for it.
//! - *Own lock*, when the shard is taken: declare the exclusive queue
//!   `jolt_lock_<key>` (refused: another worker holds it, a duplicate), then ask
//!   the shard's holder by a message to the shard queue whose body is the identity;
//!   it answers `held` or `free` into `jolt_lock_<key>`. `held`: a duplicate.
//!   No answer within [`ASK_WAIT`] (the holder went before it read the question):
//!   let go and try again.
//!
//! Why two workers never hold one identity while their connections live: two shard
//! locks exclude each other, and so do two own locks. A shard lock taken before an
//! own lock of the same identity is declared answers that lock's question `held`
//! (the question is asked after the declaration, and the shard lock is held until
//! the task is done); one taken after it finds it with the probe. An answer is only
//! ever delivered into a queue that exists, so it speaks of a time after the own lock
//! was declared.

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Connection, ConsumerMessage, ConsumerOptions, Delivery,
    FieldTable, Publish, QueueDeclareOptions, QueueDeleteOptions,
};
use anyhow::{Context, Result};
use crossbeam_channel::{select, Receiver, Sender};
use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::remote::amqp::cancel_consumer;
use crate::remote::messages::is_hex;

/// How many shard queues identities hash onto. A task collides with another one
/// running in its shard with a probability of about (tasks running) / SHARDS, which
/// costs three messages; the idle shard queues cost the broker about 28 KiB each.
const SHARDS: u32 = 1024;

/// How long a worker waits for a shard holder's answer before it tries again.
const ASK_WAIT: Duration = Duration::from_secs(10);

/// How often a worker waiting for an answer checks that the shard still has a
/// holder.
const HOLDER_CHECK: Duration = Duration::from_millis(20);

/// A shard queue unused for this long (no consumer, no declaration) is deleted by
/// the broker, so an idle broker keeps none.
const SHARD_EXPIRES_MS: i32 = 30 * 60 * 1000;

/// The shard queue of shard `n`.
fn shard_queue(n: u32) -> String {
    format!("jolt_shard_{n:03x}")
}

/// The own lock of `identity`.
fn own_queue(identity: &str) -> String {
    format!("jolt_lock_{identity}")
}

/// The shard of an identity (64 hex digits): its first four digits, modulo the shard
/// count.
fn shard_of(identity: &str) -> u32 {
    let head = identity
        .get(..4)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .unwrap_or(0);
    head % shards()
}

/// [`SHARDS`], or fewer for tests that make identities collide
/// ([`crate::testhooks::lock_shards`]).
fn shards() -> u32 {
    crate::testhooks::lock_shards()
        .filter(|n| (1..=SHARDS).contains(n))
        .unwrap_or(SHARDS)
}

/// A lock a worker holds.
pub(super) enum Lock {
    /// The identity's shard, consumed by the holder thread.
    Shard,
    /// The identity's own exclusive queue.
    Own(String),
}

/// What came of trying to lock an identity.
pub(super) enum Taken {
    Held(Lock),
    /// Another worker holds it.
    Duplicate,
    /// Undecided (a shard holder went without answering, a shard queue expired): try
    /// again.
    Again,
}

/// What an asker heard from a shard's holder.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Heard {
    Held,
    Free,
    /// No answer: the holder went, or does not answer.
    Nothing,
    /// The shard queue was deleted while the question waited in it.
    ShardGone,
}

impl Heard {
    /// The answer a delivery carries, if it is one.
    fn of(delivery: &Delivery) -> Option<Heard> {
        match delivery.body.as_slice() {
            b"held" => Some(Heard::Held),
            b"free" => Some(Heard::Free),
            _ => None,
        }
    }
}

/// Whether a `mandatory` publish reached a queue (the broker did not return it).
pub(super) trait Probe {
    fn routed(&self, exchange: &str, routing_key: &str, body: &[u8]) -> Result<bool>;
}

/// A worker session's locks: a channel for declarations, own locks and questions, a
/// spare channel for the next shard lock, and the holder thread that consumes a
/// shard while the worker holds it.
pub(super) struct Locks {
    channel: Option<Channel>,
    spare: Option<Channel>,
    /// Shard queues this connection found missing (a consumer refused with 404):
    /// declared before the next try. The others are taken to exist, so a worker
    /// declares none while the fleet keeps its shards alive.
    missing: HashSet<u32>,
    to_holder: Option<Sender<ToHolder>>,
    from_holder: Receiver<FromHolder>,
    holder: Option<std::thread::JoinHandle<()>>,
}

enum ToHolder {
    /// Consume `queue` exclusively on `channel`, for `identity`.
    Hold {
        channel: Channel,
        queue: String,
        identity: String,
    },
    /// No other worker holds the identity by its own lock: answer questions.
    Confirm,
    /// Stop consuming, and hand the channel back.
    Release,
}

enum FromHolder {
    Consuming,
    /// The broker refused the consumer (with this reply code), closing the channel.
    Refused(Option<u16>),
    /// The consumer is cancelled; the channel, unless the broker closed it.
    Released(Option<Channel>),
}

impl Locks {
    pub(super) fn new() -> Locks {
        let (to_holder, commands) = crossbeam_channel::bounded(1);
        let (answers, from_holder) = crossbeam_channel::bounded(1);
        let holder = std::thread::Builder::new()
            .name("lock-holder".into())
            .spawn(move || holder(commands, answers))
            .expect("cannot start the lock holder thread");
        Locks {
            channel: None,
            spare: None,
            missing: HashSet::new(),
            to_holder: Some(to_holder),
            from_holder,
            holder: Some(holder),
        }
    }

    /// The channel for declarations, own locks and questions, opened anew after the
    /// broker closed it.
    fn channel(&mut self, connection: &mut Connection) -> Result<&Channel> {
        if self.channel.is_none() {
            self.channel = Some(connection.open_channel(None)?);
        }
        Ok(self.channel.as_ref().expect("lock channel"))
    }

    fn ask_holder(&self, command: ToHolder) -> Result<FromHolder> {
        let gone = || anyhow::anyhow!("The lock holder thread is gone");
        self.to_holder
            .as_ref()
            .ok_or_else(gone)?
            .send(command)
            .map_err(|_| gone())?;
        self.from_holder.recv().map_err(|_| gone())
    }

    /// Locks `identity`, or says who has it.
    pub(super) fn take(
        &mut self,
        connection: &mut Connection,
        probe: &dyn Probe,
        identity: &str,
    ) -> Result<Taken> {
        let shard = shard_of(identity);
        if self.missing.contains(&shard) {
            let mut arguments = FieldTable::new();
            arguments.insert("x-expires".into(), AmqpValue::LongInt(SHARD_EXPIRES_MS));
            let declared = self.channel(connection)?.queue_declare(
                shard_queue(shard),
                QueueDeclareOptions {
                    arguments,
                    ..Default::default()
                },
            );
            if let Err(e) = declared {
                self.channel = None;
                return Err(e).context("Cannot declare a lock shard queue");
            }
            self.missing.remove(&shard);
        }
        let channel = match self.spare.take() {
            Some(c) => c,
            None => connection.open_channel(None)?,
        };
        let hold = ToHolder::Hold {
            channel,
            queue: shard_queue(shard),
            identity: identity.to_string(),
        };
        match self.ask_holder(hold)? {
            FromHolder::Consuming => {
                if probe.routed("", &own_queue(identity), b"probe")? {
                    // Another worker holds it by its own lock.
                    self.release(Lock::Shard);
                    return Ok(Taken::Duplicate);
                }
                match self.ask_holder(ToHolder::Confirm)? {
                    FromHolder::Consuming => Ok(Taken::Held(Lock::Shard)),
                    _ => anyhow::bail!("The lock holder lost its shard"),
                }
            }
            FromHolder::Refused(Some(404)) => {
                // Never declared yet, or expired since (unused for SHARD_EXPIRES_MS).
                self.missing.insert(shard);
                Ok(Taken::Again)
            }
            FromHolder::Refused(_) => self.own(connection, identity, shard),
            FromHolder::Released(_) => anyhow::bail!("The lock holder answered out of turn"),
        }
    }

    /// The shard is taken: lock `identity` by its own queue, then ask the shard's
    /// holder whether it is the identity it holds.
    fn own(&mut self, connection: &mut Connection, identity: &str, shard: u32) -> Result<Taken> {
        let channel = self.channel(connection)?;
        let queue = own_queue(identity);
        let declared = channel.queue_declare(
            queue.as_str(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
        );
        match declared {
            Ok(_) => {}
            // Held by another worker; the broker closed the channel with the error.
            Err(amiquip::Error::ServerClosedChannel { code: 405, .. }) => {
                self.channel = None;
                return Ok(Taken::Duplicate);
            }
            Err(e) => {
                self.channel = None;
                return Err(e).context("Cannot declare a lock queue");
            }
        }
        let heard = {
            let consumer = channel.basic_consume(
                queue.as_str(),
                ConsumerOptions {
                    no_ack: true,
                    ..Default::default()
                },
            )?;
            channel.basic_publish(
                "",
                Publish::with_properties(
                    identity.as_bytes(),
                    shard_queue(shard),
                    // Nobody waits for an answer longer: the broker drops it.
                    AmqpProperties::default().with_expiration(ASK_WAIT.as_millis().to_string()),
                ),
            )?;
            let deadline = Instant::now() + ASK_WAIT;
            let heard = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match consumer.receiver().recv_timeout(left.min(HOLDER_CHECK)) {
                    // Anything else is another worker's probe.
                    Ok(ConsumerMessage::Delivery(d)) => {
                        if let Some(heard) = Heard::of(&d) {
                            break heard;
                        }
                    }
                    Ok(other) => anyhow::bail!("The broker ended a lock's consumer ({other:?})"),
                    Err(_) if left.is_zero() => break Heard::Nothing,
                    Err(_) => {
                        // The holder of a short task often lets go before the
                        // question comes: then nobody will answer it.
                        match channel.queue_declare_passive(shard_queue(shard)) {
                            Ok(q) if q.declared_consumer_count() == Some(0) => {
                                // Its answer may have come meanwhile.
                                let came = consumer.receiver().try_iter().find_map(|m| match m {
                                    ConsumerMessage::Delivery(d) => Heard::of(&d),
                                    _ => None,
                                });
                                break came.unwrap_or(Heard::Nothing);
                            }
                            Ok(_) => {}
                            // Deleted (by someone else): the channel went with the error.
                            Err(amiquip::Error::ServerClosedChannel { code: 404, .. }) => {
                                break Heard::ShardGone
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
            };
            if heard != Heard::ShardGone && !cancel_consumer(consumer, |_| {}) {
                anyhow::bail!("Lost the connection while asking for a lock");
            }
            heard
        };
        if heard == Heard::Free {
            return Ok(Taken::Held(Lock::Own(queue)));
        }
        if heard == Heard::ShardGone {
            // The 404 closed the channel: let go of the own lock on a new one, and
            // start again.
            self.missing.insert(shard);
            self.channel = None;
        }
        // A lock that cannot be deleted stays with the connection: fail it.
        self.channel(connection)?
            .queue_delete(queue.as_str(), QueueDeleteOptions::default())
            .context("Cannot delete a lock queue")?;
        Ok(match heard {
            Heard::Held => Taken::Duplicate,
            _ => Taken::Again,
        })
    }

    /// Lets go of a lock; false when the connection went (and the lock with it).
    pub(super) fn release(&mut self, lock: Lock) -> bool {
        match lock {
            Lock::Shard => match self.ask_holder(ToHolder::Release) {
                Ok(FromHolder::Released(Some(channel))) => {
                    self.spare = Some(channel);
                    true
                }
                _ => false,
            },
            Lock::Own(queue) => {
                let deleted = self.channel.as_ref().is_some_and(|c| {
                    c.queue_delete(queue.as_str(), QueueDeleteOptions::default())
                        .is_ok()
                });
                if !deleted {
                    self.channel = None;
                }
                deleted
            }
        }
    }
}

impl Drop for Locks {
    fn drop(&mut self) {
        self.to_holder = None;
        if let Some(holder) = self.holder.take() {
            let _ = holder.join();
        }
    }
}

/// The holder thread: consumes one shard queue at a time, on a channel it is handed,
/// and answers the questions that come to it while it holds the shard.
fn holder(commands: Receiver<ToHolder>, answers: Sender<FromHolder>) {
    while let Ok(command) = commands.recv() {
        let ToHolder::Hold {
            channel,
            queue,
            identity,
        } = command
        else {
            // Confirm or Release without a shard: say so.
            let _ = answers.send(FromHolder::Released(None));
            continue;
        };
        let consumer = match channel.basic_consume(
            queue.as_str(),
            ConsumerOptions {
                no_ack: true,
                exclusive: true,
                ..Default::default()
            },
        ) {
            Ok(c) => c,
            Err(e) => {
                let code = match e {
                    amiquip::Error::ServerClosedChannel { code, .. } => Some(code),
                    _ => None,
                };
                // The broker closed the channel with the error: it goes with this
                // iteration.
                let _ = answers.send(FromHolder::Refused(code));
                continue;
            }
        };
        let _ = answers.send(FromHolder::Consuming);
        let mut confirmed = false;
        // Questions that came before the probe said whether the lock is ours.
        let mut waiting: Vec<Delivery> = Vec::new();
        let lost = loop {
            select! {
                recv(commands) -> command => match command {
                    Ok(ToHolder::Confirm) => {
                        confirmed = true;
                        for ask in waiting.drain(..) {
                            answer(&channel, &ask, &identity, true);
                        }
                        let _ = answers.send(FromHolder::Consuming);
                    }
                    // One lock at a time: the session never asks this.
                    Ok(ToHolder::Hold { .. }) => {
                        let _ = answers.send(FromHolder::Refused(None));
                    }
                    // Released, or the session ended: questions still waiting were
                    // asked of a lock that was never ours.
                    Ok(ToHolder::Release) | Err(_) => {
                        for ask in waiting.drain(..) {
                            answer(&channel, &ask, &identity, false);
                        }
                        break false;
                    }
                },
                recv(consumer.receiver()) -> message => match message {
                    Ok(ConsumerMessage::Delivery(ask)) if confirmed => {
                        answer(&channel, &ask, &identity, true)
                    }
                    Ok(ConsumerMessage::Delivery(ask)) => waiting.push(ask),
                    // The broker ended the consumer (the connection went), and the
                    // lock with it: the next Confirm or Release hears so.
                    _ => break true,
                },
            }
        };
        // Questions read while the broker cancels the consumer are answered after it
        // has: only `held`, true of this identity still (a duplicate, whose client
        // gets the final reply that follows the release). A late `free` could land
        // in an own lock declared anew while another worker holds the shard for
        // that identity; unanswered, the asker sees the shard without this holder
        // and tries again.
        if lost {
            drop(consumer);
        } else {
            let cancelled = cancel_consumer(consumer, |ask| {
                if confirmed && ask.body == identity.as_bytes() {
                    answer(&channel, &ask, &identity, true);
                }
            });
            let _ = answers.send(FromHolder::Released(cancelled.then_some(channel)));
        }
    }
}

/// Answers a question about `asked` (the body of `ask`): `held` when it is the
/// identity this worker holds.
fn answer(channel: &Channel, ask: &Delivery, held: &str, ours: bool) {
    let Ok(asked) = std::str::from_utf8(&ask.body) else {
        return;
    };
    if !is_hex(asked, 64) {
        return;
    }
    let body: &[u8] = if ours && asked == held {
        b"held"
    } else {
        b"free"
    };
    let _ = channel.basic_publish("", Publish::new(body, own_queue(asked)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_spread_over_the_shards_by_their_first_digits() {
        let id = |head: &str| format!("{head}{}", "0".repeat(60));
        assert_eq!(shard_of(&id("0000")), 0);
        assert_eq!(shard_of(&id("03ff")), 1023);
        assert_eq!(shard_of(&id("0400")), 0);
        assert_eq!(shard_of(&id("ffff")), 0xffff % SHARDS);
        assert_eq!(shard_queue(0x3ff), "jolt_shard_3ff");
    }
}
