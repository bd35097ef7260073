//! What the bodies of HTTP transfers pass through: an upload packed in memory up
//! to a bound ([`Bounded`]), a streamed upload's pipe that fails as its packer did
//! ([`PackedBody`]), and a download counted and hashed as it is read
//! ([`Counting`]). Plain readers and writers, apart from the client that sends them.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

/// A writer into memory that fails once more than `limit` bytes were written.
pub(super) struct Bounded {
    pub(super) bytes: Vec<u8>,
    pub(super) limit: usize,
    pub(super) full: bool,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.full = true;
            return Err(std::io::Error::other("larger than the in-memory limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The body of a streamed upload: the read end of the packer's pipe. At the end of
/// the pipe it returns the packer's error, if any, so a half-packed archive is never
/// sent as complete (the request fails and the server discards it).
pub(super) struct PackedBody {
    pub(super) pipe: std::io::PipeReader,
    pub(super) done: crossbeam_channel::Receiver<Result<(), String>>,
    /// Where the packer's error is kept for the caller.
    pub(super) failed: Arc<Mutex<Option<String>>>,
}

impl Read for PackedBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.pipe.read(buf)?;
        if n == 0 {
            if let Ok(Err(e)) = self.done.recv() {
                *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                return Err(std::io::Error::other(e));
            }
        }
        Ok(n)
    }
}

/// Counts bytes read through it, and keeps the first read error's text: a transfer
/// that stalled must mark the server down, not pass for a corrupt archive.
pub(super) struct Counting<R> {
    pub(super) inner: R,
    pub(super) count: u64,
    pub(super) failed: Option<String>,
    /// Hashes what is read, where the bytes must have a digest.
    pub(super) hasher: Option<sha2::Sha256>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.count += n as u64;
                if let Some(h) = &mut self.hasher {
                    sha2::Digest::update(h, &buf[..n]);
                }
                Ok(n)
            }
            Err(e) => {
                self.failed.get_or_insert_with(|| e.to_string());
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_packer_fails_the_upload_body_instead_of_ending_it() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        writer.write_all(b"half an archive").unwrap();
        tx.send(Err("disk error".to_string())).unwrap();
        drop(writer);
        let failed: Arc<Mutex<Option<String>>> = Arc::default();
        let mut body = PackedBody {
            pipe: reader,
            done: rx,
            failed: failed.clone(),
        };
        let mut sink = Vec::new();
        let err = body.read_to_end(&mut sink).unwrap_err();
        assert_eq!(err.to_string(), "disk error");
        assert_eq!(failed.lock().unwrap().as_deref(), Some("disk error"));

        let (reader, writer) = std::io::pipe().unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        tx.send(Ok(())).unwrap();
        drop(writer);
        let mut body = PackedBody {
            pipe: reader,
            done: rx,
            failed,
        };
        assert_eq!(body.read_to_end(&mut sink).unwrap(), 0);
    }
}
