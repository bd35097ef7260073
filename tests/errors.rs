//! Bad input: each gets a clear one-line error, its documented exit code, no panic
//! and no partial artifact.

use crate::util::Workspace;
use std::os::unix::process::CommandExt;

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
        !crate::util::alive(pid),
        "the background child {pid} survived the timeout"
    );
    assert!(ws.artifacts("slow").is_empty());
}

#[test]
fn a_missing_cwd_is_a_task_failure_not_a_panic() {
    let ws = Workspace::with("[task.a]\ncwd = \"nowhere\"\nrun = \"true\"\n");
    ws.jolt(&["build", "a"]).code(1).contains("nowhere");
}

// No input crashes anything (issue 9).

/// A chain of `n` tasks, `t{n-1}` requiring `t{n-2}` ... requiring `t0`; `t0` runs `bottom`.
fn chain(n: usize, bottom: &str) -> String {
    let mut recipe = format!("[task.t0]\nrun = \"{bottom}\"\n");
    for i in 1..n {
        recipe.push_str(&format!("[task.t{i}]\nrequires = [\"t{}\"]\n", i - 1));
    }
    recipe
}

#[test]
fn a_requirement_chain_thousands_deep_does_not_overflow_the_stack() {
    let ws = Workspace::with(&chain(6500, "false"));
    ws.jolt(&["inspect", "t6499"]).success();
    let display = ws.jolt(&["display", "t6499"]);
    display.success();
    assert_eq!(display.stdout.lines().count(), 6500);
    ws.jolt(&["list", "-a", "t6499"]).success();
    // Planning walks the chain down, and the failure of t0 blocks it all the way up.
    ws.jolt(&["build", "t6499"])
        .code(1)
        .contains("Command failed: false");
}

#[test]
fn a_requirement_chain_is_planned_in_memory_linear_in_its_depth() {
    use std::os::unix::process::CommandExt;
    // Regression (issue 24): every node kept its whole transitive view, and an
    // execution waited for each artifact it saw, so memory grew with the square of
    // a chain's depth: 10,000 tasks took 1 GB to plan. Now 12,000 plan within a
    // data limit of 300 MB (they take about 50), where the square would need 1.4 GB.
    let ws = Workspace::with(&chain(12_000, "true"));
    let mut cmd = ws.command(&["build", "--dry-run", "t11999"]);
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 300 << 20,
                rlim_max: 300 << 20,
            };
            match libc::setrlimit(libc::RLIMIT_DATA, &limit) {
                -1 => Err(std::io::Error::last_os_error()),
                _ => Ok(()),
            }
        });
    }
    ws.run(cmd)
        .success()
        .contains("Dry run: 12000 execute; nothing was run");
}

#[test]
fn numbers_out_of_range_are_usage_errors() {
    let ws = Workspace::with("[task.t]\ntimeout = \"18446744073709551615s\"\nrun = \"true\"\n");
    ws.jolt(&["build", "t"])
        .code(2)
        .contains("invalid timeout '18446744073709551615s'");
    let ws = Workspace::with("[task.t]\nexpires = { after = \"99999999999999999w\" }\n");
    ws.jolt(&["build", "t"])
        .code(2)
        .contains("invalid expires duration");
    let ws = Workspace::with("[task.t]\nrun = \"true\"\n");
    ws.jolt(&["build", "-j", "50000", "t"])
        .code(2)
        .contains("-j 50000");
    ws.jolt(&["-c", "jolt.jobs=-3", "build", "t"])
        .code(2)
        .contains("Illegal value '-3' for configuration key jolt.jobs");
    ws.jolt(&["-c", "jolt.jobs=0", "build", "t"]).success();
    ws.jolt(&[
        "-c",
        "http.uri=http://127.0.0.1:9",
        "-c",
        "http.timeout=99999999999999",
        "build",
        "t",
    ])
    .code(2)
    .contains("http.timeout");
    let max = i64::MAX;
    let ws = Workspace::with(&format!(
        "[task.a]\nweight = {max}\n[task.b]\nrequires = [\"a\"]\nweight = {max}\n"
    ));
    ws.jolt(&["build", "b"]).success();
}

