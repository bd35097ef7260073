//! Secrets: the passwords jolt is given never reach its output or its tasks.
//!
//! - Configured passwords (`http.password`, `amqp.password`, the password in a URL's
//!   userinfo) are registered here; [`redact`] replaces them in every line jolt
//!   writes, its log records (amiquip's handshake debug output included) among them.
//! - URLs are shown without their userinfo ([`strip_userinfo`]).
//! - Commands never inherit the credential variables of the jolt process
//!   ([`is_credential_var`], [`credential_vars`]).
//! - Nor can they read them from `/proc` ([`seal_process`]): before anything else, a
//!   jolt process becomes non-dumpable, so its `/proc/PID/environ`, `mem` and the
//!   like are root's and ptrace is refused to processes of its uid, and it takes the
//!   credential variables out of its environment, their values overwritten where the
//!   kernel shows them ([`taken_credentials`] keeps them for the configuration).

use std::borrow::Cow;
use std::sync::{Mutex, RwLock};

/// What a secret is replaced with.
pub const MASK: &str = "********";

/// Secrets shorter than this are not redacted: replacing every `dev` or `jolt` would
/// garble output (paths, queue names) without hiding anything worth hiding.
const MIN_SECRET_LEN: usize = 6;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Remembers a secret so that [`redact`] hides it, in its plain form and in the
/// escaped form `{:?}` gives it (which is how protocol frames are logged).
pub fn register(secret: &str) {
    if secret.len() < MIN_SECRET_LEN {
        return;
    }
    let escaped = format!("{secret:?}");
    let escaped = escaped[1..escaped.len() - 1].to_string();
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for s in [secret.to_string(), escaped] {
        if !secrets.contains(&s) {
            secrets.push(s);
        }
    }
    // Longest first, so a secret containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every registered secret replaced by [`MASK`].
pub fn redact(text: &str) -> Cow<'_, str> {
    let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    if !secrets.iter().any(|s| text.contains(s.as_str())) {
        return Cow::Borrowed(text);
    }
    let mut out = text.to_string();
    for s in secrets.iter() {
        out = out.replace(s.as_str(), MASK);
    }
    Cow::Owned(out)
}

/// A log record of another crate, made safe to show: amiquip logs the AMQP
/// handshake at debug level, whose `response` field holds the user and password
/// (`"\0user\0password"`), whatever they are, registered or not.
pub fn redact_record(text: &str) -> Cow<'_, str> {
    const FIELD: &str = "response: \"";
    let Some(start) = text.find(FIELD).map(|i| i + FIELD.len()) else {
        return redact(text);
    };
    // The field ends at the first quote that is not escaped.
    let bytes = text.as_bytes();
    let mut end = start;
    while end < bytes.len() && bytes[end] != b'"' {
        end += if bytes[end] == b'\\' { 2 } else { 1 };
    }
    let end = end.min(text.len());
    let masked = format!("{}{MASK}{}", &text[..start], &text[end..]);
    Cow::Owned(redact(&masked).into_owned())
}

/// A URL's user and password (percent-decoded), split off it.
pub type Userinfo = (String, Option<String>);

/// Splits the userinfo off a URL: `http://user:pw@host/x` gives `http://host/x` and
/// `Some(("user", Some("pw")))` (percent-decoded). URLs without userinfo come back
/// unchanged.
pub fn strip_userinfo(url: &str) -> (String, Option<Userinfo>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None);
    };
    match split_userinfo(rest) {
        (rest, Some(userinfo)) => (format!("{scheme}://{rest}"), Some(userinfo)),
        (_, None) => (url.to_string(), None),
    }
}

/// Splits the userinfo off what follows a URL's scheme (or an address that has
/// none): `user:pw@host:5672/x` gives `host:5672/x` and `Some(("user", Some("pw")))`.
pub fn split_userinfo(rest: &str) -> (String, Option<Userinfo>) {
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (rest.to_string(), None);
    };
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (percent_decode(u), Some(percent_decode(p))),
        None => (percent_decode(userinfo), None),
    };
    (format!("{host}{path}"), Some((user, password)))
}

/// The userinfo of a value that may be a URL or an address without a scheme
/// (`amqp.host` takes both).
pub fn userinfo(value: &str) -> Option<Userinfo> {
    let rest = value.split_once("://").map_or(value, |(_, rest)| rest);
    split_userinfo(rest).1
}

