//! The process-wide allocator: the configuration, the backend and, per
//! device, a pool behind its own lock (devices never contend) with its front
//! caches before it (front.rs: the hot path, per-stream locks). The
//! global instance is built once, at the first call that needs it, from
//! `TESSERA_CONF` or from a string given to [`configure`] before that.
//! Invariant: a device's pool exists iff a call for that device succeeded
//! in reserving its arenas; a memory fraction set earlier is kept and
//! applied when the pool is made.

use crate::backend::{self, Backend};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::front::{lock, Front, FrontFree, PoolSlot};
use crate::pool::{round_size, ArenaKind, DevicePool};
use crate::stats::{TesseraCounter, TesseraStats};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Default)]
struct Slot {
    pool: Option<DevicePool>,
    /// Set by set_memory_fraction; overrides the configured limit.
    fraction: Option<f64>,
}

impl PoolSlot for Slot {
    fn pool_mut(&mut self) -> Option<&mut DevicePool> {
        self.pool.as_mut()
    }
}

/// Called before tessera gives up on a request: (device, bytes requested).
pub type OomCallback = Box<dyn Fn(i32, u64) + Send + Sync>;
type SharedOomCallback = Arc<dyn Fn(i32, u64) + Send + Sync>;

pub struct Allocator {
    config: Config,
    backend: Arc<dyn Backend>,
    slots: Vec<Mutex<Slot>>,
    /// Per device, in front of its slot: lock a front's shard before the slot.
    fronts: Vec<Front>,
    /// Shared so that they run with no lock held: a callback may free,
    /// allocate (and so run the callbacks again) or register another.
    oom_callbacks: Mutex<Vec<SharedOomCallback>>,
    /// History recording asked for: applied to pools made later too.
    history: Mutex<(bool, usize)>,
    /// `watch_graphs` was called: pools made later watch too.
    graphs_watched: AtomicBool,
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
            backend,
            slots: (0..count).map(|_| Mutex::new(Slot::default())).collect(),
            fronts: (0..count).map(|_| Front::new(config.front_caches, config.graph_pools)).collect(),
            oom_callbacks: Mutex::new(Vec::new()),
            history: Mutex::new((false, 0)),
            graphs_watched: AtomicBool::new(false),
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device_count(&self) -> i32 {
        self.slots.len() as i32
    }

    fn slot(&self, device: i32) -> Result<&Mutex<Slot>> {
        usize::try_from(device).ok().and_then(|d| self.slots.get(d)).ok_or_else(|| {
            Error::InvalidArgument(format!("device {device} does not exist ({} devices)", self.slots.len()))
        })
    }

    /// Runs `f` on the device's pool, making the pool on first use, with the
    /// fronts' counts merged into its statistics. Blocks the fronts hold stay
    /// lent (the pool shows them cached): see `drain_fronts`.
    pub fn with_pool<T>(&self, device: i32, f: impl FnOnce(&mut DevicePool) -> Result<T>) -> Result<T> {
        self.fronts[self.index(device)?].merge(self.slot(device)?);
        self.pool_op(device, f)
    }

    /// The device's fronts give back every block they hold: free ones are
    /// cached in the pool, handed-out ones become its allocations (for
    /// tools that show blocks, and tests).
    pub fn drain_fronts(&self, device: i32) -> Result<()> {
        self.fronts[self.index(device)?].drain(self.slot(device)?, true);
        Ok(())
    }

    fn index(&self, device: i32) -> Result<usize> {
        self.slot(device)?;
        Ok(device as usize)
    }

    /// Runs `f` on the device's pool, making the pool on first use. Blocks
    /// lent to the fronts stay there. A pool that `f` left poisoned stops
    /// its fronts.
    fn pool_op<T>(&self, device: i32, f: impl FnOnce(&mut DevicePool) -> Result<T>) -> Result<T> {
        let mut slot = lock(self.slot(device)?);
        if slot.pool.is_none() {
            let limit = self.limit_for(device, slot.fraction)?;
            let mut conf = self.config.clone();
            conf.graph_pools |= self.graphs_watched.load(Ordering::SeqCst);
            let mut pool = DevicePool::new(device, self.backend.clone(), &conf, limit)?;
            let (on, entries) = *self.history.lock().unwrap_or_else(|p| p.into_inner());
            pool.record_history(on, entries);
            slot.pool = Some(pool);
        }
        let pool = slot.pool.as_mut().expect("made above");
        let result = f(pool);
        if pool.poisoned().is_some() {
            self.fronts[device as usize].stop();
        }
        result
    }

