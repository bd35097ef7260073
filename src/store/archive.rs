//! Artifact archives: one tar per artifact, built deterministically and unpacked
//! defensively.
//!
//! Packing walks the artifact in sorted order with deterministic headers (no owners,
//! fixed mtime) and writes `.manifest.json` last, so an archive cut short anywhere
//! lacks its manifest. Unpacking accepts only relative paths inside the destination,
//! regular files, directories and symlinks that point inside the artifact; anything
//! else (`..`, absolute paths, links leaving the artifact, hard links, devices, fifos)
//! rejects the whole archive.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::store::artifact::{Manifest, MANIFEST};

/// Fails when a symlink among `entries` (relative to `base`) leads outside `base`:
/// such an archive would be rejected by every reader.
pub fn check_links(base: &Path, entries: &[PathBuf]) -> Result<()> {
    let links: Vec<PathBuf> = entries
        .iter()
        .filter(|rel| {
            std::fs::symlink_metadata(base.join(rel))
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false)
        })
        .cloned()
        .collect();
    for rel in &links {
        let target = std::fs::read_link(base.join(rel))?;
        if !link_stays_inside(rel, &target) {
            bail!(
                "symlink '{}' -> '{}' points outside; it cannot be shared",
                rel.display(),
                target.display()
            );
        }
    }
    verify_links(base, &links)
}

/// All paths under `dir`, relative, sorted.
pub fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out)?;
    out.sort();
    Ok(out)
}

/// Writes the artifact directory `dir` as a tar stream.
pub fn pack(dir: &Path, out: impl Write) -> Result<()> {
    pack_entries(dir, entries(dir)?, out)
}

/// [`pack`] with the directory's `entries` listed already.
pub fn pack_entries(dir: &Path, mut entries: Vec<PathBuf>, out: impl Write) -> Result<()> {
    if let Some(pos) = entries.iter().position(|p| p == Path::new(MANIFEST)) {
        let manifest = entries.remove(pos);
        entries.push(manifest);
    }
    write_entries(dir, &entries, out)
}

/// Writes the files `files` (relative to `root`) as a deterministic tar stream, in
/// sorted order: a source snapshot.
pub fn pack_files(root: &Path, files: &[PathBuf], out: impl Write) -> Result<()> {
    let mut files = files.to_vec();
    files.sort();
    files.dedup();
    check_links(root, &files)?;
    write_entries(root, &files, out)
}

