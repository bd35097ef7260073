//! RabbitMQ plumbing shared by the client and the worker: connections (to one of the
//! brokers that [`AmqpSettings`] lists, tried in a fresh random order each time, so
//! that a node down costs a connect attempt and the fleet spreads over the others)
//! and the topology both sides declare.
//!
//! Topology: requests go to the durable direct exchange `jolt_exchange` with the
//! task's routing key; workers consume the durable queue `jolt_tasks_<key>` (a
//! classic queue declared with `x-max-priority`, or with `amqp.queue_type = quorum` a
//! quorum queue declared with `x-delivery-limit`); replies go to the direct exchange `jolt_results` with the
//! task identity as routing key, and every waiting client binds its own exclusive
//! reply queue by identity. Requests are persistent, so a broker restart loses none.

use amiquip::{
    AmqpValue, Auth, Channel, Connection, ConnectionOptions, ConnectionTuning, ConsumerMessage,
    Delivery, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions,
};
use anyhow::Result;
use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use crate::config::{AmqpSettings, BrokerAddress, QueueType};

pub const REQUESTS: &str = "jolt_exchange";
pub const RESULTS: &str = "jolt_results";

/// How many times a request may be delivered without an answer before it is
/// refused: a request whose worker died is tried once more; one that dies again is
/// taken for a request that kills workers. Workers count the deliveries they start
/// (`commands::worker::deliveries`), on both queue types.
pub const DELIVERY_LIMIT: u32 = 2;

/// A quorum queue's `x-delivery-limit`: a backstop only, past which the broker drops
/// a request returned that often. Its count includes deliveries that a node's loss
/// or restart returned before any worker started them, which are not deaths: a
/// rolling restart of a cluster returns a waiting request once per node.
pub const QUORUM_RETURNS: u32 = 20;

