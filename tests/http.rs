//! The shared HTTP artifact cache, against a real nginx (WebDAV PUT) on loopback.

use crate::util::{finish, running_as_root, wait_until, Nginx, Workspace};
use std::time::Duration;

pub const RECIPE: &str = r#"
[task.lib]
influence = ["src/*.c"]
run = ["mkdir -p {artifact}/lib", "cat src/*.c > {artifact}/lib/libx.txt"]
environ = { LIBX = "yes" }

[task.app]
requires = ["lib"]
run = "cp {deps.lib}/lib/libx.txt {artifact}/app.txt"

[task.other]
requires = ["lib"]
run = "echo $LIBX > {artifact}/other.txt"
"#;

fn workspace(server: &Nginx) -> Workspace {
    let ws = Workspace::with(RECIPE);
    ws.file("src/a.c", "int a;\n");
    ws.file(
        "jolt.conf.toml",
        &format!("[http]\nuri = \"{}/cache\"\n", server.url),
    );
    ws
}

pub fn jolt(ws: &Workspace, args: &[&str]) -> crate::util::Run {
    let mut all = vec!["-c", "jolt.conf.toml"];
    all.extend_from_slice(args);
    ws.jolt(&all)
}

#[test]
fn an_upload_is_downloaded_into_another_empty_cache() {
    let Some(server) = Nginx::start() else { return };
    let a = workspace(&server);
    let built = jolt(&a, &["build", "app"]);
    built
        .success()
        .contains("Upload started (app ")
        .contains("Upload finished after")
        .contains("Upload started (lib ");
    let id = built.identity();
    assert!(server.file(&format!("cache/app/{id}.tar")).is_file());

    let b = a.sibling();
    let fetched = jolt(&b, &["build", "app"]);
    fetched
        .success()
        .contains("Download started (app ")
        .contains("Download finished after")
        .lacks("Execution started")
        .lacks("Download started (lib ");
    let dir = &fetched.locations()[0];
    assert_eq!(
        std::fs::read_to_string(dir.join("app.txt")).unwrap(),
        "int a;\n"
    );
    let manifest = std::fs::read_to_string(dir.join(".manifest.json")).unwrap();
    assert!(manifest.contains(&id));
    assert!(b.staging_leftovers().is_empty());
}

/// A SOCKS5 proxy on loopback (no authentication, `CONNECT` only) that counts the
/// connections it carries.
fn socks5_proxy() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let carried = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = carried.clone();
    let serve = move |mut client: TcpStream| -> std::io::Result<()> {
        let mut b = [0u8; 258];
        client.read_exact(&mut b[..2])?;
        let methods = b[1] as usize;
        client.read_exact(&mut b[..methods])?;
        client.write_all(&[5, 0])?;
        client.read_exact(&mut b[..4])?;
        let target = match b[3] {
            1 => {
                let mut a = [0u8; 6];
                client.read_exact(&mut a)?;
                let port = u16::from_be_bytes([a[4], a[5]]);
                format!("{}.{}.{}.{}:{port}", a[0], a[1], a[2], a[3])
            }
            3 => {
                let mut n = [0u8; 1];
                client.read_exact(&mut n)?;
                let mut h = vec![0u8; n[0] as usize + 2];
                client.read_exact(&mut h)?;
                let port = u16::from_be_bytes([h[h.len() - 2], h[h.len() - 1]]);
                format!("{}:{port}", String::from_utf8_lossy(&h[..h.len() - 2]))
            }
            _ => return Ok(()),
        };
        let mut server = TcpStream::connect(target)?;
        client.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])?;
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (mut up_from, mut up_to) = (client.try_clone()?, server.try_clone()?);
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut up_from, &mut up_to);
            let _ = up_to.shutdown(Shutdown::Write);
        });
        let _ = std::io::copy(&mut server, &mut client);
        let _ = client.shutdown(Shutdown::Write);
        let _ = up.join();
        Ok(())
    };
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let serve = serve.clone();
            std::thread::spawn(move || serve(client));
        }
    });
    (port, carried)
}

/// `jolt -c jolt.conf.toml build TASK` with `var=value` as the environment's only
/// proxy setting.
fn build_through(ws: &Workspace, task: &str, (var, value): (&str, &str)) -> crate::util::Run {
    let mut cmd = ws.command(&["-c", "jolt.conf.toml", "build", task]);
    for name in ["ALL_PROXY", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"] {
        cmd.env_remove(name).env_remove(name.to_lowercase());
    }
    cmd.env(var, value)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    finish(cmd.spawn().unwrap())
}

