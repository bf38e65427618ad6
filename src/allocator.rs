//! The process-wide allocator: the configuration, the backend, one
//! [`Device`] per device (its own lock: devices never contend), the OOM
//! callbacks, and the routing of calls that name a pointer to the device
//! that owns it. The global instance is built once, at the first call that
//! needs it, from `TESSERA_CONF` or from a string given to [`configure`]
//! before that.
//! Invariant: a free or record_stream reaches at most one device's pool;
//! the pointer, not the device named, decides which.

use crate::backend::{self, Backend};
use crate::config::Config;
use crate::device::{lock, Device};
use crate::error::{Error, Result};
use crate::pool::{ArenaKind, PauseReport};
use crate::stats::{TesseraCounter, TesseraStats};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Called before tessera gives up on a request: (device, bytes requested).
pub type OomCallback = Box<dyn Fn(i32, u64) + Send + Sync>;
type SharedOomCallback = Arc<dyn Fn(i32, u64) + Send + Sync>;

pub struct Allocator {
    config: Config,
    devices: Vec<Device>,
    /// Shared so that they run with no lock held: a callback may free,
    /// allocate (and so run the callbacks again) or register another.
    oom_callbacks: Mutex<Vec<SharedOomCallback>>,
}

impl Allocator {
    pub fn new(config: Config) -> Result<Allocator> {
        let backend: Arc<dyn Backend> = Arc::from(backend::create(&config)?);
        Self::with_backend(config, backend)
    }

