//! Task references: `name`, `name:p=v,p2=v2`.

use anyhow::Result;

use crate::error::usage;

/// A parsed, not yet validated, task reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRef {
    pub name: String,
    pub params: Vec<(String, String)>,
}

pub use crate::util::valid_name;

/// Whether a part of `name` starts with `_`: such names are jolt's, never a task's.
/// The HTTP cache keeps a task's artifacts under `{http.uri}/{task}/` and jolt's own
/// files under `_recipes/` and `_sources/`, the paths operators open to anonymous
/// uploads; any part, not only the first, so that no later namespace of jolt's can
/// meet a task either.
pub fn reserved(name: &str) -> bool {
    name.split('/').any(|part| part.starts_with('_'))
}

/// Whether `name` may name a task: a [`valid_name`] that is not [`reserved`].
pub fn valid_task_name(name: &str) -> bool {
    valid_name(name) && !reserved(name)
}

impl TaskRef {
    /// Parses `name[:p=v[,p=v]...]`.
    pub fn parse(text: &str) -> Result<TaskRef> {
        let text = text.trim();
        let (name, params) = match text.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (text, None),
        };
        if !valid_task_name(name) {
            return Err(usage(format!("Invalid task name '{name}' in '{text}'")));
        }
        let mut out = Vec::new();
        if let Some(params) = params {
            for pair in params.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    usage(format!(
                        "Invalid parameter '{pair}' in '{text}': expected name=value"
                    ))
                })?;
                out.push((k.trim().to_string(), v.to_string()));
            }
        }
        Ok(TaskRef {
            name: name.to_string(),
            params: out,
        })
    }
}

/// Formats `name` and sorted parameters as `name:a=1,b=2`.
pub fn format(name: &str, params: &[(&str, &str)]) -> String {
    if params.is_empty() {
        return name.to_string();
    }
    let mut params = params.to_vec();
    params.sort();
    let joined: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{name}:{}", joined.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_parameters() {
        let r = TaskRef::parse("tools/gcc:version=12,arch=x86").unwrap();
        assert_eq!(r.name, "tools/gcc");
        assert_eq!(r.params.len(), 2);
        assert_eq!(TaskRef::parse("a:p=").unwrap().params[0].1, "");
        assert!(TaskRef::parse("a b").is_err());
        for bad in ["..", ".", "/abs", "a//b", "a/", ".tmp", "a/../b", "ünï"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_name("tools/gcc-12.2_x"));
        assert!(!valid_name(&format!("x/{}", "a".repeat(64))));
        assert!(TaskRef::parse("a:p").is_err());
        for jolts in ["_recipes", "_sources/x", "a/_x", "_"] {
            assert!(reserved(jolts) && !valid_task_name(jolts), "{jolts}");
            assert!(TaskRef::parse(jolts).is_err(), "{jolts}");
        }
        for tasks in ["a_b", "a/b_", "x/y_z"] {
            assert!(valid_task_name(tasks), "{tasks}");
        }
        assert_eq!(format("a", &[("z", "1"), ("b", "2")]), "a:b=2,z=1");
    }
}
