//! How many times a request was delivered: jolt's own header on classic queues, the
//! broker's `x-delivery-count` on quorum queues; past [`MAX_DELIVERIES`] a request is
//! refused, so that one that crashes workers cannot take the fleet down.

use amiquip::{AmqpValue, Delivery};

/// How many times a request may be delivered before it is refused.
pub(super) const MAX_DELIVERIES: u32 = crate::remote::amqp::DELIVERY_LIMIT;

/// The header that counts a request's deliveries on a classic queue.
pub(super) const DELIVERIES: &str = "x-jolt-deliveries";

/// The header in which a quorum queue counts a request's earlier deliveries.
pub(super) const BROKER_DELIVERIES: &str = "x-delivery-count";

/// Which delivery of its request this is: 1, or one past a quorum queue's
/// `x-delivery-count`, or what jolt's own header says.
pub(super) fn deliveries(delivery: &Delivery) -> u32 {
    let headers = delivery.properties.headers().as_ref();
    if let Some(earlier) = headers
        .and_then(|h| h.get(BROKER_DELIVERIES))
        .and_then(integer)
    {
        return earlier.saturating_add(1).clamp(1, u32::MAX as i64) as u32;
    }
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