/// The request queue of a routing key.
pub fn task_queue(routing_key: &str) -> String {
    format!("jolt_tasks_{routing_key}")
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A connection, and the broker of `amqp.host` it reached.
pub struct Connected {
    pub connection: Connection,
    /// That broker, as [`AmqpSettings::address_of`] shows it.
    pub broker: String,
}

/// Why one broker gave no connection.
enum Failure {
    /// It cannot be reached now (refused, timed out, closed the handshake): the
    /// next may be.
    Unreachable(String),
    /// It refused the credentials or its certificate was refused: the others
    /// would too (exit 3).
    Final(anyhow::Error),
}

/// What connects to the broker, from the `[amqp]` settings.
impl AmqpSettings {
    fn scheme(&self) -> &'static str {
        if self.tls {
            "amqps"
        } else {
            "amqp"
        }
    }

    /// Every broker, `amqp://a:5672,b:5672/vhost`, for messages (never the password).
    pub fn address(&self) -> String {
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|b| format!("{}:{}", b.host, b.port))
            .collect();
        format!(
            "{}://{}/{}",
            self.scheme(),
            hosts.join(","),
            encode(&self.vhost)
        )
    }

    /// One broker, `amqp://b:5672/vhost`, for messages (never the password).
    pub fn address_of(&self, broker: &BrokerAddress) -> String {
        format!(
            "{}://{}:{}/{}",
            self.scheme(),
            broker.host,
            broker.port,
            encode(&self.vhost)
        )
    }

    /// Opens a connection to one of the brokers, tried in a fresh random order (so
    /// that clients and workers spread over them), each within `connect_timeout`,
    /// the next when one cannot be reached; fails naming every broker when none
    /// can. A broker that refuses the credentials or whose certificate is refused
    /// ends the attempt: an infrastructure error (exit 3).
    pub fn connect(&self) -> Result<Connected> {
        let mut order: Vec<usize> = (0..self.hosts.len()).collect();
        crate::util::shuffle(&mut order);
        let mut failures: Vec<(usize, String)> = Vec::new();
        for i in order {
            let broker = &self.hosts[i];
            match self.connect_to(broker) {
                Ok(connection) => {
                    return Ok(Connected {
                        connection,
                        broker: self.address_of(broker),
                    })
                }
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Unreachable(why)) => {
                    crate::console::debug(&format!(
                        "Cannot connect to RabbitMQ at {}: {why}",
                        self.address_of(broker)
                    ));
                    failures.push((i, why));
                }
            }
        }
        // In the order of amqp.host, whatever the order tried.
        failures.sort();
        match failures.as_slice() {
            [(i, why)] => anyhow::bail!(
                "Cannot connect to RabbitMQ at {}: {why}",
                self.address_of(&self.hosts[*i])
            ),
            _ => {
                let each: Vec<String> = failures
                    .iter()
                    .map(|(i, why)| format!("{} ({why})", self.address_of(&self.hosts[*i])))
                    .collect();
                anyhow::bail!(
                    "Cannot connect to RabbitMQ at any of its {} brokers: {}",
                    self.hosts.len(),
                    each.join(", ")
                )
            }
        }
    }

    /// Opens a connection to `broker`.
    ///
    /// The TCP stream is opened here rather than by amiquip so that it can set
    /// `TCP_NODELAY`: small AMQP frames otherwise wait out delayed ACKs (about 40 ms
    /// per request and reply).
    fn connect_to(&self, broker: &BrokerAddress) -> Result<Connection, Failure> {
        let fail = |e: &dyn std::fmt::Display| Failure::Unreachable(e.to_string());
        // `[::1]` is how amqp.host writes an IPv6 address, `::1` how it resolves.
        let host = broker.host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<std::net::SocketAddr> = (host, broker.port)
            .to_socket_addrs()
            .map_err(|e| fail(&e))?
            .collect();
        let mut last: Option<std::io::Error> = None;
        let mut stream = None;
        for addr in &addrs {
            match std::net::TcpStream::connect_timeout(addr, self.connect_timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| match last {
            Some(e) => fail(&e),
            None => fail(&"no address"),
        })?;
        stream.set_nodelay(true).map_err(|e| fail(&e))?;
        let stream = if self.tls {
            let wrapped =
                super::tls::wrap(stream, host, self.ca_file.as_deref(), self.connect_timeout);
            match wrapped {
                Ok(s) => s,
                // A refused certificate does not heal by retrying.
                Err(super::tls::Failed::Refused(e)) => {
                    return Err(Failure::Final(crate::error::infra(format!(
                        "Cannot connect to RabbitMQ at {}: {e:#}",
                        self.address_of(broker)
                    ))))
                }
                Err(super::tls::Failed::Other(e)) => return Err(fail(&format!("{e:#}"))),
            }
        } else {
            stream
        };
        let stream = mio::net::TcpStream::from_stream(stream).map_err(|e| fail(&e))?;
        let refused = |e: &amiquip::Error| {
            Failure::Final(crate::error::infra(format!(
                "RabbitMQ at {} refused user '{}' ({e}): check amqp.username, amqp.password (JOLT_AMQP_PASSWORD) and amqp.vhost",
                self.address_of(broker),
                self.username
            )))
        };
        let options = ConnectionOptions::default()
            .auth(Auth::Plain {
                username: self.username.clone(),
                password: self.password.clone(),
            })
            .virtual_host(self.vhost.clone())
            .heartbeat(self.heartbeat)
            .connection_timeout(Some(self.connect_timeout));
        Connection::insecure_open_stream(stream, options, ConnectionTuning::default()).map_err(
            |e| match e {
                // Retrying cannot help: say so (exit 3) instead of trying forever.
                amiquip::Error::InvalidCredentials => refused(&e),
                // 530 also says "vhost is down" or "connection limit": those pass.
                amiquip::Error::ServerClosedConnection {
                    code: 530,
                    ref message,
                } if message.contains("refused for user") => refused(&e),
                e => fail(&e),
            },
        )
    }

    /// Declares the exchanges, and the request queue of `routing_key` bound to it;
    /// returns the queue's requests waiting and consumers, as the broker counts them.
    /// A declaration the broker refuses (an exchange or queue that exists with other
    /// arguments, say a quorum queue; no permission) does not heal by retrying: an
    /// infrastructure error (exit 3) that names it.
    pub fn declare(&self, channel: &Channel, routing_key: &str) -> Result<PoolCounts> {
        let refused = |what: String| {
            let address = self.address();
            move |e: amiquip::Error| match e {
                amiquip::Error::ServerClosedChannel { code, message, .. }
                    if code == 403 || code == 406 =>
                {
                    let hint = if code == 406 {
                        ": it exists with other arguments (jolt declares it durable, of amqp.queue_type, with x-max-priority = amqp.max_priority when classic, x-delivery-limit when quorum); set amqp.queue_type to its type, or delete it"
                    } else {
                        ": check the user's permissions on the vhost (configure, write, read)"
                    };
                    crate::error::infra(format!(
                        "RabbitMQ at {address} refuses the declaration of {what} ({code} {message}){hint}"
                    ))
                }
                e => e.into(),
            }
        };
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let requests = channel
            .exchange_declare(ExchangeType::Direct, REQUESTS, durable.clone())
            .map_err(refused(format!("the exchange {REQUESTS}")))?;
        channel
            .exchange_declare(ExchangeType::Direct, RESULTS, durable)
            .map_err(refused(format!("the exchange {RESULTS}")))?;
        let args = self.queue_arguments();
        let name = task_queue(routing_key);
        let queue = channel
            .queue_declare(
                name.clone(),
                QueueDeclareOptions {
                    durable: true,
                    arguments: args,
                    ..Default::default()
                },
            )
            .map_err(refused(format!("the queue {name}")))?;
        queue
            .bind(&requests, routing_key, FieldTable::new())
            .map_err(refused(format!("the binding of the queue {name}")))?;
        Ok(PoolCounts {
            waiting: queue.declared_message_count().unwrap_or(0),
            consumers: queue.declared_consumer_count().unwrap_or(0),
        })
    }

    /// The arguments of a request queue: a classic queue has priorities up to
    /// `amqp.max_priority`; a quorum queue counts its deliveries itself and drops a
    /// request returned more than [`DELIVERY_LIMIT`] times (the worker refuses it,
    /// with a reply, at the delivery before), and has no priorities on RabbitMQ 3
    /// (it refuses `x-max-priority`): the first declaration of a process says so once,
    /// unless `amqp.max_priority` is 0.
    fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::new();
        match self.queue_type {
            QueueType::Classic => {
                args.insert(
                    "x-max-priority".into(),
                    AmqpValue::LongInt(self.max_priority as i32),
                );
            }
            QueueType::Quorum => {
                args.insert(
                    "x-queue-type".into(),
                    AmqpValue::LongString("quorum".into()),
                );
                args.insert(
                    "x-delivery-limit".into(),
                    AmqpValue::LongInt(QUORUM_RETURNS as i32),
                );
                static WARNED: std::sync::Once = std::sync::Once::new();
                if self.max_priority > 0 {
                    WARNED.call_once(|| {
                        crate::console::warn(
                            "amqp.queue_type = quorum: RabbitMQ 3 quorum queues have no priorities, so requests are served in the order they were sent (amqp.priority is ignored; set amqp.max_priority = 0 to silence this)",
                        )
                    });
                }
            }
        }
        args
    }

    /// What the broker says of the pool `routing_key` without changing anything (a
    /// passive declare on a channel of its own: a missing queue closes it).
    pub fn pool(&self, connection: &mut amiquip::Connection, routing_key: &str) -> Result<Pool> {
        let channel = connection.open_channel(None)?;
        match channel.queue_declare_passive(task_queue(routing_key)) {
            Ok(queue) => Ok(Pool::Counted(PoolCounts {
                waiting: queue.declared_message_count().unwrap_or(0),
                consumers: queue.declared_consumer_count().unwrap_or(0),
            })),
            Err(amiquip::Error::ServerClosedChannel {
                code: 404, message, ..
            }) => Ok(Pool::not_found(&message)),
            Err(e) => Err(e.into()),
        }
    }
}