/// Appends `entries` (relative to `base`, in this order) with deterministic headers:
/// symlinks as symlinks, directories empty, files with their content.
fn write_entries(base: &Path, entries: &[PathBuf], out: impl Write) -> Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    for rel in entries {
        let full = base.join(rel);
        let meta = std::fs::symlink_metadata(&full)
            .with_context(|| format!("Cannot read {}", full.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        if meta.file_type().is_symlink() {
            header.set_size(0);
            builder.append_link(&mut header, rel, std::fs::read_link(&full)?)?;
        } else if meta.is_dir() {
            header.set_size(0);
            builder.append_data(&mut header, rel, std::io::empty())?;
        } else if !meta.is_file() {
            bail!(
                "Cannot pack {}: a {}",
                full.display(),
                crate::util::fs::kind_of(&meta)
            );
        } else {
            let file =
                File::open(&full).with_context(|| format!("Cannot read {}", full.display()))?;
            let exactly = Exactly {
                file,
                left: meta.len(),
            };
            builder
                .append_data(&mut header, rel, exactly)
                .with_context(|| format!("Cannot pack {}", full.display()))?;
        }
    }
    builder.into_inner()?.flush()?;
    Ok(())
}

/// A file's content as its tar header announces it: exactly the size it had when the
/// header was written. tar copies a reader to its end, so a file that grew or shrank
/// meanwhile (a process still writing it) made an archive whose entries no longer
/// line up, which a server took and every reader refused; it is an error instead.
struct Exactly {
    file: File,
    left: u64,
}

impl std::io::Read for Exactly {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            let mut more = [0u8; 1];
            return match self.file.read(&mut more)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other("it grew while it was packed")),
            };
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::other("it shrank while it was packed"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn walk(base: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    crate::util::fs::walk(base, rel, &mut |path, _| {
        out.push(path.to_path_buf());
        Ok(true)
    })
}

/// A path from an archive made relative and checked to stay inside; `None` when it
/// is absolute, empty or climbs out with `..`.
fn safe_path(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Whether a symlink at `link` (relative to the artifact root) pointing at `target`
/// stays inside the artifact.
pub(crate) fn link_stays_inside(link: &Path, target: &Path) -> bool {
    let depth = link.components().count().saturating_sub(1);
    crate::util::fs::stays_inside(depth, target)
}

/// Fails when a parent of `rel` is one of the symlinks unpacked before (`links`):
/// an entry must never be written through a link. (A file as a parent fails on its
/// own: no directory can be made there.) Comparing with the few links is cheap
/// where asking the file system for every parent of every entry of a deep archive
/// is not.
pub(crate) fn check_parents(rel: &Path, links: &[PathBuf]) -> Result<()> {
    if links.iter().any(|l| rel != l && rel.starts_with(l)) {
        bail!(
            "archive entry '{}' goes through a non-directory",
            rel.display()
        );
    }
    Ok(())
}

/// Unpacks a tar stream into the empty directory `dest`, rejecting unsafe entries.
pub fn unpack(reader: impl Read, dest: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(reader);
    let mut links = Vec::new();
    for entry in archive.entries().context("Unreadable archive")? {
        let mut entry = entry.context("Unreadable archive entry")?;
        let raw = entry.path().context("Unreadable entry path")?.into_owned();
        if raw.components().all(|c| matches!(c, Component::CurDir)) {
            continue; // "./", the archive's own root
        }
        let Some(rel) = safe_path(&raw) else {
            bail!("archive entry '{}' escapes the artifact", raw.display());
        };
        let target = dest.join(&rel);
        check_parents(&rel, &links)?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mode = entry.header().mode().unwrap_or(0o644);
                let mut file = File::options()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .with_context(|| format!("archive entry '{}' is duplicated", raw.display()))?;
                std::io::copy(&mut entry, &mut file)
                    .with_context(|| format!("archive entry '{}' is truncated", raw.display()))?;
                let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                file.set_permissions(std::fs::Permissions::from_mode(perm))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .context("Unreadable symlink target")?
                    .map(|l| l.into_owned())
                    .unwrap_or_default();
                if !link_stays_inside(&rel, &link) {
                    bail!(
                        "archive symlink '{}' -> '{}' points outside the artifact",
                        raw.display(),
                        link.display()
                    );
                }
                std::os::unix::fs::symlink(&link, &target)
                    .with_context(|| format!("archive entry '{}' is duplicated", raw.display()))?;
                links.push(rel.clone());
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .context("Unreadable link target")?
                    .map(|l| l.into_owned())
                    .unwrap_or_default();
                copy_hard_link(dest, (&raw, &target), &link, &links)?;
            }
            other => bail!(
                "archive entry '{}' has a forbidden type ({other:?})",
                raw.display()
            ),
        }
    }
    verify_links(dest, &links)
}

/// A hard link (as written in the archive, and where it goes) to `link`, an entry
/// unpacked before: copied, inside only, never through a symlink.
fn copy_hard_link(
    dest: &Path,
    (raw, target): (&Path, &Path),
    link: &Path,
    links: &[PathBuf],
) -> Result<()> {
    let Some(source) = safe_path(link) else {
        bail!(
            "archive hard link '{}' -> '{}' points outside",
            raw.display(),
            link.display()
        );
    };
    check_parents(&source, links)?;
    let source = dest.join(source);
    if !std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
        bail!(
            "archive hard link '{}' -> '{}' has no target",
            raw.display(),
            link.display()
        );
    }
    std::fs::copy(&source, target)
        .with_context(|| format!("archive entry '{}' is duplicated", raw.display()))?;
    Ok(())
}

/// Checks, once everything is unpacked, that every symlink resolves inside `dest`:
/// each one was checked on its own text, but a chain of links can still lead out.
pub(crate) fn verify_links(dest: &Path, links: &[PathBuf]) -> Result<()> {
    if links.is_empty() {
        return Ok(());
    }
    let root = std::fs::canonicalize(dest)?;
    for rel in links {
        let link = dest.join(rel);
        let target = std::fs::read_link(&link)?;
        // Resolve what exists of the target; a missing tail stays under its parent.
        let mut probe = link.parent().unwrap_or(dest).join(&target);
        let resolved = loop {
            match std::fs::canonicalize(&probe) {
                Ok(p) => break Some(p),
                Err(_) => match probe.parent() {
                    Some(parent) if parent != probe => probe = parent.to_path_buf(),
                    _ => break None,
                },
            }
        };
        if !resolved.is_some_and(|p| p.starts_with(&root)) {
            bail!(
                "archive symlink '{}' -> '{}' leads outside the artifact",
                rel.display(),
                target.display()
            );
        }
    }
    Ok(())
}

