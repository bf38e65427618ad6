//! The status line: one line of memory status per device, for logs (the
//! library's `status_interval` thread, `tessera_status_line`, and the
//! Python module's `status_line` and `monitor`). Written here only.
//! Invariant: at most one status thread runs (a thread.rs thread), and
//! `stop` ends it before it returns.
use crate::error::format_bytes;
use crate::stats::{TesseraCounter as C, TesseraGauge as G, TesseraStats};
use crate::thread::Thread;
use std::sync::Mutex;
use std::time::Duration;

/// The running status thread.
static THREAD: Mutex<Option<Thread>> = Mutex::new(None);

/// The line for `devices` (index, statistics); with `skip_unused`, the
/// devices that never allocated are left out.
pub fn line(devices: &[(i32, TesseraStats)], skip_unused: bool) -> String {
    let mut parts = Vec::new();
    for (d, s) in devices {
        let reserved = s.gauge(G::ReservedBytes).current as u64;
        if skip_unused && reserved == 0 && s.counter(C::CacheMisses) == 0 {
            continue;
        }
        let allocated = s.gauge(G::AllocatedBytes).current as u64;
        // Paused tags' blocks stay allocated while their memory is away.
        let paused = s.gauge(G::PausedBytes).current as u64;
        let held = reserved + paused;
        let mut part = format!(
            "dev{d} allocated {} (peak {}) reserved {} (peak {}) fragmentation {:.1}% ooms {}",
            format_bytes(allocated),
            format_bytes(s.gauge(G::AllocatedBytes).peak as u64),
            format_bytes(reserved),
            format_bytes(s.gauge(G::ReservedBytes).peak as u64),
            if held > 0 { 100.0 * (held.saturating_sub(allocated)) as f64 / held as f64 } else { 0.0 },
            s.counter(C::Ooms),
        );
        if paused > 0 {
            part += &format!(" paused {} (backup {})", format_bytes(paused), format_bytes(s.gauge(G::BackupBytes).current as u64));
        }
        parts.push(part);
    }
    if parts.is_empty() { "tessera: no device used yet".into() } else { format!("tessera: {}", parts.join(" | ")) }
}

/// Starts the thread that prints `line()` on stderr every `every_s`
/// seconds (nothing when it returns None), unless one runs.
pub fn spawn(every_s: u64, line: impl Fn() -> Option<String> + Send + 'static) {
    let mut thread = THREAD.lock().unwrap_or_else(|p| p.into_inner());
    if thread.is_some() {
        return;
    }
    let every = Duration::from_secs(every_s);
    *thread = crate::thread::spawn("status thread", move |signal| {
        while signal.wait(Some(every)) {
            if let Some(text) = line() {
                let text = format!("{text}\n");
                // SAFETY: writes bytes we own to stderr (eprintln! would touch
                // the thread-local output capture).
                unsafe { libc::write(2, text.as_ptr() as *const libc::c_void, text.len()) };
            }
        }
    });
}

/// Ends the status thread, if one runs, and waits for it.
pub fn stop() {
    let taken = THREAD.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(thread) = taken {
        thread.stop();
    }
}
