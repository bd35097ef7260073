//! The one table of configuration keys: each key's kind, range and default.
//!
//! `jolt config KEY VALUE` checks a value with [`check`], and the settings a command
//! runs with ([`super::Config`]) are read through the same function, defaults
//! included, so what `config` accepts is exactly what a build accepts.

use anyhow::Result;

use crate::error::usage;

/// The most tasks (`-j`, `jolt.jobs`) or remote executions (`amqp.jobs`) at once: each
/// takes a thread.
pub const MAX_JOBS: usize = 1024;

/// The broker's port with TLS when neither `amqp.port` nor `amqp.host` gives one (the
/// table's default, 5672, is the port without).
pub const AMQPS_PORT: u16 = 5671;

/// What a key's value must be.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// Any text.
    Text,
    /// A name as a task's (a pool's routing key names its queue), at most
    /// [`MAX_POOL_NAME`] characters.
    Name,
    /// A task reference (`app`, `app:mode=release`): not empty.
    Reference,
    /// An `http://` or `https://` URL; empty: unset.
    HttpUri,
    /// Brokers: `host[:port]`, several separated by commas, after one `amqp://` or
    /// `amqps://` and `user[:password]@` if any; a list in a file is read as its
    /// entries separated by commas.
    AmqpHost,
    Bool,
    /// An integer within bounds.
    Int(i64, i64),
    /// A size such as `10G`, in bytes within bounds.
    Size(u64, u64),
    /// One of these words.
    OneOf(&'static [&'static str]),
}

/// One key of the table.
#[derive(Debug)]
pub struct Spec {
    /// `section.key`.
    pub name: &'static str,
    pub kind: Kind,
    /// What jolt takes when no layer sets the key, spelled as `jolt config` accepts
    /// it; `None`: unset.
    pub default: Option<&'static str>,
    /// What the default means where its value does not say (`config -l` shows it in
    /// parentheses).
    pub meaning: Option<&'static str>,
}

impl Spec {
    const fn new(name: &'static str, kind: Kind, default: Option<&'static str>) -> Spec {
        Spec {
            name,
            kind,
            default,
            meaning: None,
        }
    }

    const fn meaning(self, meaning: &'static str) -> Spec {
        Spec {
            meaning: Some(meaning),
            ..self
        }
    }

    /// The default as `config -l` and `config KEY` show it.
    pub fn shown_default(&self) -> Option<String> {
        let default = self.default?;
        Some(match self.meaning {
            Some(meaning) => format!("{default} ({meaning})"),
            None => default.to_string(),
        })
    }
}

const MAX_JOBS_I64: i64 = MAX_JOBS as i64;