    /// Checks the invariants of the device's fronts and pool (panics on the
    /// first broken one). For tests and fuzzers.
    pub fn check_invariants(&self, device: i32) -> Result<()> {
        let slot = self.slot(device)?;
        self.fronts[device as usize].check(slot);
        Ok(())
    }

    /// Whether the device's pool stopped serving after driver failures.
    pub fn poisoned(&self, device: i32) -> bool {
        self.slot(device).is_ok_and(|s| lock(s).pool.as_ref().is_some_and(|p| p.poisoned().is_some()))
    }

    fn limit_for(&self, device: i32, fraction: Option<f64>) -> Result<Option<u64>> {
        let (_, total) = self.backend.mem_info(device)?;
        Ok(match fraction {
            Some(f) => Some((total as f64 * f) as u64),
            None => self.config.memory_limit.resolve(total),
        })
    }

    /// Allocates; when memory is short, runs the OOM callbacks (outside the
    /// device's lock: they may free memory) and retries once before giving up.
    pub fn malloc(&self, size: u64, device: i32, stream: u64) -> Result<u64> {
        let front = &self.fronts[self.index(device)?];
        if front.enabled() {
            let capturing = front.graphs() && !matches!(self.backend.capture_id(device, stream), Ok(None));
            if !capturing && let Some(addr) = front.malloc(round_size(size), size, stream) {
                return Ok(addr);
            }
            // A miss. A cached block of exactly this size serves it as it
            // is; otherwise best fit, growth and reclamation must see every
            // free block.
            // (The fronts' counts first, so that peaks stay exact.)
            front.merge(self.slot(device)?);
            if !capturing && let Some(addr) = self.pool_op(device, |p| Ok(p.malloc_if_exact(size, stream)))? {
                return Ok(addr);
            }
            front.drain(self.slot(device)?, false);
        }
        let first = self.pool_op(device, |p| p.malloc(size, stream));
        let Err(Error::OutOfMemory(_)) = first else { return first };
        // Other threads' frees may have reached the fronts since the drain;
        // the callbacks' frees may too.
        let mut retry = front.drain(self.slot(device)?, false) > 0;
        let callbacks = self.oom_callbacks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !callbacks.is_empty() {
            for cb in &callbacks {
                cb(device, size);
            }
            front.drain(self.slot(device)?, false);
            retry = true;
        }
        let result = if retry { self.pool_op(device, |p| p.malloc(size, stream)) } else { first };
        if let Err(Error::OutOfMemory(_)) = &result {
            if let Some(path) = &self.config.oom_snapshot.0 {
                match std::fs::write(path, self.snapshot_json()) {
                    Ok(()) => tracing::info!("tessera: OOM snapshot written to {path}"),
                    Err(e) => tracing::warn!("tessera: could not write the OOM snapshot to {path}: {e}"),
                }
            }
            self.pool_op(device, |p| {
                p.on_final_oom(size, stream);
                Ok(())
            })?;
        }
        result
    }

    /// Declares that the CUDA graphs captured so far are destroyed: the
    /// memory kept private to them becomes reusable. Returns the bytes.
    pub fn release_graph_pools(&self) -> u64 {
        let mut released = 0;
        self.each_pool(|pool| released += pool.release_graph_pools());
        released
    }

    /// Runs `f` on every device's pool that exists, one lock at a time.
    /// Blocks lent to the fronts stay there.
    fn each_pool(&self, mut f: impl FnMut(&mut DevicePool)) {
        for slot in &self.slots {
            if let Some(pool) = lock(slot).pool.as_mut() {
                f(pool);
            }
        }
    }

    /// From now on every pool, present and future, keeps the memory of CUDA
    /// graph captures private to them (`graph_pools:true`, switched on at
    /// run time; it cannot be switched off). Call before the first capture.
    pub fn watch_graphs(&self) {
        self.graphs_watched.store(true, Ordering::SeqCst);
        for front in &self.fronts {
            front.watch_graphs();
        }
        self.each_pool(DevicePool::watch_graphs);
    }

