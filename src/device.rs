//! One device: its front caches before its pool, and the protocol between
//! them, written once. A malloc tries the stream's front shard (no pool
//! lock), then, with the pool locked: the fronts' counts merged (so peaks
//! stay exact), a cached block of exactly the size, the fronts' free blocks
//! drained back (so best fit, growth and reclamation see every free byte,
//! coalesced), the pool's malloc. A free tries the shard, then the pool,
//! which takes handed-out blocks back, reports bad frees and lends blocks to
//! the shard of their stream. Every call goes this way, device → front /
//! pool, never back. A thread with a current tag (tags.rs) allocates from
//! that tag's pool instead, past the fronts; a free that no untagged block
//! matches goes to the tag pool whose address space holds it.
//! Invariants: the pool exists iff a call succeeded in reserving its arenas
//! (until the library is unloaded);
//! lock order: the pool's mutex, then one shard (front.rs); a memory
//! fraction or history setting made before the pool exists applies to it.
#![forbid(unsafe_code)]

use crate::backend::Backend;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::front::Front;
use crate::tags::TagPools;
use crate::pool::{check_request, round_size, ArenaKind, BlockView, DevicePool, DeviceReserved, Freed, HistoryEvent, PauseReport, PoolBlock, Tidy};
use crate::stats::{TesseraCounter as C, TesseraGauge as G, TesseraStats};
use crate::thread::Signal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Locks, ignoring poison: a panic while a lock was held is a bug that the
/// C boundary already reported; keep serving rather than fail every call.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cap on a device's reserved bytes: `fraction` of its memory
/// (set_memory_fraction) if given, else memory_limit resolved against it.
pub(crate) fn limit_for(backend: &dyn Backend, device: i32, config: &Config, fraction: Option<f64>) -> Result<Option<u64>> {
    let (_, total) = backend.mem_info(device)?;
    Ok(match fraction {
        Some(f) => Some((total as f64 * f) as u64),
        None => config.memory_limit.resolve(total),
    })
}

/// What the device's lock guards.
#[derive(Default)]
struct Slot {
    pool: Option<DevicePool>,
    /// Set by set_memory_fraction; overrides the configured limit.
    fraction: Option<f64>,
    /// History recording asked for: (on, ring entries).
    history: (bool, usize),
    /// A driver thread tidies the pool (see `set_tidied`).
    deferred: bool,
}

/// Tidy steps one `Device::tidy` runs at most before it lets the driver
/// thread look at the other devices.
const TIDY_STEPS_PER_ROUND: usize = 4096;

pub struct Device {
    index: i32,
    config: Config,
    backend: Arc<dyn Backend>,
    front: Front,
    slot: Mutex<Slot>,
    /// The tags' pools (never locked together with `slot`).
    tagged: TagPools,
    /// The reserved bytes of the untagged pool and the tags' together: what
    /// the memory limit caps.
    reserved: DeviceReserved,
    /// The driver thread's signal, once one tidies this device.
    tidier: OnceLock<Arc<Signal>>,
    /// Poked since the driver thread last started tidying this device:
    /// poke once, not at every call.
    tidy_asked: AtomicBool,
}

impl Device {
    pub fn new(index: i32, config: &Config, backend: Arc<dyn Backend>) -> Device {
        let reserved = DeviceReserved::default();
        Device {
            index,
            front: Front::new(config.front_caches, config.graph_pools),
            tagged: TagPools::new(index, config, backend.clone(), &reserved),
            reserved,
            config: config.clone(),
            backend,
            slot: Mutex::new(Slot::default()),
            tidier: OnceLock::new(),
            tidy_asked: AtomicBool::new(false),
        }
    }

    /// From now on a driver thread tidies the pool (made now or later), and
    /// `signal` wakes it when the pool has work for it. Without a signal,
    /// the caller runs `tidy` itself (tests, replays).
    pub fn set_tidied(&self, signal: Option<Arc<Signal>>) {
        if let Some(signal) = signal {
            let _ = self.tidier.set(signal);
        }
        let mut slot = lock(&self.slot);
        slot.deferred = true;
        if let Some(pool) = slot.pool.as_mut() {
            pool.set_deferred(true);
        }
    }