/// Every key jolt reads. Other keys are refused where they are set on the command
/// line or by `jolt config`, and warned about where a file or the environment holds
/// them.
pub const SPECS: &[Spec] = &[
    Spec::new("jolt.cachedir", Kind::Text, None),
    Spec::new("jolt.cachesize", Kind::Size(0, u64::MAX), Some("10G")),
    // A run log keeps this much of each task's output (its first and last halves);
    // the console shows all of it.
    Spec::new("jolt.log_tail", Kind::Size(0, 1 << 30), Some("1M")),
    // The runs directory (`jolt log`) stays within this.
    Spec::new("jolt.log_total", Kind::Size(1 << 20, 1 << 40), Some("256M")),
    Spec::new("jolt.jobs", Kind::Int(0, MAX_JOBS_I64), Some("0")).meaning("the number of CPUs"),
    Spec::new("jolt.default", Kind::Reference, Some("default")),
    Spec::new("jolt.upload", Kind::Bool, Some("true")),
    Spec::new("jolt.download", Kind::Bool, Some("true")),
    Spec::new("http.uri", Kind::HttpUri, None),
    Spec::new("http.upload", Kind::Bool, Some("true")),
    Spec::new("http.download", Kind::Bool, Some("true")),
    Spec::new("http.username", Kind::Text, None),
    Spec::new("http.password", Kind::Text, None),
    Spec::new("http.connect_timeout", Kind::Int(1, 86400), Some("10")),
    Spec::new("http.timeout", Kind::Int(1, 86400), Some("60")),
    Spec::new("http.retries", Kind::Int(0, 100), Some("3")),
    // A transfer of a small artifact is mostly waiting for round trips, so more of
    // them in flight hide a far cache's latency. 300 small downloads 20 ms away
    // (`scripts/bench latency`, medians): 0.43 s at 16, 0.25 s at 32, 0.17 s at 64; at
    // no latency 0.066 s at 16 and 0.076 s at 64. 64 downloads of 16 MiB on loopback:
    // 0.43 s at 16, 0.45 s at 64.
    Spec::new("http.transfers", Kind::Int(1, 256), Some("64")),
    Spec::new("http.ca_file", Kind::Text, None),
    Spec::new("amqp.host", Kind::AmqpHost, Some("localhost")),
    Spec::new("amqp.port", Kind::Int(1, 65535), Some("5672")).meaning("5671 with TLS"),
    Spec::new("amqp.vhost", Kind::Text, Some("/")),
    Spec::new("amqp.username", Kind::Text, Some("guest")),
    Spec::new("amqp.password", Kind::Text, Some("guest")),
    Spec::new("amqp.routing_key", Kind::Name, Some("default")),
    Spec::new("amqp.priority", Kind::Int(0, 255), Some("0")),
    Spec::new("amqp.max_priority", Kind::Int(0, 255), Some("10")),
    Spec::new(
        "amqp.queue_type",
        Kind::OneOf(&["classic", "quorum"]),
        Some("classic"),
    ),
    // 0: no heartbeats.
    Spec::new("amqp.heartbeat", Kind::Int(0, 3600), Some("30")),
    Spec::new("amqp.connect_timeout", Kind::Int(1, 3600), Some("10")),
    Spec::new("amqp.tls", Kind::Bool, Some("false")),
    Spec::new("amqp.ca_file", Kind::Text, None),
    Spec::new("amqp.progress", Kind::Int(1, 3600), Some("5")),
    Spec::new("amqp.timeout", Kind::Int(1, 86400), Some("300")),
    Spec::new("amqp.jobs", Kind::Int(1, MAX_JOBS_I64), Some("1024")),
    Spec::new("network.upload", Kind::Bool, Some("true")),
    Spec::new("network.download", Kind::Bool, Some("true")),
];

/// The key `name` of the table.
pub fn spec(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

/// Every key jolt reads.
pub fn keys() -> impl Iterator<Item = &'static str> {
    SPECS.iter().map(|s| s.name)
}

/// Whether some key of the table is in `section`.
pub fn is_section(section: &str) -> bool {
    keys().any(|k| k.split_once('.').is_some_and(|(s, _)| s == section))
}

/// A value as its key's kind reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text, a name or a URL: as written, without surrounding blanks for a URL.
    Text(String),
    Bool(bool),
    Int(i64),
    Size(u64),
}

/// One broker `amqp.host` lists: a host (an IPv6 address in brackets), and the
/// port written after it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    pub host: String,
    pub port: Option<u16>,
}

/// `amqp.host` taken apart: whether its scheme asks for TLS (none given: `None`),
/// the brokers it lists, and the user and password of its userinfo.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpHost {
    pub tls: Option<bool>,
    /// One or more, as written.
    pub brokers: Vec<HostEntry>,
    /// `user[:password]@` before the first host, percent-decoded: the broker's
    /// credentials unless `amqp.username` is set (as `http.uri`'s with
    /// `http.username`).
    pub userinfo: Option<crate::util::secrets::Userinfo>,
}

impl std::fmt::Debug for AmqpHost {
    /// Never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpHost")
            .field("tls", &self.tls)
            .field("brokers", &self.brokers)
            .field("user", &self.userinfo.as_ref().map(|(user, _)| user))
            .finish()
    }
}

