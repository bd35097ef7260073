//! The local cache shared by processes: locking, trimming, expiry, cleaning, interrupts.

use crate::util::{finish_within, wait_until, Workspace};
use std::time::Duration;

#[test]
fn two_builds_of_one_task_at_once_execute_it_once() {
    let ws = Workspace::with(
        "[task.slow]\nrun = [\"echo run >> {root}/count\", \"sleep 1\", \"echo done > {artifact}/f\"]\n",
    );
    let a = ws.spawn(&["build", "slow"]);
    std::thread::sleep(Duration::from_millis(100));
    let b = ws.spawn(&["build", "slow"]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success());
    assert_eq!(ws.read("count"), "run\n", "executed exactly once");
    let out_b = String::from_utf8_lossy(&b.stdout);
    let out_a = String::from_utf8_lossy(&a.stdout);
    let loc = |s: &str| {
        s.lines()
            .find(|l| l.contains("Location:"))
            .map(str::to_string)
    };
    assert_eq!(loc(&out_a), loc(&out_b));
    assert!(out_a.contains("Execution started") != out_b.contains("Execution started"));
}

#[test]
fn the_cache_is_trimmed_least_recently_used_first() {
    let ws = Workspace::with(
        "[task.a]\nrun = \"head -c 4000 /dev/zero > {artifact}/f\"\n[task.b]\nrun = \"head -c 4000 /dev/zero > {artifact}/f\"\n[task.c]\nrun = \"head -c 4000 /dev/zero > {artifact}/f\"\n",
    );
    ws.jolt(&["build", "a"]).success();
    std::thread::sleep(Duration::from_millis(20));
    ws.jolt(&["build", "b"]).success();
    std::thread::sleep(Duration::from_millis(20));
    ws.jolt(&["build", "a"]).success(); // a is now more recently used than b
    ws.jolt(&["-c", "jolt.cachesize=9000", "build", "c"])
        .success();
    assert_eq!(ws.artifacts("a").len(), 1);
    assert!(
        ws.artifacts("b").is_empty(),
        "b was the least recently used"
    );
    assert_eq!(ws.artifacts("c").len(), 1);
}

#[test]
fn a_build_never_evicts_what_it_uses() {
    let ws = Workspace::with(
        "[task.dep]\nrun = \"head -c 4000 /dev/zero > {artifact}/f\"\n[task.top]\nrequires = [\"dep\"]\nrun = \"head -c 4000 /dev/zero > {artifact}/f\"\n",
    );
    let run = ws.jolt(&["-c", "jolt.cachesize=0", "build", "top"]);
    run.success();
    assert_eq!(ws.artifacts("dep").len(), 1);
    assert_eq!(ws.artifacts("top").len(), 1);
    // The next process does not use them: its commit evicts them.
    ws.file("jolt.toml", "[task.other]\nrun = \"true\"\n");
    ws.jolt(&["-c", "jolt.cachesize=0", "build", "other"])
        .success();
    assert!(ws.artifacts("dep").is_empty());
    assert!(ws.artifacts("top").is_empty());
}

#[test]
fn artifacts_that_never_expire_survive_trimming_and_clean_expired() {
    let ws = Workspace::with(
        "[task.keep]\nexpires = \"never\"\nrun = \"echo x > {artifact}/f\"\n[task.drop]\nrun = \"echo x > {artifact}/f\"\n[task.other]\nrun = \"true\"\n",
    );
    ws.jolt(&["build", "keep", "drop"]).success();
    ws.jolt(&["clean", "--expired"]).success();
    assert_eq!(ws.artifacts("keep").len(), 1);
    assert!(ws.artifacts("drop").is_empty());
    ws.jolt(&["-c", "jolt.cachesize=0", "build", "other"])
        .success();
    assert_eq!(ws.artifacts("keep").len(), 1);
    ws.jolt(&["clean"]).success();
    assert!(
        ws.artifacts("keep").is_empty(),
        "clean without --expired removes everything"
    );
}

