//! Built-in `kind = "download"`: a file fetched from the first mirror that answers,
//! checked against its SHA-256, into the artifact.

use std::path::Path;

use super::outcome::Failure;
use super::tasklog::Log;
use crate::graph::{Node, Resolved};
use crate::interrupt;
use crate::store::sources;
use crate::util::secrets;

/// `kind = "download"`: fetches the first mirror that answers, verifies the
/// SHA-256 while streaming, and extracts or copies the file into the artifact.
pub(super) fn download_source(
    node: &Node,
    (builddir, staging): (&Path, &Path),
    log: &Log,
    say: &dyn Fn(String),
) -> Result<(), Failure> {
    let Some(Resolved::Download {
        urls,
        sha256,
        extract,
    }) = &node.source
    else {
        return Err(Failure::new("internal error: not a download task"));
    };
    let (sha256, extract) = (sha256.as_str(), *extract);
    let mut errors = Vec::new();
    for url in urls {
        if interrupt::is_set() {
            return Err(Failure::interrupted("Download interrupted"));
        }
        let name = sources::file_name(url);
        let fetch_url = url;
        // What is shown and logged: the URL without its userinfo.
        let url = &secrets::masked_url(url);
        let file = builddir.join(&name);
        log.line(&format!("Downloading {url}"));
        say(format!("Downloading {url} ({})", node.label()));
        match sources::fetch(fetch_url, &file) {
            Err(e) => errors.push(secrets::redact(&format!("{e:#}")).into_owned()),
            Ok(actual) if actual != sha256 => errors.push(format!(
                "{url}: sha256 mismatch: expected {sha256}, got {actual}"
            )),
            Ok(_) => {
                let extracted = extract
                    && sources::extract(&file, &name, staging)
                        .map_err(|e| Failure::new(format!("{url}: {e:#}")))?;
                if !extracted {
                    std::fs::rename(&file, staging.join(&name))
                        .or_else(|_| std::fs::copy(&file, staging.join(&name)).map(|_| ()))
                        .map_err(|e| Failure::new(format!("{url}: {e}")))?;
                }
                return Ok(());
            }
        }
    }
    Err(Failure::with_lines(errors))
}