/// Parses `amqp.host`: one or more brokers separated by commas, each `host` or
/// `host:port`, after an optional `amqp://` or `amqps://` and an optional
/// `user[:password]@`, once, in front (`amqp://u:pw@a:5672,b:5672`); a later broker
/// may repeat the first's scheme, not change it. Err: what is wrong, naming the
/// broker (never its password).
pub fn parse_amqp_host(written: &str) -> Result<AmqpHost, String> {
    // The scheme is not echoed: what precedes `://` may be a mistyped password.
    let (tls, rest) = split_scheme(written.trim())
        .ok_or_else(|| "its scheme is neither amqp:// nor amqps://".to_string())?;
    // The userinfo is the front's: a ',' before its '@' puts it on a later broker.
    if rest
        .rfind('@')
        .is_some_and(|at| rest[..at].contains(',') && !rest[..at].contains('/'))
    {
        return Err(
            "the user and password go once, before the first broker (a ',' in a password is written %2C)"
                .to_string(),
        );
    }
    let (rest, userinfo) = crate::util::secrets::split_userinfo(rest);
    let entries: Vec<&str> = rest.trim_end_matches('/').split(',').collect();
    let mut brokers = Vec::new();
    for (n, entry) in entries.iter().enumerate() {
        let entry = entry.trim();
        let shown = crate::util::secrets::masked_url(entry);
        let bad = |why: &str| Err(format!("the broker '{shown}' {why}"));
        if entry.is_empty() {
            return Err(format!("broker {} of {} is empty", n + 1, entries.len()));
        }
        let Some((entry_tls, bare)) = split_scheme(entry) else {
            return bad("has a scheme that is neither amqp:// nor amqps://");
        };
        if entry_tls.is_some() && entry_tls != tls {
            return bad("has a scheme of its own: give one, amqp:// or amqps://, for all in front");
        }
        let bare = bare.trim_end_matches('/');
        // A path (`amqp://host/vhost`) is not jolt's way to name a vhost: amqp.vhost is.
        if bare.contains('/') {
            return bad("has a path (the vhost goes in amqp.vhost)");
        }
        if bare.contains('@') {
            return bad("has a user: give it once, before the first broker");
        }
        match host_and_port(bare) {
            Ok((host, port)) => brokers.push(HostEntry { host, port }),
            Err(why) => return bad(why),
        }
    }
    Ok(AmqpHost {
        tls,
        brokers,
        userinfo,
    })
}

/// The scheme in front of `written`, if any (`Some(true)`: TLS), and the rest;
/// `None` for a scheme that is neither `amqp` nor `amqps`.
fn split_scheme(written: &str) -> Option<(Option<bool>, &str)> {
    match written.split_once("://") {
        // A `://` after a ',' is a later broker's.
        Some((scheme, rest)) if !scheme.contains(',') => {
            match scheme.to_ascii_lowercase().as_str() {
                "amqps" => Some((Some(true), rest)),
                "amqp" => Some((Some(false), rest)),
                _ => None,
            }
        }
        _ => Some((None, written)),
    }
}

/// `host` or `host:port`; an IPv6 address in brackets (`[::1]:5672`).
fn host_and_port(entry: &str) -> Result<(String, Option<u16>), &'static str> {
    let (host, port) = if entry.starts_with('[') {
        let Some(end) = entry.find(']') else {
            return Err("has an IPv6 address without its ']'");
        };
        match &entry[end + 1..] {
            "" => (&entry[..=end], None),
            after => match after.strip_prefix(':') {
                Some(port) => (&entry[..=end], Some(port)),
                None => return Err("has something other than a port after its ']'"),
            },
        }
    } else {
        match entry.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err("is an IPv6 address: write it in brackets, [::1]:5672")
            }
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err("has no host");
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(port),
            _ => return Err("has a port that is not from 1 to 65535"),
        },
    };
    Ok((host.to_string(), port))
}

/// A size as `config` accepts it: `1M` for 1,048,576 bytes, `1000` for 1,000.
pub fn show_size(bytes: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// The longest routing key: RabbitMQ names are at most 255 bytes, and the pool's
/// queue is `jolt_tasks_<key>`.
pub const MAX_POOL_NAME: usize = 255 - "jolt_tasks_".len();

/// Reads `value` as `spec`'s kind, or says what was expected.
fn read(spec: &Spec, value: &str) -> Result<Value, String> {
    let value_ok = match spec.kind {
        Kind::Text => Some(Value::Text(value.to_string())),
        Kind::Name => (crate::util::valid_name(value) && value.len() <= MAX_POOL_NAME)
            .then(|| Value::Text(value.to_string())),
        Kind::Reference => {
            (!value.trim().is_empty()).then(|| Value::Text(value.trim().to_string()))
        }
        Kind::HttpUri => {
            let uri = value.trim();
            let (bare, _) = crate::util::secrets::strip_userinfo(uri);
            // A host after the scheme: `http://` alone names no server.
            let host = |rest: &str| !rest.is_empty() && !rest.starts_with('/');
            let valid = bare.strip_prefix("http://").is_some_and(host)
                || bare.strip_prefix("https://").is_some_and(host);
            (uri.is_empty() || valid).then(|| Value::Text(uri.to_string()))
        }
        Kind::AmqpHost => {
            return parse_amqp_host(value)
                .map(|_| Value::Text(value.to_string()))
                .map_err(|why| format!("{why}; expected {}", expected(spec.kind)))
        }
        Kind::Bool => super::parse_bool(value).map(Value::Bool),
        Kind::Int(lo, hi) => value
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|v| (lo..=hi).contains(v))
            .map(Value::Int),
        Kind::Size(lo, hi) => super::parse_size(value)
            .filter(|v| (lo..=hi).contains(v))
            .map(Value::Size),
        Kind::OneOf(words) => words
            .contains(&value.trim())
            .then(|| Value::Text(value.trim().to_string())),
    };
    value_ok.ok_or_else(|| format!("expected {}", expected(spec.kind)))
}

