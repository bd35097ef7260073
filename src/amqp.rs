//! RabbitMQ plumbing shared by the client and the worker: settings, connections,
//! and the topology both sides declare.
//!
//! Topology: requests go to the durable direct exchange `jolt_exchange` with the
//! task's routing key; workers consume the durable queue `jolt_tasks_<key>` (declared
//! with `x-max-priority`); replies go to the direct exchange `jolt_results` with the
//! task identity as routing key, and every waiting client binds its own exclusive
//! reply queue by identity. Requests are persistent, so a broker restart loses none.

use amiquip::{
    AmqpValue, Channel, Connection, ExchangeDeclareOptions, ExchangeType, FieldTable,
    QueueDeclareOptions,
};
use anyhow::Result;
use std::time::Duration;

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
    pub vhost: String,
    pub username: String,
    pub password: String,
    /// AMQP heartbeat, seconds.
    pub heartbeat: u16,
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
        let int = |key: &str, default: i64, max: i64| -> Result<i64> {
            let v = config.get_int(key)?.unwrap_or(default);
            if v < 0 || v > max {
                return Err(usage(format!("{key} must be between 0 and {max}")));
            }
            Ok(v)
        };
        let routing_key = config
            .get("amqp.routing_key")
            .or_else(|| std::env::var("RABBITMQ_ROUTING_KEY").ok())
            .unwrap_or_else(|| "default".into());
        if !crate::taskref::valid_name(&routing_key) {
            return Err(usage(format!("Invalid amqp.routing_key '{routing_key}'")));
        }
        Ok(Settings {
            host: config
                .get("amqp.host")
                .unwrap_or_else(|| "localhost".into()),
            port: int("amqp.port", 5672, 65535)? as u16,
            vhost: config.get("amqp.vhost").unwrap_or_else(|| "/".into()),
            username: config
                .get("amqp.username")
                .unwrap_or_else(|| "guest".into()),
            password: config
                .get("amqp.password")
                .unwrap_or_else(|| "guest".into()),
            heartbeat: int("amqp.heartbeat", 30, 3600)? as u16,
            routing_key,
            priority: int("amqp.priority", 0, 255)? as u8,
            max_priority: int("amqp.max_priority", 10, 255)? as u8,
            progress: Duration::from_secs(int("amqp.progress", 5, 3600)?.max(1) as u64),
            timeout: Duration::from_secs(int("amqp.timeout", 300, 86400)?.max(1) as u64),
        })
    }

    /// `host:port/vhost`, for messages (never the password).
    pub fn address(&self) -> String {
        format!("amqp://{}:{}/{}", self.host, self.port, encode(&self.vhost))
    }

    /// Opens a connection, or fails with the broker's address in the message.
    pub fn connect(&self) -> Result<Connection> {
        let url = format!(
            "amqp://{}:{}@{}:{}/{}?heartbeat={}&connection_timeout=10000",
            encode(&self.username),
            encode(&self.password),
            self.host,
            self.port,
            encode(&self.vhost),
            self.heartbeat
        );
        Connection::insecure_open(&url)
            .map_err(|e| anyhow::anyhow!("Cannot connect to RabbitMQ at {}: {e}", self.address()))
    }

    /// Declares the exchanges, and the request queue of `routing_key` bound to it.
    pub fn declare(&self, channel: &Channel, routing_key: &str) -> Result<()> {
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
        Ok(())
    }
}
