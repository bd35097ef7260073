//! The typed settings a command runs with, one struct per section, read once from
//! the layers through the key table.
//!
//! Each field is read by one line of [`Config::read`], through [`keys::check`] with
//! the table's kind, range and default: the domain modules take these structs and
//! never see a key string, so a build accepts exactly what `jolt config` accepts.
//! Where a credential came from is read here too ([`CredentialInFile`]), from the
//! origins the layers keep, for the worker to warn of.

use anyhow::{anyhow, Result};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::keys::{self, Value};
use super::{Layers, Origin};
use crate::util::secrets;

/// The key whose default is not a constant: `$XDG_CACHE_HOME/jolt`.
pub(super) const CACHEDIR: &str = "jolt.cachedir";

/// Every setting, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub jolt: JoltSettings,
    pub http: HttpSettings,
    pub amqp: AmqpSettings,
    pub network: NetworkSettings,
    /// The credentials read from configuration files, which the tasks a worker runs
    /// can read there as its user.
    pub credentials_in_files: Vec<CredentialInFile>,
}

/// A credential a configuration file holds: a password key, or a URL with a
/// password in its userinfo. A user name alone is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialInFile {
    /// The key whose value holds it.
    pub key: &'static str,
    /// The value is a URL, and the password is in its userinfo.
    pub in_url: bool,
    /// The file it was read from.
    pub file: PathBuf,
    /// The environment variable to give it in instead.
    pub variable: &'static str,
}

/// `[jolt]`: the local cache and local builds.
#[derive(Debug, Clone)]
pub struct JoltSettings {
    /// `jolt.cachedir` (`~/` expanded), else `$XDG_CACHE_HOME/jolt`.
    pub cachedir: PathBuf,
    /// `jolt.cachesize`, bytes.
    pub cachesize: u64,
    /// `jolt.log_tail`: bytes of each task's output a run log keeps.
    pub log_tail: u64,
    /// `jolt.log_total`: bytes the runs directory holds.
    pub log_total: u64,
    /// Tasks run at once when `-j` is not given: `jolt.jobs`, the CPUs for 0.
    pub jobs: usize,
    /// The task built when no command is given.
    pub default: String,
    /// Local builds upload to / download from the HTTP cache.
    pub upload: bool,
    pub download: bool,
}

/// `[http]`: the HTTP artifact cache.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// `http.uri` as written (credentials in it included); `None`: no HTTP cache.
    pub uri: Option<String>,
    pub upload: bool,
    pub download: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    /// The longest a transfer may go without progress.
    pub timeout: Duration,
    /// Retries of connection errors and 5xx answers.
    pub retries: u32,
    /// Downloads and uploads at once.
    pub transfers: usize,
    /// PEM file of the CA certificates an `https://` cache is checked against.
    pub ca_file: Option<PathBuf>,
}

/// `[amqp]`: how to reach the broker, and the knobs of network builds.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// The brokers `amqp.host` lists, as written (one or more): each connection
    /// tries them in a fresh random order, the next when one cannot be reached.
    pub hosts: Vec<BrokerAddress>,
    /// TLS to the broker (`amqps://` in `amqp.host`, else `amqp.tls`), checked
    /// against `ca_file` or the built-in roots.
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub vhost: String,
    /// `amqp.username` when set, else the user of `amqp.host`'s userinfo, else
    /// `guest`; the password is `amqp.password` when set, else the userinfo's (only
    /// with its user), else `guest`.
    pub username: String,
    pub password: String,
    /// AMQP heartbeat, seconds (0: none).
    pub heartbeat: u16,
    /// How long connecting (TCP and the AMQP handshake) may take.
    pub connect_timeout: Duration,
    /// The worker's routing key (its pool); on a client, the pool of tasks without
    /// one.
    pub routing_key: String,
    /// Priority of the client's requests.
    pub priority: u8,
    /// `x-max-priority` of the request queues.
    pub max_priority: u8,
    /// The type of the request queues.
    pub queue_type: QueueType,
    /// How often a worker tells its clients it is still at a task; a client that hears
    /// nothing for four of these sends its request again.
    pub progress: Duration,
    /// Time between "still in progress" notes on the client.
    pub timeout: Duration,
    /// Remote executions a network client keeps in flight.
    pub jobs: usize,
}