/// What a value of `kind` must be, for errors.
fn expected(kind: Kind) -> String {
    match kind {
        Kind::Text => String::new(),
        Kind::Name => format!(
            "a name of letters, digits, '_', '-', '.' and '/', at most {MAX_POOL_NAME} characters"
        ),
        Kind::Reference => "a task reference such as app or app:mode=release".to_string(),
        Kind::HttpUri => "an http:// or https:// URL with a host".to_string(),
        Kind::AmqpHost => {
            "host[:port], several separated by commas, after one amqp:// or amqps:// and user:password@ if any (the vhost goes in amqp.vhost)".to_string()
        }
        Kind::Bool => "a boolean (true, false)".to_string(),
        Kind::Int(lo, hi) => format!("an integer from {lo} to {hi}"),
        Kind::Size(0, u64::MAX) => "a size such as 500M or 10G".to_string(),
        Kind::Size(lo, hi) => format!("a size from {} to {}", show_size(lo), show_size(hi)),
        Kind::OneOf(words) => format!("one of {}", words.join(", ")),
    }
}

/// Reads `value` as the kind of the key `spec`; a value the key cannot take is a
/// usage error naming the key, and `origin` (where the value was set) when given.
pub fn check(spec: &Spec, value: &str, origin: Option<&str>) -> Result<Value> {
    read(spec, value).map_err(|expected| {
        let shown = if spec.name.ends_with("password") {
            crate::util::secrets::MASK.to_string()
        } else if spec.kind == Kind::AmqpHost {
            // Each broker of a list, which may wrongly have a user of its own.
            let brokers: Vec<String> = value
                .split(',')
                .map(crate::util::secrets::masked_url)
                .collect();
            brokers.join(",")
        } else {
            crate::util::secrets::masked_url(value)
        };
        let key = spec.name;
        usage(match origin {
            Some(origin) => format!(
                "Illegal value '{shown}' for configuration key {key}: {expected} (set by {origin})"
            ),
            None => format!("Illegal value '{shown}' for configuration key {key}: {expected}"),
        })
    })
}

/// Refuses a value its key cannot take (`jolt config KEY VALUE`); a key outside the
/// table is [`check_key`]'s to refuse.
pub fn check_value(key: &str, value: &str) -> Result<()> {
    match spec(key) {
        Some(spec) => check(spec, value, None).map(|_| ()),
        None => Ok(()),
    }
}

/// Whether jolt knows the configuration key `section.key`.
pub fn is_known(key: &str) -> bool {
    spec(key).is_some()
}

/// What to add to an error about the unknown `key`: the key it was probably meant to
/// be, else the keys of its section, else nothing.
pub fn unknown_hint(key: &str) -> String {
    let hint = crate::util::did_you_mean(key, keys());
    if !hint.is_empty() {
        return hint;
    }
    let Some((section, _)) = key.split_once('.') else {
        return String::new();
    };
    let similar: Vec<&str> = keys()
        .filter(|k| k.strip_prefix(section).is_some_and(|r| r.starts_with('.')))
        .collect();
    if similar.is_empty() {
        String::new()
    } else {
        format!(": {section} has {}", similar.join(", "))
    }
}

