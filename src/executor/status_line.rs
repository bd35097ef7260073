//! The live status line's text: progress, the longest-running tasks here, and
//! where a network build's requests are. A pure function, tested as such.

use std::time::Duration;

/// What a network build's requests are doing.
#[derive(Clone, Copy)]
pub(super) struct RemoteCounts {
    /// Accepted by a worker.
    pub(super) on_workers: usize,
    /// Sent, not yet accepted.
    pub(super) in_broker: usize,
    /// Ready, not yet sent (over `amqp.jobs`).
    pub(super) waiting: usize,
}

/// At most how many running tasks the status line names.
pub(super) const STATUS_NAMES: usize = 3;

/// The live status line: progress, the tasks running here (the longest running
/// first) with their time so far, and where a network build's requests are.
pub(super) fn status_text(
    done: usize,
    total: usize,
    running: &[(&str, Duration)],
    remote: Option<RemoteCounts>,
    stopping: bool,
) -> String {
    let mut text = format!("[{done}/{total}] {} running", running.len());
    let mut longest: Vec<&(&str, Duration)> = running.iter().collect();
    longest.sort_by_key(|r| std::cmp::Reverse(r.1));
    if !longest.is_empty() {
        let named: Vec<String> = longest
            .iter()
            .take(STATUS_NAMES)
            .map(|(name, t)| format!("{name} {}s", t.as_secs()))
            .collect();
        text.push_str(&format!(": {}", named.join(", ")));
        if longest.len() > STATUS_NAMES {
            text.push_str(&format!(" +{}", longest.len() - STATUS_NAMES));
        }
    }
    if let Some(r) = remote {
        text.push_str(&format!(
            "; {} on workers, {} queued in the broker",
            r.on_workers, r.in_broker
        ));
        if r.waiting > 0 {
            text.push_str(&format!(", {} not sent yet", r.waiting));
        }
    }
    if stopping {
        text.push_str(", stopping");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn the_status_line_names_the_longest_running_tasks_and_where_requests_are() {
        let s = Duration::from_secs;
        let running = [("a", s(1)), ("b", s(7)), ("c", s(3)), ("d", s(0))];
        assert_eq!(
            status_text(4, 30, &running, None, false),
            "[4/30] 4 running: b 7s, c 3s, a 1s +1"
        );
        let remote = RemoteCounts {
            on_workers: 2,
            in_broker: 24,
            waiting: 0,
        };
        assert_eq!(
            status_text(4, 30, &[], Some(remote), true),
            "[4/30] 0 running; 2 on workers, 24 queued in the broker, stopping"
        );
    }
}
