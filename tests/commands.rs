//! The informational and maintenance commands: config, list, inspect, display.

use crate::util::{Broker, Nginx, Workspace};
use jolt::testing::{Kind, SPECS};

const RECIPE: &str = r#"
[task.hello]
description = "Writes a greeting"
parameters.recipient = { default = "world", help = "Who to greet" }
influence = ["src/*.txt"]
run = "cat src/a.txt > {artifact}/a"

[task.lib]
requires = ["hello"]

[task.app]
description = "The app"
requires = ["lib", "hello:recipient=bob"]
"#;

/// A workspace with [`RECIPE`] and the file its influence pattern matches.
fn workspace() -> Workspace {
    let ws = Workspace::with(RECIPE);
    ws.file("src/a.txt", "a");
    ws
}

#[test]
fn config_sets_gets_lists_and_deletes_user_values() {
    let ws = workspace();
    ws.jolt(&["config", "http.uri", "http://cache:8080/"])
        .success();
    ws.jolt(&["config", "http.uri"])
        .success()
        .contains("http.uri = http://cache:8080/");
    let file = std::fs::read_to_string(ws.config_home().join("jolt/config.toml")).unwrap();
    assert!(
        file.contains("[http]") && file.contains("uri = \"http://cache:8080/\""),
        "{file}"
    );
    ws.jolt(&["config", "-l"])
        .success()
        .contains("http.uri = http://cache:8080/");
    ws.jolt(&["config", "-d", "http.uri"]).success();
    ws.jolt(&["config", "http.uri"])
        .success()
        .contains("http.uri = (not set)  # default");
    ws.jolt(&["config", "-d", "http.uri"])
        .code(2)
        .contains("No such key");
    ws.jolt(&["config", "nodot"]).code(2);
}

#[test]
fn config_layers_follow_their_precedence() {
    let ws = workspace();
    ws.jolt(&["config", "amqp.host", "from-user-file"])
        .success();
    ws.file("extra.toml", "[amqp]\nhost = \"from-c-file\"\n");
    ws.jolt(&["-c", "extra.toml", "config", "amqp.host"])
        .success()
        .contains("= from-c-file");
    let mut env = ws.command(&["-c", "extra.toml", "config", "amqp.host"]);
    env.env("JOLT_AMQP_HOST", "from-env");
    ws.run(env).success().contains("= from-env");
    let mut both = ws.command(&[
        "-c",
        "amqp.host=from-override",
        "-c",
        "extra.toml",
        "config",
        "amqp.host",
    ]);
    both.env("JOLT_AMQP_HOST", "from-env");
    ws.run(both).success().contains("= from-override");
}

#[test]
fn amqp_host_takes_a_list_of_brokers_and_refuses_a_bad_one() {
    // Issue 25: `a:5681,b:5682` was read as the host `a:5681,b` on the port 5682.
    let ws = workspace();
    ws.jolt(&["config", "amqp.host", "a:1,b:2"]).success();
    ws.jolt(&["config", "amqp.host", "a:1,"])
        .code(2)
        .contains("Illegal value 'a:1,' for configuration key amqp.host: broker 2 of 2 is empty");
    // Nothing written.
    ws.jolt(&["config", "amqp.host"])
        .success()
        .contains("amqp.host = a:1,b:2");
    ws.jolt(&["-c", "amqp.host=a:1,b:99999", "status"])
        .code(2)
        .contains("the broker 'b:99999' has a port that is not from 1 to 65535");
    // A list in a file, its entries checked as the written form's.
    ws.file("brokers.toml", "[amqp]\nhost = [\"a:1\", \"b:2\"]\n");
    ws.jolt(&["-c", "brokers.toml", "config", "amqp.host"])
        .success()
        .contains("amqp.host = a:1,b:2");
    ws.file("bad.toml", "[amqp]\nhost = [\"a:1\", \" \"]\n");
    ws.jolt(&["-c", "bad.toml", "status"])
        .code(2)
        .contains("broker 2 of 2 is empty");
}

#[test]
fn config_never_prints_passwords() {
    let ws = workspace();
    ws.jolt(&["config", "http.password", "s3cret"]).success();
    let run = ws.jolt(&["config", "-l"]);
    run.success()
        .contains("http.password = ********")
        .lacks("s3cret");
}

#[test]
fn the_cache_directory_comes_from_the_configuration() {
    let ws = workspace();
    let other = ws.dir.path().join("other-cache");
    let run = ws.jolt(&[
        "-c",
        &format!("jolt.cachedir={}", other.display()),
        "build",
        "hello",
    ]);
    run.success();
    assert!(run.locations()[0].starts_with(&other));
}

