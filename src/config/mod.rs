//! Configuration: the layers it is merged from, the one table of its keys, and the
//! typed settings every command but `config` runs with.
//!
//! Layers, later wins: `RABBITMQ_ROUTING_KEY` (Python Jolt's, for `amqp.routing_key`),
//! `/etc/jolt/config.toml`, `$XDG_CONFIG_HOME/jolt/config.toml`, each `-c FILE`,
//! environment variables `JOLT_<SECTION>_<KEY>`, each `-c section.key=value`.
//! [`Layers`] keeps the merged values as written (TOML values) and where each came
//! from ([`Origin`]), for `jolt config` and for the worker's warning about a
//! credential read from a file; [`Config`] is read from them once, every key through the
//! table in [`keys`], so no other module reads a key string or knows a default.

mod keys;
mod settings;

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::usage;

pub use keys::{check_key, check_value, is_known, keys, unknown_hint, Kind, MAX_JOBS, SPECS};
pub use settings::{AmqpSettings, BrokerAddress, Config, JoltSettings, QueueType};

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

/// The merged layers: every value as written, and where it comes from.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    values: BTreeMap<String, Section>,
    /// Where each `section.key` set got its value.
    origins: BTreeMap<String, Origin>,
}

/// Where a value of the layers comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A configuration file, named as jolt was given it.
    File(PathBuf),
    /// An environment variable.
    Environment(String),
    /// `-c section.key=value`.
    Argument,
}

impl std::fmt::Display for Origin {
    /// As `jolt config -l` shows it: the file, `environment (VAR)`, `-c`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Environment(var) => write!(f, "environment ({var})"),
            Origin::Argument => f.write_str("-c"),
        }
    }
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

impl Layers {
    /// Loads all layers. `overrides` are the `-c` arguments in command-line order.
    pub fn load(overrides: &[String]) -> Result<Layers> {
        let mut config = Layers::default();
        // Python Jolt's variable for a worker's pool, under every other layer.
        if let Some(key) = std::env::var("RABBITMQ_ROUTING_KEY")
            .ok()
            .filter(|k| !k.is_empty())
        {
            config.set("amqp.routing_key", toml::Value::String(key));
            config.origins.insert(
                "amqp.routing_key".into(),
                Origin::Environment("RABBITMQ_ROUTING_KEY".into()),
            );
        }
        let merge_file = |config: &mut Layers, path: &Path| -> Result<()> {
            let sections = read_file(path)?;
            warn_unknown(path, &sections);
            config.merge(sections, &Origin::File(path.to_path_buf()));
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
        // Credentials were taken out of the environment at start (`secrets::seal_process`).
        config.merge_env(std::env::vars().chain(crate::util::secrets::taken_credentials()));
        for (key, value) in assignments {
            config.set(&key, toml::Value::String(value));
            config.origins.insert(key, Origin::Argument);
        }
        Ok(config)
    }

    fn merge(&mut self, layer: BTreeMap<String, Section>, origin: &Origin) {
        for (name, section) in layer {
            for key in section.keys() {
                self.origins.insert(format!("{name}.{key}"), origin.clone());
            }
            self.values.entry(name).or_default().extend(section);
        }
    }

    /// Every key of the table with its effective value and where it comes from.
    pub fn effective(&self) -> Vec<Effective> {
        keys::SPECS
            .iter()
            .map(|spec| self.effective_of(spec))
            .collect()
    }

    /// The effective value of `key`, if jolt knows the key.
    pub fn effective_value(&self, key: &str) -> Option<Effective> {
        keys::spec(key).map(|spec| self.effective_of(spec))
    }

    fn effective_of(&self, spec: &keys::Spec) -> Effective {
        let key = spec.name;
        let (value, origin) = match self.value(key) {
            Some(v) => (
                Some(value_to_string(v)),
                self.origin(key).map(Origin::to_string).unwrap_or_default(),
            ),
            None if key == settings::CACHEDIR => (
                Some(settings::default_cachedir().display().to_string()),
                "default".into(),
            ),
            None => (spec.shown_default(), "default".into()),
        };
        Effective { key, value, origin }
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
                    if !keys::is_section(&section) || key.is_empty() {
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
            self.origins.insert(key, Origin::Environment(name));
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

    /// Where the value of `section.key` comes from (`None`: no layer sets it, or
    /// [`Layers::set`] did).
    pub fn origin(&self, key: &str) -> Option<&Origin> {
        self.origins.get(key)
    }

    /// The settings these layers give, every key read and checked (a usage error
    /// names the first value a key cannot take, and where it was set).
    pub fn settings(&self) -> Result<Config> {
        Config::read(self)
    }

    /// Registers every password the configuration holds (`*.password`, and the
    /// userinfo of URLs) with [`crate::util::secrets`], so that no output shows them.
    pub fn register_secrets(&self) {
        for (key, value) in self.entries() {
            if key.ends_with("password") {
                crate::util::secrets::register(&value);
            }
            // `amqp.host` may have userinfo without a scheme (`user:pw@broker`).
            if let Some((_, Some(password))) = crate::util::secrets::userinfo(&value) {
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
}

/// A key's effective value, as `jolt config -l` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub key: &'static str,
    /// `None`: unset, and no default.
    pub value: Option<String>,
    /// `default`, a file, `environment (VAR)` or `-c`.
    pub origin: String,
}

/// A value as text, as the key table reads it: a list of strings (`amqp.host`'s
/// brokers in a file) is its entries separated by commas.
fn value_to_string(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) if items.iter().all(toml::Value::is_str) => items
            .iter()
            .filter_map(toml::Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
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
        let mut c = Layers::default();
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
}
