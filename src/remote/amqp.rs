//! RabbitMQ plumbing shared by the client and the worker: settings, connections,
//! and the topology both sides declare.
//!
//! Topology: requests go to the durable direct exchange `jolt_exchange` with the
//! task's routing key; workers consume the durable queue `jolt_tasks_<key>` (declared
//! with `x-max-priority`); replies go to the direct exchange `jolt_results` with the
//! task identity as routing key, and every waiting client binds its own exclusive
//! reply queue by identity. Requests are persistent, so a broker restart loses none.

use amiquip::{
    AmqpValue, Auth, Channel, Connection, ConnectionOptions, ConnectionTuning, ConsumerMessage,
    Delivery, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions,
};
use anyhow::Result;
use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::usage;

pub const REQUESTS: &str = "jolt_exchange";
pub const RESULTS: &str = "jolt_results";

/// The request queue of a routing key.
pub fn task_queue(routing_key: &str) -> String {
    format!("jolt_tasks_{routing_key}")
}

/// How to reach the broker, and the knobs of network builds.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    /// TLS to the broker (`amqps://`, `amqp.tls`), checked against `ca_file` or the
    /// built-in roots.
    pub tls: bool,
    pub ca_file: Option<std::path::PathBuf>,
    pub vhost: String,
    pub username: String,
    pub password: String,
    /// AMQP heartbeat, seconds.
    pub heartbeat: u16,
    /// How long connecting (TCP and the AMQP handshake) may take.
    pub connect_timeout: Duration,
    /// The worker's routing key (its pool).
    pub routing_key: String,
    /// Priority of the client's requests.
    pub priority: u8,
    /// `x-max-priority` of the request queues.
    pub max_priority: u8,
    /// How often a worker tells its clients it is still at a task; a client that hears
    /// nothing for four of these sends its request again.
    pub progress: Duration,
    /// Seconds between "still in progress" notes on the client.
    pub timeout: Duration,
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