    /// Registers a callback run before tessera gives up on a request.
    pub fn on_oom(&self, callback: OomCallback) {
        self.oom_callbacks.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::from(callback));
    }

    /// Starts or stops recording alloc/free/map/unmap/oom events in a ring
    /// of `max_entries` per device (cheap when off: one branch).
    pub fn record_history(&self, enabled: bool, max_entries: usize) {
        *self.history.lock().unwrap_or_else(|p| p.into_inner()) = (enabled, max_entries);
        // The fronts do not record: while recording, every call takes the pool.
        for (front, slot) in self.fronts.iter().zip(&self.slots) {
            if enabled {
                front.disable(slot);
            } else if self.config.front_caches {
                front.enable();
            }
        }
        self.each_pool(|pool| pool.record_history(enabled, max_entries));
    }

    /// The recorded alloc and free events of a device in the trace format of
    /// design.md §5 (replayable with tessera-replay).
    pub fn history_trace(&self, device: i32) -> Result<String> {
        use crate::pool::HistoryAction as H;
        use crate::trace::{Action, Event};
        let events: Vec<Event> = lock(self.slot(device)?)
            .pool
            .as_ref()
            .map(|p| p.history())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| {
                let action = match e.action {
                    H::Alloc => Action::Alloc,
                    H::Free => Action::Free,
                    _ => return None,
                };
                Some(Event { action, addr: e.addr, size: e.size, stream: e.stream })
            })
            .collect();
        let mut out = format!("# action addr size stream (tessera history, device {device})\n").into_bytes();
        crate::trace::write(&events, &mut out).expect("writing to memory");
        Ok(String::from_utf8(out).expect("ASCII"))
    }

    /// Every device's memory in the shape of `torch.cuda.memory._snapshot()`,
    /// as JSON: `segments` (maximal mapped ranges with their blocks) and
    /// `device_traces` (the history ring, when recording).
    pub fn snapshot_json(&self) -> String {
        let mut segments = Vec::new();
        let mut traces = Vec::new();
        for (device, slot) in self.slots.iter().enumerate() {
            // Blocks handed out by the fronts show as allocated.
            self.fronts[device].drain(slot, true);
            let slot = lock(slot);
            let mut trace = Vec::new();
            if let Some(pool) = slot.pool.as_ref() {
                for (arena, blocks) in pool.segments() {
                    let total: u64 = blocks.iter().map(|b| b.size).sum();
                    let allocated: u64 = blocks.iter().filter(|b| b.state == "active_allocated").map(|b| b.size).sum();
                    let active: u64 = blocks.iter().filter(|b| b.state != "inactive").map(|b| b.size).sum();
                    let requested: u64 = blocks.iter().map(|b| b.requested).sum();
                    let stream = blocks.iter().find(|b| b.state != "inactive").map_or(blocks[0].stream, |b| b.stream);
                    let block_json: Vec<String> = blocks
                        .iter()
                        .map(|b| {
                            format!(
                                "{{\"address\":{},\"size\":{},\"requested_size\":{},\"state\":\"{}\",\"frames\":[]}}",
                                b.addr, b.size, b.requested, b.state
                            )
                        })
                        .collect();
                    segments.push(format!(
                        "{{\"device\":{device},\"address\":{},\"total_size\":{total},\"allocated_size\":{allocated},\
                         \"active_size\":{active},\"requested_size\":{requested},\"stream\":{stream},\
                         \"segment_type\":\"{}\",\"segment_pool_id\":[0,0],\"is_expandable\":true,\"frames\":[],\
                         \"blocks\":[{}]}}",
                        blocks[0].addr,
                        if arena == ArenaKind::Small { "small" } else { "large" },
                        block_json.join(",")
                    ));
                }
                for e in pool.history() {
                    trace.push(format!(
                        "{{\"action\":\"{}\",\"addr\":{},\"size\":{},\"requested_size\":{},\"stream\":{},\"time_us\":{},\"frames\":[]}}",
                        e.action.torch_name(),
                        e.addr,
                        e.size,
                        e.requested,
                        e.stream,
                        e.time_us
                    ));
                }
            }
            traces.push(format!("[{}]", trace.join(",")));
        }
        format!("{{\"segments\":[{}],\"device_traces\":[{}]}}", segments.join(","), traces.join(","))
    }

    /// Statistics of one arena of a device (zeros for a device not used yet).
    pub fn arena_stats(&self, device: i32, arena: ArenaKind) -> Result<TesseraStats> {
        self.fronts[self.index(device)?].merge(self.slot(device)?);
        let slot = lock(self.slot(device)?);
        Ok(slot.pool.as_ref().map(|p| p.arena_stats(arena)).unwrap_or_default())
    }

    /// Frees `ptr`. The pointer is authoritative: if it belongs to another
    /// device than the one named, it is freed there and the mismatch counted.
    pub fn free(&self, ptr: u64, size: Option<u64>, device: i32, stream: Option<u64>) -> Result<()> {
        if let Ok(slot) = self.slot(device) {
            // The stream picks the front's shard; unnamed, the pool knows it.
            let stream = stream.or_else(|| lock(slot).pool.as_ref().and_then(|p| p.held_stream(ptr)));
            if let Some(stream) = stream
                && let FrontFree::Handled(result) = self.front_free(device, ptr, size, stream) {
                    return result;
                }
        }
        for (d, slot) in self.slots.iter().enumerate() {
            let found = lock(slot).pool.as_ref().and_then(|p| p.held_stream(ptr));
            if let Some(stream) = found
                && let FrontFree::Handled(result) = self.front_free(d as i32, ptr, size, stream)
            {
                result?; // a double free there, say, is reported as such
                if let Some(pool) = lock(slot).pool.as_mut() {
                    pool.stats_mut().bump(TesseraCounter::MismatchedFrees, 1);
                }
                return Err(Error::InvalidArgument(format!(
                    "free of {ptr:#x} named device {device}, but it was allocated on device {d}; freed it there"
                )));
            }
        }
        match self.slot(device).ok().and_then(|slot| lock(slot).pool.as_mut().map(|p| p.free(ptr, size, stream))) {
            Some(result) => result, // counts and reports the invalid free
            None => Err(Error::InvalidArgument(format!(
                "free of {ptr:#x} on device {device}: not a live tessera allocation"
            ))),
        }
    }

    /// Frees through the device's front (which falls back to its pool).
    fn front_free(&self, device: i32, ptr: u64, size: Option<u64>, stream: u64) -> FrontFree {
        let front = &self.fronts[device as usize];
        let capturing = |s: u64| !matches!(self.backend.capture_id(device, s), Ok(None));
        front.free(&self.slots[device as usize], ptr, size, stream, &capturing)
    }

    /// Finds the device that owns `ptr` and records the extra stream there.
    pub fn record_stream(&self, ptr: u64, stream: u64) -> Result<()> {
        for (d, slot) in self.slots.iter().enumerate() {
            let lent = lock(slot).pool.as_ref().and_then(|p| p.lent_at(ptr));
            if let Some(b) = lent {
                // Handed out by a front: the pool takes it back first.
                self.fronts[d].take_back(slot, &b);
            }
            let mut slot = lock(slot);
            if let Some(pool) = slot.pool.as_mut().filter(|p| p.held_stream(ptr).is_some()) {
                return pool.record_stream(ptr, stream);
            }
        }
        // No device is named: count it on the first device in use.
        for slot in &self.slots {
            if let Some(pool) = lock(slot).pool.as_mut() {
                pool.stats_mut().bump(TesseraCounter::InvalidRequests, 1);
                break;
            }
        }
        Err(Error::InvalidArgument(format!("record_stream on {ptr:#x}, which is not a live tessera allocation")))
    }

    /// Releases cached memory of every device to the driver.
    pub fn empty_cache(&self) -> Result<()> {
        let mut first_error = None;
        for (front, slot) in self.fronts.iter().zip(&self.slots) {
            front.drain(slot, false);
        }
        self.each_pool(|pool| {
            if let Err(e) = pool.empty_cache() {
                first_error.get_or_insert(e);
            }
        });
        first_error.map_or(Ok(()), Err)
    }

    pub fn set_memory_fraction(&self, fraction: f64, device: i32) -> Result<()> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::InvalidArgument(format!("memory fraction {fraction} is not in (0, 1]")));
        }
        let mut slot = lock(self.slot(device)?);
        slot.fraction = Some(fraction);
        let limit = self.limit_for(device, Some(fraction))?;
        if let Some(pool) = slot.pool.as_mut() {
            pool.set_limit(limit);
        }
        Ok(())
    }

    /// Statistics of a device (zeros for a device not used yet).
    pub fn stats(&self, device: i32) -> Result<TesseraStats> {
        self.fronts[self.index(device)?].merge(self.slot(device)?);
        let slot = lock(self.slot(device)?);
        Ok(slot.pool.as_ref().map(|p| p.stats()).unwrap_or_default())
    }

    pub fn reset_peak_stats(&self, device: i32) -> Result<()> {
        self.fronts[self.index(device)?].merge(self.slot(device)?);
        if let Some(pool) = lock(self.slot(device)?).pool.as_mut() {
            pool.reset_peaks();
        }
        Ok(())
    }

    /// Counts a rejected request on a device, where the device is valid.
    pub fn count_invalid_request(&self, device: i32) {
        if let Ok(slot) = self.slot(device)
            && let Some(pool) = lock(slot).pool.as_mut() {
                pool.stats_mut().bump(TesseraCounter::InvalidRequests, 1);
            }
    }
}