    /// Runs tidy steps (pool/ready.rs) until none finds work, the device's
    /// lock let go between steps, so that callers wait at most one step.
    /// Returns Waiting while cached memory waits for the device. (Not
    /// through `existing`, which would poke the thread that runs this.)
    pub fn tidy(&self) -> Tidy {
        self.tidy_asked.store(false, Ordering::Relaxed);
        for step in 0..TIDY_STEPS_PER_ROUND {
            let found = lock(&self.slot).pool.as_mut().map_or(Tidy::Idle, |pool| pool.tidy_step(step == 0));
            match found {
                Tidy::Worked => std::thread::yield_now(),
                other => return other,
            }
        }
        Tidy::Worked
    }

    /// Whether the pool has work for a tidy round.
    pub fn wants_tidy(&self) -> bool {
        lock(&self.slot).pool.as_ref().is_some_and(DevicePool::wants_tidy)
    }

    /// Wakes the driver thread if the pool left it work and it was not
    /// asked already (after the device's lock is let go).
    fn ask_tidy(&self, wanted: bool) {
        if wanted
            && let Some(signal) = self.tidier.get()
            && !self.tidy_asked.swap(true, Ordering::Relaxed)
        {
            signal.poke();
        }
    }

    /// Runs `f` on the pool, made on first use, with the device locked. A
    /// pool that `f` left poisoned stops the fronts.
    fn pool_op<T>(&self, f: impl FnOnce(&Front, &mut DevicePool) -> Result<T>) -> Result<T> {
        let mut slot = lock(&self.slot);
        if slot.pool.is_none() {
            let limit = self.limit_for(slot.fraction)?;
            let mut conf = self.config.clone();
            conf.graph_pools |= self.front.graphs();
            let mut pool = DevicePool::new(self.index, self.backend.clone(), &conf, limit)?;
            pool.share_reserved(&self.reserved);
            pool.record_history(slot.history.0, slot.history.1);
            pool.set_deferred(slot.deferred);
            slot.pool = Some(pool);
        }
        let pool = slot.pool.as_mut().expect("made above");
        let result = f(&self.front, pool);
        if pool.poisoned().is_some() {
            self.front.stop();
        }
        let wanted = pool.wants_tidy();
        drop(slot);
        self.ask_tidy(wanted);
        result
    }

    /// Runs `f` on the pool if it exists (None if not), with the device
    /// locked: for calls that must not make one.
    fn existing<T>(&self, f: impl FnOnce(&Front, &mut DevicePool) -> T) -> Option<T> {
        let mut slot = lock(&self.slot);
        let pool = slot.pool.as_mut()?;
        let result = f(&self.front, pool);
        let wanted = pool.wants_tidy();
        drop(slot);
        self.ask_tidy(wanted);
        Some(result)
    }

    fn limit_for(&self, fraction: Option<f64>) -> Result<Option<u64>> {
        limit_for(&*self.backend, self.index, &self.config, fraction)
    }

    /// Whether `stream` captures a CUDA graph now (asked only while graph
    /// captures are watched; an error counts as capturing).
    fn capturing(&self, stream: u64) -> bool {
        !matches!(self.backend.capture_id(self.index, stream), Ok(None))
    }

    /// Allocates `size` bytes for `stream`: the stream's front shard, then
    /// the pool (see the module doc). When memory is short, the free blocks
    /// that reached the fronts since (other threads', `on_oom`'s) come back,
    /// `on_oom` runs with no lock held (it may free memory; it says whether
    /// anything ran), and the pool tries once more. The caller gives up with
    /// `give_up`.
    pub fn malloc(&self, size: u64, stream: u64, on_oom: &dyn Fn() -> bool) -> Result<u64> {
        self.malloc_in(size, stream, None, on_oom)
    }

