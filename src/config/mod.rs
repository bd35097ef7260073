//! Layered configuration: files, environment and command-line overrides.
//!
//! Layers, later wins: `/etc/jolt/config.toml`, `$XDG_CONFIG_HOME/jolt/config.toml`,
//! each `-c FILE`, environment variables `JOLT_<SECTION>_<KEY>`, each
//! `-c section.key=value`. Values are kept as TOML values; typed getters accept the
//! string spellings that come from the environment and the command line.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::usage;

/// Sections whose keys may be set from the environment.
const SECTIONS: &[&str] = &["jolt", "http", "amqp", "network"];

/// What a key's value must be.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Text,
    Bool,
    /// An integer within bounds.
    Int(i64, i64),
    Size,
}

/// Every key jolt reads, with its kind and its default as `jolt config -l` shows it
/// (`None`: unset). Other keys are refused where they are set on the command line
/// and warned about where a file or the environment holds them; `params.*` is free.
const SPECS: &[(&str, Kind, Option<&str>)] = &[
    ("jolt.cachedir", Kind::Text, None),
    ("jolt.cachesize", Kind::Size, Some("10G")),
    (
        "jolt.jobs",
        Kind::Int(0, 1024),
        Some("0 (the number of CPUs)"),
    ),
    ("jolt.default", Kind::Text, Some("default")),
    ("jolt.upload", Kind::Bool, Some("true")),
    ("jolt.download", Kind::Bool, Some("true")),
    ("http.uri", Kind::Text, None),
    ("http.upload", Kind::Bool, Some("true")),
    ("http.download", Kind::Bool, Some("true")),
    ("http.username", Kind::Text, None),
    ("http.password", Kind::Text, None),
    ("http.connect_timeout", Kind::Int(0, 86400), Some("10")),
    ("http.timeout", Kind::Int(0, 86400), Some("60")),
    ("http.retries", Kind::Int(0, 100), Some("3")),
    ("http.transfers", Kind::Int(1, 256), Some("64")),
    ("http.ca_file", Kind::Text, None),
    ("amqp.host", Kind::Text, Some("localhost")),
    (
        "amqp.port",
        Kind::Int(0, 65535),
        Some("5672 (5671 with TLS)"),
    ),
    ("amqp.vhost", Kind::Text, Some("/")),
    ("amqp.username", Kind::Text, Some("guest")),
    ("amqp.password", Kind::Text, Some("guest")),
    ("amqp.routing_key", Kind::Text, Some("default")),
    ("amqp.priority", Kind::Int(0, 255), Some("0")),
    ("amqp.max_priority", Kind::Int(0, 255), Some("10")),
    ("amqp.heartbeat", Kind::Int(0, 3600), Some("30")),
    ("amqp.connect_timeout", Kind::Int(0, 3600), Some("10")),
    ("amqp.tls", Kind::Bool, Some("false")),
    ("amqp.ca_file", Kind::Text, None),
    ("amqp.progress", Kind::Int(0, 3600), Some("5")),
    ("amqp.timeout", Kind::Int(0, 86400), Some("300")),
    ("amqp.jobs", Kind::Int(1, 1024), Some("1024")),
    ("network.upload", Kind::Bool, Some("true")),
    ("network.download", Kind::Bool, Some("true")),
    ("network.config", Kind::Text, None),
];

/// Every key jolt reads.
pub fn keys() -> impl Iterator<Item = &'static str> {
    SPECS.iter().map(|(key, _, _)| *key)
}

/// Refuses a value its key cannot take (`jolt config KEY VALUE`).
pub fn check_value(key: &str, value: &str) -> Result<()> {
    let Some((_, kind, _)) = SPECS.iter().find(|(k, _, _)| *k == key) else {
        return Ok(());
    };
    let ok = match *kind {
        Kind::Text => true,
        Kind::Bool => parse_bool(value).is_some(),
        Kind::Int(lo, hi) => value
            .trim()
            .parse::<i64>()
            .is_ok_and(|v| (lo..=hi).contains(&v)),
        Kind::Size => parse_size(value).is_some(),
    };
    if ok {
        return Ok(());
    }
    let expected = match *kind {
        Kind::Bool => "a boolean (true, false)".to_string(),
        Kind::Int(lo, hi) => format!("an integer from {lo} to {hi}"),
        Kind::Size => "a size such as 500M or 10G".to_string(),
        Kind::Text => String::new(),
    };
    Err(usage(format!(
        "Illegal value '{value}' for configuration key {key}: expected {expected}"
    )))
}

