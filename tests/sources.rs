//! Declared sources and tools: `kind = "git"` against bare repositories served over
//! file:// and by nginx (dumb HTTP), and `kind = "download"` of archives served by nginx.

use crate::util::{Nginx, Workspace};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.email=t@example.org",
            "-c",
            "user.name=t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A work repository and a bare clone of it at `bare`; returns the work tree.
fn repository(base: &Path, bare: &Path) -> PathBuf {
    let work = base.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q"]);
    std::fs::write(work.join("hello.c"), "int main(void) { return 0; }\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-qm", "first"]);
    git(&work, &["tag", "-a", "v1", "-m", "v1"]);
    git(
        base,
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    git(bare, &["update-server-info"]);
    work
}

fn push(work: &Path, bare: &Path, file: &str, content: &str) -> String {
    std::fs::write(work.join(file), content).unwrap();
    git(work, &["add", "."]);
    git(work, &["commit", "-qm", "change"]);
    git(work, &["push", "-q", bare.to_str().unwrap(), "main"]);
    git(bare, &["update-server-info"]);
    git(work, &["rev-parse", "HEAD"])
}

fn git_recipe(url: &str, rev: &str) -> String {
    format!(
        "[task.src]\nkind = \"git\"\nurl = \"{url}\"\nrev = \"{rev}\"\n[task.app]\nrequires = [\"src\"]\nrun = \"cat {{deps.src}}/*.c > {{artifact}}/all.c\"\n"
    )
}

#[test]
fn a_branch_is_checked_out_and_a_move_gives_a_new_identity() {
    let base = tempfile::tempdir().unwrap();
    let bare = base.path().join("repo.git");
    let work = repository(base.path(), &bare);
    let ws = Workspace::with(&git_recipe(&format!("file://{}", bare.display()), "main"));
    let first = ws.jolt(&["build", "app"]);
    first.success().contains("Execution started (src ");
    let src = ws.artifacts("src")[0].clone();
    assert!(src.join("hello.c").is_file());
    assert!(!src.join(".git").exists(), "no .git without keep_git");
    ws.jolt(&["build", "app"])
        .success()
        .lacks("Execution started");

    push(&work, &bare, "more.c", "int more;\n");
    let moved = ws.jolt(&["build", "app"]);
    moved.success().contains("Execution started (src ");
    let all = std::fs::read_to_string(moved.locations()[0].join("all.c")).unwrap();
    assert!(all.contains("int more;"), "{all}");
    assert_ne!(first.locations(), moved.locations());
}

#[test]
fn a_pinned_commit_is_never_fetched_again_once_cached() {
    let base = tempfile::tempdir().unwrap();
    let bare = base.path().join("repo.git");
    let work = repository(base.path(), &bare);
    let commit = git(&work, &["rev-parse", "HEAD"]);
    let ws = Workspace::with(&git_recipe(&format!("file://{}", bare.display()), &commit));
    ws.jolt(&["build", "app"]).success();
    std::fs::remove_dir_all(&bare).unwrap();
    ws.jolt(&["build", "app"])
        .success()
        .lacks("Execution started");
    ws.jolt(&["inspect", "-i", "src"])
        .success()
        .contains(&format!("Git: {commit}"))
        .contains(&format!("repo.git at {commit}"));
}

#[test]
fn tags_and_keep_git_work() {
    let base = tempfile::tempdir().unwrap();
    let bare = base.path().join("repo.git");
    let work = repository(base.path(), &bare);
    let tagged = git(&work, &["rev-parse", "v1^{commit}"]);
    push(&work, &bare, "later.c", "int later;\n");
    let ws = Workspace::with(&format!(
        "[task.src]\nkind = \"git\"\nurl = \"file://{}\"\nrev = \"v1\"\nkeep_git = true\n",
        bare.display()
    ));
    let run = ws.jolt(&["build", "src"]);
    run.success();
    let dir = &run.locations()[0];
    assert!(!dir.join("later.c").exists());
    assert_eq!(git(dir, &["rev-parse", "HEAD"]), tagged);
}

#[test]
fn an_unknown_revision_exits_2_and_an_unreachable_repository_exits_3() {
    let base = tempfile::tempdir().unwrap();
    let bare = base.path().join("repo.git");
    repository(base.path(), &bare);
    let url = format!("file://{}", bare.display());
    let ws = Workspace::with(&git_recipe(&url, "no-such-branch"));
    ws.jolt(&["build", "app"])
        .code(2)
        .contains("unknown revision 'no-such-branch'")
        .contains(&url)
        .contains("'src'");
    let missing = format!("file://{}/missing.git", base.path().display());
    let gone = Workspace::with(&git_recipe(&missing, "main"));
    gone.jolt(&["build", "app"])
        .code(3)
        .contains(&missing)
        .contains("'main'");
}

