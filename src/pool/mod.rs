//! The policy layer for one device: blocks, best fit, split and coalesce,
//! streams, growth, reclamation and all the counting. It calls the backend
//! for primitives only and never asks which backend it runs on. Bookkeeping
//! lives out of band, in slabs indexed by integers; nothing is written into
//! device memory. One file per concept, each opening with its invariants:
//!
//! - `block`: the chain of blocks of each arena, its slab, the index sets;
//! - `alloc`: best fit, the hand-out, the order of fallbacks on a miss;
//! - `free`: caching, pending and lending on free; bad frees;
//! - `lend`: the blocks lent to the front caches and their counts;
//! - `streams`: epoch events, pending frees, record_stream, cross-stream reuse;
//! - `growth`: how much to map for a miss, and where;
//! - `gap`: placement across the cached blocks around a hole;
//! - `handles`: physical handles and every driver call that maps memory;
//! - `recycle`: every unmap of cached memory (recycling, reclamation, empty_cache);
//! - `ready`: the driver thread's work (tidying): the ready reserve, made
//!   of recycled memory while the cache is over its fraction;
//! - `graphs`: the private caches of CUDA graph captures;
//! - `pause`: giving the physical memory back and taking it again at the
//!   same addresses (a tag's pool);
//! - `history`: the ring of recorded events;
//! - `view`: read-only pictures of blocks and segments;
//! - `check`: the invariant check.
//!
//! Invariants of the whole (checked by [`DevicePool::check_invariants`]
//! after every operation in tests):
//! - Each arena is covered exactly, in address order, by the chain of its
//!   blocks (`prev`/`next`); no gaps, no overlap.
//! - Holes start and end on granule boundaries; no two holes are adjacent;
//!   no two cached blocks of the same cache key (stream, or graph capture)
//!   and stream are adjacent.
//! - Handles map whole, at offset 0 (CUDA maps nothing else). The mapped
//!   handles tile exactly the maximal runs of non-hole blocks: a byte is
//!   mapped iff it lies outside every hole. Handles never overlap.
//! - Every live handle is either mapped (in `mapped`, by address) or free
//!   (in `free_handles`), never both.
//! - The index sets hold exactly the blocks of their state; the gauges equal
//!   a recount. Lent blocks (see `State::Lent`) are in `live` and in no
//!   index; the pool counts them as cached, and the front cache holding them
//!   keeps the difference (see front.rs).
#![forbid(unsafe_code)]

mod alloc;
mod block;
mod check;
mod free;
mod gap;
mod graphs;
mod growth;
mod handles;
mod history;
mod lend;
mod pause;
mod ready;
mod recycle;
mod streams;
mod view;

pub use graphs::PoolBlock;
pub use handles::DeviceReserved;
pub use history::{HistoryAction, HistoryEvent};
pub use lend::{Freed, FrontDelta, LentBlock};
pub use pause::PauseReport;
pub use ready::Tidy;
pub use view::{BlockState, BlockView};

use crate::backend::{Backend, EventId};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hash::AddrHash;
use crate::stats::{TesseraCounter as C, TesseraGauge as G, TesseraStats};
use block::{Arena, Block, BlockId, CachedKey, SizedKey, State, GRAPH_KEY, NIL, READY_KEY, cache_key};
use gap::Gap;
use handles::{Handle, HandleIdx};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use streams::{Epoch, PendingFree};

/// Smallest block, and the rounding of every request (as PyTorch's).
pub const MIN_BLOCK_BYTES: u64 = 512;

/// Which arena a request goes to: small requests are packed together so
/// that they pin few granules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ArenaKind {
    Small = 0,
    Large = 1,
}

/// Whether the cross-stream index (`DevicePool::cached_by_size`) is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CrossIndex {
    /// Not kept: every cached block outside graph pools is cached under this
    /// one key (None: there is none).
    Sole(Option<u64>),
    /// Kept: it holds every cached block outside graph pools.
    Built,
}

