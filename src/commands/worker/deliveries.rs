//! How many times a worker started a request: jolt's own header, which a worker
//! raises when it queues a request again whose earlier delivery a worker started and
//! did not answer (its death); past [`MAX_DELIVERIES`] a request is refused, so that
//! one that crashes workers cannot take the fleet down. The same on both queue
//! types: a quorum queue's own `x-delivery-count` also counts the deliveries that a
//! node's loss or restart returned unstarted, which are no worker's death.

use amiquip::{AmqpValue, Delivery};

/// How many times a request may be delivered before it is refused.
pub(super) const MAX_DELIVERIES: u32 = crate::remote::amqp::DELIVERY_LIMIT;

/// The header that counts a request's deliveries.
pub(super) const DELIVERIES: &str = "x-jolt-deliveries";

/// Which delivery of its request this is: what jolt's own header says, 1 without.
pub(super) fn deliveries(delivery: &Delivery) -> u32 {
    let headers = delivery.properties.headers().as_ref();
    let n = headers
        .and_then(|h| h.get(DELIVERIES))
        .and_then(integer)
        .unwrap_or(1);
    n.clamp(1, u32::MAX as i64) as u32
}

/// An integer header's value.
pub(super) fn integer(value: &AmqpValue) -> Option<i64> {
    match value {
        AmqpValue::LongInt(n) => Some(*n as i64),
        AmqpValue::LongUInt(n) => Some(*n as i64),
        AmqpValue::LongLongInt(n) => Some(*n),
        AmqpValue::ShortInt(n) => Some(*n as i64),
        AmqpValue::ShortUInt(n) => Some(*n as i64),
        AmqpValue::ShortShortInt(n) => Some(*n as i64),
        AmqpValue::ShortShortUInt(n) => Some(*n as i64),
        _ => None,
    }
}
