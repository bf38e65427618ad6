//! The status line: one line of memory status per device, for logs (the
//! library's `status_interval` thread, `tessera_status_line`, and the
//! Python module's `status_line` and `monitor`). Written here only.
//! Invariant: at most one status thread runs, and `stop` ends it before it
//! returns (the library may be unloaded right after). It is a bare pthread
//! that touches no thread-local with a destructor: such a thread-exit hook
//! would pin the library, and dlclose would leave it (and the thread) be.
use crate::error::format_bytes;
use crate::stats::{TesseraCounter as C, TesseraGauge as G, TesseraStats};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What the status thread and `stop` share: whether to stop, and the
/// condition it sleeps on.
struct Wake {
    stop: Mutex<bool>,
    cond: Condvar,
}

/// What the thread runs.
struct Job {
    every: Duration,
    line: Box<dyn Fn() -> Option<String> + Send>,
    wake: Arc<Wake>,
}

/// The running status thread: what wakes it, and its pthread.
static THREAD: Mutex<Option<(Arc<Wake>, libc::pthread_t)>> = Mutex::new(None);

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

/// Starts the thread that prints `line()` on stderr every `every_s`
/// seconds (nothing when it returns None), unless one runs.
pub fn spawn(every_s: u64, line: impl Fn() -> Option<String> + Send + 'static) {
    let mut thread = THREAD.lock().unwrap_or_else(|p| p.into_inner());
    if thread.is_some() {
        return;
    }
    let wake = Arc::new(Wake { stop: Mutex::new(false), cond: Condvar::new() });
    let job = Box::new(Job { every: Duration::from_secs(every_s), line: Box::new(line), wake: wake.clone() });
    let arg = Box::into_raw(job) as *mut libc::c_void;
    let mut id: libc::pthread_t = 0;
    // SAFETY: `status_main` takes the Box back from `arg` exactly once; on a
    // failed create nothing ran and the Box is taken back here.
    let rc = unsafe { libc::pthread_create(&mut id, std::ptr::null(), status_main, arg) };
    if rc == 0 {
        *thread = Some((wake, id));
    } else {
        // SAFETY: the thread was not created: `arg` is still ours.
        drop(unsafe { Box::from_raw(arg as *mut Job) });
        tracing::warn!("tessera: could not start the status thread (pthread_create: {rc})");
    }
}

/// The status thread: sleeps `every` (or until told to stop), prints.
extern "C" fn status_main(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `spawn` passed a Box<Job> it gave up.
    let job = unsafe { Box::from_raw(arg as *mut Job) };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut stop = job.wake.stop.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (guard, _) = job.wake.cond.wait_timeout(stop, job.every).unwrap_or_else(|p| p.into_inner());
            stop = guard;
            if *stop {
                return;
            }
            if let Some(text) = (job.line)() {
                let text = format!("{text}\n");
                // SAFETY: writes bytes we own to stderr (eprintln! would touch
                // the thread-local output capture).
                unsafe { libc::write(2, text.as_ptr() as *const libc::c_void, text.len()) };
            }
        }
    }));
    std::ptr::null_mut()
}

/// Ends the status thread, if one runs, and waits for it.
pub fn stop() {
    let taken = THREAD.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((wake, id)) = taken {
        *wake.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.cond.notify_all();
        // SAFETY: `id` is a joinable thread that nothing else joins.
        unsafe { libc::pthread_join(id, std::ptr::null_mut()) };
    }
}
