//! A fresh workspace per test, and a small fluent helper to run the real `jolt` binary
//! in it and assert on its exit code and output.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Workspace {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Workspace {
    /// An empty workspace with its own cache and config directories.
    pub fn new() -> Workspace {
        let dir = tempfile::tempdir().expect("temp dir");
        for sub in ["ws", "cache", "config", "xdgcache"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Workspace { dir }
    }

    /// A workspace whose `jolt.toml` holds `recipe`.
    pub fn with(recipe: &str) -> Workspace {
        let ws = Workspace::new();
        ws.file("jolt.toml", recipe);
        ws
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    pub fn cachedir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    pub fn config_home(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// Writes a file relative to the workspace root.
    pub fn file(&self, rel: &str, content: &str) -> &Workspace {
        let path = self.root().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
        self
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root().join(rel)).unwrap_or_default()
    }

    /// A `jolt` command in the workspace root with an isolated environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jolt"));
        cmd.args(args).current_dir(self.root());
        for (k, _) in std::env::vars() {
            if k.starts_with("JOLT_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("XDG_CONFIG_HOME", self.config_home())
            .env("XDG_CACHE_HOME", self.dir.path().join("xdgcache"))
            .env("JOLT_JOLT_CACHEDIR", self.cachedir())
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `jolt ARGS` to completion.
    pub fn jolt(&self, args: &[&str]) -> Run {
        self.run(self.command(args))
    }

    pub fn run(&self, mut cmd: Command) -> Run {
        let out = cmd.output().expect("run jolt");
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(
            !run.all().contains("panicked"),
            "jolt panicked:\n{}",
            run.all()
        );
        run
    }

    /// Committed artifact directories of `task` in the cache.
    pub fn artifacts(&self, task: &str) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(self.cachedir().join(task))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        out.retain(|p| p.is_dir());
        out.sort();
        out
    }

    /// Every entry under the cache's task directories whose name starts with a dot
    /// (staging directories), which must never survive a build.
    pub fn staging_leftovers(&self) -> Vec<PathBuf> {
        fn visit(dir: &Path, top: bool, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if top && name.starts_with('.') {
                    continue;
                }
                if name.starts_with('.') && name.ends_with(".tmp") {
                    out.push(e.path());
                } else if e.path().is_dir() && !e.path().join(".manifest.json").exists() {
                    visit(&e.path(), false, out);
                }
            }
        }
        let mut out = Vec::new();
        visit(&self.cachedir(), true, &mut out);
        out
    }
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    pub fn code(&self, expected: i32) -> &Run {
        assert_eq!(
            self.code, expected,
            "exit code {} instead of {expected}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    pub fn success(&self) -> &Run {
        self.code(0)
    }

    pub fn contains(&self, text: &str) -> &Run {
        assert!(
            self.all().contains(text),
            "output lacks {text:?}\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn lacks(&self, text: &str) -> &Run {
        assert!(
            !self.all().contains(text),
            "output has {text:?}\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn count(&self, text: &str) -> usize {
        self.all().matches(text).count()
    }

    /// Lines of output holding `text`.
    pub fn lines_with(&self, text: &str) -> Vec<String> {
        self.all()
            .lines()
            .filter(|l| l.contains(text))
            .map(str::to_string)
            .collect()
    }

    /// The directory of the `Location:` lines.
    pub fn locations(&self) -> Vec<PathBuf> {
        self.stdout
            .lines()
            .filter_map(|l| l.split_once("Location: ").map(|(_, p)| PathBuf::from(p)))
            .collect()
    }

    /// The names of the tasks whose execution started, in order.
    pub fn started(&self) -> Vec<String> {
        self.stdout
            .lines()
            .filter_map(|l| l.split_once("Execution started ("))
            .map(|(_, rest)| {
                rest.rsplit_once(' ')
                    .map(|(n, _)| n.to_string())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// Whether a process is alive (a zombie nobody reaped counts as dead).
pub fn alive(pid: i32) -> bool {
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
    !matches!(state, Some(Some('Z')) | None)
}