    /// As `malloc`, in named private pool `pool` (see pool/graphs.rs): the
    /// fronts, which hold no pool's blocks, are passed by.
    pub fn malloc_in_pool(&self, size: u64, stream: u64, pool: u64, on_oom: &dyn Fn() -> bool) -> Result<u64> {
        self.malloc_in(size, stream, Some(pool), on_oom)
    }

    fn malloc_in(&self, size: u64, stream: u64, named: Option<u64>, on_oom: &dyn Fn() -> bool) -> Result<u64> {
        if let Err(e) = check_request(size) {
            self.count(C::InvalidRequests);
            return Err(e);
        }
        let tag = crate::tags::current();
        if tag != 0 {
            return self.malloc_tagged(tag, size, stream, named, on_oom);
        }
        let front = &self.front;
        let fronts_on = front.enabled();
        let capturing = fronts_on && (named.is_some() || front.graphs() && self.capturing(stream));
        if fronts_on && !capturing && let Some(addr) = front.malloc(round_size(size), size, stream) {
            return Ok(addr);
        }
        let pool_malloc = |pool: &mut DevicePool| match named {
            None => pool.malloc(size, stream),
            Some(n) => pool.malloc_in_pool(size, stream, n),
        };
        let first = self.pool_op(|front, pool| {
            if fronts_on {
                front.merge(pool);
                if !capturing && let Some(addr) = pool.malloc_if_exact(size, stream) {
                    return Ok(addr);
                }
                front.drain(pool, false);
            }
            pool_malloc(pool)
        });
        let Err(Error::OutOfMemory(_)) = first else { return first };
        // Memory the tags' pools cache is the driver's again (never theirs
        // while paused: they hold none).
        let drained = self.drain_free() > 0;
        let mut retry = self.tagged.release_caches() > 0 || drained;
        if on_oom() {
            self.drain_free();
            retry = true;
        }
        if retry { self.pool_op(|_, pool| pool_malloc(pool)) } else { first }
    }

    /// An allocation of tag `tag`, from its pool. When memory is short, the
    /// untagged cache goes back to the driver and `on_oom` runs (no lock
    /// held), then the tag's pool tries once more.
    fn malloc_tagged(&self, tag: u32, size: u64, stream: u64, named: Option<u64>, on_oom: &dyn Fn() -> bool) -> Result<u64> {
        let attempt = || {
            self.tagged.with_pool(tag, |pool| match named {
                None => pool.malloc(size, stream),
                Some(n) => pool.malloc_in_pool(size, stream, n),
            })
        };
        match attempt() {
            Err(Error::OutOfMemory(_)) => {
                let _ = self.empty_cache();
                on_oom();
                attempt()
            }
            other => other,
        }
    }

    /// Pauses tag `tag` on this device (see `DevicePool::pause`).
    pub fn pause_tag(&self, tag: u32, backup: bool) -> Result<PauseReport> {
        self.tagged.pause(tag, backup)
    }

    /// Resumes tag `tag` on this device (see `DevicePool::resume`). When
    /// memory is short, the untagged cache goes back to the driver and the
    /// resume tries once more.
    pub fn resume_tag(&self, tag: u32) -> Result<PauseReport> {
        match self.tagged.resume(tag) {
            Err(Error::OutOfMemory(_)) => {
                let _ = self.empty_cache();
                self.tagged.resume(tag)
            }
            other => other,
        }
    }

    /// Tag `tag`'s statistics on this device.
    pub fn tag_stats(&self, tag: u32) -> TesseraStats {
        self.tagged.stats(tag)
    }

    /// Each tag's statistics on this device, by name (for snapshots).
    pub fn tag_summaries(&self) -> Vec<(String, TesseraStats)> {
        let mut out = Vec::new();
        self.tagged.each(|tag, pool| out.push((crate::tags::name(tag), pool.stats())));
        out
    }

    /// The tags' segments, with their tags (for snapshots).
    pub fn tag_segments(&self) -> Vec<(u32, ArenaKind, Vec<BlockView>)> {
        self.tagged.segments()
    }

