//! Task parameters: their declared types, and the canonical spelling of their values.
//!
//! Canonical values make the same task spelled two ways one task: booleans become
//! `true`/`false`, integers are decimal, list elements are sorted and joined with `+`.

use anyhow::Result;

use crate::error::usage;

/// The type of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    String,
    Bool,
    Int,
    List,
}

impl ParamType {
    fn name(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Bool => "bool",
            ParamType::Int => "int",
            ParamType::List => "list",
        }
    }
}

/// A declared parameter of a task.
#[derive(Debug, Clone)]
pub struct Param {
    pub ty: ParamType,
    /// Canonical default; `None` makes the parameter required.
    pub default: Option<String>,
    /// Accepted values (elements, for lists), canonical.
    pub values: Option<Vec<String>>,
    pub min: Option<i64>,
    pub max: Option<i64>,
    pub help: Option<String>,
    /// Whether the value is part of the task's identity.
    pub influence: bool,
}

impl Param {
    /// What the parameter accepts, for messages: its values, `true, false`, or an
    /// integer's range; `None` for any string or list.
    pub fn accepted(&self) -> Option<String> {
        if let Some(values) = &self.values {
            return Some(values.join(", "));
        }
        match self.ty {
            ParamType::Bool => Some("true, false".into()),
            ParamType::Int => Some(match (self.min, self.max) {
                (Some(lo), Some(hi)) => format!("an integer from {lo} to {hi}"),
                (Some(lo), None) => format!("an integer from {lo}"),
                (None, Some(hi)) => format!("an integer up to {hi}"),
                (None, None) => "an integer".into(),
            }),
            ParamType::String | ParamType::List => None,
        }
    }
}

fn scalar_string(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

fn infer_type(v: &toml::Value) -> ParamType {
    match v {
        toml::Value::Boolean(_) => ParamType::Bool,
        toml::Value::Integer(_) => ParamType::Int,
        toml::Value::Array(_) => ParamType::List,
        _ => ParamType::String,
    }
}

fn parse_type(value: &toml::Value) -> Result<ParamType, String> {
    match value.as_str() {
        Some("string") | Some("str") => Ok(ParamType::String),
        Some("bool") | Some("boolean") => Ok(ParamType::Bool),
        Some("int") | Some("integer") => Ok(ParamType::Int),
        Some("list") => Ok(ParamType::List),
        _ => Err(format!(
            "unknown type {value}: expected string, bool, int or list"
        )),
    }
}

fn raw_value(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::Array(items) => items
            .iter()
            .map(scalar_string)
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join("+")),
        other => scalar_string(other),
    }
}

impl Param {
    /// Reads a parameter declaration: a bare default value, or a table.
    pub fn from_toml(task: &str, name: &str, decl: &toml::Value) -> Result<Param> {
        let bad = |what: String| usage(format!("Task '{task}', parameter '{name}': {what}"));
        let mut param = Param {
            ty: ParamType::String,
            default: None,
            values: None,
            min: None,
            max: None,
            help: None,
            influence: true,
        };
        let default = match decl {
            toml::Value::Table(table) => param.read_table(table).map_err(bad)?,
            other => {
                param.ty = infer_type(other);
                Some(other.clone())
            }
        };
        if param.ty != ParamType::Int && (param.min.is_some() || param.max.is_some()) {
            return Err(bad(format!(
                "min and max apply to int parameters, not {}",
                param.ty.name()
            )));
        }
        if let Some(values) = param.values.take() {
            let mut canonical = Vec::new();
            for v in values {
                let element_ty = if param.ty == ParamType::List {
                    ParamType::String
                } else {
                    param.ty
                };
                canonical.push(
                    normalize_scalar(element_ty, &v)
                        .ok_or_else(|| bad(format!("Illegal value '{v}' in 'values'")))?,
                );
            }
            param.values = Some(canonical);
        }
        if let Some(d) = default {
            let raw = raw_value(&d).ok_or_else(|| bad(format!("Illegal default value {d}")))?;
            param.default = Some(
                param
                    .normalize(task, name, &raw)
                    .map_err(|e| bad(format!("Illegal default value '{raw}': {e:#}")))?,
            );
        }
        Ok(param)
    }

    /// Reads a `{ default, values, type, min, max, help, influence }` declaration
    /// into `self`; returns the default as written.
    fn read_table(&mut self, table: &toml::Table) -> Result<Option<toml::Value>, String> {
        let mut ty = None;
        let mut default = None;
        for (key, value) in table {
            match key.as_str() {
                "default" => default = Some(value.clone()),
                "values" => {
                    let toml::Value::Array(items) = value else {
                        return Err("'values' must be a list".into());
                    };
                    if ty.is_none() {
                        ty = items
                            .first()
                            .map(infer_type)
                            .filter(|t| *t != ParamType::String);
                    }
                    let values = items
                        .iter()
                        .map(scalar_string)
                        .collect::<Option<Vec<_>>>()
                        .ok_or("'values' must hold plain values")?;
                    self.values = Some(values);
                }
                "type" => ty = Some(parse_type(value)?),
                "min" | "max" => {
                    let n = value
                        .as_integer()
                        .ok_or_else(|| format!("Illegal {key}imum value {value}"))?;
                    if key == "min" {
                        self.min = Some(n);
                    } else {
                        self.max = Some(n);
                    }
                }
                "help" => self.help = value.as_str().map(str::to_string),
                "influence" => {
                    self.influence = value.as_bool().ok_or("'influence' must be true or false")?
                }
                other => return Err(format!("unknown key '{other}'")),
            }
        }
        let bounded = self.min.is_some() || self.max.is_some();
        self.ty = ty
            .or_else(|| default.as_ref().map(infer_type))
            .unwrap_or(if bounded {
                ParamType::Int
            } else {
                ParamType::String
            });
        Ok(default)
    }