#[test]
fn expires_after_is_honoured() {
    let ws = Workspace::with(
        "[task.short]\nexpires = { after = \"1s\" }\nrun = \"echo x > {artifact}/f\"\n[task.long]\nexpires = { unused_for = \"1h\" }\nrun = \"echo x > {artifact}/f\"\n",
    );
    ws.jolt(&["build", "short", "long"]).success();
    ws.jolt(&["clean", "--expired"]).success();
    assert_eq!(ws.artifacts("short").len(), 1, "not yet expired");
    std::thread::sleep(Duration::from_millis(2100));
    ws.jolt(&["clean", "--expired"]).success();
    assert!(ws.artifacts("short").is_empty());
    assert_eq!(ws.artifacts("long").len(), 1);
}

#[test]
fn clean_with_tasks_removes_only_their_artifacts() {
    let ws =
        Workspace::with("[task.a]\nrun = \"true\"\n[task.b]\nrequires = [\"a\"]\nrun = \"true\"\n");
    ws.jolt(&["build", "b"]).success();
    ws.jolt(&["clean", "b"]).success();
    assert!(ws.artifacts("b").is_empty());
    assert_eq!(ws.artifacts("a").len(), 1);
    ws.jolt(&["build", "b"]).success();
    ws.jolt(&["clean", "--deps", "b"]).success();
    assert!(ws.artifacts("a").is_empty());
}

#[test]
fn interrupt_stops_commands_keeps_the_cache_consistent_and_exits_130() {
    let ws = Workspace::with(
        "[task.fast]\nrun = \"echo ok > {artifact}/f\"\n[task.slow]\nrequires = [\"fast\"]\nrun = [\"echo > {artifact}/partial\", \"echo $$ > {root}/pid; sleep 60\"]\n",
    );
    let child = ws.spawn(&["build", "slow"]);
    wait_until("slow to start", Duration::from_secs(20), || {
        !ws.read("pid").trim().is_empty()
    });
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: i32 = ws.read("pid").trim().parse().unwrap();
    assert!(!crate::util::alive(pid), "the command survived");
    assert_eq!(ws.artifacts("fast").len(), 1, "finished work is kept");
    assert!(ws.artifacts("slow").is_empty());
    assert!(ws.staging_leftovers().is_empty());
    ws.jolt(&["build", "fast"])
        .success()
        .lacks("Execution started");
}

#[test]
fn interrupt_ends_a_build_whose_output_nobody_reads() {
    use std::os::fd::AsRawFd;
    let ws = Workspace::with(
        "[task.chatty]\nrun = [\"echo > {artifact}/partial\", \"echo $$ > {root}/pid; yes chatty\"]\n",
    );
    let (unread, output) = std::io::pipe().unwrap();
    let probe = output.try_clone().unwrap();
    let mut cmd = ws.command(&["build", "chatty"]);
    cmd.stdout(output).stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    drop(cmd);
    wait_until(
        "jolt's output pipe to fill",
        Duration::from_secs(20),
        || {
            let mut fds = [libc::pollfd {
                fd: probe.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            }];
            // Not writable: every page of the pipe is in use, and jolt's writes wait.
            // SAFETY: one pollfd we own, no waiting.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) == 0 }
        },
    );
    let pid: i32 = ws.read("pid").trim().parse().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    // Regression (issue 23): the console's write blocked on the full pipe, holding
    // its lock; the scheduler waited for it, and a Ctrl-C changed nothing.
    let run = finish_within(
        child,
        Duration::from_secs(10),
        "jolt with its output unread",
    );
    drop((unread, probe));
    run.code(130);
    assert!(!crate::util::alive(pid), "the command survived");
    assert!(ws.artifacts("chatty").is_empty());
    assert!(ws.staging_leftovers().is_empty());
}

#[test]
fn a_build_whose_output_reader_went_away_builds_nothing_more_and_exits_141() {
    use std::io::BufRead;
    let ws = Workspace::with(
        "[task.first]\nrun = \"while [ ! -e {root}/go ]; do sleep 0.01; done\"\n[task.second]\nrequires = [\"first\"]\nrun = \"touch {root}/second-ran\"\n",
    );
    let mut child = ws.spawn(&["build", "-j", "1", "second"]);
    // `jolt build second | head -1`
    let mut head = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    head.read_line(&mut line).unwrap();
    assert!(line.contains("Execution started (first "), "{line}");
    drop(head);
    ws.file("go", "");
    // Regression (issue 23): EPIPE was ignored, and jolt built on.
    let run = finish_within(child, Duration::from_secs(20), "jolt without a reader");
    run.code(141);
    assert_eq!(run.stderr, "", "not quiet");
    assert!(!ws.root().join("second-ran").exists(), "the rest was built");
    assert!(ws.artifacts("second").is_empty());
    // What finished is kept, as after a Ctrl-C.
    assert_eq!(ws.artifacts("first").len(), 1);
    assert!(ws.staging_leftovers().is_empty());
    ws.jolt(&["log"])
        .success()
        .contains("The reader of jolt's output went away (broken pipe): stopping");
}