/// `amqp.queue_type`: the request queues' type, as RabbitMQ names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// One node holds each queue (mirrored only by a policy, gone in RabbitMQ 4);
    /// priorities up to `amqp.max_priority`; jolt counts redeliveries itself.
    Classic,
    /// Replicated over the cluster's nodes (Raft); the broker counts deliveries
    /// (`x-delivery-count`); no priorities before RabbitMQ 4.
    Quorum,
}

/// One broker: the host and port of an entry of `amqp.host` (the scheme, vhost and
/// credentials are every broker's, [`AmqpSettings`]').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// A name or an address (an IPv6 one in brackets, `[::1]`).
    pub host: String,
    /// The port the entry names, else `amqp.port`, else 5672 (5671 with TLS).
    pub port: u16,
}

/// `[network]`: a network client's own switches (as in Jolt).
#[derive(Debug, Clone)]
pub struct NetworkSettings {
    /// Local-only artifacts are uploaded.
    pub upload: bool,
    /// The goals come back.
    pub download: bool,
}

impl Default for Config {
    /// The settings no layer changes: the table's defaults.
    fn default() -> Config {
        // The table's defaults are values their keys take (tested below), so this
        // cannot fail.
        Layers::default()
            .settings()
            .expect("the key table's defaults are valid")
    }
}

impl Config {
    /// Reads every key of the table from `layers`.
    pub(super) fn read(layers: &Layers) -> Result<Config> {
        Config::read_with(&Reader::new(layers))
    }