    /// Named pool `pool` is released (see `DevicePool::release_pool`).
    pub fn release_pool(&self, pool: u64) -> Result<u64> {
        let mut released = self.existing(|_, p| p.release_pool(pool)).unwrap_or(Ok(0));
        // A capture inside a tag's region allocated from that tag's pool.
        self.tagged.each(|_, p| {
            if let (Ok(n), Ok(more)) = (&released, p.release_pool(pool)) {
                released = Ok(n + more);
            }
        });
        released
    }

    /// The live blocks of named pool `pool`.
    pub fn pool_blocks(&self, pool: u64) -> Result<Vec<PoolBlock>> {
        self.existing(|_, p| p.pool_blocks(pool)).unwrap_or(Ok(Vec::new()))
    }

    /// Allocates exactly `[addr, addr + size)` out of named pool `pool`'s
    /// cache (see `DevicePool::claim_in_pool`).
    pub fn claim_in_pool(&self, pool: u64, addr: u64, size: u64, requested: u64, stream: u64) -> Result<u64> {
        self.pool_op(|_, p| p.claim_in_pool(pool, addr, size, requested, stream))
    }

    /// The fronts give their free blocks back; returns how many.
    fn drain_free(&self) -> usize {
        self.existing(|front, pool| front.drain(pool, false)).unwrap_or(0)
    }

    /// A request of `size` bytes on `stream` failed for good: count it,
    /// record it, give the cache back to the driver (as PyTorch does).
    pub fn give_up(&self, size: u64, stream: u64) -> Result<()> {
        self.pool_op(|_, pool| {
            pool.on_final_oom(size, stream);
            Ok(())
        })
    }

    /// Frees `ptr` if it is a live block of this device: Some(the outcome),
    /// None if not. `stream`, when not named, is the block's own. The hot
    /// path is the stream's shard; otherwise the pool takes a handed-out
    /// block back before freeing it (it reports what the caller named
    /// wrongly, keeps a capture's memory private, or caches it), and lends a
    /// block it frees to the shard of its stream.
    pub fn free(&self, ptr: u64, size: Option<u64>, stream: Option<u64>) -> Option<Result<()>> {
        if let (Some(size), Some(stream)) = (size, stream)
            && self.front.free(ptr, size, stream, &|s| self.capturing(s))
        {
            return Some(Ok(()));
        }
        self.existing(|front, pool| {
            let stream = stream.or_else(|| pool.held_stream(ptr))?;
            if let Some(b) = pool.lent_at(ptr) {
                if !front.take_back(pool, &b) {
                    return Some(Err(pool.invalid_free(ptr, "freed twice")));
                }
                return Some(pool.free(ptr, size, Some(stream)));
            }
            if !pool.owns(ptr) {
                return None;
            }
            front.merge_shard(pool, stream);
            Some(match pool.free_or_lend(ptr, size, Some(stream), |s| front.lends(stream, s)) {
                Ok(Freed::Lent(b)) => {
                    front.adopt(pool, &b);
                    Ok(())
                }
                Ok(Freed::Done) => Ok(()),
                Ok(Freed::HeldByFront(_)) => unreachable!("a lent block was found above"),
                Err(e) => Err(e),
            })
        })
        .flatten()
        .or_else(|| self.tagged.at(ptr, |pool| pool.owns(ptr).then(|| pool.free(ptr, size, stream))).flatten())
    }

    /// A free of `ptr` that no device holds: the pool reports and counts it.
    pub fn reject_free(&self, ptr: u64, size: Option<u64>, stream: Option<u64>) -> Result<()> {
        self.existing(|_, pool| pool.free(ptr, size, stream)).unwrap_or_else(|| {
            Err(Error::InvalidArgument(format!("free of {ptr:#x} on device {}: not a live tessera allocation", self.index)))
        })
    }