#[test]
fn a_build_whose_output_reader_went_away_stops_its_commands() {
    use std::io::BufRead;
    let ws = Workspace::with(
        "[task.long]\nrun = [\"echo > {artifact}/partial\", \"echo $$ > {root}/pid; while [ ! -e {root}/go ]; do sleep 0.01; done; echo more; sleep 60\"]\n",
    );
    let mut child = ws.spawn(&["build", "long"]);
    let mut head = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    head.read_line(&mut line).unwrap();
    assert!(line.contains("Execution started (long "), "{line}");
    drop(head);
    ws.file("go", "");
    // The line `more` finds no reader: the build stops as after a Ctrl-C.
    let run = finish_within(child, Duration::from_secs(20), "jolt without a reader");
    run.code(141);
    assert_eq!(run.stderr, "", "not quiet");
    let pid: i32 = ws.read("pid").trim().parse().unwrap();
    assert!(!crate::util::alive(pid), "the command survived");
    assert!(ws.artifacts("long").is_empty());
    assert!(ws.staging_leftovers().is_empty());
}

// Caches that heal themselves (issue 9).

#[test]
fn an_artifact_with_an_unreadable_manifest_is_rebuilt_and_cleanable() {
    let ws = Workspace::with(
        "[task.a]\nrun = \"echo a > {artifact}/a\"\n[task.b]\nrequires = [\"a\"]\nrun = \"cat {deps.a}/a > {artifact}/b\"\n",
    );
    let first = ws.jolt(&["build", "a"]);
    first.success();
    let dir = first.locations()[0].clone();
    for broken in ["", "{\"task\": \"a\", \"identi", "not json"] {
        // A crash can leave one: commits are not synced.
        std::fs::write(dir.join(".manifest.json"), broken).unwrap();
        // Regression: "build a" said cached, and every consumer failed with
        // "Artifact of 'a' is unusable".
        ws.jolt(&["build", "b", "-f"])
            .success()
            .contains("Removed the unusable artifact")
            .contains("Execution started (a ");
        assert!(ws.artifacts("a")[0].join(".manifest.json").is_file());
    }
    std::fs::write(dir.join(".manifest.json"), "").unwrap();
    ws.jolt(&["clean", "a"])
        .success()
        .contains("Removed 1 artifacts");
    assert!(ws.artifacts("a").is_empty());
}

#[test]
fn a_fully_cached_build_succeeds_on_a_full_disk() {
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "this test needs root under CI (it mounts a small tmpfs)"
        );
        eprintln!("skipping: needs root to mount a tmpfs");
        return;
    }
    let ws = Workspace::with("[task.a]\nrun = \"echo a > {artifact}/a\"\n");
    let disk = ws.dir.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount -t tmpfs failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(disk.clone());
    let cache = disk.join("cache");
    let cachedir = format!("jolt.cachedir={}", cache.display());
    ws.jolt(&["-c", &cachedir, "build", "a"]).success();
    // Fill the disk to the last byte.
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", disk.join("filler").display()))
        .stderr(std::process::Stdio::null())
        .status();
    // Regression: recording the artifact's use failed the build.
    ws.jolt(&["-c", &cachedir, "build", "a"])
        .success()
        .contains("Cannot record artifact use")
        .lacks("Execution started");
}