// Regression: ureq was built without its SOCKS support, so `ALL_PROXY=socks5://...`
// was ignored (a warning at -vv) and the cache reached directly.
#[test]
fn the_cache_is_reached_through_a_socks5_proxy_from_the_environment() {
    let Some(server) = Nginx::start() else { return };
    let ws = workspace(&server);
    let (port, carried) = socks5_proxy();
    let proxy = format!("socks5://127.0.0.1:{port}");
    let built = build_through(&ws, "lib", ("ALL_PROXY", &proxy));
    built.success().contains("Upload finished after");
    let id = built.identity();
    assert!(server.file(&format!("cache/lib/{id}.tar")).is_file());
    assert!(
        carried.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the proxy carried nothing:\n{}",
        built.all()
    );
}

// Regression: a proxy that refused the connection was reported as the cache being
// unreachable, with nothing to say that a proxy was in the way.
#[test]
fn a_proxy_that_fails_is_named_beside_the_cache() {
    let Some(server) = Nginx::start() else { return };
    let ws = workspace(&server);
    let proxy = ("HTTP_PROXY", "http://someone:secret@127.0.0.1:1");
    build_through(&ws, "lib", proxy)
        .success()
        .contains("is unreachable")
        .contains("(through the proxy http://127.0.0.1:1)")
        .lacks("secret");
}

#[test]
fn two_workspaces_share_artifacts_through_the_cache() {
    let Some(server) = Nginx::start() else { return };
    let a = workspace(&server);
    jolt(&a, &["build", "app"]).success();
    let b = a.sibling();
    // b needs lib to execute `other`: it downloads lib and runs only other.
    let run = jolt(&b, &["build", "other"]);
    run.success().contains("Download started (lib ");
    assert_eq!(run.started(), vec!["other"]);
    assert_eq!(
        std::fs::read_to_string(run.locations()[0].join("other.txt")).unwrap(),
        "yes\n"
    );
    // and a now downloads what b uploaded.
    jolt(&a, &["build", "other"])
        .success()
        .contains("Download started (other ")
        .lacks("Execution started");
}

#[test]
fn switches_disable_uploads_and_downloads() {
    let Some(server) = Nginx::start() else { return };
    let a = workspace(&server);
    jolt(&a, &["build", "--no-upload", "lib"])
        .success()
        .lacks("Upload started");
    jolt(&a, &["-c", "jolt.upload=false", "build", "app"])
        .success()
        .lacks("Upload started");
    assert!(server.objects().is_empty());
    jolt(&a, &["build", "-f", "lib"])
        .success()
        .contains("Upload started");
    let b = a.sibling();
    let run = jolt(&b, &["build", "--no-download", "-f", "lib"]);
    run.success()
        .lacks("Download started")
        .contains("Execution started");
}

#[test]
fn an_unreachable_cache_is_one_warning_and_the_build_goes_on() {
    let ws = Workspace::with(RECIPE);
    ws.file("src/a.c", "x");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let uri = format!("http.uri=http://127.0.0.1:{port}/cache");
    let run = ws.jolt(&["-c", &uri, "-c", "http.retries=0", "build", "app", "other"]);
    run.success();
    assert_eq!(run.count("unreachable"), 1, "{}", run.all());
    assert!(run.all().contains(&format!("127.0.0.1:{port}")));
    assert_eq!(run.started().len(), 3);
}

#[test]
fn the_cache_going_down_mid_build_does_not_fail_the_build() {
    let Some(mut server) = Nginx::start() else {
        return;
    };
    let ws = Workspace::with(
        r#"
[task.first]
run = ["touch {root}/first-started", "while [ ! -f {root}/go ]; do sleep 0.02; done", "echo 1 > {artifact}/f"]
[task.second]
requires = ["first"]
run = "echo 2 > {artifact}/f"
"#,
    );
    ws.file(
        "jolt.conf.toml",
        &format!("[http]\nuri = \"{}\"\nretries = 1\n", server.url),
    );
    let child = ws.spawn(&["-c", "jolt.conf.toml", "build", "second"]);
    wait_until("first to start", Duration::from_secs(20), || {
        ws.root().join("first-started").exists()
    });
    server.stop();
    ws.file("go", "");
    let run = finish(child);
    run.success();
    assert_eq!(run.count("unreachable"), 1, "{}", run.all());
    assert_eq!(ws.artifacts("second").len(), 1);
}