    /// Marks `ptr` as used by `stream` too, if it is a live block of this
    /// device (a block a front handed out goes back to the pool first).
    pub fn record_stream(&self, ptr: u64, stream: u64) -> Option<Result<()>> {
        self.existing(|front, pool| {
            if let Some(b) = pool.lent_at(ptr) {
                front.take_back(pool, &b);
            }
            pool.held_stream(ptr).is_some().then(|| pool.record_stream(ptr, stream))
        })
        .flatten()
        .or_else(|| self.tagged.at(ptr, |pool| pool.owns(ptr).then(|| pool.record_stream(ptr, stream))).flatten())
    }

    /// Counts a rejected request here; false if the device has no pool yet.
    pub fn count_invalid_request(&self) -> bool {
        self.count(C::InvalidRequests)
    }

    /// Counts one `counter` event here; false if the device has no pool yet.
    pub fn count(&self, counter: C) -> bool {
        self.existing(|_, pool| pool.stats_mut().bump(counter, 1)).is_some()
    }

    /// The device's statistics, the fronts' counts merged (zeros before the
    /// first allocation).
    pub fn stats(&self) -> TesseraStats {
        let mut s = self
            .existing(|front, pool| {
                front.merge(pool);
                pool.stats()
            })
            .unwrap_or_default();
        s.add_all(&self.tagged.total_stats());
        s
    }

    /// One arena's statistics (block-level gauges), the fronts' counts merged.
    pub fn arena_stats(&self, arena: ArenaKind) -> TesseraStats {
        let mut s = self
            .existing(|front, pool| {
                front.merge(pool);
                pool.arena_stats(arena)
            })
            .unwrap_or_default();
        self.tagged.each(|_, pool| s.add_all(&pool.arena_stats(arena)));
        s
    }

    /// The largest block in the pool's cache (see `DevicePool::largest_cached_bytes`).
    pub fn largest_cached_bytes(&self) -> u64 {
        self.existing(|_, pool| pool.largest_cached_bytes()).unwrap_or(0)
    }

    /// Cumulative values back to current ones, counters to zero (the
    /// fronts' counts merged first).
    pub fn reset_accumulated_stats(&self) {
        self.existing(|front, pool| {
            front.merge(pool);
            pool.reset_accumulated();
        });
        self.tagged.each(|_, pool| pool.reset_accumulated());
    }

    pub fn reset_peak_stats(&self) {
        self.existing(|front, pool| {
            front.merge(pool);
            pool.reset_peaks();
        });
        self.tagged.each(|_, pool| pool.reset_peaks());
    }

    /// Gives every cached granule back to the driver, the fronts' free
    /// blocks first.
    pub fn empty_cache(&self) -> Result<()> {
        let mut result = self
            .existing(|front, pool| {
                front.drain(pool, false);
                pool.empty_cache()
            })
            .unwrap_or(Ok(()));
        self.tagged.each(|_, pool| {
            if let Err(e) = pool.release_cached() {
                result = result.clone().and(Err(e));
            }
        });
        result
    }

    pub fn set_memory_fraction(&self, fraction: f64) -> Result<()> {
        let mut slot = lock(&self.slot);
        slot.fraction = Some(fraction);
        let limit = self.limit_for(Some(fraction))?;
        if let Some(pool) = slot.pool.as_mut() {
            pool.set_limit(limit);
        }
        drop(slot);
        self.tagged.set_limit(limit);
        Ok(())
    }

    /// Starts or stops the history ring. The fronts do not record: while
    /// recording, every call takes the pool.
    pub fn record_history(&self, enabled: bool, max_entries: usize) {
        let mut slot = lock(&self.slot);
        slot.history = (enabled, max_entries);
        if enabled {
            self.front.disable(slot.pool.as_mut());
        } else if self.config.front_caches {
            self.front.enable();
        }
        if let Some(pool) = slot.pool.as_mut() {
            pool.record_history(enabled, max_entries);
        }
    }

    /// The recorded events, oldest first.
    pub fn history(&self) -> Vec<HistoryEvent> {
        self.existing(|_, pool| pool.history()).unwrap_or_default()
    }