fn mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn a_fifo_among_influence_or_published_files_fails_instead_of_blocking() {
    let ws = Workspace::with("[task.t]\ninfluence = [\"src/*\"]\nrun = \"true\"\n");
    ws.file("src/a.c", "a");
    mkfifo(&ws.root().join("src/pipe"));
    ws.jolt(&["inspect", "t"])
        .code(2)
        .contains("influence file src/pipe is not a regular file (a fifo)");
    ws.jolt(&["build", "t"]).code(2).contains("src/pipe");

    let ws = Workspace::with(
        "[task.p]\nrun = \"mkfifo {builddir}/out\"\npublish = [{ files = \"out\", cwd = \"{builddir}\" }]\n",
    );
    ws.jolt(&["build", "p"])
        .code(1)
        .contains("not a regular file (a fifo)");
    let ws = Workspace::with("[task.p]\nrun = \"mkfifo {artifact}/out\"\n");
    ws.jolt(&["build", "p"]).code(1).contains("is a fifo");
}

#[test]
fn a_huge_output_line_takes_bounded_memory() {
    // 200 MB without a newline: once held whole, twice over (788 MB for 400 MB).
    let ws = Workspace::with(
        "[task.t]\nrun = \"head -c 200000000 /dev/zero | tr '\\\\000' x; echo; echo done\"\n",
    );
    let (run, peak_kb) = with_peak(ws.spawn(&["-q", "build", "t"]));
    run.success();
    assert!(peak_kb < 100_000, "jolt peaked at {peak_kb} kB");
    let artifact = &ws.artifacts("t")[0];
    let log = std::fs::metadata(artifact.join(".build.log")).unwrap();
    assert_eq!(log.len(), 200_000_000 + 1 + 5, "the log keeps every byte");
}

// No process of a task outlives the jolt that started it (issue 9).

/// A task whose background grandchild ignores SIGTERM and records its pid.
const STUBBORN: &str = "[task.t]\nrun = \"sh -c \\\"trap '' TERM; echo \\\\$\\\\$ > {root}/grandchild.pid; exec sleep 300\\\" & wait\"\n";

fn grandchild(ws: &Workspace) -> i32 {
    crate::util::wait_until(
        "the task's background process",
        std::time::Duration::from_secs(30),
        || ws.read("grandchild.pid").trim().parse::<i32>().is_ok(),
    );
    ws.read("grandchild.pid").trim().parse().unwrap()
}

fn assert_dies(pid: i32, after: &str) {
    crate::util::wait_until(
        &format!("process {pid} to die after {after}"),
        std::time::Duration::from_secs(10),
        || !crate::util::alive(pid),
    );
}

#[test]
fn a_task_dies_with_a_jolt_killed_hard() {
    let ws = Workspace::with(STUBBORN);
    let mut child = ws.spawn(&["build", "t"]);
    let pid = grandchild(&ws);
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    // Regression: only the task's direct sh died; its children ran on under init.
    assert_dies(pid, "SIGKILL of jolt");
}

#[test]
fn a_task_dies_with_a_jolt_interrupted_twice() {
    let ws = Workspace::with(STUBBORN);
    let mut child = ws.spawn(&["build", "t"]);
    let pid = grandchild(&ws);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert_dies(pid, "a double Ctrl-C");
}

#[test]
fn what_a_finished_command_leaves_running_is_stopped() {
    let ws = Workspace::with(
        "[task.t]\nrun = \"sh -c 'echo $$ > {root}/grandchild.pid; exec sleep 300' & while [ ! -s {root}/grandchild.pid ]; do sleep 0.05; done\"\n",
    );
    ws.jolt(&["build", "t"]).success();
    let pid = grandchild(&ws);
    assert_dies(pid, "its command ended");
}

#[test]
fn a_directory_thousands_deep_in_an_artifact_is_handled() {
    // Regression: walking it recursively overflowed the stack (exit 134).
    let ws = Workspace::with(
        "[task.d]\nrun = \"cd {artifact} && i=0 && while [ $i -lt 1500 ]; do mkdir d && cd d && i=$((i+1)); done && echo x > f\"\n[task.c]\nrequires = [\"d\"]\nrun = \"cp -r {deps.d}/d {artifact}/copy\"\n",
    );
    ws.jolt(&["build", "c"]).success();
    ws.jolt(&["clean"]).success();
}