#[test]
fn list_shows_tasks_and_requirements() {
    let ws = workspace();
    let all = ws.jolt(&["list"]);
    all.success()
        .contains("app    The app")
        .contains("hello  Writes a greeting");
    assert_eq!(all.stdout.lines().count(), 3);
    let direct = ws.jolt(&["list", "app"]);
    assert_eq!(direct.stdout, "hello:recipient=bob\nlib\n");
    let transitive = ws.jolt(&["list", "-a", "app"]);
    assert_eq!(transitive.stdout, "hello\nhello:recipient=bob\nlib\n");
}

#[test]
fn inspect_shows_the_task_and_its_influence() {
    let ws = workspace();
    let run = ws.jolt(&["inspect", "-i", "hello:recipient=bob"]);
    run.success()
        .contains("Writes a greeting")
        .contains("recipient")
        .contains("Who to greet")
        .contains("jolt.toml (2)")
        .contains("Local             False")
        .contains("Name: hello")
        .contains("Parameters: recipient=bob")
        .contains("Definition: ")
        .contains("src/a.txt")
        .contains("Format: 1");
    let file_line = run.lines_with("File: ")[0].clone();
    assert!(file_line.contains("ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"));
    let built = ws.jolt(&["build", "hello:recipient=bob"]);
    let id = built.identity();
    ws.jolt(&["info", "hello:recipient=bob"])
        .success()
        .contains(&id)
        .contains("Local             True");
}

#[test]
fn identities_do_not_depend_on_the_workspace_path() {
    let a = Workspace::with(RECIPE);
    let b = Workspace::with(RECIPE);
    a.file("src/a.txt", "same");
    b.file("src/a.txt", "same");
    assert_eq!(a.identity("app"), b.identity("app"));
}

#[test]
fn display_prints_the_tree_and_dot() {
    let ws = workspace();
    let tree = ws.jolt(&["display", "app"]);
    assert_eq!(
        tree.stdout,
        "app\n├╴lib\n│ └╴hello\n└╴hello:recipient=bob\n"
    );
    let dot = ws.jolt(&["display", "--format", "dot", "app"]);
    dot.success()
        .contains("digraph")
        .contains("\"app\" -> \"lib\";")
        .contains("\"lib\" -> \"hello\";");
}

#[test]
fn display_prune_shows_repeated_subtrees_once() {
    let ws = Workspace::with(
        "[task.a]\n[task.b]\nrequires=[\"a\"]\n[task.c]\nrequires=[\"a\",\"b\"]\n[task.d]\nrequires=[\"b\",\"c\"]\n",
    );
    let run = ws.jolt(&["display", "--prune", "d"]);
    assert_eq!(run.stdout, "d\n├╴b\n│ └╴a\n└╴c\n  ├╴[a]\n  └╴[b]\n");
}

#[test]
fn version_and_help_exit_0() {
    let ws = Workspace::new();
    ws.jolt(&["--version"]).success().contains("jolt ");
    ws.jolt(&["--help"]).success().contains("build");
}