/// The pool of one device: its arenas, blocks, handles, streams and statistics.
pub struct DevicePool {
    device: i32,
    backend: Arc<dyn Backend>,
    /// The options (TESSERA_CONF) as config.rs checked them for this
    /// backend, by their own names; `graph_pools` may be switched on at run
    /// time (`watch_graphs`).
    conf: Config,
    /// The cap on reserved bytes: memory_limit resolved against the device,
    /// or what set_memory_fraction set. It caps `device_reserved`, the bytes
    /// of every pool of the device (the untagged one and the tags').
    limit_bytes: Option<u64>,
    device_reserved: DeviceReserved,
    arenas: Vec<Arena>,
    /// Slab of blocks; `free_slots` lists unused indices.
    blocks: Vec<Block>,
    free_slots: Vec<BlockId>,
    /// Allocated, pending and lent blocks by address.
    live: HashMap<u64, BlockId, AddrHash>,
    /// The allocated blocks that other streams than their own used
    /// (record_stream, `Block::has_uses`): those streams, in call order.
    stream_uses: HashMap<BlockId, Vec<u64>>,
    /// Cached blocks by (cache key, arena and size, addr): best fit per stream
    /// (or per graph capture, see `cache_key`).
    cached_by_stream: BTreeMap<CachedKey, BlockId>,
    /// The cached blocks outside graph pools again, by (arena and size, addr):
    /// best fit across streams, for a stream whose own cache has none.
    /// Filled only once two cache keys hold such blocks (`cross_index`):
    /// while one key holds them all, its range of `cached_by_stream` is the
    /// same list, and a one-stream workload pays for no second index.
    cached_by_size: BTreeMap<SizedKey, BlockId>,
    /// Whether `cached_by_size` is kept (see `CrossIndex`).
    cross_index: CrossIndex,
    /// How many cached blocks lie outside graph pools.
    cached_outside_graphs: usize,
    /// Holes by (arena and size, addr).
    holes: BTreeMap<SizedKey, BlockId>,
    /// Recycling's candidates by (size, id) (`Block::candidate`): indexed
    /// cached blocks outside graph pools that overlapped a handle wholly
    /// under cached blocks when recycling looked (`may_free_a_handle`);
    /// those that no longer do are dropped when it looks at them. Every
    /// mapped handle wholly under cached blocks overlaps a candidate or a
    /// block in `unchecked`. What recycling walks, never every cached block.
    recyclable: BTreeSet<(u64, BlockId)>,
    /// The slots of cached blocks outside graph pools indexed since
    /// recycling last looked, each once (`Block::queued`; a slot may since
    /// hold another block, or none): asked whether they may free a handle,
    /// and made candidates if so, when it next looks (`check_unchecked`).
    /// A free costs a push here, not a B-tree insert.
    unchecked: Vec<BlockId>,
    /// Slab of physical handles (None: released slot, listed in
    /// `free_handle_slots`).
    handles: Vec<Option<Handle>>,
    free_handle_slots: Vec<HandleIdx>,
    /// Unmapped live handles by (granules, index).
    free_handles: BTreeSet<(u64, HandleIdx)>,
    /// Mapped handles by address.
    mapped: BTreeMap<u64, HandleIdx>,
    pending: Vec<PendingFree>,
    /// All statistics of the device.
    stats: TesseraStats,
    /// The block-level gauges per arena (small, large); they sum to `stats`'.
    arena_stats: [TesseraStats; 2],
    /// Counts frees that cache a block (see `Block::freed_seq`).
    free_seq: u64,
    /// Per stream that freed blocks: its outstanding epoch event, recorded
    /// when `free_seq` was the second field, and the highest free number the
    /// device has passed on it.
    epochs: HashMap<u64, Epoch>,
    /// The streams with an outstanding epoch event (`Epoch::event` set),
    /// each once: what `advance_epochs` polls.
    epochs_waiting: Vec<u64>,
    /// The streams that freed blocks since their last epoch event
    /// (`Epoch::dirty` set), each once: where `advance_epochs` records one.
    epochs_dirty: Vec<u64>,
    /// The stream of the last free, to skip the map on the hot path.
    last_free_stream: Option<u64>,
    /// Whether any graph capture was seen on this device.
    seen_capture: bool,
    /// Events whose destroy failed, to destroy later.
    stale_events: Vec<EventId>,
    /// Set after driver failures that left the mapping state unknown: from
    /// then on the pool serves nothing (fail-stop, never corrupt).
    poisoned: Option<String>,
    /// The history ring, when recording: (events, capacity).
    history: Option<(VecDeque<HistoryEvent>, usize)>,
    total_bytes: u64,
    /// The driver's free bytes when last asked, the reserved bytes then, and
    /// how many more growths may use the answer (see `near_capacity`).
    free_hint: Option<(u64, u64, u32)>,
    /// A driver thread tidies this pool (see ready.rs): growth on the
    /// callers' threads leaves recycling to it until the cache passes twice
    /// max_cached_fraction.
    deferred: bool,
    /// A tidy step runs now: driver calls count as the driver thread's.
    background: bool,
    /// The largest recent miss of the large arena, in bytes, decaying by a
    /// sixteenth at each miss: what the ready reserve prepares for.
    ready_demand_bytes: u64,
    /// (misses, frees) when a tidy round last found nothing to do: until
    /// either moves, there is nothing new for the driver thread.
    tidied_at: (u64, u64),
    /// The most bytes allocated at any growth (the request included) since
    /// the last reset_peak_stats or empty_cache: the workload's peak.
    live_high_water_bytes: u64,
    /// Set while paused (see pause.rs): the backups to restore at resume.
    paused: Option<pause::Paused>,
    /// The host copies a resume kept for the next pause (keep_backups).
    kept_backups: pause::KeptBackups,
}