#[test]
fn a_task_cannot_hang_jolt_through_its_manifest_or_log() {
    for run in [
        "mkfifo {artifact}/.manifest.json",
        "rm {artifact}/.build.log && mkfifo {artifact}/.build.log",
        "rm {artifact}/.build.log && mkfifo {artifact}/.build.log && false",
        "ln -s /dev/zero {artifact}/.manifest.json",
    ] {
        let ws = Workspace::with(&format!("[task.t]\nrun = \"{run}\"\n"));
        let started = std::time::Instant::now();
        let result = ws.jolt(&["build", "t"]);
        result.code(1);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{run}"
        );
        assert!(ws.artifacts("t").is_empty(), "{run}");
    }
}

#[test]
fn parameter_values_and_task_names_that_would_read_ambiguously_are_refused() {
    // Regression: p = "x,q=y" made c:p=x,q=y... and c:q=z share an identity.
    let ws = Workspace::with("[task.c]\nparameters.p = \"x,q=y\"\nrun = \"true\"\n");
    ws.jolt(&["build", "c"])
        .code(2)
        .contains("may not contain ','");
    let id = "a".repeat(64);
    let ws = Workspace::with(&format!("[task.\"x/{id}\"]\nrun = \"true\"\n"));
    ws.jolt(&["build", &format!("x/{id}")])
        .code(2)
        .contains("invalid name");
}

#[test]
fn task_names_with_a_part_starting_with_an_underscore_are_refused() {
    // Regression (issue 24): `_recipes` and `_sources/x` were accepted, and their
    // artifacts went to the HTTP cache's `_recipes/` and `_sources/`, jolt's
    // namespace that operators open to anonymous uploads.
    for name in ["_recipes", "_sources/x", "a/_x"] {
        let ws = Workspace::new();
        ws.file(
            "jolt.toml",
            "include = [\"sub/*.toml\"]\n[task.ok]\nrun = \"true\"\n",
        )
        .file(
            "sub/more.jolt.toml",
            &format!("[task.\"{name}\"]\nrun = \"true\"\n"),
        );
        ws.jolt(&["build", "ok"])
            .code(2)
            .contains(&format!("Task '{name}' in sub/more.jolt.toml"))
            .contains("starting with '_'");
    }
}

