//! The threads that HTTP transfers run on, and how a transfer is given up on a
//! Ctrl-C. A blocking read cannot be interrupted, so each transfer runs on a thread
//! of its own while its caller watches for the interruption; the threads are kept
//! between transfers, as starting one per request cost a tenth of a network
//! client's CPU. Both are a thread pool's concerns, apart from what is transferred.

use anyhow::{bail, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A transfer given up because jolt was interrupted.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Whether an error (anywhere in its chain) is an [`Interrupted`] transfer.
pub fn is_interrupted(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<Interrupted>())
}

/// Runs a transfer on a thread of its own and waits for it, but returns
/// [`Interrupted`] within a tenth of a second of a Ctrl-C: a blocking read cannot be
/// interrupted, so the thread is left to end with the process (what it was writing
/// is a staging directory, which nothing commits).
pub(super) fn interruptible<T: Send + 'static>(
    transfer: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    TransferThreads::shared().interruptible(transfer)
}

/// A transfer, which returns how to deliver its result: the thread counts itself
/// idle before it delivers, so the transfer that follows finds it idle.
pub(super) type TransferJob = Box<dyn FnOnce() -> Delivery + Send>;
pub(super) type Delivery = Box<dyn FnOnce() + Send>;

/// Threads that transfers run on, kept between transfers: a thread started and ended
/// per request (the mmap, mprotect and munmap of its stack) was about a tenth of a
/// network client's CPU. A transfer takes an idle thread, reserving it, or starts
/// one, so it never waits behind another; a thread idle for [`TRANSFER_THREAD_IDLE`]
/// ends. The process has one ([`TransferThreads::shared`]); a test makes its own,
/// so that what other tests transfer at the same time does not count.
pub(super) struct TransferThreads {
    jobs: crossbeam_channel::Sender<TransferJob>,
    queue: crossbeam_channel::Receiver<TransferJob>,
    /// Threads waiting for a job and not reserved.
    idle: Arc<std::sync::atomic::AtomicUsize>,
    /// How long a thread waits for a job before it ends.
    keep: Duration,
}

const TRANSFER_THREAD_IDLE: Duration = Duration::from_secs(30);

impl TransferThreads {
    fn new(keep: Duration) -> TransferThreads {
        let (jobs, queue) = crossbeam_channel::unbounded();
        TransferThreads {
            jobs,
            queue,
            idle: Arc::default(),
            keep,
        }
    }

    /// The process's transfer threads.
    pub(super) fn shared() -> &'static TransferThreads {
        static THREADS: std::sync::OnceLock<TransferThreads> = std::sync::OnceLock::new();
        THREADS.get_or_init(|| TransferThreads::new(TRANSFER_THREAD_IDLE))
    }

    /// See [`interruptible`].
    fn interruptible<T: Send + 'static>(
        &self,
        transfer: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.run(Box::new(move || {
            let result = transfer();
            Box::new(move || {
                let _ = tx.send(result);
            })
        }))?;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(result) => return result,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if crate::interrupt::is_set() {
                        return Err(Interrupted.into());
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    bail!("the transfer ended without a result")
                }
            }
        }
    }

    /// Hands `job` to an idle thread, or to a new one.
    pub(super) fn run(&self, job: TransferJob) -> Result<()> {
        let reserved = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if reserved {
            let _ = self.jobs.send(job);
            return Ok(());
        }
        let (queue, idle, keep) = (self.queue.clone(), self.idle.clone(), self.keep);
        std::thread::Builder::new()
            .name("transfer".into())
            .spawn(move || {
                let mut job = job;
                loop {
                    let deliver = job();
                    idle.fetch_add(1, Ordering::AcqRel);
                    deliver();
                    job = match queue.recv_timeout(keep) {
                        Ok(job) => job,
                        Err(_) => {
                            // Leave unless a transfer reserved this thread meanwhile
                            // (its job is then on its way).
                            let left = idle
                                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok();
                            // A thread that left must not take a job: it was sent
                            // for another, which it would drop.
                            if left {
                                return;
                            }
                            match queue.recv() {
                                Ok(job) => job,
                                Err(_) => return,
                            }
                        }
                    };
                }
            })
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("Cannot start a transfer: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_reuse_their_threads_and_never_wait_for_one() {
        // Threads of the test's own: other tests transfer on the process's at the
        // same time, and would take its idle thread or make it start more.
        let threads = TransferThreads::new(TRANSFER_THREAD_IDLE);
        // One after another: one thread serves them all (it was a thread each). A
        // thread counts itself idle before it delivers, so this holds however the
        // threads are scheduled.
        let ids: Vec<std::thread::ThreadId> = (0..50)
            .map(|_| {
                threads
                    .interruptible(|| Ok(std::thread::current().id()))
                    .unwrap()
            })
            .collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "{} threads for 50 transfers",
            distinct.len()
        );
        // At once: each gets a thread, none waits for another to end (each waits
        // here until all eight run).
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|scope| {
            let waiting: Vec<_> = (0..8)
                .map(|_| {
                    let (started, threads) = (started.clone(), &threads);
                    scope.spawn(move || {
                        threads.interruptible(move || {
                            started.fetch_add(1, Ordering::SeqCst);
                            let deadline = std::time::Instant::now() + Duration::from_secs(60);
                            while started.load(Ordering::SeqCst) < 8 {
                                if std::time::Instant::now() > deadline {
                                    return Ok(false);
                                }
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            Ok(true)
                        })
                    })
                })
                .collect();
            for w in waiting {
                assert!(
                    w.join().unwrap().unwrap(),
                    "a transfer waited for another's thread"
                );
            }
        });
    }

    #[test]
    fn a_thread_that_ends_idle_takes_no_transfer_with_it() {
        // Threads that end after 50 ms without a job.
        let threads = TransferThreads::new(Duration::from_millis(50));
        for round in 0..20 {
            // Two transfers at once make two threads, which then idle out; more
            // transfers follow, each reserving a thread that is still there.
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    scope.spawn(|| {
                        threads
                            .interruptible(|| {
                                std::thread::sleep(Duration::from_millis(10));
                                Ok(())
                            })
                            .unwrap()
                    });
                }
            });
            std::thread::sleep(Duration::from_millis(20 + 10 * (round % 8)));
            for _ in 0..5 {
                // Regression (issue 23): a thread that had ended its wait took the
                // next job sent to the queue and dropped it: "the transfer ended
                // without a result", for a worker idle 30 s.
                threads.interruptible(|| Ok(())).unwrap();
            }
        }
    }
}
