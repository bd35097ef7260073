//! Influence files must hold, once a task's commands are done, the content its
//! identity was computed from (issue 24): else nothing is committed or uploaded.

use crate::util::{cluster, Nginx, Workspace};

const CHANGED: &str = "Influence changed during the build: data/in.txt (copy)";

/// A task that rewrites its own influence file with `new`, then copies it.
fn rewriting(new: &str) -> Workspace {
    let ws = Workspace::with(&format!(
        "[task.copy]\ninfluence = [\"data/in.txt\"]\nrun = \"echo {new} > data/in.txt; cp data/in.txt {{artifact}}/out.txt\"\n"
    ));
    ws.file("data/in.txt", "A\n");
    ws
}

#[test]
fn an_influence_file_changed_while_the_task_ran_fails_it_and_nothing_is_committed() {
    // Regression (issue 24): a file edited while its task ran (an editor's save) left
    // an artifact built from the new content filed under the old content's identity.
    for aged in [true, false] {
        let ws = rewriting("B");
        if aged {
            // Checked by its metadata; a file modified just now is hashed again.
            ws.age("data/in.txt");
        }
        ws.jolt(&["build", "copy"])
            .code(1)
            .contains(CHANGED)
            .lacks("Execution finished");
        assert!(ws.artifacts("copy").is_empty(), "aged: {aged}");
        assert!(ws.staging_leftovers().is_empty(), "aged: {aged}");
    }
}

#[test]
fn an_influence_file_rewritten_with_the_same_content_is_unchanged() {
    let ws = rewriting("A");
    ws.age("data/in.txt");
    ws.jolt(&["build", "copy"]).success().lacks(CHANGED);
    assert_eq!(ws.artifacts("copy").len(), 1);
    // An influence file that vanished has changed too.
    let ws =
        Workspace::with("[task.gone]\ninfluence = [\"data/in.txt\"]\nrun = \"rm data/in.txt\"\n");
    ws.file("data/in.txt", "A\n").age("data/in.txt");
    ws.jolt(&["build", "gone"])
        .code(1)
        .contains("Influence changed during the build: data/in.txt (gone)");
    assert!(ws.artifacts("gone").is_empty());
}

#[test]
fn an_influence_file_changed_while_the_task_ran_is_not_uploaded() {
    let Some(server) = Nginx::start() else { return };
    let ws = rewriting("B");
    ws.age("data/in.txt").file(
        "jolt.conf.toml",
        &format!("[http]\nuri = \"{}/cache\"\n", server.url),
    );
    ws.jolt(&["-c", "jolt.conf.toml", "build", "copy"])
        .code(1)
        .contains(CHANGED)
        .lacks("Upload started");
    assert!(server.objects().is_empty(), "{:?}", server.objects());
}

#[test]
fn a_worker_fails_a_task_whose_influence_file_changed_while_it_ran() {
    // Workers run tasks with the same executor: the check is the same code path.
    let Some(c) = cluster() else { return };
    let _w = c.worker();
    let ws = rewriting("B");
    ws.age("data/in.txt");
    c.build(&ws, &["copy"])
        .code(1)
        .contains(CHANGED)
        .contains("Remote execution failed");
    let uploaded: Vec<String> = c
        .server
        .objects()
        .into_iter()
        .filter(|o| o.starts_with("cache/copy/"))
        .collect();
    assert!(uploaded.is_empty(), "{uploaded:?}");
}