    /// The canonical spelling of `value`, or an `Illegal value` error.
    pub fn normalize(&self, task: &str, name: &str, value: &str) -> Result<String> {
        let illegal = |why: &str| {
            usage(format!(
                "Illegal value '{value}' assigned to parameter '{name}'{why} ({task})"
            ))
        };
        let check_values = |v: &str| -> Result<()> {
            match &self.values {
                Some(values) if !values.iter().any(|a| a == v) => Err(illegal(&format!(
                    ", accepted values are: {}",
                    values.join(", ")
                ))),
                _ => Ok(()),
            }
        };
        // A value is written into references (`task:p=v,q=w`) and identity lines
        // (`Parameters: p=v,q=w`): a comma in it would make two parameter sets read
        // the same.
        if value.contains(',') {
            return Err(illegal(", a value may not contain ','"));
        }
        match self.ty {
            ParamType::List => {
                let mut items: Vec<String> = if value.is_empty() {
                    Vec::new()
                } else {
                    value.split('+').map(str::to_string).collect()
                };
                items.sort();
                items.dedup();
                for item in &items {
                    check_values(item)?;
                }
                Ok(items.join("+"))
            }
            ty => {
                let v = normalize_scalar(ty, value)
                    .ok_or_else(|| illegal(&format!(", expected {}", ty.name())))?;
                if ty == ParamType::Int {
                    let n: i64 = v.parse().map_err(|_| illegal(""))?;
                    if let Some(min) = self.min.filter(|m| n < *m) {
                        return Err(illegal(&format!(", less than minimum value '{min}'")));
                    }
                    if let Some(max) = self.max.filter(|m| n > *m) {
                        return Err(illegal(&format!(", greater than maximum value '{max}'")));
                    }
                }
                check_values(&v)?;
                Ok(v)
            }
        }
    }

    /// A one-line description for `inspect`.
    pub fn describe(&self) -> String {
        let mut parts = vec![self.ty.name().to_string()];
        match &self.default {
            Some(d) => parts.push(format!("default: {d}")),
            None => parts.push("required".to_string()),
        }
        if let Some(values) = &self.values {
            parts.push(format!("values: {}", values.join(", ")));
        }
        if let Some(min) = self.min {
            parts.push(format!("min: {min}"));
        }
        if let Some(max) = self.max {
            parts.push(format!("max: {max}"));
        }
        if !self.influence {
            parts.push("no influence".to_string());
        }
        format!("[{}]", parts.join(", "))
    }
}

fn normalize_scalar(ty: ParamType, value: &str) -> Option<String> {
    match ty {
        ParamType::String | ParamType::List => Some(value.to_string()),
        ParamType::Bool => crate::config::parse_bool(value).map(|b| b.to_string()),
        ParamType::Int => value.trim().parse::<i64>().ok().map(|n| n.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(toml_text: &str) -> Result<Param> {
        let v: toml::Table = toml::from_str(&format!("p = {toml_text}")).unwrap();
        Param::from_toml("t", "p", &v["p"])
    }

    #[test]
    fn shorthand_infers_type_from_default() {
        assert_eq!(param("\"x\"").unwrap().ty, ParamType::String);
        assert_eq!(param("true").unwrap().ty, ParamType::Bool);
        assert_eq!(param("3").unwrap().ty, ParamType::Int);
        let list = param("[\"b\", \"a\"]").unwrap();
        assert_eq!(list.ty, ParamType::List);
        assert_eq!(list.default.as_deref(), Some("a+b"));
    }

    #[test]
    fn booleans_are_normalised() {
        let p = param("{ type = \"bool\", default = false }").unwrap();
        assert_eq!(p.normalize("t", "p", "yes").unwrap(), "true");
        assert_eq!(p.normalize("t", "p", "1").unwrap(), "true");
        assert_eq!(p.normalize("t", "p", "OFF").unwrap(), "false");
        assert!(p.normalize("t", "p", "abc").is_err());
    }

    #[test]
    fn lists_are_sorted() {
        let p = param("{ type = \"list\", values = [\"a\", \"b\", \"c\"] }").unwrap();
        assert_eq!(p.normalize("t", "p", "c+a").unwrap(), "a+c");
        let err = p.normalize("t", "p", "a+z").unwrap_err();
        assert!(format!("{err}").contains("Illegal value 'a+z'"));
        assert!(p.default.is_none());
    }

    #[test]
    fn int_ranges_are_checked() {
        let p = param("{ default = 10, min = 10, max = 20 }").unwrap();
        let low = p.normalize("t", "p", "9").unwrap_err().to_string();
        assert!(low.contains("less than minimum value '10'"), "{low}");
        let high = p.normalize("t", "p", "21").unwrap_err().to_string();
        assert!(high.contains("greater than maximum value '20'"), "{high}");
        assert_eq!(p.normalize("t", "p", "015").unwrap(), "15");
        assert!(param("{ default = 5, min = 10 }").is_err());
    }

    #[test]
    fn values_restrict_strings() {
        let p = param("{ default = \"debug\", values = [\"debug\", \"release\"] }").unwrap();
        assert!(p.normalize("t", "p", "release").is_ok());
        assert!(p.normalize("t", "p", "fast").is_err());
        assert!(param("{ default = \"x\", values = [\"debug\"] }").is_err());
    }
}