impl Drop for DevicePool {
    /// A pool dropped with nothing live (tests, replays; never the global
    /// one, which lives until exit) gives its memory and address space back.
    /// With live blocks it leaks on purpose: someone may still use them.
    fn drop(&mut self) {
        self.drop_backups();
        if !self.live.is_empty() || self.poisoned.is_some() {
            return;
        }
        self.give_reserved(self.physical_bytes());
        let mapped: Vec<u64> = self.mapped.keys().copied().collect();
        for va in mapped {
            let h = self.mapped[&va];
            if self.handles[h as usize].as_ref().is_some_and(|h| h.paused) {
                // Released at pause: nothing mapped, nothing held.
                self.mapped.remove(&va);
                self.handles[h as usize] = None;
                continue;
            }
            let size = self.handles[h as usize].as_ref().map_or(0, |h| h.granules * self.conf.page_size.0);
            if self.backend.unmap(self.device, va, size).is_ok() {
                self.mapped.remove(&va);
                if let Some(handle) = self.handles[h as usize].as_mut() {
                    handle.va = None;
                }
            }
        }
        for handle in self.handles.iter().flatten().filter(|h| h.va.is_none()) {
            let _ = self.backend.release(self.device, handle.backend_id);
        }
        for epoch in self.epochs.values() {
            if let Some((event, _)) = epoch.event {
                let _ = self.backend.destroy_event(self.device, event);
            }
        }
        for &event in &self.stale_events {
            let _ = self.backend.destroy_event(self.device, event);
        }
        if self.mapped.is_empty() {
            for arena in &self.arenas {
                let _ = self.backend.unreserve(self.device, arena.base, arena.size);
            }
        }
    }
}

/// `x` rounded up to a multiple of `to`.
pub(crate) fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// The largest request: 4 EiB, more than any device, and far enough from
/// 2^64 that every rounding of it (to blocks, granules, handles) is exact.
pub const MAX_REQUEST_BYTES: u64 = 1 << 62;

/// `size` if a request may ask for it, else the error every entry point
/// gives (the caller counts it).
pub fn check_request(size: u64) -> Result<u64> {
    if size > MAX_REQUEST_BYTES {
        return Err(Error::InvalidArgument(format!("allocation size {size} is negative or absurd (over 2^62 bytes)")));
    }
    Ok(size)
}

/// PyTorch's rounding: at least 512 bytes, a multiple of 512 (sizes past
/// `MAX_REQUEST_BYTES` are refused before they are rounded).
pub fn round_size(size: u64) -> u64 {
    round_up(size.max(1), MIN_BLOCK_BYTES)
}

