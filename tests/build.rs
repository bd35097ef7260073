//! Local builds: execution, caching, parameters, metadata, scheduling options.

use crate::util::Workspace;

const HELLO: &str = r#"
[task.hello]
description = "Writes a greeting"
parameters.recipient = { default = "world", help = "Who to greet" }
run = "echo 'Hello {recipient}!' > {builddir}/message.txt"
publish = [{ files = "message.txt", cwd = "{builddir}" }]

[task.print]
requires = ["hello:recipient={recipient}"]
parameters.recipient = "world"
cacheable = false
run = "cat {deps.hello}/message.txt"
"#;

#[test]
fn a_task_executes_once_then_comes_from_the_cache() {
    let ws = Workspace::with(HELLO);
    let first = ws.jolt(&["build", "hello"]);
    first
        .success()
        .contains("Execution started (hello ")
        .contains("Execution finished after 00s (hello ");
    let location = &first.locations()[0];
    assert_eq!(
        std::fs::read_to_string(location.join("message.txt")).unwrap(),
        "Hello world!\n"
    );
    assert!(location.join(".manifest.json").is_file());
    assert!(location.join(".build.log").is_file());
    assert!(location.starts_with(ws.cachedir().join("hello")));

    let second = ws.jolt(&["build", "hello"]);
    second.success().lacks("Execution started");
    assert_eq!(second.locations(), first.locations());
}