#[test]
fn a_manifest_replaced_by_a_fifo_or_a_device_heals_instead_of_hanging() {
    let ws = Workspace::with("[task.a]\nrun = \"echo a > {artifact}/a\"\n");
    for replace in ["fifo", "/dev/zero"] {
        let dir = ws.jolt(&["build", "a"]).locations()[0].clone();
        let manifest = dir.join(".manifest.json");
        std::fs::remove_file(&manifest).unwrap();
        if replace == "fifo" {
            let c = std::ffi::CString::new(manifest.as_os_str().as_encoded_bytes()).unwrap();
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        } else {
            std::os::unix::fs::symlink(replace, &manifest).unwrap();
        }
        ws.jolt(&["inspect", "a"])
            .success()
            .contains("Removed the unusable artifact");
        ws.jolt(&["build", "a"])
            .success()
            .contains("Execution started (a ");
    }
}

#[test]
fn what_dead_processes_left_goes_and_clean_leaves_nothing_behind() {
    let ws = Workspace::with(
        "[task.a]\nrun = \"echo a > {artifact}/a\"\n[task.\"x/b\"]\nrun = \"echo b > {artifact}/b\"\n",
    );
    ws.jolt(&["build", "a", "x/b"]).success();
    // A build directory of a process that is gone: its .refs file is not locked.
    let dead = ws.cachedir().join(".tmp/4242-0-beef~build-a-4242-1-2");
    std::fs::create_dir_all(dead.join("sub")).unwrap();
    ws.jolt(&["build", "a"]).success();
    assert!(!dead.exists(), "a dead process's directory stayed");
    ws.jolt(&["clean"]).success();
    let left: Vec<_> = std::fs::read_dir(ws.cachedir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "clean left {left:?}");
    let locks = std::fs::read_dir(ws.cachedir().join(".locks"))
        .unwrap()
        .count();
    assert_eq!(locks, 0, "clean left lock files");
}