/// Whether jolt knows the configuration key `section.key`.
pub fn is_known(key: &str) -> bool {
    keys().any(|k| k == key) || key.starts_with("params.")
}

/// Refuses a key jolt does not know (a typo would otherwise do nothing).
pub fn check_key(key: &str) -> Result<()> {
    split_key(key)?;
    if is_known(key) {
        return Ok(());
    }
    let (section, _) = split_key(key)?;
    let similar: Vec<&str> = keys()
        .filter(|k| k.starts_with(&format!("{section}.")))
        .collect();
    let hint = crate::util::did_you_mean(key, keys());
    Err(usage(if !hint.is_empty() {
        format!("Unknown configuration key '{key}'{hint}")
    } else if similar.is_empty() {
        format!("Unknown configuration key '{key}'")
    } else {
        format!(
            "Unknown configuration key '{key}': {section} has {}",
            similar.join(", ")
        )
    }))
}

/// Warns about the keys of a file that jolt does not know.
fn warn_unknown(path: &Path, sections: &BTreeMap<String, Section>) {
    for (section, values) in sections {
        for key in values.keys() {
            let key = format!("{section}.{key}");
            if !is_known(&key) {
                let hint = crate::util::did_you_mean(&key, keys());
                crate::console::warn(&format!(
                    "Unknown configuration key '{key}' in {} is ignored{hint}",
                    path.display()
                ));
            }
        }
    }
}

type Section = BTreeMap<String, toml::Value>;

/// The merged configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    values: BTreeMap<String, Section>,
    /// Where each `section.key` set got its value: a file, the environment, `-c`.
    origins: BTreeMap<String, String>,
}

/// Where `jolt config KEY VALUE` writes.
pub fn user_file() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".config"));
    base.join("jolt").join("config.toml")
}

/// Where `jolt config --global KEY VALUE` writes.
pub fn global_file() -> PathBuf {
    PathBuf::from("/etc/jolt/config.toml")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Splits `section.key` into its two parts.
pub fn split_key(key: &str) -> Result<(&str, &str)> {
    match key.split_once('.') {
        Some((s, k)) if !s.is_empty() && !k.is_empty() => Ok((s, k)),
        _ => Err(usage(format!(
            "Invalid configuration key '{key}': expected section.key"
        ))),
    }
}

/// Reads one TOML config file into sections; a missing file is empty.
pub fn read_file(path: &Path) -> Result<BTreeMap<String, Section>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).with_context(|| format!("Cannot read {}", path.display())),
    };
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        usage(format!(
            "Syntax error in configuration {}: {}",
            path.display(),
            crate::util::one_line(&e, &text)
        ))
    })?;
    let mut out = BTreeMap::new();
    for (section, value) in table {
        match value {
            toml::Value::Table(t) => {
                out.insert(section, t.into_iter().collect());
            }
            _ => {
                return Err(usage(format!(
                    "Syntax error in configuration {}: '{section}' must be a [section]",
                    path.display()
                )))
            }
        }
    }
    Ok(out)
}