#[test]
fn a_corrupt_or_truncated_object_is_rejected_and_the_task_built() {
    let Some(server) = Nginx::start() else { return };
    let a = workspace(&server);
    let built = jolt(&a, &["build", "lib"]);
    let id = built.identity();
    let object = server.file(&format!("cache/lib/{id}.tar"));
    let bytes = std::fs::read(&object).unwrap();

    for bad in [
        bytes[..bytes.len() / 2].to_vec(),
        b"this is not a tar archive at all".repeat(40),
    ] {
        std::fs::write(&object, &bad).unwrap();
        let b = a.sibling();
        let run = jolt(&b, &["-c", "jolt.upload=false", "build", "lib"]);
        run.success()
            .contains(&format!("{}/cache/lib/{id}.tar", server.url))
            .contains("Execution started (lib ");
        assert!(b.staging_leftovers().is_empty());
        let dir = &run.locations()[0];
        assert_eq!(
            std::fs::read_to_string(dir.join("lib/libx.txt")).unwrap(),
            "int a;\n"
        );
    }
}

#[test]
fn an_archive_naming_another_identity_is_rejected() {
    let Some(server) = Nginx::start() else { return };
    let a = workspace(&server);
    let lib = jolt(&a, &["build", "lib"]);
    let lib_id = lib.identity();
    a.file("src/a.c", "int b;\n");
    let new_id = a.identity("lib");
    assert_ne!(lib_id, new_id);
    std::fs::copy(
        server.file(&format!("cache/lib/{lib_id}.tar")),
        server.file(&format!("cache/lib/{new_id}.tar")),
    )
    .unwrap();
    let run = jolt(&a, &["-c", "jolt.upload=false", "build", "lib"]);
    run.success()
        .contains("rejected")
        .contains("Execution started (lib ");
    let dir = &run.locations()[0];
    assert_eq!(
        std::fs::read_to_string(dir.join("lib/libx.txt")).unwrap(),
        "int b;\n"
    );
}

