//! The status line: one line of memory status per device, for logs (the
//! library's `status_interval` thread, `tessera_status_line`, and the
//! Python module's `status_line` and `monitor`). Written here only.
#![forbid(unsafe_code)]

use crate::error::format_bytes;
use crate::stats::{TesseraCounter as C, TesseraGauge as G, TesseraStats};

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
        parts.push(format!(
            "dev{d} allocated {} (peak {}) reserved {} (peak {}) fragmentation {:.1}% ooms {}",
            format_bytes(allocated),
            format_bytes(s.gauge(G::AllocatedBytes).peak as u64),
            format_bytes(reserved),
            format_bytes(s.gauge(G::ReservedBytes).peak as u64),
            if reserved > 0 { 100.0 * (reserved.saturating_sub(allocated)) as f64 / reserved as f64 } else { 0.0 },
            s.counter(C::Ooms),
        ));
    }
    if parts.is_empty() { "tessera: no device used yet".into() } else { format!("tessera: {}", parts.join(" | ")) }
}

/// Starts a thread that prints `line()` on stderr every `every_s` seconds
/// (nothing when it returns None).
pub fn spawn(every_s: u64, line: impl Fn() -> Option<String> + Send + 'static) {
    let spawned = std::thread::Builder::new().name("tessera-status".into()).spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(every_s));
            if let Some(text) = line() {
                eprintln!("{text}");
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("tessera: could not start the status thread: {e}");
    }
}
