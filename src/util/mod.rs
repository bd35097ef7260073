//! Small helpers every layer uses: file system, globs, secrets, hex, base64, TOML errors.
//! Nothing here knows recipes, graphs or caches.

pub mod fs;
pub mod globs;
pub mod secrets;

/// Whether `name` is a legal task name (also a pool's, `amqp.routing_key`): ASCII letters, digits and `_ - . /`, in
/// `/`-separated parts that are neither empty, `.`, `..`, start with a dot nor are 64
/// hex digits (a name becomes a directory of the cache and a path of the HTTP
/// cache's URLs).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && name.split('/').all(|part| {
            // A part that looks like an identity would read as an artifact directory
            // of the cache (`<task>/<identity>/`).
            let identity_like = part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit());
            !part.is_empty() && !part.starts_with('.') && !identity_like
        })
}

/// The candidate closest to `word` when it is close enough to be a typo of it
/// (an edit distance of at most a third of its length, and at least 1), as
/// ` (did you mean 'X'?)` to append to an error; empty otherwise.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| format!(" (did you mean '{c}'?)"))
        .unwrap_or_default()
}

/// Edit distance between two strings, by characters: insertions, deletions,
/// substitutions and swaps of neighbours (the commonest typos) count one each.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: distance between the first i characters of a and the first j of b.
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

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

/// `data` in standard base64 (RFC 4648, padded), as HTTP Basic auth wants it.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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

/// 16 random bytes, from `/dev/urandom`, or where a chroot has none, a digest of
/// this process, the time and a counter (unique, not secret).
pub fn random_bytes() -> [u8; 16] {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seed = format!("{nanos}:{}", fs::unique_suffix());
        bytes.copy_from_slice(&Sha256::digest(seed.as_bytes())[..16]);
    }
    bytes
}

/// `items` in a fresh random order ([`random_bytes`]).
pub fn shuffle<T>(items: &mut [T]) {
    let bytes = random_bytes();
    let seed = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    shuffle_with(items, seed);
}

/// `items` in the order the seed `seed` gives: a Fisher-Yates shuffle driven by
/// splitmix64 (a bias of one in 2^64 / len is no matter for a list of brokers).
fn shuffle_with<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        items.swap(i, (z % (i as u64 + 1)) as usize);
    }
}

/// The CPUs this process may use, asked once: the answer reads cgroup files, which
/// a worker would otherwise do for every request.
pub fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    }

    #[test]
    fn a_shuffle_keeps_the_items_and_puts_each_first_about_as_often() {
        let mut firsts = [0u32; 4];
        for seed in 0..4000u64 {
            let mut items = [0, 1, 2, 3];
            shuffle_with(&mut items, seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut sorted = items;
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3]);
            firsts[items[0]] += 1;
        }
        assert!(
            firsts.iter().all(|&n| (800..1200).contains(&n)),
            "{firsts:?}"
        );
        let (mut a, mut b) = ([0; 12], [0; 12]);
        for (i, (a, b)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
            (*a, *b) = (i, i);
        }
        shuffle(&mut a);
        shuffle(&mut b);
        // Fresh each time: two orders of 12 agree by chance once in 479 million.
        assert_ne!(a, b);
        let mut one = ["only"];
        shuffle(&mut one);
        assert_eq!(one, ["only"]);
    }

    #[test]
    fn typos_get_a_suggestion_and_strangers_none() {
        let tasks = ["hello", "print", "help"];
        assert_eq!(did_you_mean("helo", tasks), " (did you mean 'hello'?)");
        assert_eq!(did_you_mean("prnit", tasks), " (did you mean 'print'?)");
        assert_eq!(did_you_mean("nope", tasks), "");
        assert_eq!(did_you_mean("hello", tasks), "");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("prnit", "print"), 1);
        assert_eq!(edit_distance("", "ab"), 2);
    }
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn printable_paths_escape_controls_and_non_utf8() {
        let p = std::path::Path::new(std::ffi::OsStr::from_bytes(b"a\n[ INFO] x\xff\\b/\xc3\xa9"));
        assert_eq!(printable(p), "a\\n[ INFO] x\\xff\\\\b/\u{e9}");
    }
}