/// A tar whose one entry is written with a raw (unchecked) name and type.
fn raw_tar(name: &str, kind: tar::EntryType, link: &str, data: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    if !link.is_empty() {
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

#[test]
fn a_path_escaping_archive_never_reaches_the_disk() {
    let Some(server) = Nginx::start() else { return };
    let ws = workspace(&server);
    let id = ws.identity("lib");
    let object = server.file(&format!("cache/lib/{id}.tar"));
    std::fs::create_dir_all(object.parent().unwrap()).unwrap();
    let cases = [
        raw_tar("../../../escaped.txt", tar::EntryType::Regular, "", b"evil"),
        raw_tar(
            "/tmp/jolt-absolute-escape.txt",
            tar::EntryType::Regular,
            "",
            b"evil",
        ),
        raw_tar("link", tar::EntryType::Symlink, "/etc", b""),
        raw_tar("dev", tar::EntryType::Char, "", b""),
    ];
    for tar_bytes in cases {
        std::fs::write(&object, tar_bytes).unwrap();
        let run = jolt(&ws, &["-c", "jolt.upload=false", "build", "lib"]);
        run.success()
            .contains(&format!("cache/lib/{id}.tar"))
            .contains("Execution started (lib ");
        jolt(&ws, &["clean"]).success();
    }
    assert!(!ws.cachedir().join("escaped.txt").exists());
    assert!(!ws.dir.path().join("escaped.txt").exists());
    assert!(!std::path::Path::new("/tmp/jolt-absolute-escape.txt").exists());
    assert!(ws.staging_leftovers().is_empty());
}

#[test]
fn jolt_download_fetches_without_building() {
    let Some(server) = Nginx::start() else { return };
    let a = workspace(&server);
    jolt(&a, &["build", "lib"]).success();
    let b = a.sibling();
    let run = jolt(&b, &["download", "lib", "--copy", "out"]);
    run.success()
        .contains("Download started (lib ")
        .lacks("Execution started");
    assert_eq!(b.read("out/lib/libx.txt"), "int a;\n");
    jolt(&b, &["download", "app"])
        .code(1)
        .contains("Task must be built first");
    b.jolt(&["download", "lib"]).code(2).contains("http.uri");
    let dead = b.jolt(&[
        "-c",
        "http.uri=http://127.0.0.1:1",
        "-c",
        "http.retries=0",
        "download",
        "app",
    ]);
    dead.code(3).contains("127.0.0.1:1");
}

#[test]
fn a_missing_object_is_built() {
    let Some(server) = Nginx::start() else { return };
    let ws = workspace(&server);
    jolt(&ws, &["inspect", "lib"])
        .success()
        .contains("Remote            False");
    jolt(&ws, &["build", "lib"])
        .success()
        .contains("Execution started")
        .lacks("WARNING");
    jolt(&ws, &["inspect", "lib"])
        .success()
        .contains("Remote            True");
}

#[test]
fn uploads_need_credentials_where_the_server_requires_them() {
    let Some(server) = Nginx::start_with_auth("builder:hunter2") else {
        return;
    };
    let ws = workspace(&server);
    let refused = jolt(&ws, &["build", "lib"]);
    refused.success().contains("401").contains("http.username");
    assert!(server.objects().is_empty());

    let mut cmd = ws.command(&[
        "-c",
        "jolt.conf.toml",
        "-c",
        "http.username=builder",
        "build",
        "-f",
        "lib",
    ]);
    cmd.env("JOLT_HTTP_PASSWORD", "hunter2");
    let accepted = ws.run(cmd);
    accepted
        .success()
        .contains("Upload finished")
        .lacks("hunter2");
    assert_eq!(server.objects().len(), 1);
    // Reading needs no credentials.
    let b = ws.sibling();
    let forced_id = accepted.identity();
    assert!(server.objects()[0].contains(&forced_id));
    jolt(&b, &["build", "app"])
        .success()
        .lacks("Download started (lib ");
}

#[test]
fn an_artifact_with_a_symlink_leading_out_is_not_uploaded() {
    let Some(server) = Nginx::start() else { return };
    let ws = Workspace::with("[task.venv]\nrun = \"ln -s /usr/bin/env {artifact}/python\"\n");
    ws.file(
        "jolt.conf.toml",
        &format!("[http]\nuri = \"{}/cache\"\n", server.url),
    );
    let run = jolt(&ws, &["build", "venv"]);
    run.success()
        .contains("points outside")
        .lacks("Upload finished");
    assert!(server.objects().is_empty());
}

// Caches that heal themselves, and secrets that stay secret (issue 9).

#[test]
fn a_builder_replaces_an_archive_that_clients_reject() {
    let Some(server) = Nginx::start() else { return };
    let a = workspace(&server);
    let id = crate::util::identity_of(&jolt(&a, &["build", "lib"]).locations()[0]);
    let object = server.file(&format!("cache/lib/{id}.tar"));
    std::fs::write(&object, b"this is not a tar archive at all".repeat(40)).unwrap();
    // Regression: the builder saw that the object exists and skipped the upload, so
    // the bad archive stayed forever.
    let b = a.sibling();
    jolt(&b, &["build", "lib"])
        .success()
        .contains("corrupt archive")
        .contains("Execution started (lib ")
        .contains("Upload finished");
    let c = a.sibling();
    jolt(&c, &["build", "lib"])
        .success()
        .contains("Download finished")
        .lacks("Execution started");
}

/// A copy of the artifact directory `dir`, modes and all, to forge an archive from.
fn copy_of(dir: &std::path::Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", dir.display()))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    copy
}

#[test]
fn an_archive_whose_files_differ_from_its_manifest_is_rejected_and_the_task_built() {
    let Some(server) = Nginx::start() else { return };
    let a = workspace(&server);
    let built = jolt(&a, &["build", "lib"]);
    let dir = built.locations()[0].clone();
    let id = crate::util::identity_of(&dir);
    // Regression (issue 24): the genuine manifest with other file contents, or a
    // file more, was accepted under the identity; so was an archive of an older
    // manifest without digests.
    for forge in ["content", "added", "executable", "no digests"] {
        let forged = copy_of(&dir);
        let f = forged.path();
        let lib = f.join("lib/libx.txt");
        std::fs::set_permissions(&lib, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        match forge {
            "content" => std::fs::write(&lib, "PWNED\n").unwrap(),
            "added" => std::fs::write(f.join("lib/local.mk"), "PWNED\n").unwrap(),
            "executable" => {
                std::fs::set_permissions(&lib, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .unwrap()
            }
            _ => {
                let path = f.join(".manifest.json");
                let mut manifest: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                manifest.as_object_mut().unwrap().remove("contents");
                std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
            }
        }
        let mut tar = Vec::new();
        jolt::testing::pack(f, &mut tar).unwrap();
        std::fs::write(server.file(&format!("cache/lib/{id}.tar")), tar).unwrap();
        let b = a.sibling();
        let run = jolt(&b, &["-c", "jolt.upload=false", "build", "lib"]);
        run.success()
            .contains("do not match its manifest")
            .contains("Execution started (lib ");
        assert_eq!(
            std::fs::read_to_string(run.locations()[0].join("lib/libx.txt")).unwrap(),
            "int a;\n",
            "{forge}"
        );
    }
}

#[test]
fn a_downloaded_manifest_that_reaches_outside_is_rejected() {
    let Some(server) = Nginx::start() else { return };
    let a = workspace(&server);
    let built = jolt(&a, &["build", "lib"]);
    let dir = built.locations()[0].clone();
    let id = crate::util::identity_of(&dir);
    for (key, value) in [
        ("environ", serde_json::json!({"PATH": "../../.."})),
        ("environ", serde_json::json!({"LD_PRELOAD": "lib/evil.so"})),
        ("paths", serde_json::json!({"secret": "/etc/shadow"})),
    ] {
        let forged = copy_of(&dir);
        let path = forged.path().join(".manifest.json");
        let mut manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        manifest[key] = value;
        std::fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
        let mut tar = Vec::new();
        jolt::testing::pack(forged.path(), &mut tar).unwrap();
        std::fs::write(server.file(&format!("cache/lib/{id}.tar")), tar).unwrap();
        let b = a.sibling();
        jolt(&b, &["-c", "jolt.upload=false", "build", "other"])
            .success()
            .contains("unsafe")
            .contains("Execution started (lib ");
    }
}

#[test]
fn a_password_in_the_cache_url_is_never_shown() {
    let ws = Workspace::with(RECIPE);
    ws.file("src/a.c", "int a;\n");
    let uri = "http.uri=http://ci:s3cr3t-pw@127.0.0.1:9/cache";
    let run = ws.jolt(&["-c", uri, "build", "lib"]);
    run.success().contains("unreachable").lacks("s3cr3t-pw");
    ws.jolt(&["-c", uri, "inspect", "lib"])
        .success()
        .contains("http://127.0.0.1:9/cache/lib/")
        .lacks("s3cr3t-pw");
    ws.jolt(&["config", "http.uri", "http://ci:s3cr3t-pw@cache:8080/"])
        .success();
    for args in [&["config", "-l"][..], &["config", "http.uri"][..]] {
        ws.jolt(args)
            .success()
            .contains("http.uri = http://********@cache:8080/")
            .lacks("s3cr3t-pw");
    }
}

#[test]
fn a_refused_upload_is_warned_about_once_and_no_more_are_tried_in_that_build() {
    let Some(server) = Nginx::start_with_auth("builder:hunter2") else {
        return;
    };
    // Regression (issue 23): a client without credentials for a write-protected
    // cache warned once per artifact (35 warnings for a small C project); with
    // credentials the server refused, the cache counted as unreachable for the
    // build, downloads included.
    for credentials in [&[][..], &["-c", "http.username=someone"]] {
        let ws = workspace(&server);
        let mut args = credentials.to_vec();
        args.extend(["build", "app", "other"]);
        let run = jolt(&ws, &args);
        run.success()
            .contains("no more uploads in this build")
            .lacks("unreachable");
        assert_eq!(run.count("Upload failed"), 1, "{}", run.all());
        assert_eq!(run.count("Upload started"), 1, "{}", run.all());
    }
    let access = std::fs::read_to_string(server.dir.path().join("access.log")).unwrap();
    assert_eq!(access.matches("\"PUT ").count(), 2, "{access}");
    assert!(server.objects().is_empty());
}

#[test]
fn credentials_in_the_cache_url_authenticate_uploads() {
    let Some(server) = Nginx::start_with_auth("builder:hunter2") else {
        return;
    };
    let ws = Workspace::with(RECIPE);
    ws.file("src/a.c", "int a;\n");
    let uri = format!(
        "http.uri={}/cache",
        server.url.replace("http://", "http://builder:hunter2@")
    );
    ws.jolt(&["-c", &uri, "build", "lib"])
        .success()
        .contains("Upload finished")
        .lacks("hunter2");
    assert_eq!(server.objects().len(), 1);
}

#[test]
fn a_downloaded_archive_thousands_of_directories_deep_does_not_crash_jolt() {
    let Some(server) = Nginx::start() else { return };
    let a = workspace(&server);
    let dir = jolt(&a, &["build", "lib"]).locations()[0].clone();
    let id = crate::util::identity_of(&dir);
    let forged = copy_of(&dir);
    let deep: std::path::PathBuf = std::iter::repeat_n("d", 1800).collect();
    std::fs::create_dir_all(forged.path().join(&deep)).unwrap();
    let mut tar = Vec::new();
    jolt::testing::pack(forged.path(), &mut tar).unwrap();
    std::fs::write(server.file(&format!("cache/lib/{id}.tar")), tar).unwrap();
    // Regression: the client that downloaded it aborted with a stack overflow.
    let b = a.sibling();
    jolt(&b, &["-c", "jolt.upload=false", "build", "lib"]).success();
}

// Faults answered in seconds (issue 14).

use crate::util::{FakeCache, Fault};

/// A workspace of `n` independent tasks with an influence file, using `cache`.
fn fault_workspace(n: usize, cache: &str) -> Workspace {
    let mut recipe = String::new();
    for t in 0..n {
        recipe.push_str(&format!(
            "[task.t{t}]\nrun = \"echo {t} > {{artifact}}/f\"\n"
        ));
    }
    recipe.push_str(&crate::util::alias("all", (0..n).map(|t| format!("t{t}"))));
    let ws = Workspace::with(&recipe);
    ws.file(
        "jolt.conf.toml",
        &format!("[http]\nuri = \"{cache}\"\ntimeout = 2\nconnect_timeout = 2\n"),
    );
    ws
}

#[test]
fn a_cache_that_hangs_costs_one_timeout_and_one_warning() {
    let cache = FakeCache::start(Fault::Hang);
    let ws = fault_workspace(10, &cache.url);
    let started = std::time::Instant::now();
    let run = jolt(&ws, &["build", "all"]);
    run.success();
    // Regression: each request was tried four times, a timeout each.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(run.count("unreachable"), 1, "{}", run.all());
    assert_eq!(cache.requests(), 1);
}

#[test]
fn a_far_cache_is_asked_about_many_tasks_at_once() {
    // Issue 11: the planner asked HEAD for each task one after another, so a cache
    // 20 ms away cost 300 x 20 ms before anything started.
    let cache = FakeCache::start(Fault::Missing(100));
    let ws = fault_workspace(30, &cache.url);
    let run = jolt(&ws, &["build", "--no-upload", "all"]);
    run.success().lacks("[WARNING]");
    assert_eq!(run.count("Execution finished"), 30, "{}", run.all());
    assert_eq!(
        cache.requests(),
        30,
        "one request a task: a GET, no HEAD before it"
    );
    let most = cache.most_at_once.load(std::sync::atomic::Ordering::SeqCst);
    assert!(most > 1, "the checks went one at a time");
}

#[test]
fn transfers_at_once_are_a_setting_of_their_own() {
    let Some(server) = Nginx::start() else { return };
    let ws = workspace(&server);
    jolt(&ws, &["build", "app"]).success();
    let other = ws.sibling();
    jolt(
        &other,
        &["-c", "http.transfers=1", "build", "-j", "8", "app"],
    )
    .success()
    .contains("Download finished");
    jolt(&other, &["-c", "http.transfers=0", "build", "app"])
        .code(2)
        .contains("configuration key http.transfers: expected an integer from 1 to 256");
}

#[test]
fn a_cache_that_answers_500_is_marked_down_after_the_first_failure() {
    let cache = FakeCache::start(Fault::Status(500));
    let ws = fault_workspace(10, &cache.url);
    let run = jolt(&ws, &["build", "all"]);
    // Regression: never marked down, a warning (and retries) for every task.
    run.success();
    assert_eq!(run.count("[WARNING]"), 1, "{}", run.all());
    assert!(cache.requests() <= 4, "{} requests", cache.requests());
}

#[test]
fn jolt_download_exits_3_when_the_cache_fails_or_refuses() {
    for code in [500, 403] {
        let cache = FakeCache::start(Fault::Status(code));
        let ws = fault_workspace(1, &cache.url);
        jolt(&ws, &["download", "t0"])
            .code(3)
            .contains("The HTTP cache is unreachable")
            .contains(&code.to_string())
            .lacks("no cache holds");
    }
}

#[test]
fn ctrl_c_interrupts_a_slow_download_within_a_second() {
    let cache = FakeCache::start(Fault::Slow);
    let ws = fault_workspace(1, &cache.url);
    // A slow server still answers 200: the download (no HEAD before it) trickles.
    let mut cmd = ws.command(&["-c", "jolt.conf.toml", "build", "t0"]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    wait_until("the download", Duration::from_secs(20), || {
        cache.requests() >= 1
    });
    std::thread::sleep(Duration::from_millis(500));
    let interrupted = std::time::Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let run = finish(child);
    // Regression: Ctrl-C was honoured only when the download had finished.
    assert!(
        interrupted.elapsed() < Duration::from_millis(1500),
        "{:?}\n{}",
        interrupted.elapsed(),
        run.all()
    );
    assert_eq!(run.code, 130, "{}", run.all());
}

// https, verified (issue 14).

#[test]
fn an_https_cache_is_verified_against_http_ca_file() {
    let Some(server) = Nginx::start_tls("localhost") else {
        return;
    };
    let ca = server.ca.clone().unwrap();
    let ws = Workspace::with(RECIPE);
    ws.file("src/a.c", "int a;\n");
    ws.file(
        "jolt.conf.toml",
        &format!(
            "[http]\nuri = \"{}/cache\"\nca_file = \"{}\"\n",
            server.url,
            ca.display()
        ),
    );
    jolt(&ws, &["build", "lib"])
        .success()
        .contains("Upload finished");
    let b = ws.sibling();
    jolt(&b, &["build", "lib"])
        .success()
        .contains("Download finished");
    // Without the CA, the certificate is refused: a warning for a build, exit 3 for
    // a download, both naming the server.
    let c = ws.sibling();
    let uri = format!("http.uri={}/cache", server.url);
    c.jolt(&["-c", &uri, "build", "lib"])
        .success()
        .contains("unreachable")
        .contains("localhost");
    ws.sibling()
        .jolt(&["-c", &uri, "download", "lib"])
        .code(3)
        .contains("localhost");
}

#[test]
fn an_https_certificate_for_another_host_is_refused() {
    let Some(server) = Nginx::start_tls("cache.example") else {
        return;
    };
    let ws = Workspace::with(RECIPE);
    ws.file("src/a.c", "int a;\n");
    let uri = format!("http.uri={}/cache", server.url);
    let ca = format!("http.ca_file={}", server.ca.clone().unwrap().display());
    ws.jolt(&["-c", &uri, "-c", &ca, "download", "lib"])
        .code(3)
        .contains("localhost");
}

#[test]
fn a_cache_frozen_mid_download_is_marked_down_after_one_stall() {
    let cache = FakeCache::start(Fault::Stall);
    let ws = fault_workspace(3, &cache.url);
    let started = std::time::Instant::now();
    let run = jolt(&ws, &["build", "all"]);
    // Regression: the stall passed for a corrupt archive; the cache stayed up and the
    // next download stalled again.
    run.success().contains("Execution started (t0 ");
    assert_eq!(run.count("unreachable"), 1, "{}", run.all());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

// The cache trims itself (issue 15).

#[test]
fn jolt_cache_trim_keeps_the_served_directory_within_its_size() {
    let Some(server) = Nginx::start() else { return };
    let ws = workspace(&server);
    jolt(&ws, &["build", "app", "other"]).success();
    let root = server.file("cache");
    let objects = server.objects();
    assert_eq!(objects.len(), 3, "{objects:?}");
    let size: u64 = objects
        .iter()
        .map(|o| std::fs::metadata(server.file(o)).unwrap().len())
        .max()
        .unwrap();
    let max = format!("{}", size + 1);
    let run = ws.jolt(&["cache", "trim", root.to_str().unwrap(), "--max-size", &max]);
    run.success().contains("Removed ").contains("Freed ");
    assert_eq!(server.objects().len(), 1, "{:?}", server.objects());
    ws.jolt(&["cache", "trim", "/nonexistent-dir", "--max-size", "1G"])
        .code(2)
        .contains("not a directory");
    ws.jolt(&[
        "cache",
        "trim",
        root.to_str().unwrap(),
        "--max-size",
        "lots",
    ])
    .code(2)
    .contains("--max-size");
}

#[test]
fn a_trimming_sidecar_waits_for_its_directory_survives_a_failed_pass_and_stops_on_sigterm() {
    let ws = Workspace::new();
    // Not there yet: nginx creates its root with the first upload.
    let served = ws.root().join("served");
    let log = ws.root().join("trim.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = ws.command(&[
        "cache",
        "trim",
        served.to_str().unwrap(),
        "--max-size",
        "0",
        "--every",
        "1s",
    ]);
    let mut child = cmd
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let output = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(
        "a pass before the first upload",
        Duration::from_secs(10),
        || output().contains("Cannot scan"),
    );
    std::fs::create_dir_all(&served).unwrap();
    wait_until("a first pass", Duration::from_secs(10), || {
        output().contains("Freed 0 bytes")
    });
    // The volume vanishes for a while (an unmounted disk, an operator's rm -rf).
    std::fs::remove_dir(&served).unwrap();
    let failed = output().matches("Cannot scan").count();
    wait_until("a failed pass", Duration::from_secs(10), || {
        output().matches("Cannot scan").count() > failed
    });
    assert!(child.try_wait().unwrap().is_none(), "{}", output());
    std::fs::create_dir_all(served.join("t")).unwrap();
    std::fs::write(served.join("t/x.tar"), b"abc").unwrap();
    wait_until("a pass after it", Duration::from_secs(10), || {
        output().contains("Removed t/x.tar")
    });
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let run = finish(child);
    assert_eq!(run.code, 130, "{}", output());
}

#[test]
fn what_a_trim_cannot_read_or_remove_is_named_and_the_rest_is_trimmed() {
    use std::os::unix::fs::{chown, PermissionsExt};
    if !running_as_root("to trim as another user") {
        return;
    }
    let ws = Workspace::new();
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let served = top.path().join("served");
    let nobody = 65534;
    for (rel, age) in [("a/1.tar", 300), ("b/2.tar", 400), ("c/3.tar", 100)] {
        let path = served.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"0123456789").unwrap();
        let when = std::time::SystemTime::now() - Duration::from_secs(age);
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_times(
            std::fs::FileTimes::new()
                .set_accessed(when)
                .set_modified(when),
        )
        .unwrap();
    }
    for owned in ["", "a", "a/1.tar", "c", "c/3.tar"] {
        chown(served.join(owned), Some(nobody), Some(nobody)).unwrap();
    }
    // b stays root's: its file cannot be removed by the trim; d cannot be read.
    std::fs::create_dir(served.join("d")).unwrap();
    std::fs::set_permissions(served.join("d"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.env("HOME", top.path())
        .env("XDG_CONFIG_HOME", top.path().join("config"))
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_jolt"))
        .args(["cache", "trim"])
        .arg(&served)
        .args(["--max-size", "0"]);
    let run = ws.run(cmd);
    run.success()
        .contains(&format!(
            "Cannot read {}/d: Permission denied",
            served.display()
        ))
        .contains(&format!(
            "Cannot remove {}/b/2.tar: Permission denied",
            served.display()
        ))
        .contains("Removed a/1.tar (10 bytes)")
        .contains("Removed c/3.tar (10 bytes)")
        .contains("holds 10 bytes");
    assert!(served.join("b/2.tar").exists());
}

#[test]
fn a_trim_prints_hostile_file_names_escaped() {
    use std::os::unix::ffi::OsStrExt;
    let ws = Workspace::new();
    let served = ws.root().join("served");
    let name = std::ffi::OsStr::from_bytes(b"x\n[   INFO] Freed 0 bytes\xff.tar");
    std::fs::create_dir_all(served.join("t")).unwrap();
    std::fs::write(served.join("t").join(name), b"abc").unwrap();
    let run = ws.jolt(&["cache", "trim", served.to_str().unwrap(), "--max-size", "0"]);
    run.success()
        .contains("Removed t/x\\n[   INFO] Freed 0 bytes\\xff.tar (3 bytes)");
    assert_eq!(run.count("Freed"), 2, "{}", run.all());
}

#[test]
fn a_dry_run_asks_the_cache_what_it_holds_and_downloads_nothing() {
    let Some(server) = Nginx::start() else { return };
    let a = workspace(&server);
    let b = a.sibling();
    // Nothing anywhere: everything executes.
    jolt(&b, &["build", "--dry-run", "app"])
        .success()
        .contains("execute (app ")
        .contains("execute (lib ");
    jolt(&a, &["build", "app"]).success();
    // In the HTTP cache: the goal is downloaded (its requirement is not needed).
    jolt(&b, &["build", "--dry-run", "app"])
        .success()
        .contains("download (app ")
        .contains("skip (lib ")
        .lacks("Download started");
    assert_eq!(
        std::fs::read_dir(b.cachedir()).unwrap().count(),
        0,
        "a dry run wrote into the cache"
    );
}