impl Settings {
    pub fn from_config(config: &Config) -> Result<Settings> {
        let int = |key: &str, default: i64, max: i64| config.get_int_in(key, default, 0, max);
        let routing_key = config
            .get("amqp.routing_key")
            .or_else(|| std::env::var("RABBITMQ_ROUTING_KEY").ok())
            .unwrap_or_else(|| "default".into());
        if !crate::recipe::taskref::valid_name(&routing_key) {
            return Err(usage(format!("Invalid amqp.routing_key '{routing_key}'")));
        }
        let password = config
            .get("amqp.password")
            .unwrap_or_else(|| "guest".into());
        // amqp.host may be a URL: amqps://host[:port] asks for TLS.
        let host = config
            .get("amqp.host")
            .unwrap_or_else(|| "localhost".into());
        let (scheme, host) = match host.split_once("://") {
            Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest.to_string()),
            None => (None, host),
        };
        let tls = match scheme.as_deref() {
            Some("amqps") => true,
            Some("amqp") => false,
            Some(other) => {
                return Err(usage(format!(
                    "Invalid amqp.host: scheme '{other}://', expected amqp:// or amqps://"
                )))
            }
            None => config.get_bool("amqp.tls", false)?,
        };
        let (host, port) = match host.trim_end_matches('/').rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse::<u16>().ok()),
            _ => (host.trim_end_matches('/').to_string(), None),
        };
        let default_port = if tls { 5671 } else { 5672 };
        let port = match port {
            Some(p) => p,
            None => int("amqp.port", default_port, 65535)? as u16,
        };
        Ok(Settings {
            host,
            port,
            tls,
            ca_file: config
                .get("amqp.ca_file")
                .filter(|f| !f.is_empty())
                .map(std::path::PathBuf::from),
            vhost: config.get("amqp.vhost").unwrap_or_else(|| "/".into()),
            username: config
                .get("amqp.username")
                .unwrap_or_else(|| "guest".into()),
            password,
            heartbeat: int("amqp.heartbeat", 30, 3600)? as u16,
            connect_timeout: Duration::from_secs(
                int("amqp.connect_timeout", 10, 3600)?.max(1) as u64
            ),
            routing_key,
            priority: int("amqp.priority", 0, 255)? as u8,
            max_priority: int("amqp.max_priority", 10, 255)? as u8,
            progress: Duration::from_secs(int("amqp.progress", 5, 3600)?.max(1) as u64),
            timeout: Duration::from_secs(int("amqp.timeout", 300, 86400)?.max(1) as u64),
        })
    }

    /// `host:port/vhost`, for messages (never the password).
    pub fn address(&self) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        format!(
            "{scheme}://{}:{}/{}",
            self.host,
            self.port,
            encode(&self.vhost)
        )
    }

    /// Opens a connection, or fails with the broker's address in the message.
    ///
    /// The TCP stream is opened here rather than by amiquip so that it can set
    /// `TCP_NODELAY`: small AMQP frames otherwise wait out delayed ACKs (about 40 ms
    /// per request and reply).
    pub fn connect(&self) -> Result<Connection> {
        let fail = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("Cannot connect to RabbitMQ at {}: {e}", self.address())
        };
        let addrs: Vec<std::net::SocketAddr> = (self.host.as_str(), self.port)
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
            let wrapped = super::tls::wrap(
                stream,
                &self.host,
                self.ca_file.as_deref(),
                self.connect_timeout,
            );
            match wrapped {
                Ok(s) => s,
                // A refused certificate does not heal by retrying.
                Err(super::tls::Failed::Refused(e)) => {
                    return Err(crate::error::infra(format!(
                        "Cannot connect to RabbitMQ at {}: {e:#}",
                        self.address()
                    )))
                }
                Err(super::tls::Failed::Other(e)) => return Err(fail(&format!("{e:#}"))),
            }
        } else {
            stream
        };
        let stream = mio::net::TcpStream::from_stream(stream).map_err(|e| fail(&e))?;
        let refused = |e: &amiquip::Error| {
            crate::error::infra(format!(
                "RabbitMQ at {} refused user '{}' ({e}): check amqp.username, amqp.password (JOLT_AMQP_PASSWORD) and amqp.vhost",
                self.address(),
                self.username
            ))
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
    pub fn declare(&self, channel: &Channel, routing_key: &str) -> Result<PoolCounts> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let requests = channel.exchange_declare(ExchangeType::Direct, REQUESTS, durable.clone())?;
        channel.exchange_declare(ExchangeType::Direct, RESULTS, durable)?;
        let mut args = FieldTable::new();
        args.insert(
            "x-max-priority".into(),
            AmqpValue::LongInt(self.max_priority as i32),
        );
        let queue = channel.queue_declare(
            task_queue(routing_key),
            QueueDeclareOptions {
                durable: true,
                arguments: args,
                ..Default::default()
            },
        )?;
        queue.bind(&requests, routing_key, FieldTable::new())?;
        Ok(PoolCounts {
            waiting: queue.declared_message_count().unwrap_or(0),
            consumers: queue.declared_consumer_count().unwrap_or(0),
        })
    }

    /// What the broker says of the pool `routing_key` without changing anything (a
    /// passive declare on a channel of its own: a missing queue closes it); `None`
    /// when the pool's queue does not exist.
    pub fn pool(
        &self,
        connection: &mut amiquip::Connection,
        routing_key: &str,
    ) -> Result<Option<PoolCounts>> {
        let channel = connection.open_channel(None)?;
        match channel.queue_declare_passive(task_queue(routing_key)) {
            Ok(queue) => Ok(Some(PoolCounts {
                waiting: queue.declared_message_count().unwrap_or(0),
                consumers: queue.declared_consumer_count().unwrap_or(0),
            })),
            Err(amiquip::Error::ServerClosedChannel { code: 404, .. }) => Ok(None),
            Err(e) => Err(e.into()),
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