    /// Keeps graph captures' memory private from now on (see
    /// `DevicePool::watch_graphs`), in the pool made later too.
    pub fn watch_graphs(&self) {
        let mut slot = lock(&self.slot);
        self.front.watch_graphs();
        if let Some(pool) = slot.pool.as_mut() {
            pool.watch_graphs();
        }
    }

    /// The captured graphs are gone: their memory becomes reusable.
    pub fn release_graph_pools(&self) -> u64 {
        self.existing(|_, pool| pool.release_graph_pools()).unwrap_or(0)
    }

    /// The fronts give back every block they hold (handed-out ones become
    /// the pool's allocations): for tools that show blocks, and on drop.
    pub fn drain_fronts(&self) {
        self.existing(|front, pool| front.drain(pool, true));
    }

    /// The segments with their blocks as they are: blocks the fronts
    /// handed out show as allocated, their free ones as cached; nothing
    /// moves.
    pub fn segments(&self) -> Vec<(ArenaKind, Vec<BlockView>)> {
        self.existing(|front, pool| pool.segments_with(&front.handed_out())).unwrap_or_default()
    }

    /// Runs `f` on tag `tag`'s pool here, if it has one. For tools and tests.
    pub fn with_tag_pool<T>(&self, tag: u32, f: impl FnOnce(&mut DevicePool) -> T) -> Option<T> {
        self.tagged.existing(tag, f)
    }

    /// Runs `f` on the pool (made on first use), the fronts' counts merged;
    /// the blocks they hold stay lent. For tools and tests.
    pub fn with_pool<T>(&self, f: impl FnOnce(&mut DevicePool) -> Result<T>) -> Result<T> {
        self.pool_op(|front, pool| {
            front.merge(pool);
            f(pool)
        })
    }

    /// The library is being unloaded: the fronts stop and give everything
    /// back, cached memory goes back to the driver, and a pool with nothing
    /// live is dropped, which releases its handles and address space.
    /// Returns the blocks and bytes still live, which stay mapped.
    pub fn shutdown(&self) -> (u64, u64) {
        let mut slot = lock(&self.slot);
        let Some(pool) = slot.pool.as_mut() else { return (0, 0) };
        self.front.disable(Some(pool));
        if let Err(e) = pool.release_cached() {
            tracing::warn!("tessera: releasing device {}'s cache at unload failed: {e}", self.index);
        }
        let s = pool.stats();
        let blocks = (s.gauge(G::ActiveBlocks).current + s.gauge(G::PendingFreeBlocks).current) as u64;
        let bytes = (s.gauge(G::AllocatedBytes).current + s.gauge(G::PendingFreeBytes).current) as u64;
        if blocks == 0 {
            slot.pool = None;
        }
        (blocks, bytes)
    }

    /// Checks the fronts' invariants and the pool's (panics on the first
    /// broken one). For tests and fuzzers.
    pub fn check_invariants(&self) {
        let mut slot = lock(&self.slot);
        self.front.check(slot.pool.as_mut());
        let mut reserved = slot.pool.as_ref().map_or(0, |p| p.stats().gauge(G::ReservedBytes).current);
        let mut poisoned = slot.pool.as_ref().is_some_and(|p| p.poisoned().is_some());
        drop(slot);
        self.tagged.each(|_, pool| {
            pool.check_invariants();
            reserved += pool.stats().gauge(G::ReservedBytes).current;
            poisoned |= pool.poisoned().is_some();
        });
        // Exact while no other thread allocates (how tests call this), and
        // while no pool stopped (a stopped pool's count keeps what the driver
        // may still hold for it).
        if !poisoned {
            assert_eq!(reserved as u64, self.reserved.bytes(), "the device's reserved count is the sum of its pools'");
        }
    }

    /// Whether the pool stopped serving after driver failures.
    pub fn poisoned(&self) -> bool {
        lock(&self.slot).pool.as_ref().is_some_and(|p| p.poisoned().is_some())
    }
}

impl Drop for Device {
    /// The fronts give their blocks back, so that a pool with nothing live
    /// returns its memory (tests, replays, and the global one at `dlclose`).
    fn drop(&mut self) {
        self.drain_fronts();
    }
}