    /// An allocator over a given backend (tests keep a handle on a sim or
    /// host backend to inspect it).
    pub fn with_backend(config: Config, backend: Arc<dyn Backend>) -> Result<Allocator> {
        let count = backend.device_count()?;
        tracing::info!(backend = backend.name(), devices = count, "tessera initialised");
        Ok(Allocator {
            devices: (0..count).map(|d| Device::new(d, &config, backend.clone())).collect(),
            oom_callbacks: Mutex::new(Vec::new()),
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device_count(&self) -> i32 {
        self.devices.len() as i32
    }

    /// The device of index `device`, or an error naming it.
    pub fn device(&self, device: i32) -> Result<&Device> {
        usize::try_from(device).ok().and_then(|d| self.devices.get(d)).ok_or_else(|| {
            Error::InvalidArgument(format!("device {device} does not exist ({} devices)", self.devices.len()))
        })
    }

    /// Runs `f` on the device's pool, making the pool on first use, with the
    /// fronts' counts merged into its statistics. Blocks the fronts hold stay
    /// lent (the pool shows them cached): see `drain_fronts`.
    pub fn with_pool<T>(&self, device: i32, f: impl FnOnce(&mut crate::pool::DevicePool) -> Result<T>) -> Result<T> {
        self.device(device)?.with_pool(f)
    }

    /// Runs `f` on tag `tag`'s pool on the device, if the tag has one there
    /// (None otherwise). For tools and tests.
    pub fn with_tag_pool<T>(&self, device: i32, tag: &str, f: impl FnOnce(&mut crate::pool::DevicePool) -> T) -> Result<Option<T>> {
        let dev = self.device(device)?;
        Ok(crate::tags::find(tag).and_then(|id| dev.with_tag_pool(id, f)))
    }

    /// The device's fronts give back every block they hold: free ones are
    /// cached in the pool, handed-out ones become its allocations (for
    /// tools that show blocks, and tests).
    pub fn drain_fronts(&self, device: i32) -> Result<()> {
        self.device(device)?.drain_fronts();
        Ok(())
    }

    /// Checks the invariants of the device's fronts and pool (panics on the
    /// first broken one). For tests and fuzzers.
    pub fn check_invariants(&self, device: i32) -> Result<()> {
        self.device(device)?.check_invariants();
        Ok(())
    }

    /// Whether the device's pool stopped serving after driver failures.
    pub fn poisoned(&self, device: i32) -> bool {
        self.device(device).is_ok_and(Device::poisoned)
    }

    /// Allocates; when memory is short, runs the OOM callbacks (with no
    /// lock held: they may free memory) and retries once before giving up.
    pub fn malloc(&self, size: u64, device: i32, stream: u64) -> Result<u64> {
        self.malloc_in(size, device, stream, None)
    }

    /// As `malloc`, in named private pool `pool` of the device (PyTorch's
    /// pools, through the torch adaptor; see pool/graphs.rs).
    pub fn malloc_in_pool(&self, size: u64, device: i32, stream: u64, pool: u64) -> Result<u64> {
        self.malloc_in(size, device, stream, Some(pool))
    }

    fn malloc_in(&self, size: u64, device: i32, stream: u64, pool: Option<u64>) -> Result<u64> {
        let dev = self.device(device)?;
        let on_oom = || self.run_oom_callbacks(device, size);
        let result = match pool {
            None => dev.malloc(size, stream, &on_oom),
            Some(pool) => dev.malloc_in_pool(size, stream, pool, &on_oom),
        };
        if let Err(Error::OutOfMemory(_)) = &result {
            if let Some(path) = &self.config.oom_snapshot.0 {
                match std::fs::write(path, self.snapshot_json()) {
                    Ok(()) => tracing::info!("tessera: OOM snapshot written to {path}"),
                    Err(e) => tracing::warn!("tessera: could not write the OOM snapshot to {path}: {e}"),
                }
            }
            dev.give_up(size, stream)?;
        }
        result
    }

    /// Runs every OOM callback; says whether any ran. Never inside one on
    /// the same thread: an allocation a callback makes that runs out of
    /// memory fails with its own error rather than run them again (which
    /// would recurse until the stack ran out).
    fn run_oom_callbacks(&self, device: i32, size: u64) -> bool {
        thread_local! {
            static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
        }
        if IN_CALLBACK.get() {
            return false;
        }
        /// Clears the flag however the callbacks end.
        struct Leave;
        impl Drop for Leave {
            fn drop(&mut self) {
                IN_CALLBACK.set(false);
            }
        }
        IN_CALLBACK.set(true);
        let _leave = Leave;
        let callbacks = lock(&self.oom_callbacks).clone();
        for cb in &callbacks {
            cb(device, size);
        }
        !callbacks.is_empty()
    }

    /// Declares that the CUDA graphs captured so far are destroyed: the
    /// memory kept private to them becomes reusable. Returns the bytes.
    pub fn release_graph_pools(&self) -> u64 {
        self.devices.iter().map(Device::release_graph_pools).sum()
    }

    /// From now on every pool, present and future, keeps the memory of CUDA
    /// graph captures private to them (`graph_pools:true`, switched on at
    /// run time; it cannot be switched off). Call before the first capture.
    pub fn watch_graphs(&self) {
        self.devices.iter().for_each(Device::watch_graphs);
    }

    /// From now on a driver thread tidies every device (pool/ready.rs),
    /// woken by `signal`; without one the caller runs `tidy` (tests,
    /// replays).
    pub fn set_tidied(&self, signal: Option<Arc<crate::thread::Signal>>) {
        for dev in &self.devices {
            dev.set_tidied(signal.clone());
        }
    }

    /// Whether some device's pool has work for a tidy round.
    pub fn wants_tidy(&self) -> bool {
        self.devices.iter().any(Device::wants_tidy)
    }

    /// One tidy round on every device (what the driver thread runs):
    /// Waiting if any device's cache waits for its device, Worked if a round
    /// stopped with work left.
    pub fn tidy(&self) -> crate::pool::Tidy {
        use crate::pool::Tidy;
        self.devices.iter().map(Device::tidy).fold(Tidy::Idle, |acc, t| match (acc, t) {
            (Tidy::Worked, _) | (_, Tidy::Worked) => Tidy::Worked,
            (Tidy::Waiting, _) | (_, Tidy::Waiting) => Tidy::Waiting,
            _ => Tidy::Idle,
        })
    }

    /// Registers a callback run before tessera gives up on a request.
    pub fn on_oom(&self, callback: OomCallback) {
        lock(&self.oom_callbacks).push(Arc::from(callback));
    }

    /// Starts or stops recording alloc/free/map/unmap/oom events in a ring
    /// of `max_entries` per device (cheap when off: one branch).
    pub fn record_history(&self, enabled: bool, max_entries: usize) {
        for dev in &self.devices {
            dev.record_history(enabled, max_entries);
        }
    }

    /// The recorded alloc and free events of a device in the trace format
    /// (replayable with tessera-replay).
    pub fn history_trace(&self, device: i32) -> Result<String> {
        Ok(crate::trace::from_history(device, &self.device(device)?.history()))
    }

    /// Every device's memory in the shape of `torch.cuda.memory._snapshot()`,
    /// as JSON: `segments` (maximal mapped ranges with their blocks) and
    /// `device_traces` (the history ring, when recording).
    pub fn snapshot_json(&self) -> String {
        let devices: Vec<_> = self
            .devices
            .iter()
            .map(|dev| crate::snapshot::DeviceMemory {
                segments: dev.segments(),
                history: dev.history(),
                tag_segments: dev.tag_segments().into_iter().map(|(t, a, b)| (crate::tags::name(t), a, b)).collect(),
                tags: dev.tag_summaries(),
            })
            .collect();
        crate::snapshot::to_json(&devices)
    }

    /// The largest cached block of a device, in bytes (0 before its first
    /// allocation).
    pub fn largest_cached_bytes(&self, device: i32) -> Result<u64> {
        Ok(self.device(device)?.largest_cached_bytes())
    }

    /// Statistics of one arena of a device (zeros for a device not used yet).
    pub fn arena_stats(&self, device: i32, arena: ArenaKind) -> Result<TesseraStats> {
        Ok(self.device(device)?.arena_stats(arena))
    }

    /// Frees `ptr`. The pointer is authoritative: if it belongs to another
    /// device than the one named, it is freed there and the mismatch counted.
    pub fn free(&self, ptr: u64, size: Option<u64>, device: i32, stream: Option<u64>) -> Result<()> {
        if let Ok(dev) = self.device(device)
            && let Some(result) = dev.free(ptr, size, stream)
        {
            return result;
        }
        for (d, dev) in self.devices.iter().enumerate() {
            if let Some(result) = dev.free(ptr, size, None) {
                result?; // a double free there, say, is reported as such
                dev.count(TesseraCounter::MismatchedFrees);
                return Err(Error::InvalidArgument(format!(
                    "free of {ptr:#x} named device {device}, but it was allocated on device {d}; freed it there"
                )));
            }
        }
        match self.device(device) {
            Ok(dev) => dev.reject_free(ptr, size, stream), // counts and reports the invalid free
            Err(_) => Err(Error::InvalidArgument(format!("free of {ptr:#x} on device {device}: not a live tessera allocation"))),
        }
    }

    /// A free that named a negative size: the block is freed as it was
    /// allocated, and the free counted and reported as mismatched.
    pub fn free_negative_size(&self, ptr: u64, size: i64, device: i32, stream: Option<u64>) -> Result<()> {
        self.free(ptr, None, device, stream)?;
        self.device(device)?.count(TesseraCounter::MismatchedFrees);
        Err(Error::InvalidArgument(format!("free of {ptr:#x} with negative size {size}; freed it as allocated")))
    }

    /// Finds the device that owns `ptr` and records the extra stream there.
    pub fn record_stream(&self, ptr: u64, stream: u64) -> Result<()> {
        if let Some(result) = self.devices.iter().find_map(|dev| dev.record_stream(ptr, stream)) {
            return result;
        }
        // No device is named: count it on the first device in use.
        self.devices.iter().any(Device::count_invalid_request);
        Err(Error::InvalidArgument(format!("record_stream on {ptr:#x}, which is not a live tessera allocation")))
    }

    /// Pauses tag `tag` on every device (see `DevicePool::pause`): its
    /// physical memory goes back to the driver, its addresses stay; with
    /// `backup`, its live blocks' contents are copied to host memory first.
    /// Returns what every device released, together.
    pub fn pause(&self, tag: &str, backup: bool) -> Result<PauseReport> {
        self.on_every_device("pause", tag, |dev, id| dev.pause_tag(id, backup))
    }

    /// Resumes tag `tag` on every device where it is paused (see
    /// `DevicePool::resume`). Out of memory leaves the tag paused, with its
    /// backups, where it could not resume; calling again retries.
    pub fn resume(&self, tag: &str) -> Result<PauseReport> {
        self.on_every_device("resume", tag, |dev, id| dev.resume_tag(id))
    }

    /// Runs `f` (a pause or a resume, `what`) for tag `tag` on every device
    /// in order, stopping at the first error; returns what they did together.
    fn on_every_device(&self, what: &str, tag: &str, f: impl Fn(&Device, u32) -> Result<PauseReport>) -> Result<PauseReport> {
        let id = crate::tags::find(tag)
            .ok_or_else(|| Error::InvalidArgument(format!("{what} of tag {tag:?}: no allocation was ever made with it")))?;
        let mut total = PauseReport::default();
        for dev in &self.devices {
            let r = f(dev, id)?;
            total.bytes += r.bytes;
            total.backup_bytes += r.backup_bytes;
        }
        Ok(total)
    }

    /// Statistics of tag `tag` on a device (zeros for a tag never used there).
    pub fn tag_stats(&self, device: i32, tag: &str) -> Result<TesseraStats> {
        let dev = self.device(device)?;
        Ok(crate::tags::find(tag).map(|id| dev.tag_stats(id)).unwrap_or_default())
    }

    /// Releases cached memory of every device to the driver.
    pub fn empty_cache(&self) -> Result<()> {
        let mut first_error = None;
        for dev in &self.devices {
            if let Err(e) = dev.empty_cache() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub fn set_memory_fraction(&self, fraction: f64, device: i32) -> Result<()> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::InvalidArgument(format!("memory fraction {fraction} is not in (0, 1]")));
        }
        self.device(device)?.set_memory_fraction(fraction)
    }

    /// Statistics of a device (zeros for a device not used yet).
    pub fn stats(&self, device: i32) -> Result<TesseraStats> {
        Ok(self.device(device)?.stats())
    }

    pub fn reset_peak_stats(&self, device: i32) -> Result<()> {
        self.device(device)?.reset_peak_stats();
        Ok(())
    }

    /// Counts a rejected request on a device, where the device is valid.
    pub fn count_invalid_request(&self, device: i32) {
        if let Ok(dev) = self.device(device) {
            dev.count_invalid_request();
        }
    }

    /// One line of memory status per device in use (`device` None), or for
    /// one device, for logs.
    pub fn status_line(&self, device: Option<i32>) -> Result<String> {
        let stats = match device {
            Some(d) => vec![(d, self.stats(d)?)],
            None => (0..self.device_count()).map(|d| (d, self.devices[d as usize].stats())).collect(),
        };
        Ok(crate::status::line(&stats, device.is_none()))
    }
}

/// One line of memory status per device in use, for logs.
pub fn status_line(a: &Allocator) -> String {
    a.status_line(None).unwrap_or_default()
}

static PENDING_CONF: Mutex<Option<String>> = Mutex::new(None);
/// The global allocator, leaked from a Box so that `on_unload` can give its
/// memory back.
static GLOBAL: OnceLock<std::result::Result<&'static Allocator, Error>> = OnceLock::new();

/// Sets the configuration string before the first allocation; it takes the
/// place of `TESSERA_CONF`. An invalid string is an error at once.
pub fn configure(text: &str) -> Result<()> {
    Config::parse(text)?;
    if GLOBAL.get().is_some() {
        return Err(Error::Config("tessera is already initialised; configure it before the first allocation".into()));
    }
    *lock(&PENDING_CONF) = Some(text.to_string());
    Ok(())
}

/// The configuration that the global allocator will use (or uses).
pub fn active_config() -> Result<Config> {
    if let Some(Ok(a)) = GLOBAL.get() {
        return Ok(a.config().clone());
    }
    active_config_with_warnings().map(|(config, _)| config)
}

/// The configuration given (to `configure`, else in `TESSERA_CONF`) and its
/// warnings: PyTorch's keys that do not apply (see `config::PYTORCH_KEYS`).
pub fn active_config_with_warnings() -> Result<(Config, Vec<String>)> {
    match lock(&PENDING_CONF).clone() {
        Some(text) => Config::parse_with_warnings(&text),
        None => Config::env_text()?.map_or_else(|| Ok((Config::default(), Vec::new())), |t| Config::parse_with_warnings(&t)),
    }
}

/// Checks the configuration that is (or will be) in force and that its
/// backend starts (the driver loads, devices are there); once the global
/// allocator exists, whether it started.
pub fn check_config() -> Result<()> {
    if let Some(started) = GLOBAL.get() {
        return started.clone().map(|_| ());
    }
    backend::create(&active_config()?).map(|_| ())
}

/// Set at process exit (an atexit handler runs before the libraries'
/// destructors), when `on_unload` must leave everything as it is: the
/// process and its memory go at once, and other code may still free.
static EXITING: AtomicBool = AtomicBool::new(false);
/// Set once the library is being unloaded: every later call is refused.
static UNLOADED: AtomicBool = AtomicBool::new(false);

/// The process exits: from now on nothing is given back, and the driver
/// thread stops here, before the driver's own exit handlers run (they were
/// registered before this one, so they run after it).
extern "C" fn mark_exiting() {
    EXITING.store(true, Ordering::SeqCst);
    let _ = std::panic::catch_unwind(crate::worker::stop);
}

/// The library's destructor: runs at dlclose, and at process exit after
/// `mark_exiting`. At dlclose it stops the status and driver threads and gives back
/// what each device holds (see `Device::shutdown`): cached memory, handles
/// and address space; blocks still live stay mapped, and it says so.
extern "C" fn on_unload() {
    if EXITING.load(Ordering::SeqCst) {
        return;
    }
    let _ = std::panic::catch_unwind(|| {
        UNLOADED.store(true, Ordering::SeqCst);
        crate::status::stop();
        crate::worker::stop();
        lock(&PENDING_CONF).take();
        let Some(Ok(a)) = GLOBAL.get() else { return };
        for (d, dev) in a.devices.iter().enumerate() {
            let (blocks, bytes) = dev.shutdown();
            if blocks > 0 {
                eprintln!(
                    "tessera: unloaded with {blocks} blocks ({}) still live on device {d}; their memory stays mapped",
                    crate::error::format_bytes(bytes)
                );
            }
        }
        // SAFETY: `a` came from Box::leak in `global`; UNLOADED (set above)
        // refuses every later call, and no call may run while the library
        // is being unloaded (its code is about to go). Dropping it frees
        // the bookkeeping; live blocks' memory stays mapped (a pool with
        // live blocks does not unmap them when dropped).
        drop(unsafe { Box::from_raw(*a as *const Allocator as *mut Allocator) });
    });
}

// SAFETY: `.fini_array` holds pointers to functions the loader calls with no
// arguments when the library is unloaded or the process exits; `on_unload`
// is such a function and catches every panic.
#[used]
#[unsafe(link_section = ".fini_array")]
static ON_UNLOAD: extern "C" fn() = on_unload;

/// Set in a child process forked after tessera started: the CUDA driver
/// cannot be used there, and neither can the parent's mappings.
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn mark_forked_child() {
    FORKED.store(true, Ordering::Relaxed);
}

/// The global allocator, built on first use. A bad configuration or a
/// missing driver is an error for every call, with the same message; so is
/// any use from a child forked after tessera started, as with PyTorch.
pub fn global() -> Result<&'static Allocator> {
    if UNLOADED.load(Ordering::Relaxed) {
        return Err(Error::InvalidArgument("tessera is being unloaded".into()));
    }
    if FORKED.load(Ordering::Relaxed) {
        return Err(Error::InvalidArgument(
            "Cannot use tessera (CUDA) in a process forked after it started: the driver does not survive \
             fork. To use CUDA with multiprocessing, use the 'spawn' start method."
                .into(),
        ));
    }
    GLOBAL
        .get_or_init(|| {
            crate::log::init();
            let (config, warnings) = active_config_with_warnings()?;
            for w in warnings {
                tracing::warn!("{w}");
            }
            let allocator: &'static Allocator = Box::leak(Box::new(Allocator::new(config)?));
            // SAFETY: both register handlers that only store to an atomic.
            unsafe {
                libc::pthread_atfork(None, None, Some(mark_forked_child));
                libc::atexit(mark_exiting);
            }
            if allocator.config.driver_thread {
                let signal = crate::worker::start(|| match GLOBAL.get() {
                    Some(Ok(a)) if !EXITING.load(Ordering::Relaxed) => Some(a.tidy()),
                    _ => None,
                });
                if signal.is_some() {
                    allocator.set_tidied(signal);
                }
            }
            if allocator.config.status_interval.0 > 0 {
                crate::status::spawn(allocator.config.status_interval.0, || match GLOBAL.get() {
                    Some(Ok(a)) => Some(status_line(a)),
                    _ => None,
                });
            }
            Ok(allocator)
        })
        .clone()
}