    fn read_with(r: &Reader) -> Result<Config> {
        let jolt = JoltSettings {
            cachedir: match r.text(CACHEDIR)?.filter(|d| !d.is_empty()) {
                Some(dir) => expand_home(&dir),
                None => default_cachedir(),
            },
            cachesize: r.size("jolt.cachesize")?,
            log_tail: r.size("jolt.log_tail")?,
            log_total: r.size("jolt.log_total")?,
            jobs: match r.int::<usize>("jolt.jobs")? {
                0 => crate::util::cpus(),
                jobs => jobs,
            },
            default: r.text("jolt.default")?.unwrap_or_default(),
            upload: r.bool("jolt.upload")?,
            download: r.bool("jolt.download")?,
        };
        let uri_password = |uri: &str| matches!(secrets::userinfo(uri), Some((_, Some(_))));
        let http = HttpSettings {
            uri: r.text("http.uri")?.filter(|u| !u.is_empty()),
            upload: r.bool("http.upload")?,
            download: r.bool("http.download")?,
            username: r.text("http.username")?,
            password: r.text("http.password")?,
            connect_timeout: r.secs("http.connect_timeout")?,
            timeout: r.secs("http.timeout")?,
            retries: r.int("http.retries")?,
            transfers: r.int("http.transfers")?,
            ca_file: r.path("http.ca_file")?,
        };
        let written = r.text("amqp.host")?.unwrap_or_default();
        let host = keys::parse_amqp_host(&written).map_err(|why| {
            anyhow!(
                "amqp.host '{}' passed its check and failed to parse: {why}",
                secrets::masked_url(&written)
            )
        })?;
        let tls = r.bool("amqp.tls")?;
        let tls = host.tls.unwrap_or(tls);
        let port_set = r.is_set("amqp.port");
        let port = r.int("amqp.port")?;
        let hosts = host
            .brokers
            .into_iter()
            .map(|entry| BrokerAddress {
                host: entry.host,
                port: match entry.port {
                    Some(port) => port,
                    None if tls && !port_set => keys::AMQPS_PORT,
                    None => port,
                },
            })
            .collect();
        // The userinfo of amqp.host gives the user and password, as http.uri's does:
        // amqp.username, when set, wins, and goes with amqp.password.
        let host_password = matches!(host.userinfo, Some((_, Some(_))));
        let username = r.text("amqp.username")?.unwrap_or_default();
        let password = r.text("amqp.password")?.unwrap_or_default();
        let key_password = !password.is_empty();
        let (username, password) = match host.userinfo {
            Some((user, url_password)) if !r.is_set("amqp.username") => {
                let password = match url_password {
                    Some(url_password) if !r.is_set("amqp.password") => url_password,
                    _ => password,
                };
                (user, password)
            }
            _ => (username, password),
        };
        let amqp = AmqpSettings {
            hosts,
            tls,
            ca_file: r.path("amqp.ca_file")?,
            vhost: r.text("amqp.vhost")?.unwrap_or_default(),
            username,
            password,
            heartbeat: r.int("amqp.heartbeat")?,
            connect_timeout: r.secs("amqp.connect_timeout")?,
            routing_key: r.text("amqp.routing_key")?.unwrap_or_default(),
            priority: r.int("amqp.priority")?,
            max_priority: r.int("amqp.max_priority")?,
            queue_type: match r.text("amqp.queue_type")?.as_deref() {
                Some("quorum") => QueueType::Quorum,
                _ => QueueType::Classic,
            },
            progress: r.secs("amqp.progress")?,
            timeout: r.secs("amqp.timeout")?,
            jobs: r.int("amqp.jobs")?,
        };
        let network = NetworkSettings {
            upload: r.bool("network.upload")?,
            download: r.bool("network.download")?,
        };
        // The keys whose value holds a password, each with the file it was read
        // from, if it was: a file whose key a later layer sets is not seen.
        let http_password = http.password.as_ref().is_some_and(|p| !p.is_empty());
        let http_uri_password = http.uri.as_deref().is_some_and(uri_password);
        let holds_password = [
            ("http.password", http_password, false, "JOLT_HTTP_PASSWORD"),
            ("http.uri", http_uri_password, true, "JOLT_HTTP_PASSWORD"),
            ("amqp.password", key_password, false, "JOLT_AMQP_PASSWORD"),
            ("amqp.host", host_password, true, "JOLT_AMQP_PASSWORD"),
        ];
        let credentials_in_files = holds_password
            .into_iter()
            .filter(|&(_, holds, _, _)| holds)
            .filter_map(|(key, _, in_url, variable)| {
                Some(CredentialInFile {
                    key,
                    in_url,
                    file: r.file(key)?.to_path_buf(),
                    variable,
                })
            })
            .collect();
        Ok(Config {
            jolt,
            http,
            amqp,
            network,
            credentials_in_files,
        })
    }
}

/// Reads keys from the layers through the table, and notes which it read.
struct Reader<'a> {
    layers: &'a Layers,
    read: RefCell<Vec<&'static str>>,
}