/// Writes sections back to a TOML config file.
pub fn write_file(path: &Path, sections: &BTreeMap<String, Section>) -> Result<()> {
    let mut table = toml::Table::new();
    for (name, section) in sections {
        if section.is_empty() {
            continue;
        }
        table.insert(
            name.clone(),
            toml::Value::Table(section.clone().into_iter().collect()),
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    let text = toml::to_string(&table)?;
    // Configuration files may hold passwords: only their owner reads them.
    crate::util::fs::write_atomic_mode(path, text.as_bytes(), 0o600)
        .with_context(|| format!("Cannot write {}", path.display()))
}

impl Config {
    /// Loads all layers. `overrides` are the `-c` arguments in command-line order.
    pub fn load(overrides: &[String]) -> Result<Config> {
        let mut config = Config::default();
        let merge_file = |config: &mut Config, path: &Path| -> Result<()> {
            let sections = read_file(path)?;
            warn_unknown(path, &sections);
            config.merge(sections, &path.display().to_string());
            Ok(())
        };
        merge_file(&mut config, &global_file())?;
        merge_file(&mut config, &user_file())?;
        let mut assignments = Vec::new();
        for arg in overrides {
            let path = Path::new(arg);
            if path.is_file() {
                merge_file(&mut config, path)?;
            } else if let Some((key, value)) = arg.split_once('=') {
                check_key(key.trim())?;
                assignments.push((key.trim().to_string(), value.trim().to_string()));
            } else {
                return Err(usage(format!(
                    "Syntax error in configuration: '{arg}' is neither a file nor section.key=value"
                )));
            }
        }
        config.merge_env(std::env::vars());
        for (key, value) in assignments {
            config.set(&key, toml::Value::String(value));
            config.origins.insert(key, "-c".into());
        }
        Ok(config)
    }

    fn merge(&mut self, layer: BTreeMap<String, Section>, origin: &str) {
        for (name, section) in layer {
            for key in section.keys() {
                self.origins
                    .insert(format!("{name}.{key}"), origin.to_string());
            }
            self.values.entry(name).or_default().extend(section);
        }
    }

    /// Every known key with its effective value (or `None`, unset) and where the
    /// value comes from: `default`, a file, `environment (VAR)` or `-c`; then any
    /// `params.*` set.
    pub fn effective(&self) -> Vec<(String, Option<String>, String)> {
        let mut out = Vec::new();
        for (key, _, default) in SPECS {
            let entry = match self.value(key) {
                Some(v) => (
                    value_to_string(v),
                    self.origins.get(*key).cloned().unwrap_or_default(),
                ),
                None if *key == "jolt.cachedir" => {
                    (self.cachedir().display().to_string(), "default".into())
                }
                None => match default {
                    Some(d) => (d.to_string(), "default".into()),
                    None => {
                        out.push((key.to_string(), None, "default".into()));
                        continue;
                    }
                },
            };
            out.push((key.to_string(), Some(entry.0), entry.1));
        }
        for (key, value) in self.entries() {
            if key.starts_with("params.") {
                let origin = self.origins.get(&key).cloned().unwrap_or_default();
                out.push((key, Some(value), origin));
            }
        }
        out
    }

    fn merge_env(&mut self, vars: impl Iterator<Item = (String, String)>) {
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix("JOLT_") else {
                continue;
            };
            let key = match rest {
                "CACHE_SIZE" | "CACHESIZE" => "jolt.cachesize".to_string(),
                _ => {
                    let Some((section, key)) = rest.split_once('_') else {
                        continue;
                    };
                    let section = section.to_ascii_lowercase();
                    if !SECTIONS.contains(&section.as_str()) || key.is_empty() {
                        continue;
                    }
                    format!("{section}.{}", key.to_ascii_lowercase())
                }
            };
            if !is_known(&key) {
                crate::console::warn(&format!(
                    "Unknown configuration key '{key}' in the environment ({name}) is ignored"
                ));
                continue;
            }
            self.set(&key, toml::Value::String(value));
            self.origins.insert(key, format!("environment ({name})"));
        }
    }

    /// Sets `section.key` in the merged view.
    pub fn set(&mut self, key: &str, value: toml::Value) {
        if let Some((section, name)) = key.split_once('.') {
            self.values
                .entry(section.to_string())
                .or_default()
                .insert(name.to_string(), value);
        }
    }

    /// The raw value of `section.key`.
    pub fn value(&self, key: &str) -> Option<&toml::Value> {
        let (section, name) = key.split_once('.')?;
        self.values.get(section)?.get(name)
    }

    /// The value of `section.key` as a string.
    pub fn get(&self, key: &str) -> Option<String> {
        self.value(key).map(value_to_string)
    }

    /// A boolean setting; accepts true/false/yes/no/on/off/1/0.
    pub fn get_bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.value(key) {
            None => Ok(default),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(v) => parse_bool(&value_to_string(v)).ok_or_else(|| {
                usage(format!(
                    "Illegal value '{}' for configuration key {key}: expected a boolean",
                    value_to_string(v)
                ))
            }),
        }
    }

    /// An integer setting.
    pub fn get_int(&self, key: &str) -> Result<Option<i64>> {
        match self.value(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) => Ok(Some(*i)),
            Some(v) => value_to_string(v).trim().parse().map(Some).map_err(|_| {
                usage(format!(
                    "Illegal value '{}' for configuration key {key}: expected an integer",
                    value_to_string(v)
                ))
            }),
        }
    }

    /// An integer setting that must lie in `min..=max`, else a usage error naming it.
    pub fn get_int_in(&self, key: &str, default: i64, min: i64, max: i64) -> Result<i64> {
        let v = self.get_int(key)?.unwrap_or(default);
        if !(min..=max).contains(&v) {
            return Err(usage(format!(
                "Illegal value {v} for configuration key {key}: expected {min} to {max}"
            )));
        }
        Ok(v)
    }

    /// A size setting such as `10G`.
    pub fn get_size(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_size(&v).map(Some).ok_or_else(|| {
                usage(format!(
                    "Illegal value '{v}' for configuration key {key}: expected a size such as 500M or 10G"
                ))
            }),
        }
    }

    /// Registers every password the configuration holds (`*.password`, and the
    /// userinfo of URLs) with [`crate::util::secrets`], so that no output shows them.
    pub fn register_secrets(&self) {
        for (key, value) in self.entries() {
            if key.ends_with("password") {
                crate::util::secrets::register(&value);
            }
            if let (_, Some((_, Some(password)))) = crate::util::secrets::strip_userinfo(&value) {
                crate::util::secrets::register(&password);
            }
        }
    }

    /// All `section.key = value` pairs, sorted.
    pub fn entries(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (section, values) in &self.values {
            for (key, value) in values {
                out.push((format!("{section}.{key}"), value_to_string(value)));
            }
        }
        out
    }

    /// The local cache directory: `jolt.cachedir`, else `$XDG_CACHE_HOME/jolt`.
    pub fn cachedir(&self) -> PathBuf {
        if let Some(dir) = self.get("jolt.cachedir").filter(|d| !d.is_empty()) {
            return expand_home(&dir);
        }
        std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| home().join(".cache"))
            .join("jolt")
    }
}

