//! Placeholder expansion: `{name}` in recipe strings, `{{` and `}}` as escapes.
//!
//! Parsing is separate from resolution so the graph can validate every placeholder of a
//! task before anything runs, and the executor can expand them later with real paths.

use anyhow::Result;

use crate::error::usage;

/// One piece of a template.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Text(&'a str),
    Brace(char),
    Placeholder(&'a str),
}

/// How deep placeholders may nest (`{deps.obj:mode={mode}}` is depth 2).
const MAX_NESTING: usize = 4;

/// The end (index of the closing `}`) of the placeholder whose `{` is at `open`;
/// braces inside it nest.
fn closing(template: &str, open: usize) -> Result<usize, String> {
    let mut depth = 0;
    for (i, b) in template.bytes().enumerate().skip(open) {
        match b {
            b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(format!(
                        "placeholders nest deeper than {MAX_NESTING} levels in \"{template}\""
                    ));
                }
            }
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            _ => {}
        }
    }
    Err(format!("unclosed '{{' in \"{template}\""))
}

/// Splits a template into text and placeholders. A placeholder's name may itself hold
/// placeholders (`{deps.obj:mode={mode}}`): see [`expand`].
pub fn parse(template: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let bytes = template.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' if bytes.get(i + 1) == Some(&b'{') => {
                pieces.push(Piece::Text(&template[start..i]));
                pieces.push(Piece::Brace('{'));
                i += 2;
                start = i;
            }
            b'}' if bytes.get(i + 1) == Some(&b'}') => {
                pieces.push(Piece::Text(&template[start..i]));
                pieces.push(Piece::Brace('}'));
                i += 2;
                start = i;
            }
            b'{' => {
                let end = closing(template, i)?;
                let name = template[i + 1..end].trim();
                if name.is_empty() {
                    return Err(format!("empty placeholder '{{}}' in \"{template}\""));
                }
                pieces.push(Piece::Text(&template[start..i]));
                pieces.push(Piece::Placeholder(name));
                i = end + 1;
                start = i;
            }
            b'}' => return Err(format!("unmatched '}}' in \"{template}\" (write '}}}}')")),
            _ => i += 1,
        }
    }
    pieces.push(Piece::Text(&template[start..]));
    pieces.retain(|p| !matches!(p, Piece::Text("")));
    Ok(pieces)
}

