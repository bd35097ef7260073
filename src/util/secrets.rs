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
//!   kernel shows them ([`taken_credentials`] keeps them for the configuration),
//!   and overwrites the passwords in its command line, which every user may read.

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
/// - Credentials on the command line (`-c http.password=...`, a URL's password in
///   `-c amqp.host=amqp://user:pw@broker`, `jolt config http.password VALUE`) are
///   overwritten with `*` where the kernel shows the arguments: `/proc/PID/cmdline`
///   (what `ps` shows) is open to every user, dumpable or not. The arguments were
///   copied before (`std::env::args_os` in `main`), and the masked text has the
///   same length.
///
/// Root can still read them (it can read anything of any process); other users saw
/// a command line's credentials until this ran: credentials belong in the
/// environment.
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
    drop(taken);
    mask_arguments();
}

/// Overwrites the credentials in this process's arguments, where
/// `/proc/self/stat` says the kernel keeps them (fields 48 and 49, `arg_start` and
/// `arg_end`), with `*`.
fn mask_arguments() {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields are counted from the last ')' (the name may hold anything): field 3 is
    // index 0 there.
    let Some(rest) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
        return;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<usize>().ok());
    let (Some(start), Some(end)) = (field(48), field(49)) else {
        return;
    };
    if start == 0 || end <= start {
        return;
    }
    // SAFETY: the kernel reports [start, end) as this process's argument strings,
    // which lie in its stack mapping, readable and writable; nothing else runs yet
    // (see `seal_process`). Rust's standard library keeps pointers into them, and
    // later reads see the masked text: bytes are replaced within each string, the
    // NUL terminators left where they are.
    let memory = unsafe { std::slice::from_raw_parts_mut(start as *mut u8, end - start) };
    let mut offsets = Vec::new();
    let mut at = 0;
    for arg in memory.split(|&b| b == 0) {
        offsets.push(at);
        at += arg.len() + 1;
    }
    let args: Vec<&[u8]> = memory.split(|&b| b == 0).collect();
    let masks = secrets_in_arguments(&args);
    for (arg, bytes) in masks {
        let from = offsets[arg];
        memory[from + bytes.start..from + bytes.end].fill(b'*');
    }
}

/// Where arguments hold a credential: `(argument, byte range)` pairs. The value of
/// a `...password=VALUE` argument; the argument after one ending in `password`
/// (`jolt config http.password VALUE`); the password of a URL's userinfo, in an
/// argument holding `://` or in the value of a `KEY=VALUE` one (`amqp.host` takes
/// `user:pw@broker` too).
fn secrets_in_arguments(args: &[&[u8]]) -> Vec<(usize, std::ops::Range<usize>)> {
    const KEY: &[u8] = b"password=";
    let mut out = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        let lower = arg.to_ascii_lowercase();
        if let Some(at) = find(&lower, KEY) {
            if at + KEY.len() < arg.len() {
                out.push((i, at + KEY.len()..arg.len()));
            }
            continue;
        }
        if lower.ends_with(b"password") {
            if let Some(next) = args.get(i + 1).filter(|next| !next.is_empty()) {
                out.push((i + 1, 0..next.len()));
            }
            continue;
        }
        let value = match arg.iter().position(|&b| b == b'=') {
            Some(eq) => eq + 1,
            None if find(arg, b"://").is_some() => 0,
            None => continue,
        };
        if let Some(pw) = userinfo_password(&arg[value..]) {
            out.push((i, value + pw.start..value + pw.end));
        }
    }
    out
}

/// The bytes of the password in a URL's (or an address's) userinfo, still
/// percent-encoded: `pw` in `amqp://user:pw@broker/x` and in `user:pw@broker`.
fn userinfo_password(value: &[u8]) -> Option<std::ops::Range<usize>> {
    let rest = find(value, b"://").map_or(0, |at| at + 3);
    let end = value[rest..]
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .map_or(value.len(), |at| rest + at);
    let at = rest + value[rest..end].iter().rposition(|&b| b == b'@')?;
    let colon = rest + value[rest..at].iter().position(|&b| b == b':')?;
    (colon + 1 < at).then_some(colon + 1..at)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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
    fn credentials_in_arguments_are_found() {
        /// The arguments, and the masked parts: which argument, what text.
        type Case<'a> = (&'a [&'a str], &'a [(usize, &'a str)]);
        let cases: &[Case] = &[
            (
                &["jolt", "-c", "http.password=s3cret", "build"],
                &[(2, "s3cret")],
            ),
            (&["jolt", "-cAMQP.PASSWORD=s3cret"], &[(1, "s3cret")]),
            (&["jolt", "--config=http.password=a=b"], &[(1, "a=b")]),
            (
                &["jolt", "config", "http.password", "s3cret"],
                &[(3, "s3cret")],
            ),
            (
                &["jolt", "-c", "amqp.host=amqp://u:p%40w@broker/a@b"],
                &[(2, "p%40w")],
            ),
            (&["jolt", "-c", "amqp.host=u:pw@broker:5672"], &[(2, "pw")]),
            (&["jolt", "-c", "http.uri=https://u@cache/x"], &[]),
            (&["jolt", "-c", "http.password="], &[]),
            (&["jolt", "build", "a:b", "x@y", "-c", "k=v"], &[]),
        ];
        for (args, expected) in cases {
            let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
            let found: Vec<(usize, &str)> = secrets_in_arguments(&bytes)
                .into_iter()
                .map(|(i, range)| (i, &args[i][range]))
                .collect();
            assert_eq!(found, *expected, "{args:?}");
        }
    }

    #[test]
    fn credential_variables_are_recognised() {
        assert!(is_credential_var("JOLT_HTTP_PASSWORD"));
        assert!(is_credential_var("JOLT_AMQP_USERNAME"));
        assert!(!is_credential_var("JOLT_HTTP_URI"));
        assert!(!is_credential_var("PASSWORD"));
    }
}
