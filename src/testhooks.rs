//! Test hooks: what tests change through `JOLT_TEST_*` variables, all of them here.
//!
//! They are compiled only with the `test-hooks` feature, which the test build turns
//! on (the package is its own dev-dependency with it: see Cargo.toml), so a release
//! binary reads no `JOLT_TEST_*` variable: without the feature every hook is a
//! constant (no pause, no change). `JOLT_TEST_LOCK_SHARDS` changes the shard count
//! that every worker of a broker must agree on, which no production worker may read.

use std::sync::OnceLock;
use std::time::Duration;

/// The milliseconds `JOLT_TEST_<name>` gives, if the hooks are compiled in.
#[cfg(feature = "test-hooks")]
fn number(name: &str) -> Option<u64> {
    std::env::var(format!("JOLT_TEST_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
}

#[cfg(not(feature = "test-hooks"))]
fn number(_name: &str) -> Option<u64> {
    None
}

/// Sleeps for the milliseconds `JOLT_TEST_<name>` gives (read once, into `once`).
fn pause(once: &OnceLock<Option<Duration>>, name: &str) {
    if let Some(pause) = once.get_or_init(|| number(name).map(Duration::from_millis)) {
        std::thread::sleep(*pause);
    }
}

/// Holds each command between its start and its registration with the guardian, so
/// that a test can kill jolt in that instant (`JOLT_TEST_SPAWN_PAUSE_MS`).
pub fn pause_after_spawn() {
    static PAUSE: OnceLock<Option<Duration>> = OnceLock::new();
    pause(&PAUSE, "SPAWN_PAUSE_MS");
}

/// Holds each request between its publication and its parking with the waiter, so
/// that its reply comes first (`JOLT_TEST_PARK_PAUSE_MS`).
pub fn pause_before_parking() {
    static PAUSE: OnceLock<Option<Duration>> = OnceLock::new();
    pause(&PAUSE, "PARK_PAUSE_MS");
}

/// Holds a worker before it locks a request (`JOLT_TEST_LOCK_PAUSE_MS`).
pub fn pause_before_lock() {
    static PAUSE: OnceLock<Option<Duration>> = OnceLock::new();
    pause(&PAUSE, "LOCK_PAUSE_MS");
}

/// How long a worker takes a requester to be there still, for tests that must not
/// depend on how fast one request follows another (`JOLT_TEST_REQUESTER_KEPT_MS`).
pub fn requester_kept() -> Option<Duration> {
    static KEPT: OnceLock<Option<Duration>> = OnceLock::new();
    *KEPT.get_or_init(|| number("REQUESTER_KEPT_MS").map(Duration::from_millis))
}

/// How long a build runs before a worker says `accepted`, for tests that must not
/// depend on how long a short build takes (`JOLT_TEST_ACCEPTED_AFTER_MS`).
pub fn accepted_after() -> Option<Duration> {
    static AFTER: OnceLock<Option<Duration>> = OnceLock::new();
    *AFTER.get_or_init(|| number("ACCEPTED_AFTER_MS").map(Duration::from_millis))
}

/// Fewer lock shards, for tests that make identities collide
/// (`JOLT_TEST_LOCK_SHARDS`; every worker of a broker must use the same count).
pub fn lock_shards() -> Option<u32> {
    static SHARDS: OnceLock<Option<u32>> = OnceLock::new();
    *SHARDS.get_or_init(|| number("LOCK_SHARDS").and_then(|n| u32::try_from(n).ok()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_test_build_reads_the_hooks() {
        // The test build has the feature on (Cargo.toml's dev-dependency on this
        // package): the integration tests that use the hooks depend on it. A
        // variable of this test's own, which nothing else reads.
        std::env::set_var("JOLT_TEST_UNIT_PROBE", "7");
        assert_eq!(super::number("UNIT_PROBE"), Some(7));
    }
}
