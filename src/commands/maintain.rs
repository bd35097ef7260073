//! `clean` and `config`: maintenance of the local cache and the configuration files.

use anyhow::Result;
use std::collections::HashSet;

use super::workspace::Workspace;
use crate::cli::{CleanArgs, ConfigArgs};
use crate::config::{self, Config, Effective, Layers};
use crate::console;
use crate::error::usage;
use crate::error::Exit;
use crate::graph::GraphOptions;
use crate::store::local::LocalCache;
use crate::store::trim::Event;

pub fn clean(config: &Config, args: CleanArgs) -> Result<Exit> {
    if args.tasks.is_empty() {
        let cache = LocalCache::from_config(&config.jolt)?;
        let removed = cache.clean(args.expired, &|_| true)?;
        cache.clean_scratch();
        console::info(&format!(
            "Removed {removed} artifacts from {}",
            cache.root.display()
        ));
        return Ok(Exit::Success);
    }
    let ws = Workspace::open(config)?;
    let graph = ws.graph(&args.tasks, &GraphOptions::default())?;
    let nodes = if args.deps {
        graph.closure(&graph.requested)
    } else {
        graph.goals.clone()
    };
    let identities: HashSet<&str> = nodes
        .iter()
        .map(|&i| graph.nodes[i].identity.as_str())
        .collect();
    let removed = ws
        .cache
        .clean(args.expired, &|a| identities.contains(a.identity.as_str()))?;
    console::info(&format!("Removed {removed} artifacts"));
    Ok(Exit::Success)
}

/// A configuration value as it may be shown: passwords masked, and the userinfo of
/// URLs.
fn shown(key: &str, value: &str) -> String {
    if key.ends_with("password") {
        crate::util::secrets::MASK.to_string()
    } else {
        crate::util::secrets::masked_url(value)
    }
}

/// A key's effective value as `config -l` lists it: `key = value  # origin`.
fn effective_line(e: &Effective) -> String {
    let value = e
        .value
        .as_ref()
        .map_or_else(|| "(not set)".to_string(), |v| shown(e.key, v));
    format!("{} = {value}  # {}", e.key, e.origin)
}

pub fn config(merged: &Layers, args: ConfigArgs) -> Result<Exit> {
    let file = if args.global {
        config::global_file()
    } else {
        config::user_file()
    };
    if args.list {
        if args.global {
            let mut c = Layers::default();
            for (section, values) in config::read_file(&file)? {
                for (k, v) in values {
                    c.set(&format!("{section}.{k}"), v);
                }
            }
            for (key, value) in c.entries() {
                console::print(&format!("{key} = {}", shown(&key, &value)));
            }
            return Ok(Exit::Success);
        }
        // Every key's effective value, and where it comes from.
        for effective in merged.effective() {
            console::print(&effective_line(&effective));
        }
        return Ok(Exit::Success);
    }
    let Some(key) = args.key else {
        return Err(usage("config needs a KEY (section.key), or -l to list"));
    };
    let (section, name) = config::split_key(&key)?;
    if args.delete {
        if args.value.is_some() {
            return Err(usage("config -d takes a KEY, not a value"));
        }
        let mut sections = config::read_file(&file)?;
        let removed = sections
            .get_mut(section)
            .and_then(|s| s.remove(name))
            .is_some();
        if !removed {
            return Err(usage(format!("No such key: {key}")));
        }
        config::write_file(&file, &sections)?;
        return Ok(Exit::Success);
    }
    match args.value {
        None => match (merged.get(&key), merged.effective_value(&key)) {
            (Some(v), Some(_)) => {
                console::print(&format!("{key} = {}", shown(&key, &v)));
                Ok(Exit::Success)
            }
            // Known and unset: its default, as `-l` shows it.
            (None, Some(effective)) => {
                console::print(&effective_line(&effective));
                Ok(Exit::Success)
            }
            // Unknown, even if a file holds it: jolt ignores it.
            (_, None) => Err(usage(format!(
                "No such key: {key}{}",
                config::unknown_hint(&key)
            ))),
        },
        Some(value) => {
            config::check_key(&key)?;
            config::check_value(&key, &value)?;
            let mut sections = config::read_file(&file)?;
            sections
                .entry(section.to_string())
                .or_default()
                .insert(name.to_string(), toml::Value::String(value));
            config::write_file(&file, &sections)?;
            Ok(Exit::Success)
        }
    }
}

/// `jolt cache trim DIR --max-size SIZE [--every DURATION]`.
pub fn trim(args: crate::cli::TrimArgs) -> Result<Exit> {
    let max = config::parse_size(&args.max_size).ok_or_else(|| {
        usage(format!(
            "Illegal --max-size '{}': expected a size such as 500M or 10G",
            args.max_size
        ))
    })?;
    let every = match &args.every {
        None => None,
        Some(e) => Some(
            crate::util::fs::parse_duration(e)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    usage(format!(
                        "Illegal --every '{e}': expected a duration such as 10m"
                    ))
                })?,
        ),
    };
    // A sidecar may start before the first upload created the directory: its
    // passes warn until it appears.
    let absent = !args.dir.exists() && every.is_some();
    if !args.dir.is_dir() && !absent {
        return Err(usage(format!("{} is not a directory", args.dir.display())));
    }
    loop {
        let shown = |rel: &std::path::Path| crate::util::printable(&args.dir.join(rel));
        let mut report = |event: Event| match event {
            Event::Removed(rel, size) => console::info(&format!(
                "Removed {} ({size} bytes)",
                crate::util::printable(rel)
            )),
            Event::Unreadable(rel, e) => console::warn(&format!("Cannot read {}: {e}", shown(rel))),
            Event::Unremovable(rel, e) => {
                console::warn(&format!("Cannot remove {}: {e}", shown(rel)))
            }
            Event::Reading(rel) => console::debug(&format!("Reading {}", shown(rel))),
            Event::Checking(rel) => console::debug(&format!("Checking {}", shown(rel))),
        };
        match crate::store::trim::trim(&args.dir, max, &mut report) {
            Ok(t) => {
                console::info(&format!(
                    "Freed {} bytes in {} files; {} holds {} bytes",
                    t.freed,
                    t.removed.len(),
                    crate::util::printable(&args.dir),
                    t.left
                ));
            }
            // A sidecar keeps going: the next pass may well succeed.
            Err(e) if every.is_some() => console::warn(&format!("{e:#}")),
            Err(e) => return Err(e),
        }
        let Some(every) = every else {
            return Ok(Exit::Success);
        };
        let until = std::time::Instant::now() + every;
        while std::time::Instant::now() < until {
            if crate::interrupt::is_set() {
                return Ok(Exit::Interrupted);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}