#[test]
fn config_files_jolt_writes_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let ws = workspace();
    ws.jolt(&["config", "http.password", "pw"]).success();
    let mode = std::fs::metadata(ws.config_home().join("jolt/config.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn unknown_configuration_keys_are_refused_when_set_and_warned_when_read() {
    let ws = workspace();
    ws.jolt(&["config", "http.url", "http://cache/"])
        .code(2)
        .contains("Unknown configuration key 'http.url'")
        .contains("http.uri");
    ws.jolt(&["-c", "http.url=x", "list"])
        .code(2)
        .contains("Unknown configuration key 'http.url'");
    ws.file("typo.toml", "[http]\nurl = \"http://cache/\"\n");
    ws.jolt(&["-c", "typo.toml", "list"])
        .success()
        .contains("Unknown configuration key 'http.url' in typo.toml is ignored");
    // Issue 13: a typo gets the key it was meant to be.
    ws.jolt(&["config", "jolt.cachsize", "2G"])
        .code(2)
        .contains("Unknown configuration key 'jolt.cachsize' (did you mean 'jolt.cachesize'?)");
}

#[test]
fn unknown_tasks_and_parameters_suggest_the_close_ones() {
    let ws = Workspace::with(
        "[task.hello]\nparameters.recipient = \"world\"\nrun = \"echo {recipient}\"\n",
    );
    ws.jolt(&["build", "helo"])
        .code(2)
        .contains("No such task 'helo' (did you mean 'hello'?)");
    ws.jolt(&["build", "hello:recipent=x"])
        .code(2)
        .contains("(did you mean 'recipient'?)");
    ws.jolt(&["build", "zzz"]).code(2).lacks("did you mean");
}

#[test]
fn config_list_shows_every_effective_value_and_its_origin() {
    let ws = workspace();
    // Regression (issue 13): a fresh `jolt config -l` printed nothing.
    ws.jolt(&["config", "-l"])
        .success()
        .contains("jolt.cachesize = 10G  # default")
        .contains("http.uri = (not set)  # default")
        .contains("amqp.jobs = 1024  # default");
    ws.jolt(&["config", "jolt.cachesize", "2G"]).success();
    let mut cmd = ws.command(&["-c", "amqp.jobs=64", "config", "-l"]);
    cmd.env("JOLT_HTTP_TIMEOUT", "5");
    ws.run(cmd)
        .success()
        .contains("jolt.cachesize = 2G  # ")
        .contains("config.toml")
        .contains("http.timeout = 5  # environment (JOLT_HTTP_TIMEOUT)")
        .contains("amqp.jobs = 64  # -c");
    // `-c` before and after the command add up (the later one lost the earlier).
    ws.jolt(&["-c", "amqp.jobs=65", "config", "-l", "-c", "http.timeout=7"])
        .success()
        .contains("amqp.jobs = 65  # -c")
        .contains("http.timeout = 7  # -c");
    // A bad value is refused, and nothing is written.
    ws.jolt(&["config", "jolt.cachesize", "banana"])
        .code(2)
        .contains("Illegal value 'banana' for configuration key jolt.cachesize");
    ws.jolt(&["config", "amqp.tls", "maybe"]).code(2);
    ws.jolt(&["config", "jolt.cachesize"])
        .success()
        .contains("2G");
}

#[test]
fn completions_complete_commands_flags_and_the_workspaces_tasks() {
    let ws = Workspace::with("[task.hello]\nrun = \"true\"\n[task.help-me]\nrun = \"true\"\n[task.other]\nrun = \"true\"\n");
    let bash = ws.jolt(&["completions", "bash"]);
    bash.success();
    ws.file("jolt.bash", &bash.stdout);
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_jolt"))
        .parent()
        .unwrap();
    let complete = |words: &str| {
        let script = format!(
            "source jolt.bash; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _jolt_tasks jolt \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .current_dir(ws.root())
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .env("XDG_CONFIG_HOME", ws.config_home())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tasks = complete("jolt build he");
    assert!(
        tasks.contains("hello") && tasks.contains("help-me") && !tasks.contains("other"),
        "{tasks}"
    );
    assert!(complete("jolt bu").lines().any(|l| l == "build"));
    assert!(complete("jolt build --dry").contains("--dry-run"));
    ws.jolt(&["completions", "zsh"])
        .success()
        .contains("bashcompinit");
    ws.jolt(&["completions", "fish"])
        .success()
        .contains("complete -c jolt")
        .contains("jolt list --names");
}

#[test]
fn config_of_a_known_unset_key_shows_its_default_and_of_an_unknown_key_refuses_it() {
    // Issue 23: `config jolt.jobs` said `No such key: jolt.jobs`, as for `jolt.bogus`.
    let ws = workspace();
    let jobs = ws.jolt(&["config", "jolt.jobs"]);
    jobs.success();
    assert_eq!(
        jobs.stdout,
        "jolt.jobs = 0 (the number of CPUs)  # default\n"
    );
    let listed = ws.jolt(&["config", "-l"]);
    assert!(listed
        .stdout
        .lines()
        .any(|l| format!("{l}\n") == jobs.stdout));
    ws.jolt(&["config", "http.timeout"])
        .success()
        .contains("http.timeout = 60  # default");
    ws.jolt(&["config", "jolt.bogus"])
        .code(2)
        .contains("No such key: jolt.bogus");
    ws.jolt(&["config", "nosuch.key"])
        .code(2)
        .contains("No such key: nosuch.key")
        .lacks("did you mean");
    ws.jolt(&["config", "jolt.jbos"])
        .code(2)
        .contains("No such key: jolt.jbos (did you mean 'jolt.jobs'?)");
    // A key set keeps its answer.
    ws.jolt(&["config", "jolt.jobs", "3"]).success();
    let set = ws.jolt(&["config", "jolt.jobs"]);
    set.success();
    assert_eq!(set.stdout, "jolt.jobs = 3\n");
}

#[test]
fn params_and_network_config_are_refused_as_unknown_keys() {
    // Issue 23: both were accepted, listed by `config -l`, and read by nothing.
    let ws = workspace();
    for key in ["params.answer", "network.config"] {
        ws.jolt(&["config", key, "42"])
            .code(2)
            .contains(&format!("Unknown configuration key '{key}'"));
        ws.jolt(&["-c", &format!("{key}=42"), "list"])
            .code(2)
            .contains(&format!("Unknown configuration key '{key}'"));
        ws.jolt(&["config", key])
            .code(2)
            .contains(&format!("No such key: {key}"));
    }
    ws.file(
        "params.toml",
        "[params]\nanswer = 42\n[network]\nconfig = \"x\"\n",
    );
    ws.jolt(&["-c", "params.toml", "config", "-l"])
        .success()
        .contains("Unknown configuration key 'params.answer' in params.toml is ignored")
        .contains("Unknown configuration key 'network.config' in params.toml is ignored")
        .lacks("params.answer =")
        .lacks("network.config =");
}

/// The environment variable that sets `key`: `JOLT_<SECTION>_<KEY>`.
fn env_var(key: &str) -> String {
    format!("JOLT_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Values the key cannot take: past each end of its range, or one of another form.
fn refused_values(kind: Kind) -> Vec<String> {
    match kind {
        Kind::Int(lo, hi) => vec![(lo - 1).to_string(), (hi + 1).to_string(), "x".into()],
        Kind::Bool => vec!["maybe".into()],
        Kind::Size(lo, hi) => {
            let mut refused = vec!["banana".to_string()];
            if lo > 0 {
                refused.push((lo - 1).to_string());
            }
            if hi < u64::MAX {
                refused.push((hi + 1).to_string());
            }
            refused
        }
        Kind::Name => vec!["two words".into(), "p".repeat(245)],
        Kind::Reference => vec!["".into()],
        Kind::HttpUri => vec!["ftp://cache/".into(), "http://".into()],
        Kind::AmqpHost => vec!["ftp://broker".into(), "broker:99999".into()],
        Kind::OneOf(_) => vec!["banana".into()],
        Kind::Text => vec![],
    }
}

#[test]
fn every_value_config_accepts_a_build_accepts_and_every_value_it_refuses_a_build_refuses() {
    // Issue 23: `config http.timeout 0` was accepted, and every later build failed
    // with exit 2; the key table and the readers had ranges of their own.
    let Some(server) = Nginx::start() else { return };
    let Some(broker) = Broker::start() else {
        return;
    };
    let ws = Workspace::with("[task.t]\nrun = \"true\"\n");
    let network = [
        format!("http.uri={}", server.url),
        "amqp.host=127.0.0.1".to_string(),
        format!("amqp.routing_key={}", broker.routing_key),
    ];
    // A network build that plans only: it reads every key, builds the HTTP client,
    // connects to the broker and asks the cache, and runs nothing.
    let network_build = |extra: &[&str]| {
        let mut args: Vec<&str> = Vec::new();
        for c in &network {
            args.extend(["-c", c.as_str()]);
        }
        args.extend(extra);
        args.extend(["build", "--network", "--dry-run", "t"]);
        ws.jolt(&args)
    };
    network_build(&[]).success();
    for spec in SPECS {
        let key = spec.name;
        if let Some(default) = spec.default {
            ws.jolt(&["config", key, default]).success();
            ws.jolt(&["config", "-d", key]).success();
        }
        for bad in refused_values(spec.kind) {
            ws.jolt(&["config", "--", key, &bad])
                .code(2)
                .contains(&format!("for configuration key {key}"));
            let assigned = format!("{key}={bad}");
            ws.jolt(&["-c", &assigned, "build", "t"])
                .code(2)
                .contains(&format!("for configuration key {key}"))
                .contains("(set by -c)");
            let mut cmd = ws.command(&["build", "t"]);
            cmd.env(env_var(key), &bad);
            ws.run(cmd)
                .code(2)
                .contains(&format!("for configuration key {key}"))
                .contains(&env_var(key));
            let (section, name) = key.split_once('.').unwrap();
            ws.file("bad.toml", &format!("[{section}]\n{name} = \"{bad}\"\n"));
            ws.jolt(&["-c", "bad.toml", "build", "t"])
                .code(2)
                .contains(&format!("for configuration key {key}"))
                .contains("bad.toml");
        }
        let Kind::Int(lo, hi) = spec.kind else {
            continue;
        };
        for ok in [lo, hi] {
            let ok = ok.to_string();
            ws.jolt(&["config", key, &ok]).success();
            if key == "amqp.port" {
                // An address: any port is taken, and only a broker there answers.
                ws.jolt(&["build", "t"]).success();
            } else {
                let run = network_build(&[]);
                assert_eq!(run.code, 0, "{key} = {ok}: {}", run.all());
            }
            ws.jolt(&["config", "-d", key]).success();
        }
    }
}