#[test]
fn a_requirement_changed_in_the_local_cache_is_built_again_before_a_consumer_reads_it() {
    use std::os::unix::fs::PermissionsExt;
    let ws = Workspace::with(
        "[task.lib]\nrun = \"echo genuine > {artifact}/f\"\n\
         [task.app]\nparameters.n = \"1\"\nrequires = [\"lib\"]\nrun = \"cat {deps.lib}/f > {artifact}/out\"\n",
    );
    ws.jolt(&["build", "app:n=1"]).success();
    let dir = ws.artifacts("lib")[0].clone();
    // What a task of the same user, or root, may do despite the read-only bits.
    std::fs::set_permissions(dir.join("f"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(dir.join("f"), "PWNED\n").unwrap();
    // Regression (issue 24): a consumer that executes read the changed copy, which
    // only an upload checked.
    let run = ws.jolt(&["build", "app:n=2"]);
    run.success()
        .contains("f differs from its manifest; it will be built again")
        .contains("Execution finished");
    let out = ws.artifacts("app");
    let outs: Vec<String> = out
        .iter()
        .map(|d| std::fs::read_to_string(d.join("out")).unwrap())
        .collect();
    assert_eq!(outs, vec!["genuine\n", "genuine\n"], "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(dir.join("f")).unwrap(), "genuine\n");
    // A build that uses nothing of it does not hash it.
    ws.jolt(&["build", "app:n=2"])
        .success()
        .lacks("differs from its manifest");
}

#[test]
fn a_changed_requirement_that_is_also_a_goal_is_built_again_before_a_consumer_reads_it() {
    use std::os::unix::fs::PermissionsExt;
    let ws = Workspace::with(
        "[task.lib]\nrun = \"echo genuine > {artifact}/f\"\n\
         [task.al]\nkind = \"alias\"\nrequires = [\"lib\"]\n\
         [task.app]\nparameters.n = \"1\"\nrequires = [\"lib\"]\nrun = \"cat {deps.lib}/f > {artifact}/out\"\n",
    );
    ws.jolt(&["build", "app:n=1"]).success();
    let dir = ws.artifacts("lib")[0].clone();
    std::fs::set_permissions(dir.join("f"), std::fs::Permissions::from_mode(0o644)).unwrap();
    // Planned first as a goal (or an alias's member), which reads nothing, then as
    // what the consumer reads: it is hashed all the same.
    for (goal, n) in [("lib", "2"), ("al", "3")] {
        std::fs::write(dir.join("f"), "PWNED\n").unwrap();
        let app = format!("app:n={n}");
        let run = ws.jolt(&["build", goal, &app]);
        run.success()
            .contains("f differs from its manifest; it will be built again");
        let out = ws
            .artifacts("app")
            .iter()
            .map(|d| std::fs::read_to_string(d.join("out")).unwrap())
            .collect::<Vec<_>>();
        assert!(
            out.iter().all(|o| o == "genuine\n"),
            "{goal}: {out:?}\n{}",
            run.stderr
        );
        std::fs::set_permissions(dir.join("f"), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

#[test]
fn ctrl_c_while_planning_hashes_a_large_requirement_stops_the_build_within_seconds() {
    // 512 MiB, sparse: hashing it costs CPU, not disk (seconds in a debug build).
    let ws = Workspace::with(
        "[task.big]\nrun = \"truncate -s 512M {artifact}/blob\"\n\
         [task.use]\nrequires = [\"big\"]\nrun = \"true\"\n",
    );
    ws.jolt(&["build", "big"]).success();
    // A fresh consumer executes: planning hashes big first (issue 24, item 1).
    let child = ws.spawn(&["build", "-f", "use"]);
    std::thread::sleep(Duration::from_millis(700));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    // Regression: Ctrl-C waited for every artifact to be hashed.
    let run = finish_within(child, Duration::from_secs(4), "an interrupted build");
    run.code(130).lacks("Removed the artifact");
    assert_eq!(ws.artifacts("big").len(), 1, "a genuine artifact is kept");
    ws.jolt(&["build", "big"])
        .success()
        .lacks("Execution started");
}

#[test]
fn committed_artifacts_are_read_only_and_a_task_writing_into_a_requirement_fails() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !crate::util::running_as_root("to build as another user") {
        return;
    }
    let ws = Workspace::with(
        "[task.lib]\nrun = [\"echo genuine > {artifact}/f\", \"mkdir {artifact}/d\", \"echo x > {artifact}/d/g\"]\n\
         [task.bad]\nrequires = [\"lib\"]\nrun = \"echo PWNED > {deps.lib}/f\"\n\
         [task.worse]\nrequires = [\"lib\"]\nrun = \"rm -rf {deps.lib}/d\"\n",
    );
    // As a user without root's privileges, which permission bits bind.
    let nobody = 65534;
    let status = std::process::Command::new("chown")
        .args(["-R", &format!("{nobody}:{nobody}")])
        .arg(ws.dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let as_nobody = |args: &[&str]| {
        let mut cmd = ws.command(args);
        cmd.uid(nobody).gid(nobody).env("HOME", ws.dir.path());
        ws.run(cmd)
    };
    as_nobody(&["build", "lib"]).success();
    let dir = ws.artifacts("lib")[0].clone();
    let mode = |rel: &str| {
        std::fs::symlink_metadata(dir.join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(
        (
            mode(""),
            mode("f"),
            mode("d"),
            mode("d/g"),
            mode(".manifest.json")
        ),
        (0o555, 0o444, 0o555, 0o444, 0o444)
    );
    // Regression (issue 24): a consumer wrote into its requirement's artifact, and
    // every later build used what it wrote, still reported cached.
    as_nobody(&["build", "bad"])
        .code(1)
        .contains("Permission denied");
    as_nobody(&["build", "worse"]).code(1);
    assert_eq!(std::fs::read_to_string(dir.join("f")).unwrap(), "genuine\n");
    assert!(dir.join("d/g").exists());
    // Copies are their owner's: --copy twice into one place works.
    for _ in 0..2 {
        as_nobody(&["build", "lib", "--copy", "out"]).success();
    }
    assert_eq!(mode("f"), 0o444);
    // And jolt itself still removes what it committed, and what a crash left
    // read-only: a staging directory made read-only but not renamed, and trash.
    let id = dir.file_name().unwrap().to_string_lossy().into_owned();
    let staged = dir.with_file_name(format!(".{id}.99999-0-dead.tmp"));
    let trash = ws.cachedir().join(".tmp/trash-99999-1-dead");
    for leftover in [&staged, &trash] {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&dir)
            .arg(leftover)
            .status()
            .unwrap();
        assert!(status.success());
    }
    as_nobody(&["clean"]).success();
    assert!(ws.artifacts("lib").is_empty());
    // Regression (found by an attacking helper): they stayed for ever, unseen by
    // jolt.cachesize.
    assert!(!staged.exists() && !trash.exists());
}
