//! The `accepted` replies of a worker, and whether anyone still waits for a request.

use amiquip::{AmqpProperties, Channel, Connection, Publish};
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

use super::lock::{self, Probe};
use crate::remote::amqp::RESULTS;
use crate::remote::messages::Reply;

/// The channel `accepted` replies go out on: published `mandatory`, with publisher
/// confirms, so that the broker says whether anyone waits for the identity.
///
/// A client binds its exclusive reply queue to every identity it waits for, and the
/// broker drops the queue, bindings and all, with the client's connection. An
/// `accepted` reply nobody is bound to is returned (`basic.return`, which the broker
/// sends before the message's confirm): its client is gone and no other client
/// waits, so the request is not built. This costs the broker nothing beyond the
/// reply it publishes anyway, where asking for the requester's queue by name cost a
/// declaration and a closed channel per request.
pub(super) struct Acceptor {
    pub(super) channel: Channel,
    confirms: crossbeam_channel::Receiver<amiquip::Confirm>,
    returns: crossbeam_channel::Receiver<amiquip::Return>,
    /// The delivery tag of the last publish (the broker numbers them from 1).
    tag: std::cell::Cell<u64>,
}

/// How long a build runs before its clients are told `accepted` (when the request
/// did not tell them already): a shorter build's final reply is all they hear.
pub(super) const ACCEPTED_AFTER: Duration = Duration::from_millis(250);

/// [`ACCEPTED_AFTER`], or what a test says ([`crate::testhooks::accepted_after`]).
pub(super) fn accepted_after() -> Duration {
    crate::testhooks::accepted_after().unwrap_or(ACCEPTED_AFTER)
}

/// How long a worker waits for the broker to confirm an `accepted` reply.
pub(super) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

impl Acceptor {
    pub(super) fn open(connection: &mut Connection) -> Result<Acceptor> {
        let channel = connection.open_channel(None)?;
        let confirms = channel.listen_for_publisher_confirms()?;
        let returns = channel.listen_for_returns()?;
        channel.enable_publisher_confirms()?;
        Ok(Acceptor {
            channel,
            confirms,
            returns,
            tag: std::cell::Cell::new(0),
        })
    }

    /// Publishes an `accepted` reply; whether any client is bound to its identity.
    pub(super) fn accept(&self, reply: &Reply) -> Result<bool> {
        let body = serde_json::to_vec(reply)?;
        self.routed(RESULTS, &reply.identity, &body)
    }
}

impl lock::Probe for Acceptor {
    /// Publishes `body` `mandatory`; whether the broker routed it to a queue.
    fn routed(&self, exchange: &str, routing_key: &str, body: &[u8]) -> Result<bool> {
        self.channel
            .basic_publish(
                exchange,
                Publish {
                    body,
                    routing_key: routing_key.to_string(),
                    mandatory: true,
                    immediate: false,
                    properties: AmqpProperties::default()
                        .with_content_type("application/json".into()),
                },
            )
            .context("Cannot publish a reply")?;
        let tag = self.tag.get() + 1;
        self.tag.set(tag);
        let deadline = Instant::now() + CONFIRM_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.confirms.recv_timeout(left) {
                Ok(amiquip::Confirm::Ack(p) | amiquip::Confirm::Nack(p))
                    if p.delivery_tag >= tag =>
                {
                    break
                }
                Ok(_) => {}
                Err(_) => bail!("The broker did not confirm a message within {CONFIRM_TIMEOUT:?}"),
            }
        }
        // A return comes before its confirm.
        let returned = self
            .returns
            .try_iter()
            .any(|r| r.routing_key == routing_key);
        Ok(!returned)
    }
}
