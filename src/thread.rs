//! The threads tessera starts in its host's process (the status line, the
//! driver thread): bare pthreads, each with a [`Signal`] that wakes it or
//! tells it to stop. They touch no thread-local with a destructor: such a
//! thread-exit hook would pin the library, and dlclose would leave it (and
//! the thread) be. No panic leaves a thread's body.
//! Invariant: a started [`Thread`] is joined exactly once, by `stop`, which
//! returns only after the thread ended (the library may be unloaded next).
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What a thread and its owner share: (stop asked, poked), and the
/// condition the thread sleeps on.
pub struct Signal {
    state: Mutex<(bool, bool)>,
    cond: Condvar,
}

impl Signal {
    fn new() -> Arc<Signal> {
        Arc::new(Signal { state: Mutex::new((false, false)), cond: Condvar::new() })
    }

    /// Wakes the thread if it sleeps in `wait` (or makes its next `wait`
    /// return at once).
    pub fn poke(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.cond.notify_one();
    }

    /// Sleeps until poked, told to stop, or `timeout` (None: no timeout)
    /// passed; clears the poke. False once the thread must stop.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.0 && !state.1 {
            state = match timeout {
                Some(t) => self.cond.wait_timeout(state, t).unwrap_or_else(|p| p.into_inner()).0,
                None => self.cond.wait(state).unwrap_or_else(|p| p.into_inner()),
            };
        }
        state.1 = false;
        !state.0
    }

    fn stop(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 = true;
        self.cond.notify_all();
    }
}

/// A running thread: its signal and its pthread.
pub struct Thread {
    signal: Arc<Signal>,
    id: libc::pthread_t,
}

/// What the pthread runs: the body and its signal.
struct Job {
    body: Box<dyn FnOnce(&Signal) + Send>,
    signal: Arc<Signal>,
}

/// Starts a thread that runs `body` with its signal (the body returns when
/// `Signal::wait` says to stop). None, with a warning naming `what`, if the
/// thread cannot be made.
pub fn spawn(what: &str, body: impl FnOnce(&Signal) + Send + 'static) -> Option<Thread> {
    let signal = Signal::new();
    let job = Box::new(Job { body: Box::new(body), signal: signal.clone() });
    let arg = Box::into_raw(job) as *mut libc::c_void;
    let mut id: libc::pthread_t = 0;
    // SAFETY: `thread_main` takes the Box back from `arg` exactly once; on a
    // failed create nothing ran and the Box is taken back here.
    let rc = unsafe { libc::pthread_create(&mut id, std::ptr::null(), thread_main, arg) };
    if rc != 0 {
        // SAFETY: the thread was not created: `arg` is still ours.
        drop(unsafe { Box::from_raw(arg as *mut Job) });
        tracing::warn!("tessera: could not start the {what} (pthread_create: {rc})");
        return None;
    }
    Some(Thread { signal, id })
}

extern "C" fn thread_main(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `spawn` passed a Box<Job> it gave up.
    let job = unsafe { Box::from_raw(arg as *mut Job) };
    let Job { body, signal } = *job;
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&signal)));
    std::ptr::null_mut()
}

impl Thread {
    /// The thread's signal, for whoever pokes it.
    pub fn signal(&self) -> Arc<Signal> {
        self.signal.clone()
    }

    /// Tells the thread to stop and waits until it ended.
    pub fn stop(self) {
        self.signal.stop();
        // SAFETY: `id` is a joinable thread that nothing else joins (`self`
        // is consumed).
        unsafe { libc::pthread_join(self.id, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn a_thread_wakes_when_poked_and_is_joined_by_stop() {
        let woken = Arc::new(AtomicU32::new(0));
        let w = woken.clone();
        let t = spawn("test thread", move |s| {
            while s.wait(None) {
                w.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap();
        t.signal().poke();
        let start = std::time::Instant::now();
        while woken.load(Ordering::SeqCst) == 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "a poke did not wake the thread");
            std::thread::yield_now();
        }
        t.stop();
        let after = woken.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(woken.load(Ordering::SeqCst), after, "the thread ran after stop returned");
    }
}
