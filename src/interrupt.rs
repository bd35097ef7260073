//! Ctrl-C and SIGTERM: the first sets a flag that running work polls; the second exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Installs the handlers (once).
pub fn install() {
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while the flag is set exits with 130 right away.
        let _ = signal_hook::flag::register_conditional_shutdown(signal, 130, flag.clone());
        let _ = signal_hook::flag::register(signal, flag.clone());
    }
}

/// Whether an interrupt was received.
pub fn is_set() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed))
}