/// `jolt build TASK`, held by the test hook between each command's start and its
/// registration with the guardian (a minute: the test kills it meanwhile).
fn held_mid_start(ws: &Workspace, task: &str) -> std::process::Child {
    ws.command(&["build", task])
        .env("JOLT_TEST_SPAWN_PAUSE_MS", "60000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_task_dies_with_a_jolt_killed_between_its_start_and_its_registration() {
    // A task started with posix_spawn runs before jolt tells the guardian its
    // process group; the hook holds jolt in that instant.
    let ws = Workspace::with("[task.t]\nrun = \"echo $$ > {root}/leader.pid; exec sleep 300\"\n");
    let mut child = held_mid_start(&ws, "t");
    crate::util::wait_until(
        "the task's shell",
        std::time::Duration::from_secs(30),
        || ws.read("leader.pid").trim().parse::<i32>().is_ok(),
    );
    let pid: i32 = ws.read("leader.pid").trim().parse().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    // Regression: with posix_spawn and no announcement, it ran on under init.
    assert_dies(pid, "SIGKILL of jolt before it registered the task");
}

#[test]
fn a_jolt_killed_while_starting_a_command_kills_it_and_spares_the_users_other_jobs() {
    // Regression (issue 24): killed in the instant between a start and its
    // registration, jolt left its guardian to kill the whole process group of any
    // process of its session that had been handed to jolt's reaper since the
    // announcement, leader or not: a user's job, leader and all, died in 4 runs of 12.
    // Here the job leaves a process to the reaper in that instant, every time.
    let ws = Workspace::with("[task.t]\nrun = \"echo $$ > {root}/leader.pid; exec sleep 300\"\n");
    let number = |file: &str| ws.read(file).trim().parse::<i32>().ok();
    let wait = |what: &str, file: &str| {
        crate::util::wait_until(what, std::time::Duration::from_secs(30), || {
            number(file).is_some()
        });
        number(file).unwrap()
    };
    for run in 0..12 {
        for file in ["leader.pid", "job.child", "job.left"] {
            let _ = std::fs::remove_file(ws.root().join(file));
        }
        // The user's job, in a process group of its own in this (jolt's) session: a
        // leader and its child, started before jolt and, even by the clock's ticks,
        // before what jolt announces.
        let mut job = std::process::Command::new("sh")
            .args(["-c", "sleep 300 & echo $! > job.child; wait"])
            .current_dir(ws.root())
            .process_group(0)
            .spawn()
            .unwrap();
        let leader = job.id() as i32;
        let child = wait("the job's child", "job.child");
        let newest = start_tick(leader).max(start_tick(child));
        crate::util::wait_until(
            "the next clock tick",
            std::time::Duration::from_secs(10),
            || boot_ticks() > newest,
        );
        let mut jolt = held_mid_start(&ws, "t");
        let command = wait("the task's shell", "leader.pid");
        let guardian = guardian_of(jolt.id() as i32);
        // Jolt is held between the command's start and its registration. The job
        // starts a process there and leaves it to the reaper, jolt's reaper too.
        let mut left = std::process::Command::new("sh")
            .args(["-c", "sleep 300 & echo $! > job.left"])
            .current_dir(ws.root())
            .process_group(leader)
            .spawn()
            .unwrap();
        left.wait().unwrap();
        let orphan = wait("the job's process left to the reaper", "job.left");
        unsafe { libc::kill(jolt.id() as i32, libc::SIGKILL) };
        let _ = jolt.wait();
        assert_dies(command, "SIGKILL of jolt before it registered the task");
        // Whatever the guardian kills, it has killed once it is gone.
        assert_dies(guardian, "SIGKILL of jolt");
        for (what, pid) in [("leader", leader), ("child", child), ("process", orphan)] {
            assert!(
                untouched(pid),
                "run {run}: the guardian killed the user's job ({what} {pid})"
            );
        }
        unsafe { libc::kill(-leader, libc::SIGKILL) };
        let _ = job.wait();
    }
}

/// The jolt guardian whose parent is `jolt`.
fn guardian_of(jolt: i32) -> i32 {
    let find = || {
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .find_map(|entry| {
                let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
                let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
                (comm.trim() == "jolt-guardian" && stat_field(pid, 1)? == jolt as u64)
                    .then_some(pid)
            })
    };
    crate::util::wait_until(
        "jolt's guardian",
        std::time::Duration::from_secs(30),
        || find().is_some(),
    );
    find().unwrap()
}

/// Field `index` of `/proc/PID/stat`, counted from the state (0) after the name.
fn stat_field(pid: i32, index: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(index)?.parse().ok()
}

/// When `pid` started, in clock ticks since boot.
fn start_tick(pid: i32) -> u64 {
    stat_field(pid, 19).expect("a start time")
}

/// Clock ticks since boot, as `/proc/PID/stat` counts a start.
fn boot_ticks() -> u64 {
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u128;
    let nanos = now.tv_sec as u128 * 1_000_000_000 + now.tv_nsec as u128;
    (nanos * hz / 1_000_000_000) as u64
}

/// Whether `pid` runs and nobody has sent it SIGKILL: none pending (the instant a
/// kill returns), and not exiting (once the process took it).
fn untouched(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kill = 1u64 << (libc::SIGKILL - 1);
    let pending = status
        .lines()
        .filter_map(|line| {
            let mask = line
                .strip_prefix("SigPnd:")
                .or_else(|| line.strip_prefix("ShdPnd:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .any(|mask| mask & kill != 0);
    // PF_EXITING, in the flags (field 9).
    let exiting = stat_field(pid, 6).is_none_or(|flags| flags & 0x4 != 0);
    !pending && !exiting && crate::util::alive(pid)
}

#[test]
fn a_task_reading_the_terminal_fails_instead_of_hanging() {
    // Regression: on a terminal, a command (in a background process group) that read
    // /dev/tty was stopped by SIGTTIN, and the build hung without a word.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "the test needs script (util-linux)"
        );
        return;
    }
    let ws = Workspace::with(
        "[task.prompt]\ncacheable = false\nrun = \"read x < /dev/tty; echo read-done\"\n[task.stty]\ncacheable = false\nrun = \"stty -echo < /dev/tty; stty echo < /dev/tty; echo stty-done\"\n",
    );
    let jolt = env!("CARGO_BIN_EXE_jolt");
    for (task, code) in [("prompt", 1), ("stty", 0)] {
        let line = format!("{jolt} build {task}; echo exit=$?");
        let cmd = {
            let mut c = std::process::Command::new("script");
            c.args(["-qec", &line, "/dev/null"]);
            c
        };
        let mut cmd = cmd;
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let child = ws.spawn_command(cmd);
        let pid = child.id() as i32;
        // A hang ends in 30 s (the pty closes, jolt gets SIGHUP) and fails the test.
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let killer = std::thread::spawn(move || {
            if finished
                .recv_timeout(std::time::Duration::from_secs(30))
                .is_err()
            {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        let run = crate::util::finish(child);
        let _ = done.send(());
        killer.join().unwrap();
        run.contains(&format!("exit={code}"));
    }
}

#[test]
fn a_process_left_running_does_not_write_into_a_committed_artifact() {
    // Regression: output of a daemon a task left behind (setsid escapes its group)
    // was appended to the task's .build.log after the artifact was committed.
    let ws = Workspace::with(
        "[task.d]\nrun = \"setsid sh -c 'echo $$ > {root}/daemon.pid; sleep 3; echo late-line' & echo launched\"\n[task.slow]\nrun = \"sleep 5\"\n[task.both]\nkind = \"alias\"\nrequires = [\"d\", \"slow\"]\n",
    );
    ws.jolt(&["build", "-j", "2", "both"]).success();
    if let Ok(pid) = ws.read("daemon.pid").trim().parse::<i32>() {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let log = std::fs::read_to_string(ws.artifacts("d")[0].join(".build.log")).unwrap();
    assert!(
        log.contains("launched") && !log.contains("late-line"),
        "{log}"
    );
}

#[test]
fn ctrl_c_while_output_drains_stops_at_once_and_runs_no_further_command() {
    // Regression: Ctrl-C during the 2 s a command's leftover output drains went
    // unnoticed until its end, and the task's next command was started.
    let ws = Workspace::with(
        "[task.c]\ncacheable = false\nrun = [\"touch {root}/first; sleep 100 & echo x\", \"touch {root}/second; sleep 50\"]\n",
    );
    let mut child = ws.spawn(&["build", "c"]);
    crate::util::wait_until(
        "the first command",
        std::time::Duration::from_secs(30),
        || ws.root().join("first").exists(),
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    interrupt_stops_at_once(&mut child);
    assert!(!ws.root().join("second").exists(), "the next command ran");
}

#[test]
fn jolt_as_pid_1_reaps_what_its_tasks_leave_behind() {
    // Regression: in a container jolt is PID 1 (the worker image has no init), and
    // every process a task left behind became a zombie for the container's life.
    let mut recipe = String::new();
    for i in 0..20 {
        recipe.push_str(&format!(
            "[task.z{i}]\nrun = \"(sleep 0.1 &) ; echo z{i}\"\n"
        ));
    }
    let reqs: Vec<String> = (0..20).map(|i| format!("\"z{i}\"")).collect();
    recipe.push_str(&format!(
        "[task.last]\nrequires = [{}]\nrun = \"sleep 2.5; grep -lE '^[0-9]+ [(][^)]*[)] Z' /proc/[0-9]*/stat 2>/dev/null | wc -l > {{root}}/zombies\"\n",
        reqs.join(", ")
    ));
    let ws = Workspace::with(&recipe);
    let can = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !can {
        assert!(
            std::env::var_os("CI").is_none(),
            "unshare --pid needs root, which CI has"
        );
        return;
    }
    let jolt = env!("CARGO_BIN_EXE_jolt");
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--pid",
        "--fork",
        "--mount-proc",
        jolt,
        "build",
        "-j",
        "8",
        "last",
    ]);
    crate::util::finish(ws.spawn_command(cmd)).success();
    assert_eq!(ws.read("zombies").trim(), "0");
}

#[test]
fn read_only_directories_a_task_leaves_are_removed_all_the_same() {
    // Regression: as a user other than root (the worker image's), a task that left a
    // read-only directory leaked its build or staging directory, and `jolt clean`
    // failed on its artifact with "Permission denied".
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "the test runs jolt as nobody: CI is root"
        );
        return;
    }
    let ro = "mkdir -p {d}/ro/sub && touch {d}/ro/sub/f && chmod 555 {d}/ro/sub {d}/ro";
    let ws = Workspace::with(&format!(
        "[task.ro]\nrun = \"{}; echo ok > {{artifact}}/o\"\n[task.roart]\nrun = \"{}\"\n[task.rofail]\nrun = \"{}; false\"\n",
        ro.replace("{d}", "{builddir}"),
        ro.replace("{d}", "{artifact}"),
        ro.replace("{d}", "{artifact}"),
    ));
    let base = ws.root().parent().unwrap().to_path_buf();
    let chown = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&base)
        .status()
        .unwrap();
    assert!(chown.success());
    let as_nobody = |args: &[&str]| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_jolt"))
            .args(args)
            .env("HOME", &base);
        crate::util::finish(ws.spawn_command(cmd))
    };
    as_nobody(&["build", "ro"]).success();
    as_nobody(&["build", "roart"]).success();
    as_nobody(&["build", "rofail"]).code(1);
    let leftovers: Vec<String> = std::fs::read_dir(ws.cachedir().join(".tmp"))
        .unwrap()
        .chain(std::fs::read_dir(ws.cachedir().join("rofail")).unwrap())
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    as_nobody(&["clean"]).success();
    assert!(ws.artifacts("roart").is_empty());
}

/// Waits for `child`, sampling its peak resident memory (kB) meanwhile.
fn with_peak(child: std::process::Child) -> (crate::util::Run, u64) {
    let pid = child.id();
    let peak = std::thread::spawn(move || {
        let mut peak = 0u64;
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
            peak = peak.max(hwm);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peak
    });
    let run = crate::util::finish(child);
    (run, peak.join().unwrap())
}

#[test]
fn many_output_lines_take_bounded_memory() {
    // Regression: lines were queued for the console without bound: 109 MB of
    // output peaked at 1.27 GB (found by an attack review).
    let ws = Workspace::with("[task.t]\ncacheable = false\nrun = \"seq 1 1500000\"\n");
    let (run, peak_kb) = with_peak(ws.spawn(&["build", "t"]));
    run.success().contains("[   INFO] Execution finished");
    assert!(run.stdout.contains("\n1499999\n"), "lines were lost");
    assert!(peak_kb < 60_000, "jolt peaked at {peak_kb} kB");
}

#[test]
fn ctrl_c_while_influence_files_are_hashed_stops_at_once() {
    // Regression: Ctrl-C waited for the hashing to end (a 40 GB file: 65 s).
    let ws = Workspace::with("[task.t]\ninfluence = [\"big.bin\"]\nrun = \"true\"\n");
    let big = std::fs::File::create(ws.root().join("big.bin")).unwrap();
    big.set_len(16 << 30).unwrap(); // sparse: 16 GiB of zeros to read
    let mut child = ws.spawn(&["build", "t"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    interrupt_stops_at_once(&mut child);
}

/// Sends Ctrl-C to a running jolt: it must exit 130 within 1.5 s.
#[track_caller]
fn interrupt_stops_at_once(child: &mut std::process::Child) {
    let sent = std::time::Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        sent.elapsed() < std::time::Duration::from_millis(1500),
        "{:?}",
        sent.elapsed()
    );
}

#[test]
fn recipes_beyond_the_limits_exit_2_quickly_naming_the_limit() {
    // Regression (issue 24): nothing bounded what a recipe could make jolt hold. A
    // binary tree of parameter values: 262,143 tasks from 18 definitions.
    let tree = crate::util::parameter_tree(17);
    // A task requiring itself with a parameter that doubles: memory ran out within
    // seconds, the chain being a few dozen tasks long.
    let doubling = "[task.c]\nparameters.p = \"x\"\nrequires = [\"c:p={p}{p}\"]\n";
    let large = format!("[task.big]\n# {}\n", "x".repeat(16 << 20));
    for (recipe, goal, error) in [
        (
            tree.as_str(),
            "l0",
            "jolt.toml: the graph of 'l0' has more than 100000 tasks (the limit)",
        ),
        (
            doubling,
            "c",
            "jolt.toml: task 'c' requires a reference longer than 4096 bytes (the limit)",
        ),
        (
            large.as_str(),
            "big",
            "jolt.toml: the recipes are larger than 16777216 bytes (the limit)",
        ),
    ] {
        let ws = Workspace::with(recipe);
        let start = std::time::Instant::now();
        ws.jolt(&["build", goal]).code(2).contains(error);
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{goal}: {:?}",
            start.elapsed()
        );
    }
}
