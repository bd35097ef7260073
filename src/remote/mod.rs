//! Network builds over RabbitMQ: the broker's settings and topology (`amqp`), the
//! versioned messages (`messages`), the client's connection (`client`), and what a
//! network build keeps in the HTTP cache beside the artifacts (`shared`: recipe
//! bundles, source snapshots, fleet marks). The worker that serves requests is a
//! command (`commands::worker`).

pub mod amqp;
pub mod client;
pub mod messages;
pub mod shared;
pub mod tls;