impl Drop for Allocator {
    /// The fronts give their blocks back, so that a pool with nothing live
    /// returns its memory (tests, replays; the global one is never dropped).
    fn drop(&mut self) {
        for (front, slot) in self.fronts.iter().zip(&self.slots) {
            front.drain(slot, true);
        }
    }
}

static PENDING_CONF: Mutex<Option<String>> = Mutex::new(None);
static GLOBAL: OnceLock<std::result::Result<Allocator, Error>> = OnceLock::new();

/// Sets the configuration string before the first allocation; it takes the
/// place of `TESSERA_CONF`. An invalid string is an error at once.
pub fn configure(text: &str) -> Result<()> {
    Config::parse(text)?;
    if GLOBAL.get().is_some() {
        return Err(Error::Config(
            "tessera is already initialised; configure it before the first allocation".into(),
        ));
    }
    *PENDING_CONF.lock().unwrap_or_else(|p| p.into_inner()) = Some(text.to_string());
    Ok(())
}

/// The configuration that the global allocator will use (or uses).
pub fn active_config() -> Result<Config> {
    if let Some(Ok(a)) = GLOBAL.get() {
        return Ok(a.config().clone());
    }
    match PENDING_CONF.lock().unwrap_or_else(|p| p.into_inner()).as_deref() {
        Some(text) => Config::parse(text),
        None => Config::from_env(),
    }
}

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
            let allocator = Allocator::new(active_config()?)?;
            // SAFETY: registers a handler that only stores to an atomic.
            unsafe { libc::pthread_atfork(None, None, Some(mark_forked_child)) };
            if allocator.config.status_interval.0 > 0 {
                start_status_thread(allocator.config.status_interval.0);
            }
            Ok(allocator)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// One line of memory status per device in use, for logs.