fn expand_home(path: &str) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => home().join(rest),
        None => PathBuf::from(path),
    }
}

fn value_to_string(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Parses the boolean spellings users write.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Parses `512`, `500M`, `10G`, `1.5T`, `2 GiB` (powers of 1024) into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().ok()?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit.trim_end_matches("IB").trim_end_matches('B');
    let factor: u64 = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return None,
    };
    let bytes = number * factor as f64;
    // Not silently capped: a size past what 64 bits hold is a typo.
    if !(0.0..u64::MAX as f64).contains(&bytes) {
        return None;
    }
    Some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_a_kind_and_every_kind_checks_its_values() {
        // One table holds the keys with their kinds: each once, in a known section.
        let all: Vec<&str> = keys().collect();
        let unique: std::collections::BTreeSet<&str> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len());
        assert!(all
            .iter()
            .all(|k| SECTIONS.contains(&k.split_once('.').unwrap().0)));
        assert!(check_value("jolt.cachesize", "2G").is_ok());
        assert!(check_value("jolt.cachesize", "banana").is_err());
        assert!(check_value("amqp.tls", "yes").is_ok());
        assert!(check_value("amqp.tls", "maybe").is_err());
        assert!(check_value("http.transfers", "256").is_ok());
        assert!(check_value("http.transfers", "257").is_err());
        assert!(check_value("amqp.host", "anything").is_ok());
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("500 M"), Some(500 << 20));
        assert_eq!(parse_size("0G"), Some(0));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("5Q"), None);
        assert_eq!(parse_size("99999999999999999999999T"), None);
        assert_eq!(parse_size("16777215T"), Some(16777215 << 40));
    }

    #[test]
    fn environment_overrides_known_sections_only() {
        let mut c = Config::default();
        c.merge_env(
            vec![
                ("JOLT_AMQP_HOST".to_string(), "broker".to_string()),
                ("JOLT_AMQP_ROUTING_KEY".to_string(), "linux".to_string()),
                ("JOLT_CACHE_SIZE".to_string(), "5G".to_string()),
                ("JOLT_ROOT".to_string(), "/x".to_string()),
            ]
            .into_iter(),
        );
        assert_eq!(c.get("amqp.host").as_deref(), Some("broker"));
        assert_eq!(c.get("amqp.routing_key").as_deref(), Some("linux"));
        assert_eq!(c.get("jolt.cachesize").as_deref(), Some("5G"));
        assert_eq!(c.entries().len(), 3);
    }

    #[test]
    fn booleans_accept_common_spellings() {
        let mut c = Config::default();
        c.set("jolt.upload", toml::Value::String("no".into()));
        assert!(!c.get_bool("jolt.upload", true).unwrap());
        c.set("jolt.upload", toml::Value::String("maybe".into()));
        assert!(c.get_bool("jolt.upload", true).is_err());
        assert!(c.get_bool("jolt.download", true).unwrap());
    }
}