impl DevicePool {
    /// Reserves the arenas of `device`, which runs by `conf` (checked here
    /// against the backend's granularity) under `limit_bytes`. Fails on a bad
    /// device or configuration, or when the backend cannot reserve address
    /// space.
    pub fn new(device: i32, backend: Arc<dyn Backend>, conf: &Config, limit_bytes: Option<u64>) -> Result<Self> {
        let conf = conf.for_backend(backend.name(), backend.granularity(device)?)?;
        let g = conf.page_size.0;
        let (_, total_bytes) = backend.mem_info(device)?;
        let mut pool = DevicePool {
            device,
            backend,
            arenas: Vec::new(),
            blocks: Vec::new(),
            free_slots: Vec::new(),
            live: HashMap::with_hasher(AddrHash),
            stream_uses: HashMap::new(),
            cached_by_stream: BTreeMap::new(),
            cached_by_size: BTreeMap::new(),
            cross_index: CrossIndex::Sole(None),
            cached_outside_graphs: 0,
            holes: BTreeMap::new(),
            recyclable: BTreeSet::new(),
            unchecked: Vec::new(),
            handles: Vec::new(),
            free_handle_slots: Vec::new(),
            free_handles: BTreeSet::new(),
            mapped: BTreeMap::new(),
            pending: Vec::new(),
            stats: TesseraStats::default(),
            arena_stats: [TesseraStats::default(); 2],
            free_seq: 0,
            epochs: HashMap::new(),
            epochs_waiting: Vec::new(),
            epochs_dirty: Vec::new(),
            last_free_stream: None,
            seen_capture: false,
            stale_events: Vec::new(),
            poisoned: None,
            paused: None,
            kept_backups: Default::default(),
            history: None,
            total_bytes,
            free_hint: None,
            deferred: false,
            background: false,
            ready_demand_bytes: 0,
            tidied_at: (u64::MAX, u64::MAX),
            live_high_water_bytes: 0,
            conf,
            limit_bytes,
            device_reserved: DeviceReserved::default(),
        };
        for kind in [ArenaKind::Small, ArenaKind::Large] {
            let size = match kind {
                ArenaKind::Small => round_up(pool.conf.va_size.0 / 4, g),
                ArenaKind::Large => pool.conf.va_size.0,
            };
            let base = match pool.backend.reserve(device, size, g) {
                Ok(base) => base,
                Err(e) => {
                    for arena in &pool.arenas {
                        let _ = pool.backend.unreserve(device, arena.base, arena.size);
                    }
                    pool.arenas.clear();
                    return Err(e);
                }
            };
            let id = pool.new_block(Block {
                addr: base,
                size,
                arena: kind,
                state: State::Hole,
                stream: 0,
                requested: 0,
                prev: NIL,
                next: NIL,
                has_uses: false,
                freed_seq: 0,
                graph: 0,
                indexed: false,
                queued: false,
                candidate: false,
            });
            pool.index(id);
            pool.arenas.push(Arena { base, size, head: id });
        }
        Ok(pool)
    }

    /// The device index.
    pub fn device(&self) -> i32 {
        self.device
    }

    /// Whether `addr` lies in one of the pool's arenas (its address space).
    pub fn in_arenas(&self, addr: u64) -> bool {
        self.arenas.iter().any(|a| addr >= a.base && addr < a.base + a.size)
    }

    /// Why the pool stopped serving, after driver failures that left its
    /// mapping state unknown (fail-stop); None while healthy.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// The error every call (`call`) of a stopped pool gives; Ok while healthy.
    fn refuse_if_poisoned(&self, call: &'static str) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(Error::Driver { call, code: -1, message: format!("device {} disabled: {why}", self.device) }),
            None => Ok(()),
        }
    }

    /// Every statistic of the device.
    pub fn stats(&self) -> TesseraStats {
        self.stats
    }

    /// The statistics, for counters the caller keeps (bad requests).
    pub fn stats_mut(&mut self) -> &mut TesseraStats {
        &mut self.stats
    }

    /// Caps reserved bytes from now on (set_memory_fraction).
    pub fn set_limit(&mut self, limit_bytes: Option<u64>) {
        self.limit_bytes = limit_bytes;
    }

    /// From now on the memory limit caps this pool together with the other
    /// pools of `reserved` (the device's). Called on a pool that holds no
    /// memory yet (just made).
    pub fn share_reserved(&mut self, reserved: &DeviceReserved) {
        assert_eq!(self.physical_bytes(), 0, "a pool joins its device's count before it holds memory");
        self.device_reserved = reserved.clone();
    }

    /// Memory of the device, as the backend reported it.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Statistics of one arena (block-level gauges only: allocated,
    /// requested, active, cached, mapped, pending).
    pub fn arena_stats(&self, arena: ArenaKind) -> TesseraStats {
        self.arena_stats[arena as usize]
    }

    /// Moves a gauge of the device and of one arena by `delta`.
    pub(super) fn gauge(&mut self, arena: ArenaKind, g: G, delta: i64) {
        for s in [&mut self.stats, &mut self.arena_stats[arena as usize]] {
            if delta >= 0 {
                s.gauge_mut(g).add(delta);
            } else {
                s.gauge_mut(g).sub(-delta);
            }
        }
    }

    /// Peaks back to current values, the device's and each arena's.
    /// Cumulative values and counters back to zero (current values stay),
    /// the device's and each arena's.
    pub fn reset_accumulated(&mut self) {
        self.stats.reset_accumulated();
        for s in &mut self.arena_stats {
            s.reset_accumulated();
        }
    }

    pub fn reset_peaks(&mut self) {
        self.live_high_water_bytes = self.stats.gauge(G::AllocatedBytes).current as u64;
        self.stats.reset_peaks();
        for s in &mut self.arena_stats {
            s.reset_peaks();
        }
    }

    /// Counts `e` if it is a driver failure; returns it.
    pub(super) fn driver_error(&mut self, e: Error) -> Error {
        if matches!(e, Error::Driver { .. }) {
            self.stats.bump(C::DriverErrors, 1);
        }
        e
    }
}