pub fn status_line(a: &Allocator) -> String {
    use crate::error::format_bytes;
    use crate::stats::TesseraGauge as G;
    let mut parts = Vec::new();
    for d in 0..a.device_count() {
        let Ok(s) = a.stats(d) else { continue };
        let reserved = s.gauge(G::ReservedBytes).current as u64;
        if reserved == 0 && s.counter(TesseraCounter::CacheMisses) == 0 {
            continue;
        }
        let allocated = s.gauge(G::AllocatedBytes).current as u64;
        parts.push(format!(
            "dev{d} allocated {} (peak {}) reserved {} (peak {}) unused {:.1}% ooms {}",
            format_bytes(allocated),
            format_bytes(s.gauge(G::AllocatedBytes).peak as u64),
            format_bytes(reserved),
            format_bytes(s.gauge(G::ReservedBytes).peak as u64),
            if reserved > 0 { 100.0 * (reserved.saturating_sub(allocated)) as f64 / reserved as f64 } else { 0.0 },
            s.counter(TesseraCounter::Ooms),
        ));
    }
    if parts.is_empty() { "tessera: no device used yet".into() } else { format!("tessera: {}", parts.join(" | ")) }
}

fn start_status_thread(every_s: u64) {
    let spawned = std::thread::Builder::new().name("tessera-status".into()).spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(every_s));
            if let Some(Ok(a)) = GLOBAL.get() {
                eprintln!("{}", status_line(a));
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("tessera: could not start the status thread: {e}");
    }
}
