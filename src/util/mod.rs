//! Small helpers every layer uses: file system, globs, secrets, hex, TOML errors.
//! Nothing here knows recipes, graphs or caches.

pub mod fs;
pub mod globs;
pub mod secrets;

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Formats a TOML error as one line with the line and column it points at.
pub fn one_line(err: &toml::de::Error, text: &str) -> String {
    let message = err.message().replace('\n', " ");
    match err.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!("line {line}, column {column}: {}", message.trim())
        }
        None => message.trim().to_string(),
    }
}

/// A path as one printable line: control characters escaped (`\n`, `\u{1b}`) and
/// bytes that are not UTF-8 as `\xNN`, so a hostile file name can neither forge a
/// console line nor hide which file it is.
pub fn printable(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in path.as_os_str().as_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn printable_paths_escape_controls_and_non_utf8() {
        let p = std::path::Path::new(std::ffi::OsStr::from_bytes(b"a\n[ INFO] x\xff\\b/\xc3\xa9"));
        assert_eq!(printable(p), "a\\n[ INFO] x\\xff\\\\b/\u{e9}");
    }
}