#[test]
fn the_manifest_describes_the_artifact() {
    let ws = Workspace::with(HELLO);
    let run = ws.jolt(&["build", "hello:recipient=john"]);
    run.success();
    let dir = &run.locations()[0];
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(".manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["task"], "hello");
    assert_eq!(
        manifest["identity"].as_str().unwrap(),
        dir.file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(manifest["parameters"]["recipient"], "john");
    assert_eq!(manifest["files"][0], "message.txt");
    assert!(manifest["influence"][0]
        .as_str()
        .unwrap()
        .starts_with("Name: hello"));
    assert!(manifest["size"].as_u64().unwrap() > 0);
    assert!(manifest["created"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn parameters_select_distinct_artifacts_and_defaults_are_the_same_task() {
    let ws = Workspace::with(HELLO);
    ws.jolt(&["build", "print:recipient=john"])
        .success()
        .contains("Hello john!");
    ws.jolt(&["build", "hello"])
        .success()
        .contains("Execution started (hello ");
    ws.jolt(&["build", "hello:recipient=world"])
        .success()
        .lacks("Execution started");
    assert_eq!(ws.artifacts("hello").len(), 2);
}

#[test]
fn log_lines_name_the_task_with_its_non_default_parameters() {
    let ws = Workspace::with(HELLO);
    let run = ws.jolt(&["build", "hello:recipient=john"]);
    let line = &run.lines_with("Execution started")[0];
    let id = run.identity();
    assert_eq!(
        line,
        &format!(
            "[   INFO] Execution started (hello:recipient=john {})",
            &id[..8]
        )
    );
}

#[test]
fn changing_an_influence_file_rebuilds_and_reverting_it_reuses() {
    let ws = Workspace::with(
        "[task.app]\ninfluence = [\"src/**/*.c\"]\nrun = \"cat src/main.c > {artifact}/out\"\n",
    );
    ws.file("src/main.c", "one")
        .file("src/lib/util.c", "u")
        .file("src/notes.txt", "n");
    let first = ws.jolt(&["build", "app"]);
    first.success().contains("Execution started");
    ws.file("src/notes.txt", "not an influence");
    ws.jolt(&["build", "app"])
        .success()
        .lacks("Execution started");
    ws.file("src/lib/util.c", "changed");
    let second = ws.jolt(&["build", "app"]);
    second.success().contains("Execution started");
    assert_ne!(first.locations(), second.locations());
    ws.file("src/lib/util.c", "u");
    let third = ws.jolt(&["build", "app"]);
    third.success().lacks("Execution started");
    assert_eq!(third.locations(), first.locations());
}

#[test]
fn influence_env_and_env_placeholders_are_part_of_the_identity() {
    let ws = Workspace::with(
        "[task.a]\ninfluence_env = [\"CFLAGS\"]\nrun = \"true\"\n[task.b]\nrun = \"echo {env.GREETING}\"\n",
    );
    let mut cmd = ws.command(&["build", "a", "b"]);
    cmd.env("CFLAGS", "-O2").env("GREETING", "hi");
    ws.run(cmd).success().contains("hi");
    let mut same = ws.command(&["build", "a", "b"]);
    same.env("CFLAGS", "-O2").env("GREETING", "hi");
    ws.run(same).success().lacks("Execution started");
    let mut other = ws.command(&["build", "a", "b"]);
    other.env("CFLAGS", "-O3").env("GREETING", "hello");
    let run = ws.run(other);
    let mut started = run.started();
    started.sort();
    assert_eq!(started, vec!["a", "b"]);
}

#[test]
fn an_influencing_variables_value_is_kept_as_its_digest_only() {
    let ws = Workspace::with("[task.t]\ninfluence_env = [\"MY_TOKEN\"]\nrun = \"true\"\n");
    let run = |args: &[&str], value: &str| {
        let mut cmd = ws.command(args);
        cmd.env("MY_TOKEN", value);
        ws.run(cmd)
    };
    run(&["build", "t"], "tok-SECRET-77").success();
    // Regression (issue 24): the value was kept in clear in the manifest, inside the
    // archive anyone may read from the HTTP cache, and shown by inspect -i.
    let manifest = ws.artifacts("t")[0].join(".manifest.json");
    let text = std::fs::read_to_string(manifest).unwrap();
    assert!(!text.contains("tok-SECRET-77"), "{text}");
    let digest = "Environment: MY_TOKEN=sha256:";
    assert!(text.contains(digest), "{text}");
    run(&["inspect", "-i", "t"], "tok-SECRET-77")
        .success()
        .contains(digest)
        .lacks("tok-SECRET-77");
    // As much part of the identity as before.
    run(&["build", "t"], "tok-SECRET-77")
        .success()
        .lacks("Execution started");
    run(&["build", "t"], "tok-OTHER")
        .success()
        .contains("Execution started");
}

#[test]
fn editing_a_command_changes_the_identity_but_a_description_does_not() {
    let ws = Workspace::with("[task.a]\nrun = \"echo one\"\n");
    ws.jolt(&["build", "a"]).success().contains("one");
    ws.file(
        "jolt.toml",
        "[task.a]\ndescription = \"new words\"\nweight = 3\nrun = \"echo one\"\n",
    );
    ws.jolt(&["build", "a"])
        .success()
        .lacks("Execution started");
    ws.file("jolt.toml", "[task.a]\nrun = \"echo two\"\n");
    ws.jolt(&["build", "a"]).success().contains("two");
}

#[test]
fn a_tool_puts_itself_on_its_consumers_path_and_exports_metadata() {
    let ws = Workspace::with(
        r#"
[task.tool]
run = ["mkdir -p {artifact}/bin", "printf '#!/bin/sh\necho tool says $1\n' > {artifact}/bin/mytool", "chmod +x {artifact}/bin/mytool"]
environ = { PATH = "bin", TOOL_MODE = "fast" }
strings = { version = "1.2" }
paths = { bin = "bin/mytool" }

[task.user]
requires = ["tool"]
run = [
  "mytool hello > {artifact}/out",
  "echo $TOOL_MODE {deps.tool.strings.version} >> {artifact}/out",
  "test -x {deps.tool.paths.bin}",
  "test -d {deps.tool}/bin",
  "test -n \"$JOLT_ROOT\" -a -n \"$JOLT_BUILDDIR\" -a -n \"$JOLT_ARTIFACT\" -a -n \"$JOLT_CACHEDIR\"",
]
"#,
    );
    let run = ws.jolt(&["build", "user"]);
    run.success();
    let out = std::fs::read_to_string(run.locations()[0].join("out")).unwrap();
    assert_eq!(out, "tool says hello\nfast 1.2\n");
}

#[test]
fn direct_requirements_win_over_transitive_ones_in_the_environment() {
    let ws = Workspace::with(
        r#"
[task.base]
run = "mkdir -p {artifact}/bin"
environ = { MODE = "base", PATH = "bin" }
[task.mid]
requires = ["base"]
run = "mkdir -p {artifact}/bin"
environ = { MODE = "mid", PATH = "bin" }
[task.top]
requires = ["mid"]
run = ["echo MODE=$MODE", "echo PATH=$PATH"]
"#,
    );
    let run = ws.jolt(&["build", "top"]);
    run.success().contains("MODE=mid");
    let path = run.lines_with("PATH=")[0].clone();
    let mid = path.find("/mid/").expect("mid on PATH");
    let base = path.find("/base/").expect("base on PATH");
    assert!(mid < base, "the direct requirement comes first: {path}");
}

#[test]
fn an_alias_builds_what_it_requires() {
    let ws = Workspace::with(&format!(
        "{HELLO}\n[task.all]\nkind = \"alias\"\nrequires = [\"hello\", \"hello:recipient=bob\"]\n"
    ));
    let run = ws.jolt(&["build", "all"]);
    run.success();
    assert_eq!(run.locations().len(), 2);
    assert_eq!(run.started().len(), 2);
}

#[test]
fn with_no_command_the_default_task_is_built() {
    let ws = Workspace::with("[task.default]\nrun = \"echo built default\"\n[task.custom]\nrun = \"echo built custom\"\n");
    ws.jolt(&[]).success().contains("built default");
    ws.jolt(&["-c", "jolt.default=custom"])
        .success()
        .contains("built custom");
    // Regression (issue 13): `jolt build` with no task built nothing and exited 0.
    ws.jolt(&["-c", "jolt.default=custom", "build", "-f"])
        .success()
        .contains("built custom");
}

#[test]
fn included_recipes_and_slashed_names_work() {
    let ws = Workspace::with("include = [\"recipes/*.toml\"]\n[task.app]\nrequires = [\"tools/gcc\"]\nrun = \"cat {deps.tools/gcc}/v\"\n");
    ws.file(
        "recipes/tools.toml",
        "[task.\"tools/gcc\"]\nrun = \"echo 12 > {artifact}/v\"\n",
    );
    ws.jolt(&["build", "app"]).success().contains("12");
    assert_eq!(ws.artifacts("tools/gcc").len(), 1);
}

#[test]
fn a_resource_is_acquired_and_released_around_its_consumer() {
    let ws = Workspace::with(
        r#"
[task.lock]
kind = "resource"
acquire = "echo acquire >> {root}/events"
release = "echo release >> {root}/events"
[task.user]
requires = ["lock"]
run = "echo run >> {root}/events"
[task.failing]
requires = ["lock"]
run = "false"
"#,
    );
    ws.jolt(&["build", "user"]).success();
    assert_eq!(ws.read("events"), "acquire\nrun\nrelease\n");
    ws.jolt(&["build", "user"]).success();
    assert_eq!(
        ws.read("events"),
        "acquire\nrun\nrelease\n",
        "a cached consumer acquires nothing"
    );
    ws.jolt(&["build", "failing"]).code(1);
    assert_eq!(
        ws.read("events"),
        "acquire\nrun\nrelease\nacquire\nrelease\n"
    );
}

#[test]
fn a_failing_acquire_fails_the_consumer_without_running_it() {
    let ws = Workspace::with(
        "[task.r]\nkind = \"resource\"\nacquire = \"false\"\nrelease = \"echo released >> {root}/events\"\n[task.user]\nrequires = [\"r\"]\nrun = \"echo ran >> {root}/events\"\n",
    );
    ws.jolt(&["build", "user"])
        .code(1)
        .contains("Resource acquisition failed");
    assert_eq!(ws.read("events"), "");
}

#[test]
fn keep_going_builds_independent_tasks_after_a_failure() {
    let ws = Workspace::with(
        "[task.bad]\nrun = \"false\"\nweight = 10\n[task.after_bad]\nrequires = [\"bad\"]\n[task.good]\nrun = \"echo good\"\n",
    );
    let run = ws.jolt(&["build", "-j", "1", "-k", "after_bad", "good"]);
    run.code(1)
        .contains("Command failed: false")
        .contains("List of failed tasks");
    assert_eq!(ws.artifacts("good").len(), 1);
    assert_eq!(
        run.locations(),
        ws.artifacts("good"),
        "the goal that was built is located"
    );
    let stopped = Workspace::with(
        "[task.bad]\nrun = \"false\"\nweight = 10\n[task.good]\nrun = \"echo good\"\n",
    );
    stopped.jolt(&["build", "-j", "1", "bad", "good"]).code(1);
    assert!(
        stopped.artifacts("good").is_empty(),
        "without -k the build stops"
    );
}

#[test]
fn force_rebuilds_the_goal_with_a_fresh_identity() {
    let ws = Workspace::with(HELLO);
    let plain = ws.jolt(&["build", "hello"]);
    let forced = ws.jolt(&["build", "-f", "hello"]);
    forced.success().contains("Execution started (hello ");
    let again = ws.jolt(&["build", "-f", "hello"]);
    assert_ne!(forced.locations(), plain.locations());
    assert_ne!(forced.locations(), again.locations());
    ws.jolt(&["build", "hello"])
        .success()
        .lacks("Execution started");
}

#[test]
fn salt_changes_every_identity_and_repeats() {
    let ws = Workspace::with(HELLO);
    ws.jolt(&["build", "print"]).success();
    let salted = ws.jolt(&["build", "-s", "one", "print"]);
    assert_eq!(salted.started().len(), 2);
    let again = ws.jolt(&["build", "-s", "one", "print"]);
    assert_eq!(again.started(), vec!["print".to_string()]);
}

#[test]
fn copy_puts_the_goal_files_in_a_directory() {
    let ws = Workspace::with(HELLO);
    ws.jolt(&["build", "hello", "--copy", "out"]).success();
    assert_eq!(ws.read("out/message.txt"), "Hello world!\n");
    assert!(!ws.root().join("out/.manifest.json").exists());
}

#[test]
fn result_file_reports_every_task() {
    let ws = Workspace::with(HELLO);
    ws.jolt(&["build", "print", "--result", "r.json"]).success();
    let report: serde_json::Value = serde_json::from_str(&ws.read("r.json")).unwrap();
    assert_eq!(report["result"], "SUCCESS");
    let tasks = report["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    for t in tasks {
        assert_eq!(t["status"], "executed");
        assert_eq!(t["identity"].as_str().unwrap().len(), 64);
        assert!(t["duration"].as_f64().is_some());
    }
    ws.file("jolt.toml", "[task.bad]\nrun = \"false\"\n");
    ws.jolt(&["build", "bad", "--result", "r.json"]).code(1);
    let report: serde_json::Value = serde_json::from_str(&ws.read("r.json")).unwrap();
    assert_eq!(report["result"], "FAILED");
    assert_eq!(report["tasks"][0]["status"], "failed");
}

#[test]
fn an_unstable_failure_does_not_fail_the_build_but_its_consumer_fails() {
    let ws = Workspace::with(
        "[task.flaky]\nunstable = true\nrun = \"false\"\n[task.user]\nrequires = [\"flaky\"]\nrun = \"true\"\n",
    );
    ws.jolt(&["build", "flaky"])
        .success()
        .contains("List of failed tasks");
    ws.jolt(&["build", "user"])
        .code(1)
        .contains("Task depends on failed task 'flaky'");
}

#[test]
fn a_non_cacheable_task_runs_every_time_and_has_no_location() {
    let ws = Workspace::with(HELLO);
    let first = ws.jolt(&["build", "print"]);
    first.success().contains("Hello world!");
    assert!(first.locations().is_empty());
    ws.jolt(&["build", "print"])
        .success()
        .contains("Execution started (print ");
}

#[test]
fn ready_tasks_start_highest_weight_first() {
    let ws = Workspace::with("[task.a]\nweight = 3\n[task.b]\nweight = 1\n[task.c]\nweight = 2\n");
    let run = ws.jolt(&["build", "-j", "1", "a", "b", "c"]);
    assert_eq!(run.started(), vec!["a", "c", "b"]);
}

#[test]
fn jobs_run_tasks_at_the_same_time() {
    // Each task waits for the other to start: only a parallel build finishes them.
    let ws = Workspace::with(
        r#"
[task.ping]
timeout = "20s"
run = "touch {root}/ping; while [ ! -f {root}/pong ]; do sleep 0.02; done"
[task.pong]
timeout = "20s"
run = "touch {root}/pong; while [ ! -f {root}/ping ]; do sleep 0.02; done"
"#,
    );
    let run = ws.jolt(&["build", "-j", "2", "ping", "pong"]);
    run.success();
}

#[test]
fn parallel_output_lines_carry_their_task() {
    let ws = Workspace::with("[task.a]\nrun = \"echo from-a\"\n[task.b]\nrun = \"echo from-b\"\n");
    let run = ws.jolt(&["build", "-j", "2", "a", "b"]);
    run.success().contains("[a] from-a").contains("[b] from-b");
    let serial = Workspace::with("[task.a]\nrun = \"echo from-a\"\n");
    let out = serial.jolt(&["build", "a"]);
    assert!(out.stdout.lines().any(|l| l == "from-a"), "{}", out.stdout);
}

#[test]
fn a_cached_selfsustained_task_prunes_its_requirements() {
    let ws = Workspace::with(
        r#"
[task.dep]
run = "echo dep > {artifact}/f"
[task.bundle]
selfsustained = true
requires = ["dep"]
run = "cp {deps.dep}/f {artifact}/f"
[task.user]
requires = ["bundle"]
run = "cat {deps.bundle}/f"
"#,
    );
    ws.jolt(&["build", "bundle"]).success();
    ws.jolt(&["clean", "dep"]).success();
    let run = ws.jolt(&["build", "user"]);
    run.success().contains("dep");
    assert_eq!(run.started(), vec!["user"]);
}

#[test]
fn quiet_hides_info_lines() {
    let ws = Workspace::with(HELLO);
    let run = ws.jolt(&["-q", "build", "hello"]);
    run.success().lacks("Execution started");
}

// Identities cover what a task reads (issue 9).

const OBJECTS: &str = r#"
[task.obj]
parameters.file = { values = ["add", "mul"] }
parameters.mode = { default = "release", values = ["debug", "release"] }
influence = ["src/{file}.c"]
influence_env = ["CFLAGS_{mode}"]
run = "cat src/{file}.c > {artifact}/{file}.o"

[task.prog]
parameters.mode = "release"
requires = ["obj:file=add,mode={mode}"]
run = "cat {deps.obj:file=add,mode={mode}}/add.o > {artifact}/prog"
"#;

#[test]
fn placeholders_in_influence_select_the_files_hashed() {
    let ws = Workspace::with(OBJECTS);
    ws.file("src/add.c", "int add;")
        .file("src/mul.c", "int mul;");
    let inspect = ws.jolt(&["inspect", "-i", "obj:file=add"]);
    inspect
        .success()
        .contains("File: ")
        .contains(": src/add.c")
        .lacks("src/mul.c")
        .contains("Environment: CFLAGS_release is unset");
    ws.jolt(&["build", "obj:file=add"]).success();
    // Regression: the file was never hashed, so an edit left the old artifact "cached".
    ws.file("src/add.c", "int add2;");
    ws.jolt(&["build", "obj:file=add"])
        .success()
        .contains("Execution started (obj:file=add ");
}

#[test]
fn glob_alternations_in_influence_are_globs_not_placeholders() {
    let ws = Workspace::with("[task.t]\ninfluence = [\"src/*.{c,h}\"]\nrun = \"true\"\n");
    ws.file("src/a.c", "c")
        .file("src/a.h", "h")
        .file("src/a.o", "o");
    ws.jolt(&["inspect", "-i", "t"])
        .success()
        .contains(": src/a.c")
        .contains(": src/a.h")
        .lacks("src/a.o");
}

#[test]
fn unknown_placeholders_in_influence_exit_2() {
    let ws = Workspace::with("[task.t]\ninfluence = [\"src/{nope}.c\"]\n");
    ws.jolt(&["build", "t"])
        .code(2)
        .contains("Unknown placeholder '{nope}' in task 't'");
    let ws = Workspace::with("[task.t]\ninfluence_env = [\"X_{nope}\"]\n");
    ws.jolt(&["inspect", "t"])
        .code(2)
        .contains("Unknown placeholder '{nope}' in task 't'");
}

#[test]
fn an_influence_pattern_that_matches_nothing_is_an_error_unless_optional() {
    let ws = Workspace::with("[task.t]\ninfluence = [\"gen/*.h\"]\nrun = \"true\"\n");
    ws.jolt(&["build", "t"])
        .code(2)
        .contains("Task 't': influence pattern 'gen/*.h' matches no file");
    let ws = Workspace::with(
        "[task.t]\ninfluence = [{ files = \"gen/*.h\", optional = true }]\nrun = \"true\"\n",
    );
    ws.jolt(&["build", "t"]).success();
    ws.file("gen/a.h", "x");
    ws.jolt(&["inspect", "-i", "t"])
        .success()
        .contains(": gen/a.h");
}

#[test]
fn a_file_published_from_the_workspace_must_be_an_influence() {
    let recipe = |influence: &str| {
        format!(
            "[task.headers]\ninfluence = [{influence}]\npublish = [{{ files = \"include\", dest = \"inc/\" }}]\n"
        )
    };
    let ws = Workspace::with(&recipe("\"include/a.h\""));
    ws.file("include/a.h", "a").file("include/b.h", "b");
    ws.age("include/a.h").age("include/b.h");
    let run = ws.jolt(&["build", "headers"]);
    run.code(1)
        .contains("Missing influence: include/b.h (headers)")
        .lacks("Missing influence: include/a.h")
        .contains("Task is missing source influence");
    assert!(ws.artifacts("headers").is_empty());
    let ws = Workspace::with(&recipe("\"include/**\""));
    ws.file("include/a.h", "a").file("include/b.h", "b");
    let run = ws.jolt(&["build", "headers"]);
    run.success();
    assert!(run.locations()[0].join("inc/include/b.h").is_file());
}

#[test]
fn files_a_task_writes_into_the_workspace_are_outputs_not_sources() {
    let ws = Workspace::with(
        "[task.inplace]\ninfluence = [\"src/*.c\"]\nrun = \"mkdir -p out && cat src/*.c > out/lib.a\"\npublish = [\"out/*.a\", \"src/*.{c,h}\"]\n",
    );
    ws.file("src/a.c", "a").file("src/a.h", "h");
    ws.age("src/a.c").age("src/a.h");
    let run = ws.jolt(&["build", "inplace"]);
    // out/lib.a was written by the task; src/a.h is a source nobody declared.
    run.code(1)
        .contains("Missing influence: src/a.h (inplace)")
        .lacks("Missing influence: out/lib.a")
        .lacks("Missing influence: src/a.c");
}

#[test]
fn a_symlinked_directory_is_an_influence_as_a_link() {
    let ws = Workspace::with("[task.sdk]\ninfluence = [\"sdk\"]\npublish = [\"sdk\"]\n");
    ws.file("real/include/x.h", "x");
    std::os::unix::fs::symlink("real", ws.root().join("sdk")).unwrap();
    ws.age("real/include/x.h");
    ws.jolt(&["build", "sdk"]).success();
}

#[test]
fn files_published_from_the_build_directory_need_no_influence() {
    Workspace::with(HELLO)
        .jolt(&["build", "hello"])
        .success()
        .lacks("Missing influence");
}

#[test]
fn placeholders_nest_inside_requirement_references() {
    let ws = Workspace::with(OBJECTS);
    ws.file("src/add.c", "int add;")
        .file("src/mul.c", "int mul;");
    let run = ws.jolt(&["build", "prog:mode=debug"]);
    run.success();
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("prog")).unwrap(),
        "int add;"
    );
    // The same reference with the parameters in another order, defaults spelled out.
    let ws = Workspace::with(&OBJECTS.replace(
        "{deps.obj:file=add,mode={mode}}",
        "{deps.obj:mode={mode},file=add}",
    ));
    ws.file("src/add.c", "int add;")
        .file("src/mul.c", "int mul;");
    ws.jolt(&["build", "prog"]).success();
}

// Secrets stay secret; metadata stays inside (issue 9).

#[test]
fn tasks_never_see_the_credentials_of_jolt() {
    let ws = Workspace::with("[task.t]\nrun = \"env > {artifact}/env\"\n");
    let mut cmd = ws.command(&["build", "t"]);
    cmd.env("JOLT_HTTP_PASSWORD", "http-s3cret")
        .env("JOLT_AMQP_PASSWORD", "amqp-s3cret")
        .env("JOLT_HTTP_URI", "http://u:url-s3cret@cache/");
    let run = ws.run(cmd);
    run.success();
    let env = std::fs::read_to_string(run.locations()[0].join("env")).unwrap();
    for secret in ["http-s3cret", "amqp-s3cret", "url-s3cret"] {
        assert!(!env.contains(secret), "a task saw {secret}:\n{env}");
    }
    assert!(env.contains("JOLT_ARTIFACT="));
    // Nor through a placeholder, whose value would land in manifests and requests.
    let ws = Workspace::with("[task.t]\nrun = \"echo {env.JOLT_HTTP_PASSWORD}\"\n");
    ws.jolt(&["build", "t"])
        .code(2)
        .contains("may not use the credential variable JOLT_HTTP_PASSWORD");
}

#[test]
fn the_environment_and_command_line_of_jolt_hold_no_credential_once_read() {
    // Root reads any process's `/proc/PID/environ`, non-dumpable or not: what it
    // shows is the memory the environment was given at exec.
    if !crate::util::running_as_root("to read a non-dumpable process's environ") {
        return;
    }
    let ws = Workspace::with(
        "[task.t]\nrun = \"tr '\\\\0' '\\\\n' < /proc/$PPID/environ > {artifact}/environ; tr '\\\\0' ' ' < /proc/$PPID/cmdline > {artifact}/cmdline\"\n",
    );
    let mut cmd = ws.command(&[
        "-c",
        "amqp.host=amqp://u:amqp-s3cret@broker",
        "-c",
        "amqp.password=other-s3cret",
        "build",
        "t",
    ]);
    cmd.env("JOLT_HTTP_PASSWORD", "http-s3cret");
    let run = ws.run(cmd);
    run.success();
    let read = |name: &str| std::fs::read_to_string(run.locations()[0].join(name)).unwrap();
    let (environ, cmdline) = (read("environ"), read("cmdline"));
    // Regression (issue 24): a task of jolt's user read them there (and any user
    // the command line).
    for secret in ["http-s3cret", "amqp-s3cret", "other-s3cret"] {
        assert!(!environ.contains(secret), "{secret} in:\n{environ}");
        assert!(!cmdline.contains(secret), "{secret} in: {cmdline}");
    }
    assert!(environ.contains("JOLT_JOLT_CACHEDIR="), "{environ}");
    assert!(
        cmdline.contains(
            "amqp.host=amqp://u:***********@broker -c amqp.password=************ build t"
        ),
        "{cmdline}"
    );
}

#[test]
fn commands_get_only_descriptors_0_to_2_and_a_daemon_holds_no_descriptor_of_jolts_caller() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    // Regression (issue 24): commands inherited every descriptor that jolt inherited
    // without close-on-exec, so a daemon a task started (`setsid`) held its caller's
    // pipe open after jolt had ended, and the caller waited for the daemon.
    let ws = Workspace::with(
        "[task.t]\nrun = \"ls /proc/$$/fd > {artifact}/fds; setsid sleep 30 </dev/null >/dev/null 2>&1 & echo $! > {artifact}/daemon\"\n",
    );
    let mut fds = [0; 2];
    // SAFETY: `fds` holds two descriptors; O_CLOEXEC keeps both ends out of what
    // other tests start meanwhile.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let raw = write.as_raw_fd();
    let mut cmd = ws.command(&["build", "t"]);
    // SAFETY: dup2 and fcntl are async-signal-safe: jolt starts with the pipe's write
    // end as descriptor 5, without close-on-exec, as a caller's descriptor is.
    unsafe {
        cmd.pre_exec(move || {
            let done = match raw {
                5 => libc::fcntl(5, libc::F_SETFD, 0),
                _ => libc::dup2(raw, 5),
            };
            match done {
                -1 => Err(std::io::Error::last_os_error()),
                _ => Ok(()),
            }
        });
    }
    let run = ws.run(cmd);
    drop(write);
    run.success();
    let artifact = &run.locations()[0];
    let daemon: i32 = std::fs::read_to_string(artifact.join("daemon"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: signals the daemon this test's task started.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _daemon = Kill(daemon);
    // The shell's: 0 to 2, and its own from 10 on (where dash saves a descriptor it
    // redirects; bash keeps 255), never the 5 jolt inherited.
    let listed = std::fs::read_to_string(artifact.join("fds")).unwrap();
    let mut listed: Vec<i32> = listed
        .split_whitespace()
        .map(|fd| fd.parse().unwrap())
        .collect();
    listed.sort();
    assert!(
        listed.starts_with(&[0, 1, 2]) && !listed.iter().any(|fd| (3..10).contains(fd)),
        "the command's descriptors: {listed:?}"
    );
    // jolt has ended: the reader sees end-of-file now, not when the daemon ends.
    let mut poll = libc::pollfd {
        fd: read.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `poll` is one valid pollfd.
    let ready = unsafe { libc::poll(&mut poll, 1, 5000) };
    assert_eq!(ready, 1, "the pipe is still held open");
    let mut byte = [0u8; 1];
    // SAFETY: reads at most one byte into `byte`.
    let n = unsafe { libc::read(read.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
    assert_eq!(n, 0, "end-of-file");
}

#[test]
fn an_environ_for_the_loader_or_leaving_the_artifact_fails_the_task() {
    for (environ, message) in [
        (
            "LD_PRELOAD = \"evil.so\"",
            "consumers may not be given LD_PRELOAD",
        ),
        ("PATH = \"../..\"", "is not a path inside the artifact"),
    ] {
        let ws = Workspace::with(&format!(
            "[task.t]\nrun = \"true\"\nenviron = {{ {environ} }}\n"
        ));
        ws.jolt(&["build", "t"]).code(1).contains(message);
        assert!(ws.artifacts("t").is_empty());
    }
}

#[test]
fn a_server_one_command_starts_serves_the_next() {
    // Regression: what a command left running was killed when it ended.
    let ws = Workspace::with(
        "[task.t]\nrun = [\"sleep 30 & echo $! > {builddir}/server.pid\", \"kill -0 $(cat {builddir}/server.pid)\"]\n",
    );
    ws.jolt(&["build", "t"]).success();
}

#[test]
fn an_influence_file_read_through_a_symlink_is_hashed_with_its_target() {
    let ws = Workspace::with(
        "[task.t]\ninfluence = [\"cur.txt\"]\nrun = \"cat cur.txt > {artifact}/out\"\n",
    );
    ws.file("real.txt", "one");
    std::os::unix::fs::symlink("real.txt", ws.root().join("cur.txt")).unwrap();
    ws.jolt(&["build", "t"]).success();
    // Regression: only the link's text was hashed, and the old output served.
    ws.file("real.txt", "two");
    let run = ws.jolt(&["build", "t"]);
    run.success().contains("Execution started (t ");
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("out")).unwrap(),
        "two"
    );
}

#[test]
fn quiet_still_shows_a_failing_tasks_output_and_verbose_echoes_commands() {
    let ws = Workspace::with(
        "[task.bad]\nrun = \"echo noise; echo 'error: bad thing' >&2; exit 3\"\n[task.good]\nrun = \"echo fine\"\n",
    );
    // Regression (issue 13): -q showed only "Command failed".
    ws.jolt(&["-q", "build", "bad"])
        .code(1)
        .contains("error: bad thing")
        .contains("Command failed");
    ws.jolt(&["-q", "build", "good"]).success().lacks("fine");
    ws.jolt(&["-v", "build", "-f", "good"])
        .success()
        .contains("[VERBOSE] Running: echo fine (good)");
    // Many -v are as many as two (128 of them wrapped round to silence).
    let many = vec!["-v"; 130];
    let mut args: Vec<&str> = many.clone();
    args.extend(["build", "-f", "good"]);
    ws.jolt(&args)
        .success()
        .contains("[VERBOSE] Running: echo fine");
}

#[test]
fn a_failed_command_is_reported_once_and_a_cut_tail_says_how_much_was_cut() {
    let ws = Workspace::with("[task.bad]\nrun = \"seq 1 5002; false\"\n");
    let failed = "Command failed: seq 1 5002; false";
    let run = ws.jolt(&["-q", "build", "bad"]);
    // Regression (issue 23): -q printed the tail of the task's log, which ended
    // with jolt's line `Command failed: ...`, and then the same line as an error; and
    // it showed the last 200 of 5,002 lines without a word of the 4,802 before.
    run.code(1)
        .contains(&format!("[  ERROR] {failed}\n"))
        .contains("[bad] [... the first 4802 lines of the output are not shown ...]\n[bad] 4803\n")
        .contains("[bad] 5002\n");
    assert_eq!(run.count(failed), 1, "{}", run.all());
    // The kept output has all of it, and why it failed after it.
    let text = std::fs::read_to_string(run.kept_output()).unwrap();
    assert!(text.starts_with("1\n2\n"), "{}", &text[..20]);
    assert!(text.ends_with(&format!("\n5002\n{failed}\n")), "{text}");
    let run = ws.jolt(&["build", "bad"]);
    run.code(1).contains("\n5002\n");
    assert_eq!(run.count(failed), 1, "{}", run.all());
}

/// Every path under `dir` with its modification time.
fn tree(dir: &std::path::Path) -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let meta = e.metadata().unwrap();
            out.push((e.path(), meta.modified().unwrap()));
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_dry_run_says_what_would_happen_and_runs_and_writes_nothing() {
    let ws = Workspace::with(
        "[task.a]\nrun = \"touch {root}/ran-a; echo a > {artifact}/a\"\n[task.b]\nrequires = [\"a\"]\nrun = \"touch {root}/ran-b\"\n",
    );
    ws.jolt(&["build", "--dry-run", "b"])
        .success()
        .contains("execute (a ")
        .contains("execute (b ")
        .contains("Dry run: 2 execute; nothing was run");
    assert!(!ws.root().join("ran-a").exists() && !ws.root().join("ran-b").exists());
    assert_eq!(
        tree(&ws.cachedir()),
        vec![],
        "a dry run wrote into the cache"
    );
    ws.jolt(&["build", "a"]).success();
    let before = tree(&ws.cachedir());
    ws.jolt(&["build", "--dry-run", "b"])
        .success()
        .contains("cached (a ")
        .contains("execute (b ");
    ws.jolt(&["build", "--dry-run", "a"])
        .success()
        .contains("cached (a ");
    assert_eq!(tree(&ws.cachedir()), before, "a dry run changed the cache");
    assert!(!ws.root().join("ran-b").exists());
}

#[test]
fn explain_shows_the_influence_lines_that_changed() {
    let ws = Workspace::with(
        "[task.c]\nparameters.mode = \"debug\"\ninfluence = [\"src/*.c\"]\nrun = \"echo {mode}\"\n",
    );
    ws.file("src/x.c", "one");
    ws.file("src/y.c", "same");
    ws.jolt(&["build", "--explain", "c"])
        .success()
        .contains("no earlier artifact of this task and parameters");
    ws.file("src/x.c", "two");
    let run = ws.jolt(&["build", "--explain", "c"]);
    run.success().contains("Execution started");
    let out = run.all();
    let changed: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("  - ") || l.contains("  + "))
        .collect();
    assert_eq!(changed.len(), 2, "{out}");
    assert!(
        changed[0].contains("- File: ") && changed[0].ends_with(": src/x.c"),
        "{out}"
    );
    assert!(
        changed[1].contains("+ File: ") && changed[1].ends_with(": src/x.c"),
        "{out}"
    );
    // Other parameters are another task: nothing to compare with.
    ws.jolt(&["build", "--explain", "--dry-run", "c:mode=release"])
        .success()
        .contains("no earlier artifact");
}

#[test]
fn colour_is_used_when_asked_for_and_never_when_piped() {
    let ws = Workspace::with("[task.good]\nrun = \"true\"\n[task.bad]\nrun = \"exit 3\"\n");
    ws.jolt(&["build", "--color", "always", "good"])
        .success()
        .contains("\x1b[32m[   INFO] Execution finished");
    ws.jolt(&["build", "--color", "always", "bad"])
        .code(1)
        .contains("\x1b[31m[  ERROR] Command failed");
    // Piped (auto) and never: plain lines; NO_COLOR does not beat `always`.
    ws.jolt(&["build", "-f", "good"]).success().lacks("\x1b[");
    ws.jolt(&["build", "--color", "never", "bad"])
        .code(1)
        .lacks("\x1b[");
    let mut cmd = ws.command(&["build", "--color", "always", "-f", "good"]);
    cmd.env("NO_COLOR", "1");
    ws.run(cmd).success().contains("\x1b[32m");
}

#[test]
fn a_trace_and_the_result_say_when_and_where_each_task_ran() {
    let ws = Workspace::with(
        "[task.a]\nrun = \"sleep 0.2\"\n[task.b]\nrequires = [\"a\"]\nrun = \"true\"\n[task.bad]\nrun = \"exit 4\"\n",
    );
    let (trace, result) = (ws.root().join("t.json"), ws.root().join("r.json"));
    ws.jolt(&[
        "build",
        "-k",
        "-j",
        "2",
        "--trace",
        trace.to_str().unwrap(),
        "--result",
        result.to_str().unwrap(),
        "b",
        "bad",
    ])
    .code(1);
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let complete: Vec<&serde_json::Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    let names: Vec<&str> = complete
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(complete.len(), 3, "{names:?}");
    let a = complete.iter().find(|e| e["name"] == "a").unwrap();
    let b = complete.iter().find(|e| e["name"] == "b").unwrap();
    assert!(a["dur"].as_u64().unwrap() >= 200_000, "{a}");
    assert!(b["ts"].as_u64().unwrap() >= a["ts"].as_u64().unwrap() + a["dur"].as_u64().unwrap());
    // Every lane is named.
    for e in &complete {
        assert!(
            events
                .iter()
                .any(|m| m["ph"] == "M" && m["tid"] == e["tid"]),
            "{e}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
    let task = |n: &str| {
        report["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == n)
            .unwrap()
            .clone()
    };
    assert!(task("b")["start"].as_f64().unwrap() >= 0.2);
    assert!(task("a")["worker"].as_str().unwrap().starts_with("local "));
    assert_eq!(task("bad")["error"], "Command failed: exit 4");
}

#[test]
fn every_build_is_logged_and_a_failed_tasks_output_is_kept() {
    let ws = Workspace::with(
        "[task.good]\nrun = \"echo hidden-by-quiet\"\n[task.bad]\nrun = \"echo first-line; echo 'error: bad thing' >&2; exit 3\"\n",
    );
    ws.jolt(&["log"])
        .code(2)
        .contains("No build has been logged yet");
    ws.jolt(&["-q", "build", "good"]).success();
    // The full log, whatever the verbosity.
    ws.jolt(&["log"])
        .success()
        .contains("$ jolt -q build good")
        .contains("hidden-by-quiet")
        .contains("Execution finished");
    let run = ws.jolt(&["build", "bad"]);
    run.code(1);
    let kept = run.kept_output();
    let text = std::fs::read_to_string(&kept).unwrap();
    assert!(
        text.contains("first-line") && text.contains("error: bad thing"),
        "{text}"
    );
    assert!(
        kept.starts_with(ws.state_home().to_str().unwrap()),
        "{kept}"
    );
    let list = ws.jolt(&["log", "-l"]);
    list.success();
    assert_eq!(list.stdout.lines().count(), 2, "{}", list.stdout);
    assert!(list
        .stdout
        .lines()
        .last()
        .unwrap()
        .ends_with("$ jolt build bad"));
}

#[test]
fn run_logs_kept_output_results_and_traces_are_private_to_their_owner() {
    // Regression (issue 24): a failed task's kept output was 0644 in a 0755
    // directory, --result and --trace files 0644.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let ws = Workspace::with("[task.bad]\nrun = \"echo private-output; exit 1\"\n");
    // A result file readable by all, and a runs directory an older jolt made 0755.
    ws.file("r.json", "{}");
    let open = std::fs::Permissions::from_mode(0o644);
    std::fs::set_permissions(ws.root().join("r.json"), open).unwrap();
    let runs = ws.state_home().join("jolt/runs");
    std::fs::create_dir_all(&runs).unwrap();
    std::fs::set_permissions(&runs, std::fs::Permissions::from_mode(0o755)).unwrap();
    ws.jolt(&["build", "bad", "--result", "r.json", "--trace", "t.json"])
        .code(1)
        .contains("Task output kept in ");
    assert_eq!(mode(&ws.root().join("r.json")), 0o600);
    assert_eq!(mode(&ws.root().join("t.json")), 0o600);
    assert_eq!(mode(&runs), 0o700);
    let mut files = 0;
    let mut stack = vec![runs];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                assert_eq!(mode(&path), 0o700, "{}", path.display());
                stack.push(path);
            } else {
                assert_eq!(mode(&path), 0o600, "{}", path.display());
                files += 1;
            }
        }
    }
    // The run's log and the task's kept output.
    assert_eq!(files, 2);
}

/// A task that prints `lines` lines of 100 bytes, `TAG-00001 xxx...` on, then exits
/// with `code`.
fn chatty(tag: &str, lines: u32, code: u32) -> String {
    format!(
        "[task.{tag}]\nrun = \"seq -f '{tag}-%05g' 1 {lines} | sed 's/$/ {pad}/'; exit {code}\"\n",
        pad = "x".repeat(89 - tag.len())
    )
}

#[test]
fn a_run_log_keeps_a_bounded_head_and_tail_of_each_tasks_output() {
    // Regression (issue 24): a task printing 400 MB made a 400 MB run log, and its
    // kept output as much again.
    let ws = Workspace::with(&format!(
        "{}{}{}",
        chatty("one", 2000, 0),
        chatty("two", 2000, 0),
        chatty("bad", 2000, 1)
    ));
    let run = ws.jolt(&[
        "-c",
        "jolt.log_tail=8K",
        "build",
        "-k",
        "-j",
        "3",
        "one",
        "two",
        "bad",
    ]);
    run.code(1);
    // The console shows everything.
    for tag in ["one", "two", "bad"] {
        for n in [1, 1000, 2000] {
            run.contains(&format!("{tag}-{n:05} x"));
        }
    }
    let runs = ws.state_home().join("jolt/runs");
    let log = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.len() < 3 * 8192 + 4096, "{} bytes", text.len());
    for tag in ["one", "two", "bad"] {
        // Its first lines as they came, its last lines at its end, and what is between
        // said to be left out.
        assert!(text.contains(&format!("{tag}-00001 x")), "{text}");
        assert!(text.contains(&format!("{tag}-02000 x")), "{text}");
        assert!(!text.contains(&format!("{tag}-01000 x")), "{text}");
        assert!(
            text.contains(&format!(
                "of the output of {tag} left out of the run log (jolt.log_tail)"
            )),
            "{text}"
        );
    }
    // The failed task's kept output is its end.
    let kept = std::fs::read_dir(log.with_extension(""))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .next()
        .unwrap();
    assert!(kept.len() < 8192 + 1024, "{} bytes", kept.len());
    assert!(kept.starts_with("[... "), "{kept}");
    assert!(
        kept.contains("bad-02000 x") && !kept.contains("bad-01000 x"),
        "{kept}"
    );
}

#[test]
fn the_runs_directory_stays_within_jolt_log_total() {
    // Regression (issue 24): 50 runs were kept whatever their size.
    let ws = Workspace::with(&chatty("big", 20_000, 0));
    let runs = ws.state_home().join("jolt/runs");
    std::fs::create_dir_all(&runs).unwrap();
    // Three older runs of 300 KiB each.
    for second in 1..=3 {
        let old = runs.join(format!("20200101T00000{second}Z-1.log"));
        std::fs::write(old, vec![b'.'; 300 << 10]).unwrap();
    }
    let run = ws.jolt(&[
        "-c",
        "jolt.log_total=1M",
        "-c",
        "jolt.log_tail=4M",
        "build",
        "big",
    ]);
    run.success().contains("big-20000 x");
    let mut left: Vec<String> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    // The oldest went, so that the others take at most half; this run wrote up to
    // the other half of task output, and said so.
    assert_eq!(left.len(), 2, "{left:?}");
    assert_eq!(left[0], "20200101T000003Z-1.log");
    let total: u64 = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total <= (1 << 20) + 16384, "{total}");
    ws.jolt(&["log"])
        .success()
        .contains("big-00001 x")
        .lacks("big-20000 x")
        .contains("half of jolt.log_total: no more is logged");
}

#[test]
fn the_log_says_how_a_failed_command_ended_in_words() {
    let ws =
        Workspace::with("[task.code]\nrun = \"exit 3\"\n[task.killed]\nrun = \"kill -9 $$\"\n");
    ws.jolt(&["build", "code"]).code(1);
    // Regression (issue 23): the run log said `exit 3: Some(Code(3))`.
    ws.jolt(&["log"])
        .success()
        .contains("[  DEBUG] exit 3: exit code 3\n")
        .lacks("Some(");
    ws.jolt(&["build", "killed"]).code(1);
    ws.jolt(&["log"])
        .success()
        .contains("[  DEBUG] kill -9 $$: killed by signal 9\n")
        .lacks("Signal(");
}

#[test]
fn the_summary_gives_the_cache_hit_rate_and_the_slowest_tasks() {
    let ws = Workspace::with(
        "[task.a]\nrun = \"sleep 0.3\"\n[task.b]\nrun = \"true\"\n[task.all]\nkind = \"alias\"\nrequires = [\"a\", \"b\"]\n",
    );
    ws.jolt(&["build", "all"])
        .success()
        .contains("Cache hits: 0 of 2 (0%); slowest: a ")
        .contains("s, b ");
    ws.jolt(&["build", "-f", "b"]).success();
    ws.jolt(&["build", "all"])
        .success()
        .contains("Cache hits: 2 of 2 (100%)\n");
}

#[test]
fn a_task_chooses_its_shell_and_bash_fails_a_pipeline_whose_first_command_fails() {
    // Regression (issue 26): `/bin/sh` was fixed, and dash has no pipefail, so a
    // failing test piped into tee was cached as a pass.
    let ws = Workspace::with(
        "[task.sh]\nrun = \"false | tee {artifact}/log\"\n\
         [task.bash]\nshell = \"bash\"\nrun = \"false | tee {artifact}/log\"\n\
         [task.which]\nshell = \"/bin/bash\"\nrun = \"echo $BASH_VERSION > {artifact}/v\"\n\
         [task.none]\nshell = \"no-such-shell\"\nrun = \"true\"\n",
    );
    ws.jolt(&["build", "sh"]).success();
    ws.jolt(&["build", "bash"])
        .code(1)
        .contains("Command failed");
    let run = ws.jolt(&["build", "which"]);
    run.success();
    let version = std::fs::read_to_string(run.locations()[0].join("v")).unwrap();
    assert!(!version.trim().is_empty(), "not run by bash");
    ws.jolt(&["build", "none"])
        .code(1)
        .contains("Cannot run the shell 'no-such-shell' of none");
    Workspace::with("[task.bad]\nshell = \"bin/bash\"\nrun = \"true\"\n")
        .jolt(&["build", "bad"])
        .code(2)
        .contains("invalid shell 'bin/bash'");
    // A shell set is part of the task's identity; the default adds nothing.
    let id = |recipe: &str| {
        let ws = Workspace::with(recipe);
        let run = ws.jolt(&["inspect", "t"]);
        run.success().lines_with("Identity")
    };
    assert_eq!(
        id("[task.t]\nrun = \"true\"\n"),
        id("[task.t]\nrun = \"true\"\n")
    );
    assert_ne!(
        id("[task.t]\nrun = \"true\"\n"),
        id("[task.t]\nshell = \"bash\"\nrun = \"true\"\n")
    );
}