impl<'a> Reader<'a> {
    fn new(layers: &'a Layers) -> Reader<'a> {
        Reader {
            layers,
            read: RefCell::default(),
        }
    }

    /// The value of `key` as its kind reads it: set by a layer, else the table's
    /// default, else `None`.
    fn value(&self, key: &str) -> Result<Option<Value>> {
        let spec = keys::spec(key)
            .ok_or_else(|| anyhow!("the configuration key {key} is not in the table"))?;
        self.read.borrow_mut().push(spec.name);
        match self.layers.value(key) {
            Some(v) => {
                let written = super::value_to_string(v);
                let origin = self.layers.origin(key).map(Origin::to_string);
                keys::check(spec, &written, origin.as_deref()).map(Some)
            }
            None => spec
                .default
                .map(|d| keys::check(spec, d, Some("default")))
                .transpose(),
        }
    }

    fn is_set(&self, key: &str) -> bool {
        self.layers.value(key).is_some()
    }

    /// The configuration file `key`'s value was read from, if a file set it.
    fn file(&self, key: &str) -> Option<&Path> {
        match self.layers.origin(key)? {
            Origin::File(path) => Some(path),
            Origin::Environment(_) | Origin::Argument => None,
        }
    }

    fn mismatch(key: &str, value: Option<Value>, wanted: &str) -> anyhow::Error {
        anyhow!("the configuration key {key} is read as {wanted}, and its kind gives {value:?}")
    }

    fn text(&self, key: &str) -> Result<Option<String>> {
        match self.value(key)? {
            None => Ok(None),
            Some(Value::Text(t)) => Ok(Some(t)),
            other => Err(Self::mismatch(key, other, "text")),
        }
    }

    /// A file name; empty: none.
    fn path(&self, key: &str) -> Result<Option<PathBuf>> {
        Ok(self.text(key)?.filter(|p| !p.is_empty()).map(PathBuf::from))
    }

    fn bool(&self, key: &str) -> Result<bool> {
        match self.value(key)? {
            Some(Value::Bool(b)) => Ok(b),
            other => Err(Self::mismatch(key, other, "a boolean")),
        }
    }

    /// An integer, in the type its range fits.
    fn int<T: TryFrom<i64>>(&self, key: &str) -> Result<T> {
        match self.value(key)? {
            Some(Value::Int(i)) => T::try_from(i).map_err(|_| {
                anyhow!("the range of configuration key {key} does not fit its field")
            }),
            other => Err(Self::mismatch(key, other, "an integer")),
        }
    }

    fn secs(&self, key: &str) -> Result<Duration> {
        self.int(key).map(Duration::from_secs)
    }

    fn size(&self, key: &str) -> Result<u64> {
        match self.value(key)? {
            Some(Value::Size(s)) => Ok(s),
            other => Err(Self::mismatch(key, other, "a size")),
        }
    }
}

/// The local cache directory when `jolt.cachedir` is unset: `$XDG_CACHE_HOME/jolt`.
pub(super) fn default_cachedir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| super::home().join(".cache"))
        .join("jolt")
}