/// Checks an unpacked artifact: its manifest names `task` and `identity`, and the
/// files are those it describes, each holding what it records
/// ([`crate::store::artifact::check_contents`]).
pub fn verify(dir: &Path, task: &str, identity: &str) -> Result<Manifest> {
    let manifest =
        Manifest::read(dir).context("the archive has no readable manifest (truncated?)")?;
    if manifest.identity != identity || manifest.task != task {
        bail!(
            "the archive holds {} {}, not {task} {identity}",
            manifest.task,
            manifest.identity
        );
    }
    manifest
        .check_metadata()
        .context("the archive's manifest is unsafe")?;
    crate::store::artifact::check_contents(dir, &manifest)
        .context("the archive's files do not match its manifest")?;
    if manifest.files.iter().ne(manifest.contents.keys()) {
        bail!("the archive's manifest lists other files than it describes");
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_packed_at_the_size_its_header_gives_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let read = |left: u64| {
            let mut out = Vec::new();
            let file = File::open(&path).unwrap();
            Exactly { file, left }
                .read_to_end(&mut out)
                .map(|_| out)
                .map_err(|e| e.to_string())
        };
        assert_eq!(read(10).unwrap(), b"0123456789");
        // Regression: tar copied the file to its end whatever its header said, and an
        // archive of a file written meanwhile was uploaded broken.
        assert_eq!(read(5).unwrap_err(), "it grew while it was packed");
        assert_eq!(read(20).unwrap_err(), "it shrank while it was packed");
    }

    fn header(path: &str, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        // Write the raw name so the builder's own checks do not stop a hostile path.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        h
    }

    fn hostile(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, kind, data) in entries {
            let mut h = header(
                path,
                *kind,
                if *kind == tar::EntryType::Symlink {
                    0
                } else {
                    data.len() as u64
                },
            );
            if *kind == tar::EntryType::Symlink {
                h.set_link_name(data).unwrap();
                h.set_cksum();
            }
            out.extend_from_slice(h.as_bytes());
            if *kind != tar::EntryType::Symlink {
                out.extend_from_slice(data.as_bytes());
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn pack_and_unpack_round_trip_deterministically() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("bin")).unwrap();
        std::fs::write(src.path().join("bin/tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            src.path().join("bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(src.path().join(MANIFEST), "{}").unwrap();
        std::os::unix::fs::symlink("bin/tool", src.path().join("link")).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        pack(src.path(), &mut a).unwrap();
        pack(src.path(), &mut b).unwrap();
        assert_eq!(a, b);
        let dest = tempfile::tempdir().unwrap();
        unpack(&a[..], dest.path()).unwrap();
        let mode = std::fs::metadata(dest.path().join("bin/tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(dest.path().join("link")).unwrap(),
            Path::new("bin/tool")
        );
    }

    #[test]
    fn hostile_entries_are_rejected() {
        use tar::EntryType::*;
        let cases: Vec<Vec<(&str, tar::EntryType, &str)>> = vec![
            vec![("../evil", Regular, "x")],
            vec![("/etc/evil", Regular, "x")],
            vec![("a/../../evil", Regular, "x")],
            vec![("link", Symlink, "/etc")],
            vec![("link", Symlink, "../outside")],
            vec![("dir/link", Symlink, "../../outside")],
            vec![("dev", Char, "")],
            vec![("fifo", Fifo, "")],
            vec![("hard", Link, "")],
            vec![("link", Symlink, "."), ("link/x", Regular, "x")],
            // Each link stays inside on its own text; followed, the second leads out.
            vec![
                ("a1/a2/a3/a4", Symlink, "../../.."),
                ("x", Symlink, "a1/a2/a3/a4/../../../../etc/hostname"),
            ],
        ];
        for entries in cases {
            let dest = tempfile::tempdir().unwrap();
            let data = hostile(&entries);
            assert!(
                unpack(&data[..], dest.path()).is_err(),
                "accepted {entries:?}"
            );
        }
        let dest = tempfile::tempdir().unwrap();
        let ok = hostile(&[("dir/link", Symlink, "../file"), ("file", Regular, "x")]);
        unpack(&ok[..], dest.path()).unwrap();
    }

    #[test]
    fn a_truncated_archive_is_an_error() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("big"), vec![7u8; 100_000]).unwrap();
        let mut data = Vec::new();
        pack(src.path(), &mut data).unwrap();
        let dest = tempfile::tempdir().unwrap();
        assert!(unpack(&data[..50_000], dest.path()).is_err());
    }
}
