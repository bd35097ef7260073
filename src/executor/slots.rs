//! A counting semaphore: the transfers a build makes at once, whichever lane's job
//! makes them.

use std::sync::Mutex;
use std::time::Duration;

use crate::interrupt;

/// A counting semaphore.
pub(super) struct Slots {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

/// A slot of [`Slots`], given back when dropped.
pub(super) struct Slot<'a>(&'a Slots);

impl Slots {
    pub fn new(n: usize) -> Slots {
        Slots {
            free: Mutex::new(n.max(1)),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Takes a slot, waiting for one; `None` once the build is interrupted.
    pub(super) fn take(&self) -> Option<Slot<'_>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            if interrupt::is_set() {
                return None;
            }
            free = self
                .freed
                .wait_timeout(free, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *free -= 1;
        Some(Slot(self))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}
