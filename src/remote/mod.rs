//! Network builds over RabbitMQ: the broker's settings and topology (`amqp`), the
//! versioned messages (`messages`), and the client's connection (`client`). The
//! worker that serves requests is a command (`commands::worker`).

pub mod amqp;
pub mod client;
pub mod messages;
pub mod tls;