/// Expands `template`, asking `resolve` for each placeholder. `resolve` returns
/// `Ok(None)` for a placeholder it does not know. Placeholders inside a placeholder's
/// name are expanded first, with the same `resolve`.
pub fn expand(
    task: &str,
    template: &str,
    resolve: &mut dyn FnMut(&str) -> Result<Option<String>>,
) -> Result<String> {
    let pieces = parse(template).map_err(|e| usage(format!("Task '{task}': {e}")))?;
    let mut out = String::with_capacity(template.len());
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Brace(c) => out.push(c),
            Piece::Placeholder(raw) => {
                let name = expand_name(task, raw, resolve)?;
                match resolve(&name)? {
                    Some(value) => out.push_str(&value),
                    None => {
                        return Err(usage(format!(
                            "Unknown placeholder '{{{name}}}' in task '{task}'"
                        )))
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Whether a placeholder in a glob is a glob alternation (`*.{c,h}`), written back
/// as it is: a name with a comma that is not a requirement reference.
pub fn is_alternation(name: &str) -> bool {
    name.contains(',') && !name.starts_with("deps.") && !name.starts_with("env.")
}

/// [`expand`] for a glob pattern: alternations (`{c,h}`) stay for the glob.
pub fn expand_glob(
    task: &str,
    template: &str,
    resolve: &mut dyn FnMut(&str) -> Result<Option<String>>,
) -> Result<String> {
    expand(task, template, &mut |name| {
        if is_alternation(name) {
            return Ok(Some(format!("{{{name}}}")));
        }
        resolve(name)
    })
}

/// A placeholder's name with the placeholders nested in it expanded.
pub fn expand_name(
    task: &str,
    raw: &str,
    resolve: &mut dyn FnMut(&str) -> Result<Option<String>>,
) -> Result<String> {
    if raw.contains('{') {
        expand(task, raw, resolve)
    } else {
        Ok(raw.to_string())
    }
}

/// The placeholder names used in `template`.
pub fn names(template: &str) -> Result<Vec<&str>, String> {
    Ok(parse(template)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Placeholder(n) => Some(n),
            _ => None,
        })
        .collect())
}

/// What a placeholder names. [`Placeholder::parse`] is the one place that reads
/// placeholder names; every user matches the result.
#[derive(Debug, PartialEq, Eq)]
pub enum Placeholder<'a> {
    /// `{PARAM}`: a parameter of the task.
    Param(&'a str),
    /// `{root}`: the workspace root.
    Root,
    /// `{builddir}`: the execution's fresh build directory.
    BuildDir,
    /// `{artifact}`: the artifact being staged.
    Artifact,
    /// `{env.VAR}`.
    Env(&'a str),
    /// `{deps.NAME}` and its metadata; `NAME` may be a reference with parameters.
    Dep(&'a str, DepKey<'a>),
    /// Anything else.
    Unknown(&'a str),
}

/// What a `{deps.NAME...}` placeholder takes from the requirement.
#[derive(Debug, PartialEq, Eq)]
pub enum DepKey<'a> {
    /// `{deps.NAME}`: its artifact directory.
    Dir,
    /// `{deps.NAME.strings.KEY}`.
    String(&'a str),
    /// `{deps.NAME.paths.KEY}`: the path, absolute.
    Path(&'a str),
}

impl<'a> Placeholder<'a> {
    /// Reads a placeholder's name (with nested placeholders already expanded). A
    /// parameter of the task wins over `root`, `builddir` and `artifact`.
    pub fn parse(name: &'a str, is_param: &dyn Fn(&str) -> bool) -> Placeholder<'a> {
        if is_param(name) {
            return Placeholder::Param(name);
        }
        match name {
            "root" => return Placeholder::Root,
            "builddir" => return Placeholder::BuildDir,
            "artifact" => return Placeholder::Artifact,
            _ => {}
        }
        if let Some(var) = name.strip_prefix("env.") {
            return Placeholder::Env(var);
        }
        if let Some(rest) = name.strip_prefix("deps.") {
            // Task names may themselves contain dots: the key is what follows the
            // last `.strings.` or `.paths.`.
            if let Some((dep, key)) = rest.rsplit_once(".strings.") {
                return Placeholder::Dep(dep, DepKey::String(key));
            }
            if let Some((dep, key)) = rest.rsplit_once(".paths.") {
                return Placeholder::Dep(dep, DepKey::Path(key));
            }
            return Placeholder::Dep(rest, DepKey::Dir);
        }
        Placeholder::Unknown(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_with(t: &str) -> Result<String> {
        expand("t", t, &mut |n| {
            Ok(match n {
                "a" => Some("1".into()),
                "deps.x" => Some("/c/x".into()),
                _ => None,
            })
        })
    }

    #[test]
    fn expands_and_escapes() {
        assert_eq!(expand_with("echo {a} {{a}} }}{{").unwrap(), "echo 1 {a} }{");
        assert_eq!(expand_with("cat {deps.x}/f").unwrap(), "cat /c/x/f");
        assert_eq!(
            expand_with("awk '{{print $1}}'").unwrap(),
            "awk '{print $1}'"
        );
    }

    #[test]
    fn unknown_and_malformed_placeholders_are_errors() {
        let e = expand_with("echo {nope}").unwrap_err().to_string();
        assert_eq!(e, "Unknown placeholder '{nope}' in task 't'");
        assert!(expand_with("echo {a").is_err());
        assert!(expand_with("echo a}").is_err());
    }

    #[test]
    fn placeholders_nest_inside_names() {
        let mut resolve = |n: &str| -> Result<Option<String>> {
            Ok(match n {
                "mode" => Some("debug".into()),
                "deps.obj:file=add,mode=debug" => Some("/c/obj".into()),
                _ => None,
            })
        };
        assert_eq!(
            expand(
                "t",
                "cc {deps.obj:file=add,mode={mode}}/add.o",
                &mut resolve
            )
            .unwrap(),
            "cc /c/obj/add.o"
        );
        let e = expand("t", "{deps.obj:mode={nope}}", &mut resolve).unwrap_err();
        assert_eq!(e.to_string(), "Unknown placeholder '{nope}' in task 't'");
        let deep = format!("{{x{}{}", "{y".repeat(50), "}".repeat(51));
        assert!(parse(&deep).unwrap_err().contains("nest deeper"));
        assert!(parse("{a{b}").is_err());
    }

    #[test]
    fn alternations_in_globs_stay_for_the_glob() {
        let mut resolve =
            |n: &str| -> Result<Option<String>> { Ok((n == "dir").then(|| "src".to_string())) };
        assert_eq!(
            expand_glob("t", "{dir}/*.{c,h}", &mut resolve).unwrap(),
            "src/*.{c,h}"
        );
        assert!(expand("t", "{dir}/*.{c,h}", &mut resolve).is_err());
    }

    #[test]
    fn names_parse_into_what_they_name() {
        let none = |_: &str| false;
        let params = |n: &str| n == "root" || n == "mode";
        assert_eq!(Placeholder::parse("root", &none), Placeholder::Root);
        assert_eq!(
            Placeholder::parse("root", &params),
            Placeholder::Param("root")
        );
        assert_eq!(
            Placeholder::parse("mode", &params),
            Placeholder::Param("mode")
        );
        assert_eq!(Placeholder::parse("env.CC", &none), Placeholder::Env("CC"));
        assert_eq!(
            Placeholder::parse("deps.tools.gcc", &none),
            Placeholder::Dep("tools.gcc", DepKey::Dir)
        );
        assert_eq!(
            Placeholder::parse("deps.tools.gcc.strings.version", &none),
            Placeholder::Dep("tools.gcc", DepKey::String("version"))
        );
        assert_eq!(
            Placeholder::parse("deps.lib:n=1.paths.include", &none),
            Placeholder::Dep("lib:n=1", DepKey::Path("include"))
        );
        assert_eq!(
            Placeholder::parse("nope", &none),
            Placeholder::Unknown("nope")
        );
    }
}
