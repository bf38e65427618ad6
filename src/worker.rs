//! The driver thread: one per process, started with the global allocator
//! (option `driver_thread`), which runs the devices' tidy steps (pool/ready.rs)
//! off the callers' threads. It sleeps until a device pokes its signal (a
//! miss, a free, a growth left it work), or, while cached memory waits for
//! the device to pass it, polls with a backoff of 1 to 64 ms.
//! Invariant: it never runs after `stop` returned; it ends at process exit
//! (before the driver's own exit handlers) and at unload.
use crate::pool::Tidy;
use crate::thread::{Signal, Thread};
use std::sync::Mutex;
use std::time::Duration;

/// The running driver thread.
static THREAD: Mutex<Option<Thread>> = Mutex::new(None);

/// The first and the longest wait between polls while memory waits for the
/// device.
const POLL_FIRST: Duration = Duration::from_millis(1);
const POLL_MOST: Duration = Duration::from_millis(64);

/// Starts the driver thread, which calls `tidy` (None: nothing to tidy, the
/// allocator is going) whenever poked or polling, unless one runs. Returns
/// its signal, for the devices to poke.
pub fn start(tidy: impl Fn() -> Option<Tidy> + Send + 'static) -> Option<std::sync::Arc<Signal>> {
    let mut thread = THREAD.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = thread.as_ref() {
        return Some(t.signal());
    }
    *thread = crate::thread::spawn("driver thread", move |signal| run(signal, &tidy));
    thread.as_ref().map(Thread::signal)
}

/// The thread's loop: tidy, then sleep until poked, or poll while waiting.
fn run(signal: &Signal, tidy: &dyn Fn() -> Option<Tidy>) {
    let mut poll: Option<Duration> = None;
    while signal.wait(poll) {
        poll = match tidy() {
            Some(Tidy::Waiting) => Some(poll.map_or(POLL_FIRST, |p| (p * 2).min(POLL_MOST))),
            Some(Tidy::Worked) => Some(Duration::ZERO),
            _ => None,
        };
    }
}

/// Ends the driver thread, if one runs, and waits for it (at most one tidy
/// step: a handle's driver calls).
pub fn stop() {
    let taken = THREAD.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(thread) = taken {
        thread.stop();
    }
}