/// A URL as it may be shown: userinfo replaced by the mask (also in a URL that
/// lacks its scheme: `user:pw@host/x`).
pub fn masked_url(url: &str) -> String {
    match strip_userinfo(url) {
        (clean, Some(_)) => match clean.split_once("://") {
            Some((scheme, rest)) => format!("{scheme}://{MASK}@{rest}"),
            None => clean,
        },
        (clean, None) if !clean.contains("://") => {
            let end = clean.find(['/', '?', '#']).unwrap_or(clean.len());
            match clean[..end].rfind('@') {
                Some(at) => format!("{MASK}{}", &clean[at..]),
                None => clean,
            }
        }
        (clean, None) => clean,
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether an environment variable of the jolt process carries a credential:
/// `JOLT_<SECTION>_PASSWORD` and `JOLT_<SECTION>_USERNAME`.
pub fn is_credential_var(name: &str) -> bool {
    name.starts_with("JOLT_") && (name.ends_with("PASSWORD") || name.ends_with("_USERNAME"))
}

/// Whether the variable `name=value` carries a credential: [`is_credential_var`], or
/// a `JOLT_` variable holding a URL with userinfo.
fn is_credential(name: &str, value: &str) -> bool {
    is_credential_var(name) || (name.starts_with("JOLT_") && userinfo(value).is_some())
}

/// The variables of this process that commands must not inherit (none once
/// [`seal_process`] took them out).
pub fn credential_vars() -> Vec<std::ffi::OsString> {
    std::env::vars_os()
        .filter(|(name, value)| is_credential(&name.to_string_lossy(), &value.to_string_lossy()))
        .map(|(name, _)| name)
        .collect()
}

/// The credential variables [`seal_process`] took out of the environment.
static TAKEN: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The credential variables this process was started with, as `(name, value)`:
/// the configuration reads them here, since the environment no longer holds them.
pub fn taken_credentials() -> Vec<(String, String)> {
    TAKEN.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

extern "C" {
    /// The C library's environment (glibc and musl alike; the libc crate declares it
    /// for glibc only).
    static mut environ: *const *mut libc::c_char;
}

/// Puts this process's credentials out of reach of the tasks it runs, which run as
/// the same user: call it first thing in `main`, while the process has one thread
/// and no child.
///
/// - It becomes non-dumpable (`PR_SET_DUMPABLE` 0): `/proc/PID/environ`, `mem`,
///   `maps` and the like become root's, unreadable to processes of the same non-root
///   uid, and ptrace is refused. Children that jolt forks without exec (the
///   guardian) inherit that; commands, which exec, do not, and need not. What a
///   process reads of itself in `/proc/self` (`fd/N` reopened by the console, `stat`,
///   `task/`) stays open to it.
/// - Credential variables ([`is_credential`]) are copied to [`taken_credentials`]
///   and removed from the environment. Unsetting is not enough: `/proc/PID/environ`
///   shows the memory the kernel put the environment in at exec, which `unsetenv`
///   leaves as it was, so each value is overwritten there with zero bytes first.
///   This was chosen over re-executing jolt without them: no second exec per run, no
///   side channel (a pipe or memfd) to hand the values over, and no window in which
///   a process holds them unprotected.
///
/// Root can still read them (it can read anything of any process); and what reads
/// the command line (`ps`, `/proc/PID/cmdline`, open to every user) sees a `-c
/// http.password=...` argument: credentials belong in the environment.
pub fn seal_process() {
    let not_dumpable: libc::c_ulong = 0;
    // SAFETY: prctl with PR_SET_DUMPABLE only changes an attribute of this process.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, not_dumpable, 0, 0, 0) };
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: this runs before any other thread exists (see above), so nothing reads
    // or changes the environment meanwhile. `environ` is a null-terminated array of
    // pointers to NUL-terminated `NAME=VALUE` strings; each value is overwritten
    // within its own length, its terminator kept, before `remove_var` takes the
    // entry out of the array (so every entry of a name, duplicates included, is
    // cleared, and no string is written after the C library could free it).
    unsafe {
        let mut entry = environ;
        while !entry.is_null() && !(*entry).is_null() {
            let text = std::ffi::CStr::from_ptr(*entry).to_bytes();
            if let Some(eq) = text.iter().position(|&b| b == b'=') {
                let name = String::from_utf8_lossy(&text[..eq]).into_owned();
                let value = String::from_utf8_lossy(&text[eq + 1..]).into_owned();
                if is_credential(&name, &value) {
                    let len = text.len() - eq - 1;
                    std::ptr::write_bytes((*entry).add(eq + 1), 0, len);
                    if !taken.iter().any(|(n, _)| *n == name) {
                        taken.push((name, value));
                    }
                }
            }
            entry = entry.add(1);
        }
    }
    for (name, _) in taken.iter() {
        std::env::remove_var(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_split_off_urls() {
        assert_eq!(
            strip_userinfo("http://ci:s%40cret@cache:8080/jolt"),
            (
                "http://cache:8080/jolt".to_string(),
                Some(("ci".to_string(), Some("s@cret".to_string())))
            )
        );
        assert_eq!(strip_userinfo("http://cache/a@b").1, None);
        let pair = Some(("u".to_string(), Some("p@w".to_string())));
        assert_eq!(userinfo("amqp://u:p%40w@broker:5672/vh"), pair);
        assert_eq!(userinfo("u:p%40w@broker"), pair);
        assert_eq!(userinfo("broker/a@b"), None);
        assert_eq!(
            split_userinfo("u@broker:5672"),
            ("broker:5672".to_string(), Some(("u".to_string(), None)))
        );
        assert_eq!(masked_url("https://u:p@h/x"), format!("https://{MASK}@h/x"));
        assert_eq!(masked_url("https://h/x"), "https://h/x");
        assert_eq!(masked_url("u:pw@h/x@y"), format!("{MASK}@h/x@y"));
        assert_eq!(masked_url("h/x"), "h/x");
    }

    #[test]
    fn registered_secrets_are_redacted_also_when_escaped() {
        register("pa\"ss-w0rd");
        assert_eq!(
            redact("PLAIN \\0guest\\0pa\\\"ss-w0rd"),
            format!("PLAIN \\0guest\\0{MASK}")
        );
        assert_eq!(redact("login pa\"ss-w0rd!"), format!("login {MASK}!"));
        assert!(matches!(redact("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn the_amqp_handshake_response_is_masked_whatever_it_holds() {
        let line = r#"sending handshake StartOk { mechanism: "PLAIN", response: "\0guest\0gu\"est", locale: "en_US" }"#;
        let shown = redact_record(line);
        assert!(!shown.contains("guest"), "{shown}");
        assert!(shown.contains("locale: \"en_US\""), "{shown}");
        assert_eq!(redact_record("no handshake here"), "no handshake here");
    }

    #[test]
    fn credential_variables_are_recognised() {
        assert!(is_credential_var("JOLT_HTTP_PASSWORD"));
        assert!(is_credential_var("JOLT_AMQP_USERNAME"));
        assert!(!is_credential_var("JOLT_HTTP_URI"));
        assert!(!is_credential_var("PASSWORD"));
    }
}
