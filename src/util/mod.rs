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
