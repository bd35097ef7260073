//! The planner's decision for one node: a pure function of what is known about it
//! (the kind of build, whether it is a goal, cacheable, in the local cache, and
//! whether the HTTP cache may be downloaded from and uploaded to) and of two
//! questions asked only when the answer matters, since each may cost a round trip:
//! does the HTTP cache hold it, and are a `fast` task's needs all here.

use super::plan::{Choice, Plan};

/// What kind of build decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Local,
    DownloadOnly,
    Worker,
    Network,
}

/// What is known about a node without asking anyone.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Facts {
    pub goal: bool,
    pub cacheable: bool,
    /// Its artifact is in the local cache.
    pub local: bool,
    /// An HTTP cache is configured with downloads enabled.
    pub download: bool,
    /// An HTTP cache is configured with uploads enabled.
    pub upload: bool,
    /// Ask the HTTP cache before planning a download (a dry run, which downloads
    /// nothing to find out).
    pub ask_first: bool,
}

/// The questions whose answers cost something.
pub(super) trait Ask {
    /// Whether the HTTP cache holds the artifact.
    fn remote(&mut self) -> bool;
    /// Whether the task is `fast` and every artifact it needs is in the local cache.
    fn fast_here(&mut self) -> bool;
}

/// Decides what happens to one node.
pub(super) fn choose(kind: Kind, f: Facts, ask: &mut dyn Ask) -> Choice {
    match kind {
        // What the local cache has, else what the HTTP cache has, else execute. The
        // HTTP cache is not asked first: the download's GET asks (a 404 is a miss,
        // and the node executes then, with what it needs).
        Kind::Local => Choice::Plan(if f.local {
            Plan::Available
        } else if f.cacheable && f.download && (!f.ask_first || ask.remote()) {
            Plan::Download
        } else {
            Plan::Execute
        }),
        // `jolt download`: from one of the caches, or not at all.
        Kind::DownloadOnly => {
            if f.local {
                Choice::Plan(Plan::Available)
            } else if ask.remote() {
                Choice::Plan(Plan::Download)
            } else {
                Choice::NotBuilt
            }
        }
        // A worker: the goal is served from the HTTP cache, uploaded from the local
        // one, or executed; requirements come from the caches (or, keeping no
        // artifact, run here as in a local build). A requirement's download asks
        // with its GET: a 404 fails it as not built.
        Kind::Worker if !f.goal => Choice::Plan(if f.local {
            Plan::Available
        } else if !f.cacheable {
            Plan::Execute
        } else if !f.ask_first || ask.remote() {
            Plan::Download
        } else {
            return Choice::NotBuilt;
        }),
        Kind::Worker => {
            let remote = f.cacheable && ask.remote();
            match (f.local, remote) {
                (_, true) => Choice::InHttpCache,
                (true, false) => Choice::Plan(Plan::Upload),
                (false, false) => Choice::Plan(Plan::Execute),
            }
        }
        // A network client: what the HTTP cache has is not sent (a goal is
        // downloaded), what only the local cache has is uploaded, a `fast` task whose
        // needs are all here runs here, the rest goes to the workers.
        Kind::Network => {
            let remote = f.cacheable && ask.remote();
            Choice::Plan(if remote && f.local {
                Plan::Available
            } else if remote {
                if !(f.goal && f.download) {
                    return Choice::InHttpCache;
                }
                Plan::Download
            } else if f.local && f.upload {
                Plan::Upload
            } else if ask.fast_here() {
                Plan::Execute
            } else {
                Plan::Remote
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers given in advance; `None` panics: the question must not be asked.
    struct Answers {
        remote: Option<bool>,
        fast: Option<bool>,
    }

    impl Ask for Answers {
        fn remote(&mut self) -> bool {
            self.remote.expect("the HTTP cache was asked needlessly")
        }
        fn fast_here(&mut self) -> bool {
            self.fast.expect("fast was asked needlessly")
        }
    }

    const A: Choice = Choice::Plan(Plan::Available);
    const D: Choice = Choice::Plan(Plan::Download);
    const U: Choice = Choice::Plan(Plan::Upload);
    const X: Choice = Choice::Plan(Plan::Execute);
    const R: Choice = Choice::Plan(Plan::Remote);
    const H: Choice = Choice::InHttpCache;
    const N: Choice = Choice::NotBuilt;

    /// One row: goal, cacheable, local, the HTTP cache's answer, fast's answer, the
    /// choice. Downloads and uploads are enabled unless the row says otherwise.
    type Row = (bool, bool, bool, Option<bool>, Option<bool>, Choice);

    #[track_caller]
    fn check(kind: Kind, rows: &[Row], download: bool, upload: bool) {
        for (n, &(goal, cacheable, local, remote, fast, want)) in rows.iter().enumerate() {
            let facts = Facts {
                goal,
                cacheable,
                local,
                download,
                upload,
                ask_first: false,
            };
            let got = choose(kind, facts, &mut Answers { remote, fast });
            assert_eq!(got, want, "{kind:?} row {n}: {facts:?} remote {remote:?}");
        }
    }

    #[test]
    fn local_builds_use_the_local_cache_then_try_the_http_cache_then_execute() {
        // Nothing is asked: a download that finds nothing turns into an execution.
        let rows: &[Row] = &[
            (true, true, true, None, None, A),
            (false, true, true, None, None, A),
            (true, true, false, None, None, D),
            (false, true, false, None, None, D),
            // Not cacheable: always executed.
            (true, false, false, None, None, X),
        ];
        check(Kind::Local, rows, true, true);
        // Without downloads (or with the cache down): executed.
        check(
            Kind::Local,
            &[(true, true, false, None, None, X)],
            false,
            true,
        );
        // A dry run asks first.
        for (remote, want) in [(true, D), (false, X)] {
            let facts = Facts {
                goal: true,
                cacheable: true,
                download: true,
                ask_first: true,
                ..Facts::default()
            };
            let mut answers = Answers {
                remote: Some(remote),
                fast: None,
            };
            assert_eq!(choose(Kind::Local, facts, &mut answers), want);
        }
    }

    #[test]
    fn downloads_come_from_a_cache_or_not_at_all() {
        let rows: &[Row] = &[
            (true, true, true, None, None, A),
            (true, true, false, Some(true), None, D),
            (true, true, false, Some(false), None, N),
            (false, false, false, Some(false), None, N),
        ];
        check(Kind::DownloadOnly, rows, true, true);
    }

    #[test]
    fn workers_serve_execute_or_upload_the_goal_and_fetch_requirements() {
        let rows: &[Row] = &[
            (true, true, false, Some(true), None, H),
            (true, true, true, Some(true), None, H),
            (true, true, true, Some(false), None, U),
            (true, true, false, Some(false), None, X),
            (true, false, false, None, None, X),
            // Requirements: the local cache, else a download, without asking: the
            // GET asks (a 404 fails the requirement as not built).
            (false, true, true, None, None, A),
            (false, true, false, None, None, D),
            (false, false, false, None, None, X),
        ];
        check(Kind::Worker, rows, true, true);
    }

    #[test]
    fn network_clients_send_what_no_cache_has_and_download_their_goals() {
        let rows: &[Row] = &[
            (true, true, true, Some(true), None, A),
            (true, true, false, Some(true), None, D),
            (false, true, false, Some(true), None, H),
            (false, true, true, Some(false), None, U),
            (true, true, false, Some(false), Some(true), X),
            (true, true, false, Some(false), Some(false), R),
            (false, false, false, None, Some(false), R),
        ];
        check(Kind::Network, rows, true, true);
        // Without downloads a goal in the HTTP cache stays there; without uploads an
        // artifact only this client has is built again by a worker.
        let rows: &[Row] = &[
            (true, true, false, Some(true), None, H),
            (true, true, true, Some(false), Some(false), R),
        ];
        check(Kind::Network, rows, false, false);
    }
}