/// Refuses a key jolt does not know (a typo would otherwise do nothing).
pub fn check_key(key: &str) -> Result<()> {
    super::split_key(key)?;
    if is_known(key) {
        return Ok(());
    }
    Err(usage(format!(
        "Unknown configuration key '{key}'{}",
        unknown_hint(key)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_once_in_the_table_and_its_default_is_a_value_it_takes() {
        let all: Vec<&str> = keys().collect();
        let unique: std::collections::BTreeSet<&str> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len());
        for spec in SPECS {
            assert!(super::super::split_key(spec.name).is_ok(), "{}", spec.name);
            if let Some(default) = spec.default {
                assert!(check(spec, default, None).is_ok(), "{}", spec.name);
            }
            if let Kind::Int(lo, hi) = spec.kind {
                assert!(check(spec, &lo.to_string(), None).is_ok(), "{}", spec.name);
                assert!(check(spec, &hi.to_string(), None).is_ok(), "{}", spec.name);
                assert!(check(spec, &(lo - 1).to_string(), None).is_err());
                assert!(check(spec, &(hi + 1).to_string(), None).is_err());
            }
        }
        let port = spec("amqp.port").unwrap();
        assert!(port.meaning.unwrap().contains(&AMQPS_PORT.to_string()));
    }

    #[test]
    fn every_kind_checks_its_values() {
        assert!(check_value("jolt.cachesize", "2G").is_ok());
        assert!(check_value("jolt.cachesize", "banana").is_err());
        assert!(check_value("jolt.log_tail", "0").is_ok());
        assert!(check_value("jolt.log_tail", "1G").is_ok());
        let err = check_value("jolt.log_tail", "2G").unwrap_err();
        assert!(format!("{err}").contains("a size from 0 to 1G"), "{err}");
        assert!(check_value("jolt.log_total", "1023K").is_err());
        assert!(check_value("jolt.log_total", "1T").is_ok());
        assert_eq!(show_size(1536), "1536");
        assert_eq!(
            (show_size(1 << 20), show_size(0)),
            ("1M".to_string(), "0".to_string())
        );
        assert!(check_value("amqp.tls", "yes").is_ok());
        assert!(check_value("amqp.tls", "maybe").is_err());
        assert!(check_value("http.transfers", "256").is_ok());
        assert!(check_value("http.transfers", "257").is_err());
        assert!(check_value("amqp.host", "anything").is_ok());
        assert!(check_value("amqp.host", "amqps://broker:5000/").is_ok());
        assert!(check_value("amqp.host", "ftp://broker").is_err());
        assert!(check_value("amqp.routing_key", "linux/x86").is_ok());
        assert!(check_value("amqp.routing_key", "two words").is_err());
        assert!(check_value("http.uri", "https://u:pw@cache/").is_ok());
        assert!(check_value("http.uri", "").is_ok());
        let err = check_value("http.uri", "ftp://u:s3cret@cache/").unwrap_err();
        assert!(!format!("{err}").contains("s3cret"), "{err}");
        // Issue 23: a timeout of 0 was accepted here and refused by every build.
        assert!(check_value("http.timeout", "0").is_err());
        assert!(check_value("http.connect_timeout", "0").is_err());
    }

    #[test]
    fn amqp_hosts_come_apart_into_scheme_host_and_port() {
        let parsed = |s| {
            parse_amqp_host(s).ok().map(|h| {
                assert_eq!(h.brokers.len(), 1, "{s}");
                let b = h.brokers[0].clone();
                (h.tls, b.host, b.port)
            })
        };
        assert_eq!(parsed("broker"), Some((None, "broker".into(), None)));
        assert_eq!(
            parsed("AMQPS://broker:5000/"),
            Some((Some(true), "broker".into(), Some(5000)))
        );
        assert_eq!(
            parsed("amqp://[::1]:5672"),
            Some((Some(false), "[::1]".into(), Some(5672)))
        );
        assert_eq!(parsed("[::1]"), Some((None, "[::1]".into(), None)));
        assert_eq!(parsed("http://broker"), None);
        assert_eq!(parsed("amqp://"), None);
        assert_eq!(parsed("amqp://u:pw@"), None);
        // Issue 24: the userinfo was read as part of the host name.
        let host = parse_amqp_host("amqp://ci:s%40cret-77@broker:5673/").unwrap();
        let b = &host.brokers[0];
        assert_eq!((b.host.as_str(), b.port), ("broker", Some(5673)));
        assert_eq!(
            host.userinfo,
            Some(("ci".to_string(), Some("s@cret-77".to_string())))
        );
        assert!(!format!("{host:?}").contains("cret"), "{host:?}");
        let host = parse_amqp_host("ci@broker").unwrap();
        assert_eq!(host.brokers[0].host, "broker");
        assert_eq!(host.userinfo, Some(("ci".to_string(), None)));
    }

    #[test]
    fn amqp_host_lists_several_brokers() {
        // Issue 25: `a:5681,b:5682` was one host, `a:5681,b`, on the port 5682.
        let brokers = |s: &str| {
            let h = parse_amqp_host(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            let list: Vec<(String, Option<u16>)> =
                h.brokers.into_iter().map(|b| (b.host, b.port)).collect();
            (h.tls, list, h.userinfo.map(|(user, _)| user))
        };
        let a_b = vec![("a".to_string(), Some(5681)), ("b".to_string(), Some(5682))];
        assert_eq!(brokers("a:5681,b:5682"), (None, a_b.clone(), None));
        assert_eq!(
            brokers("amqp://a:5681, b:5682/"),
            (Some(false), a_b.clone(), None)
        );
        assert_eq!(
            brokers("amqps://a:5681,amqps://b:5682"),
            (Some(true), a_b.clone(), None)
        );
        assert_eq!(
            brokers("amqp://ci:pw@a:5681,b:5682"),
            (Some(false), a_b, Some("ci".to_string()))
        );
        assert_eq!(
            brokers("a,b:5673,[::1]").1,
            vec![
                ("a".to_string(), None),
                ("b".to_string(), Some(5673)),
                ("[::1]".to_string(), None)
            ]
        );
        let h = parse_amqp_host("ci:s%2Ccret@a,b").unwrap();
        assert_eq!(h.userinfo, Some(("ci".into(), Some("s,cret".into()))));
    }

    #[test]
    fn a_bad_broker_of_a_list_is_refused_by_name() {
        let cases = [
            ("a:1,", "broker 2 of 2 is empty"),
            (",a", "broker 1 of 2 is empty"),
            ("a,,b", "broker 2 of 3 is empty"),
            (
                "a:1,b:99999",
                "the broker 'b:99999' has a port that is not from 1 to 65535",
            ),
            ("a:1,b:0", "the broker 'b:0' has a port"),
            ("a:1,b:x", "the broker 'b:x' has a port"),
            ("a:1,b:", "the broker 'b:' has a port"),
            ("a,:5672", "the broker ':5672' has no host"),
            (
                "amqp://a,amqps://b",
                "the broker 'amqps://b' has a scheme of its own",
            ),
            (
                "a,amqp://b",
                "the broker 'amqp://b' has a scheme of its own",
            ),
            (
                "a,ftp://b",
                "the broker 'ftp://b' has a scheme that is neither",
            ),
            ("ftp://a,b", "its scheme is neither amqp:// nor amqps://"),
            ("amqp://a,b/vhost", "the broker 'b/vhost' has a path"),
            ("a,::1", "the broker '::1' is an IPv6 address"),
            (
                "a,[::1",
                "the broker '[::1' has an IPv6 address without its ']'",
            ),
            (
                "amqp://a,u:s3cret@b",
                "the user and password go once, before the first",
            ),
            (
                "amqp://u:s3cret@a,amqp://u:s3cret@b",
                "the broker 'amqp://********@b' has a user",
            ),
        ];
        for (written, why) in cases {
            let err = parse_amqp_host(written).unwrap_err();
            assert!(err.starts_with(why), "{written}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
            let err = format!("{}", check_value("amqp.host", written).unwrap_err());
            assert!(
                err.contains(&format!("for configuration key amqp.host: {why}")),
                "{err}"
            );
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn config_refuses_what_a_build_could_not_use() {
        // Found by an attacking helper: each was accepted by `jolt config`, then
        // every build or worker failed on it (a queue name over 255 bytes, an empty
        // task name, a URL without a host, a vhost read as part of the host name, a
        // port past 65535 read as part of the host name).
        let long = "p".repeat(MAX_POOL_NAME);
        assert!(check_value("amqp.routing_key", &long).is_ok());
        assert!(check_value("amqp.routing_key", &format!("{long}p")).is_err());
        assert!(check_value("jolt.default", "").is_err());
        assert!(check_value("jolt.default", " ").is_err());
        assert!(check_value("jolt.default", "app:mode=release").is_ok());
        for bad in ["http://", "https://", "http:///cache"] {
            assert!(check_value("http.uri", bad).is_err(), "{bad}");
        }
        assert!(check_value("http.uri", "http://cache:8080/jolt").is_ok());
        for bad in [
            "amqp://u:p@127.0.0.1:5672/%2F",
            "broker:99999",
            "amqp://broker:0",
        ] {
            assert!(check_value("amqp.host", bad).is_err(), "{bad}");
        }
        assert!(check_value("amqp.host", "broker:5672").is_ok());
    }

    #[test]
    fn params_and_network_config_are_unknown_keys() {
        // Issue 23: both were accepted and listed, and nothing read them.
        assert!(check_key("params.answer").is_err());
        assert!(check_key("network.config").is_err());
        assert!(check_key("network.upload").is_ok());
    }
}