fn expand_home(path: &str) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => super::home().join(rest),
        None => PathBuf::from(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(host: &str, port: u16) -> BrokerAddress {
        BrokerAddress {
            host: host.to_string(),
            port,
        }
    }

    fn layers(values: &[(&str, &str)]) -> Layers {
        let mut layers = Layers::default();
        for (key, value) in values {
            layers.set(key, toml::Value::String(value.to_string()));
        }
        layers
    }

    #[test]
    fn every_key_of_the_table_is_read_by_one_field() {
        // Issue 23: network.config was in the table and nothing read it.
        let layers = Layers::default();
        let reader = Reader::new(&layers);
        Config::read_with(&reader).unwrap();
        let mut read = reader.read.into_inner();
        read.sort();
        let mut table: Vec<&str> = keys::keys().collect();
        table.sort();
        assert_eq!(read, table);
    }

    #[test]
    fn every_key_takes_its_minimum_and_maximum_and_refuses_past_them() {
        // Issue 23: `config http.timeout 0` was accepted, and every build refused it.
        for spec in keys::SPECS {
            let keys::Kind::Int(lo, hi) = spec.kind else {
                continue;
            };
            for ok in [lo, hi] {
                let settings = layers(&[(spec.name, &ok.to_string())]).settings();
                assert!(settings.is_ok(), "{} = {ok}: {settings:?}", spec.name);
                assert!(keys::check_value(spec.name, &ok.to_string()).is_ok());
            }
            for bad in [lo - 1, hi + 1] {
                let err = layers(&[(spec.name, &bad.to_string())])
                    .settings()
                    .unwrap_err();
                assert!(format!("{err}").contains(spec.name), "{err}");
                assert!(keys::check_value(spec.name, &bad.to_string()).is_err());
            }
        }
    }

    #[test]
    fn defaults_come_from_the_table() {
        let c = Config::default();
        assert_eq!(c.jolt.cachesize, 10 << 30);
        assert_eq!((c.jolt.log_tail, c.jolt.log_total), (1 << 20, 256 << 20));
        assert_eq!(c.jolt.default, "default");
        assert!(c.jolt.jobs >= 1);
        assert_eq!(c.http.uri, None);
        assert_eq!(c.http.timeout, Duration::from_secs(60));
        assert_eq!(c.http.transfers, 64);
        assert_eq!(c.amqp.hosts, [broker("localhost", 5672)]);
        assert_eq!(c.amqp.routing_key, "default");
        assert_eq!(c.amqp.jobs, keys::MAX_JOBS);
        assert!(c.network.upload && c.network.download);
    }

    #[test]
    fn the_broker_address_takes_its_scheme_and_port_from_amqp_host() {
        let amqp = |values: &[(&str, &str)]| layers(values).settings().unwrap().amqp;
        let a = amqp(&[("amqp.tls", "yes")]);
        assert_eq!((a.tls, a.hosts), (true, vec![broker("localhost", 5671)]));
        let a = amqp(&[("amqp.host", "amqps://broker"), ("amqp.port", "6000")]);
        assert_eq!((a.tls, a.hosts), (true, vec![broker("broker", 6000)]));
        let a = amqp(&[("amqp.host", "amqp://broker:7000/"), ("amqp.port", "6000")]);
        assert_eq!((a.tls, a.hosts), (false, vec![broker("broker", 7000)]));
    }

    #[test]
    fn each_broker_of_amqp_host_takes_the_default_port_it_does_not_name() {
        // Issue 25: `amqp.host` named one broker.
        let amqp = |values: &[(&str, &str)]| layers(values).settings().unwrap().amqp;
        let a = amqp(&[("amqp.host", "amqps://a:7000,b"), ("amqp.port", "6000")]);
        assert_eq!(
            (a.tls, a.hosts),
            (true, vec![broker("a", 7000), broker("b", 6000)])
        );
        let a = amqp(&[("amqp.host", "amqps://a:7000,b")]);
        assert_eq!(a.hosts, [broker("a", 7000), broker("b", 5671)]);
        let a = amqp(&[("amqp.host", "amqp://ci:pw@a,b:5673")]);
        assert_eq!(a.hosts, [broker("a", 5672), broker("b", 5673)]);
        assert_eq!((a.username.as_str(), a.password.as_str()), ("ci", "pw"));
        // A list in a file: its entries, separated by commas.
        let mut l = Layers::default();
        let list = ["amqp://a:1", "amqp://b"].map(|s| toml::Value::String(s.into()));
        l.set("amqp.host", toml::Value::Array(list.to_vec()));
        let a = l.settings().unwrap().amqp;
        assert_eq!(
            (a.tls, a.hosts),
            (false, vec![broker("a", 1), broker("b", 5672)])
        );
        let err = layers(&[("amqp.host", "a:1,")]).settings().unwrap_err();
        assert!(format!("{err}").contains("broker 2 of 2 is empty"), "{err}");
    }

    #[test]
    fn the_userinfo_of_amqp_host_gives_the_credentials_unless_the_keys_do() {
        // Issue 24: amqp://user:pw@host was read as the host `user:pw@host`.
        let amqp = |values: &[(&str, &str)]| layers(values).settings().unwrap().amqp;
        let url = ("amqp.host", "amqp://ci:s%3Acret@broker:5673");
        let a = amqp(&[url]);
        assert_eq!(a.hosts, [broker("broker", 5673)]);
        assert_eq!((a.username.as_str(), a.password.as_str()), ("ci", "s:cret"));
        let a = amqp(&[url, ("amqp.password", "other")]);
        assert_eq!((a.username.as_str(), a.password.as_str()), ("ci", "other"));
        let a = amqp(&[url, ("amqp.username", "me")]);
        assert_eq!((a.username.as_str(), a.password.as_str()), ("me", "guest"));
        let a = amqp(&[("amqp.host", "ci@broker")]);
        assert_eq!((a.username.as_str(), a.password.as_str()), ("ci", "guest"));
        let a = amqp(&[]);
        assert_eq!(
            (a.username.as_str(), a.password.as_str()),
            ("guest", "guest")
        );
    }

    #[test]
    fn a_bad_value_names_its_key_and_where_it_was_set() {
        let mut l = layers(&[]);
        l.merge_env(vec![("JOLT_HTTP_TIMEOUT".to_string(), "0".to_string())].into_iter());
        let err = format!("{}", l.settings().unwrap_err());
        assert!(err.contains("http.timeout"), "{err}");
        assert!(err.contains("JOLT_HTTP_TIMEOUT"), "{err}");
    }

    #[test]
    fn the_credentials_in_files_are_the_passwords_a_file_gives() {
        // Issue 24: the tasks of a worker read its configuration files; it warns of
        // the credentials they hold.
        let file = Path::new("/etc/jolt/worker.conf");
        let from = |origin: &str, key: &str, value: &str| {
            let mut layers = Layers::default();
            match origin {
                "file" => {
                    let (section, name) = key.split_once('.').unwrap();
                    let values = [(name.to_string(), toml::Value::String(value.into()))];
                    let sections = [(section.to_string(), values.into_iter().collect())];
                    layers.merge(sections.into_iter().collect(), &Origin::File(file.into()));
                }
                "env" => {
                    let var = format!("JOLT_{}", key.replace('.', "_").to_uppercase());
                    layers.merge_env([(var, value.to_string())].into_iter());
                }
                _ => {
                    layers.set(key, toml::Value::String(value.into()));
                    layers.origins.insert(key.into(), Origin::Argument);
                }
            }
            let found = layers.settings().unwrap().credentials_in_files;
            found.iter().for_each(|c| assert_eq!(c.file, file));
            let found: Vec<_> = found
                .iter()
                .map(|c| (c.key, c.in_url, c.variable))
                .collect();
            found
        };
        let http = ("http.password", false, "JOLT_HTTP_PASSWORD");
        let http_uri = ("http.uri", true, "JOLT_HTTP_PASSWORD");
        let amqp = ("amqp.password", false, "JOLT_AMQP_PASSWORD");
        let amqp_host = ("amqp.host", true, "JOLT_AMQP_PASSWORD");
        let cases = [
            ("file", "http.password", "s3cret", vec![http]),
            ("env", "http.password", "s3cret", vec![]),
            ("-c", "http.password", "s3cret", vec![]),
            ("file", "http.password", "", vec![]),
            ("file", "http.username", "ci", vec![]),
            (
                "file",
                "http.uri",
                "http://ci:s3cret@cache/",
                vec![http_uri],
            ),
            ("env", "http.uri", "http://ci:s3cret@cache/", vec![]),
            ("file", "http.uri", "http://ci@cache/", vec![]),
            ("file", "http.uri", "http://cache/", vec![]),
            ("file", "amqp.password", "guest", vec![amqp]),
            ("env", "amqp.password", "guest", vec![]),
            (
                "file",
                "amqp.host",
                "amqp://ci:s3cret@broker",
                vec![amqp_host],
            ),
            (
                "file",
                "amqp.host",
                "ci:s3cret@broker:5672",
                vec![amqp_host],
            ),
            ("-c", "amqp.host", "amqp://ci:s3cret@broker", vec![]),
            ("file", "amqp.host", "ci@broker", vec![]),
            ("file", "amqp.host", "broker", vec![]),
        ];
        for (origin, key, value, expected) in cases {
            assert_eq!(
                from(origin, key, value),
                expected,
                "{key} = {value} from {origin}"
            );
        }
        assert_eq!(Config::default().credentials_in_files, vec![]);
    }

    #[test]
    fn booleans_accept_common_spellings() {
        let settings = layers(&[("jolt.upload", "no")]).settings().unwrap();
        assert!(!settings.jolt.upload);
        assert!(settings.jolt.download);
        assert!(layers(&[("jolt.upload", "maybe")]).settings().is_err());
    }
}