/// A pool's request queue, as a passive declare finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pool {
    Counted(PoolCounts),
    /// The queue does not exist: no request sent, no worker started.
    Missing,
    /// The queue exists but cannot be reached: the broker's words (a cluster node
    /// that holds it is down: `home node ... is down or inaccessible`).
    Unavailable(String),
}

impl Pool {
    /// What a passive declare answered 404 with `message` means: RabbitMQ says
    /// `NOT_FOUND - no queue 'q' in vhost '/'` of a queue that does not exist, and
    /// 404 too of one whose node is down.
    fn not_found(message: &str) -> Pool {
        if message.contains("no queue") {
            Pool::Missing
        } else {
            Pool::Unavailable(message.to_string())
        }
    }
}

/// A pool's request queue as the broker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    /// Requests waiting for a worker.
    pub waiting: u32,
    /// Workers consuming it.
    pub consumers: u32,
}

/// Cancels `consumer`, handing the deliveries that come meanwhile to `delivery`;
/// false when the connection went.
///
/// It waits for the consumer's end to reach its receiver: amiquip's I/O thread
/// hands it over after the broker's `cancel-ok`, and takes a receiver dropped
/// before then for an internal error that closes the whole connection.
pub fn cancel_consumer(consumer: amiquip::Consumer, mut delivery: impl FnMut(Delivery)) -> bool {
    let receiver = consumer.receiver().clone();
    let cancelled = consumer.cancel().is_ok();
    drop(consumer);
    if !cancelled {
        return false;
    }
    let deadline = Instant::now() + CANCEL_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(left) {
            Ok(ConsumerMessage::Delivery(d)) => delivery(d),
            Ok(ConsumerMessage::ClientCancelled) => return true,
            Ok(_) | Err(_) => return false,
        }
    }
}

/// How long cancelling a consumer may take.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_404_names_a_missing_queue_or_one_whose_node_is_down() {
        assert_eq!(
            Pool::not_found("NOT_FOUND - no queue 'jolt_tasks_default' in vhost '/'"),
            Pool::Missing
        );
        // Regression (issue 23): jolt status said "no queue yet" of a queue whose
        // home node was down.
        let down = "NOT_FOUND - home node 'rc1@localhost' of durable queue 'jolt_tasks_default' in vhost '/' is down or inaccessible";
        assert_eq!(Pool::not_found(down), Pool::Unavailable(down.to_string()));
    }
}