#[test]
fn a_repository_is_fetched_over_http() {
    let Some(server) = Nginx::start() else { return };
    let bare = server.file("git/repo.git");
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    let base = tempfile::tempdir().unwrap();
    let work = repository(base.path(), &bare);
    let url = format!("{}/git/repo.git", server.url);
    let ws = Workspace::with(&git_recipe(&url, "main"));
    ws.jolt(&["build", "app"])
        .success()
        .contains("Execution started (src ");
    let commit = push(&work, &bare, "http.c", "int http;\n");
    let run = ws.jolt(&["build", "app"]);
    run.success();
    assert!(std::fs::read_to_string(run.locations()[0].join("all.c"))
        .unwrap()
        .contains("int http;"));
    ws.jolt(&["inspect", "-i", "src"])
        .success()
        .contains(&format!("Git: {commit}"));
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A gzipped tarball of a tool `tool/bin/say` served by `server` at `name`.
fn tool_tarball(server: &Nginx, name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("tool/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("say"), "#!/bin/sh\necho \"tool says $*\"\n").unwrap();
    Command::new("chmod")
        .args(["+x", bin.join("say").to_str().unwrap()])
        .status()
        .unwrap();
    let out = server.file(name);
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let status = Command::new("tar")
        .args([
            "-czf",
            out.to_str().unwrap(),
            "-C",
            dir.path().to_str().unwrap(),
            "tool",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    sha256(&out)
}

fn download_recipe(url: &str, sha: &str) -> String {
    format!(
        "[task.tool]\nkind = \"download\"\nurl = \"{url}\"\nsha256 = \"{sha}\"\nenviron = {{ PATH = \"tool/bin\" }}\n[task.use]\nrequires = [\"tool\"]\nrun = \"say hello > {{artifact}}/said\"\n"
    )
}

#[test]
fn a_downloaded_tool_is_extracted_and_on_its_consumers_path() {
    let Some(server) = Nginx::start() else { return };
    let sha = tool_tarball(&server, "dl/tool.tar.gz");
    let ws = Workspace::with(&download_recipe(
        &format!("{}/dl/tool.tar.gz", server.url),
        &sha,
    ));
    let run = ws.jolt(&["build", "use"]);
    run.success();
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("said")).unwrap(),
        "tool says hello\n"
    );
    // Mirrors: the first that answers wins.
    let mirrors = Workspace::with(&format!(
        "[task.tool]\nkind = \"download\"\nurl = [\"{0}/missing.tgz\", \"{0}/dl/tool.tar.gz\"]\nsha256 = \"{sha}\"\n",
        server.url
    ));
    mirrors.jolt(&["build", "tool"]).success();
}

#[test]
fn a_zip_is_extracted_and_extract_false_keeps_the_file() {
    let Some(server) = Nginx::start() else { return };
    let path = server.file("dl/files.zip");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    zip.start_file("data/readme.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    zip.write_all(b"zipped\n").unwrap();
    zip.finish().unwrap();
    let sha = sha256(&path);
    let url = format!("{}/dl/files.zip", server.url);
    let ws = Workspace::with(&format!(
        "[task.z]\nkind = \"download\"\nurl = \"{url}\"\nsha256 = \"{sha}\"\n[task.raw]\nkind = \"download\"\nurl = \"{url}\"\nsha256 = \"{sha}\"\nextract = false\n"
    ));
    let z = ws.jolt(&["build", "z"]);
    z.success();
    assert_eq!(
        std::fs::read_to_string(z.locations()[0].join("data/readme.txt")).unwrap(),
        "zipped\n"
    );
    let raw = ws.jolt(&["build", "raw"]);
    assert!(raw.locations()[0].join("files.zip").is_file());
}

#[test]
fn a_digest_mismatch_fails_naming_both_digests() {
    let Some(server) = Nginx::start() else { return };
    let actual = tool_tarball(&server, "dl/tool.tar.gz");
    let wrong = "0".repeat(64);
    let ws = Workspace::with(&download_recipe(
        &format!("{}/dl/tool.tar.gz", server.url),
        &wrong,
    ));
    ws.jolt(&["build", "use"])
        .code(1)
        .contains(&format!("expected {wrong}"))
        .contains(&format!("got {actual}"));
    assert!(ws.artifacts("tool").is_empty());
    assert!(ws.staging_leftovers().is_empty());
}

#[test]
fn a_path_escaping_archive_fails_the_task() {
    let Some(server) = Nginx::start() else { return };
    // A tar whose single entry climbs out, written with a raw header.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(4);
    h.set_mode(0o644);
    let name = b"../../escaped.txt";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    let mut data = h.as_bytes().to_vec();
    data.extend_from_slice(b"evil");
    data.resize(512 * 4, 0);
    let path = server.file("dl/evil.tar");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &data).unwrap();
    let sha = sha256(&path);
    let ws = Workspace::with(&format!(
        "[task.evil]\nkind = \"download\"\nurl = \"{}/dl/evil.tar\"\nsha256 = \"{sha}\"\n",
        server.url
    ));
    ws.jolt(&["build", "evil"]).code(1).contains("escapes");
    assert!(!ws.cachedir().join("escaped.txt").exists());
    assert!(ws.artifacts("evil").is_empty());
}

#[test]
fn an_unreachable_download_fails_naming_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("http://127.0.0.1:{port}/tool.tgz");
    let ws = Workspace::with(&download_recipe(&url, &"1".repeat(64)));
    ws.jolt(&["build", "use"]).code(1).contains(&url);
}

#[test]
fn the_c_program_example_builds() {
    let ws = Workspace::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/c-program");
    for entry in ["jolt.toml", "setup.sh", "src", "tool"] {
        let status = Command::new("cp")
            .arg("-a")
            .arg(example.join(entry))
            .arg(ws.root())
            .status()
            .unwrap();
        assert!(status.success());
    }
    let setup = Command::new("sh")
        .arg("setup.sh")
        .current_dir(ws.root())
        .output()
        .unwrap();
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    ws.jolt(&["build", "hello"])
        .success()
        .contains("hello from a declared source, version 1.0");
}
