//! Bad input: each gets a clear one-line error, its documented exit code, no panic
//! and no partial artifact.

mod util;

use util::Workspace;

const RECIPE: &str = r#"
[task.hello]
parameters.recipient = "world"
parameters.count = { default = 1, min = 1, max = 3 }
parameters.mode = { default = "debug", values = ["debug", "release"] }
run = "echo {recipient}"

[task.needs]
parameters.target = { help = "required" }
run = "echo {target}"
"#;

#[test]
fn a_toml_syntax_error_names_file_and_line() {
    let ws = Workspace::with("[task.a]\nrun = \"echo\"\nbroken = [\n");
    ws.jolt(&["build", "a"])
        .code(2)
        .contains("jolt.toml")
        .contains("line 4");
    let inc = Workspace::with("include = [\"more/*.toml\"]\n");
    inc.file("more/x.toml", "[task.b]\nrun = 'x'\n\n[task.b.oops\n");
    inc.jolt(&["build", "b"])
        .code(2)
        .contains("more/x.toml")
        .contains("line 4");
}

#[test]
fn an_unknown_key_is_a_recipe_error() {
    let ws = Workspace::with("[task.a]\nrnu = \"echo\"\n");
    ws.jolt(&["build", "a"])
        .code(2)
        .contains("jolt.toml")
        .contains("rnu")
        .contains("line 2");
}

#[test]
fn unknown_tasks_and_parameters_exit_2() {
    let ws = Workspace::with(RECIPE);
    ws.jolt(&["build", "nope"])
        .code(2)
        .contains("No such task 'nope'");
    ws.jolt(&["build", "hello:colour=red"])
        .code(2)
        .contains("No such parameter 'colour' (hello)");
    ws.jolt(&["inspect", "nope"])
        .code(2)
        .contains("No such task");
    let req = Workspace::with("[task.a]\nrequires = [\"missing\"]\n");
    req.jolt(&["build", "a"])
        .code(2)
        .contains("No such task 'missing' (required by a)");
}

#[test]
fn illegal_values_exit_2() {
    let ws = Workspace::with(RECIPE);
    ws.jolt(&["build", "hello:count=9"]).code(2).contains(
        "Illegal value '9' assigned to parameter 'count', greater than maximum value '3'",
    );
    ws.jolt(&["build", "hello:count=x"])
        .code(2)
        .contains("Illegal value 'x'");
    ws.jolt(&["build", "hello:mode=fast"])
        .code(2)
        .contains("Illegal value 'fast'");
}

#[test]
fn a_missing_required_parameter_exits_2() {
    let ws = Workspace::with(RECIPE);
    ws.jolt(&["build", "needs"])
        .code(2)
        .contains("Required parameter 'target' has not been set (needs)");
    ws.jolt(&["build", "needs:target=x"])
        .success()
        .contains("x");
}

#[test]
fn a_dependency_cycle_names_its_tasks() {
    let ws = Workspace::with(
        "[task.a]\nrequires = [\"b\"]\n[task.b]\nrequires = [\"c:n=1\"]\n[task.c]\nparameters.n = \"0\"\nrequires = [\"a\"]\n",
    );
    ws.jolt(&["build", "a"])
        .code(2)
        .contains("Dependency cycle: a -> b -> c:n=1 -> a");
}

#[test]
fn an_unknown_placeholder_names_task_and_placeholder() {
    let ws = Workspace::with("[task.a]\nrun = \"echo {recipient}\"\n");
    ws.jolt(&["build", "a"])
        .code(2)
        .contains("Unknown placeholder '{recipient}' in task 'a'");
    let strings = Workspace::with(
        "[task.d]\nstrings = { v = \"1\" }\n[task.a]\nrequires = [\"d\"]\nrun = \"echo {deps.d.strings.nope}\"\n",
    );
    strings
        .jolt(&["build", "a"])
        .code(2)
        .contains("{deps.d.strings.nope}");
}

#[test]
fn a_failing_command_exits_1_and_leaves_no_artifact() {
    let ws = Workspace::with(
        "[task.bad]\nrun = [\"echo partial > {artifact}/f\", \"false\", \"echo never\"]\n",
    );
    let run = ws.jolt(&["build", "bad"]);
    run.code(1)
        .contains("[  ERROR] Command failed: false")
        .contains("Execution failed after")
        .lacks("never");
    assert!(ws.artifacts("bad").is_empty());
    assert!(ws.staging_leftovers().is_empty());
}

#[test]
fn a_publish_glob_that_matches_nothing_fails_the_task() {
    let ws = Workspace::with("[task.p]\nrun = \"true\"\npublish = [\"*.so\"]\n");
    ws.jolt(&["build", "p"])
        .code(1)
        .contains("Publish rule '*.so' matched no files");
    assert!(ws.artifacts("p").is_empty());
    assert!(ws.staging_leftovers().is_empty());
}

#[test]
fn a_missing_workspace_is_a_usage_error() {
    let ws = Workspace::new();
    ws.jolt(&["build", "x"])
        .code(2)
        .contains("No jolt.toml found");
}

#[test]
fn bad_command_lines_exit_2() {
    let ws = Workspace::with(RECIPE);
    ws.jolt(&["build", "--bogus"]).code(2);
    ws.jolt(&["frobnicate"]).code(2);
    ws.jolt(&["-c", "nonsense", "build", "hello"])
        .code(2)
        .contains("nonsense");
    ws.jolt(&["-c", "jolt.cachesize=lots", "build", "hello"])
        .code(2)
        .contains("jolt.cachesize");
}

#[test]
fn a_timeout_kills_the_whole_process_tree() {
    let ws = Workspace::with(
        "[task.slow]\ntimeout = \"1s\"\nrun = \"sh -c 'echo $$ > {root}/child.pid; exec sleep 60' & sleep 60\"\n",
    );
    let started = std::time::Instant::now();
    ws.jolt(&["build", "slow"])
        .code(1)
        .contains("Command timeout:");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let pid: i32 = ws.read("child.pid").trim().parse().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !util::alive(pid),
        "the background child {pid} survived the timeout"
    );
    assert!(ws.artifacts("slow").is_empty());
}

#[test]
fn a_missing_cwd_is_a_task_failure_not_a_panic() {
    let ws = Workspace::with("[task.a]\ncwd = \"nowhere\"\nrun = \"true\"\n");
    ws.jolt(&["build", "a"]).code(1).contains("nowhere");
}
