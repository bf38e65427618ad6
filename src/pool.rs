//! The policy layer for one device: blocks, best fit, split and coalesce,
//! streams, growth, reclamation and all the counting. It calls the backend
//! for primitives only and never asks which backend it runs on. Bookkeeping
//! lives out of band, in slabs indexed by integers; nothing is written into
//! device memory.
//!
//! Invariants (checked by [`DevicePool::check_invariants`] after every
//! operation in tests):
//! - Each arena is covered exactly, in address order, by the chain of its
//!   blocks (`prev`/`next`); no gaps, no overlap.
//! - Holes start and end on granule boundaries; no two holes are adjacent;
//!   no two cached blocks of the same cache key (stream, or graph capture)
//!   are adjacent.
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

use crate::backend::{Backend, EventId};
use crate::error::{Error, OomInfo, Result};
use crate::stats::{TesseraCounter as C, TesseraGauge as G, TesseraStat, TesseraStats};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

/// Smallest block, and the rounding of every request (as PyTorch's).
pub const MIN_BLOCK_BYTES: u64 = 512;

/// Growth by `growth_size` steps maps at most this share (1/8) of the
/// reserved bytes. On the 24 multi-stream seeds (about 100 MiB live) it
/// took reserved/live from mean 1.107 (max 1.170) to 1.099 (1.145) and the
/// frontier from 1.092 to 1.089; the GPT-2, KV-cache, mixed and churn
/// traces, in pools of GiBs, grow as before.
const GROWTH_STEP_SHARE: u64 = 8;

type BlockId = u32;
type HandleIdx = u32;
const NIL: BlockId = u32::MAX;

/// Which arena a request goes to: small requests are packed together so
/// that they pin few granules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ArenaKind {
    Small = 0,
    Large = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Handed out to a caller.
    Allocated,
    /// Free and mapped; reusable at once on `stream`.
    Cached,
    /// Free, waiting for events on other streams (record_stream).
    Pending,
    /// Free and unmapped: address space only.
    Hole,
    /// Lent to a front cache (front.rs), which serves it whole, on `stream`,
    /// for requests of exactly its size and takes its frees, without the
    /// pool's lock. The pool counts it as cached and keeps it in `live`
    /// (free routing finds it), in no index; it comes back by `return_lent`
    /// (free) or `lent_to_live` (allocated).
    Lent,
}

#[derive(Debug, Clone)]
struct Block {
    addr: u64,
    size: u64,
    arena: ArenaKind,
    state: State,
    /// Allocated: the stream it was allocated on. Cached/Pending: the stream
    /// that may reuse it at once. Holes: 0.
    stream: u64,
    /// Bytes the caller asked for (Allocated only).
    requested: u64,
    /// Address neighbours in the arena's chain, or NIL at the arena's ends.
    prev: BlockId,
    next: BlockId,
    /// Streams other than `stream` that used the block (record_stream).
    stream_uses: Vec<u64>,
    /// The CUDA graph capture that owns the block (0: none). Memory a
    /// capture allocated, or freed while it captured, may be touched by every
    /// replay of the graph: it is cached only for that capture, never reused
    /// outside it nor unmapped, until `release_graph_pools`.
    graph: u64,
    /// Cached blocks: the free sequence number when `stream` last freed it
    /// (0: never used by the device). The device is done with the block once
    /// its stream's epoch event recorded at a later number has completed.
    freed_seq: u64,
}

/// One physical handle of `granules` granules, mapped whole at `va` or not
/// at all.
#[derive(Debug, Clone)]
struct Handle {
    backend_id: u64,
    granules: u64,
    va: Option<u64>,
}

#[derive(Debug)]
struct Arena {
    base: u64,
    size: u64,
    /// First block of the chain (lowest address).
    head: BlockId,
}

/// Where growth maps a request (see `DevicePool::best_gap`): `new` granules
/// of hole `hole`, joined with the blocks `first..=last` around it. From
/// the front of the hole (`first` may precede it; `last` is the hole when
/// its front suffices) or, when `back`, its back (`first` is the hole).
#[derive(Debug, Clone, Copy)]
struct Gap {
    new: u64,
    hole: BlockId,
    first: BlockId,
    last: BlockId,
    back: bool,
}

/// A block freed while other streams may still use it.
#[derive(Debug)]
struct PendingFree {
    block: BlockId,
    /// (stream, event recorded on it at the free), one per stream that used
    /// the block.
    events: Vec<(u64, EventId)>,
    /// Recording an event failed: the block waits for a successful
    /// device synchronize instead.
    needs_sync: bool,
}

/// What `free_or_lend` did with a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freed {
    /// Freed in the pool (cached, pending or, for a mismatch, as allocated).
    Done,
    /// Lent to the caller's front cache, whole and free.
    Lent(LentBlock),
    /// Already lent to the front cache of this stream: not freed here.
    HeldByFront(u64),
}

/// A block lent to a front cache: what the front needs to serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LentBlock {
    pub id: u32,
    pub addr: u64,
    pub size: u64,
    pub arena: ArenaKind,
    pub stream: u64,
}

/// What a front cache counted since it last merged into the pool. A front
/// only hands lent blocks out and takes them back, so three gauges move
/// (allocated, requested, active) and cached bytes move opposite to
/// allocated bytes: they are derived at the merge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontDelta {
    /// `[scope][gauge]`, scope 0 the device, 1 + `ArenaKind` an arena; gauge
    /// 0 allocated bytes, 1 requested bytes, 2 active blocks. Each a change
    /// from zero: `current` the net change, `peak` the highest.
    pub gauges: [[TesseraStat; 3]; 3],
    /// Per scope, the lowest net change of allocated bytes (so the highest
    /// of cached bytes).
    pub alloc_low: [i64; 3],
    pub cache_hits: u64,
}

impl FrontDelta {
    /// A block of `size` bytes (`requested` asked for) handed out.
    #[inline]
    pub fn hand_out(&mut self, arena: ArenaKind, size: u64, requested: u64) {
        for scope in [0, 1 + arena as usize] {
            let g = &mut self.gauges[scope];
            g[0].add(size as i64);
            g[1].add(requested as i64);
            g[2].add(1);
        }
    }

    /// A handed-out block taken back (freed into the front, or returned to
    /// the pool as an allocation).
    #[inline]
    pub fn take_back(&mut self, arena: ArenaKind, size: u64, requested: u64) {
        for scope in [0, 1 + arena as usize] {
            let g = &mut self.gauges[scope];
            g[0].sub(size as i64);
            g[1].sub(requested as i64);
            g[2].sub(1);
            self.alloc_low[scope] = self.alloc_low[scope].min(g[0].current);
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == FrontDelta::default()
    }
}

/// Settings of one pool, resolved from the configuration and the backend.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub granule_bytes: u64,
    pub max_handle_bytes: u64,
    /// Past this fraction of the allowed memory, new handles are one
    /// granule each (see `near_capacity`); 1: never.
    pub fine_handles_above: f64,
    pub small_size_bytes: u64,
    pub growth_bytes: u64,
    /// Growth recycles device-done cached memory first while cached bytes
    /// exceed this fraction of reserved bytes.
    pub cached_fraction: f64,
    /// PyTorch's garbage_collection_threshold: growth recycles first while
    /// reserved bytes exceed this fraction of the allowed memory (0: off).
    pub gc_threshold: f64,
    pub va_size_bytes: u64,
    pub expandable: bool,
    pub limit_bytes: Option<u64>,
    /// Track graph captures on every call (see `Block::graph`).
    pub graph_pools: bool,
}

/// A read-only picture of one block, for snapshots and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockView {
    pub addr: u64,
    pub size: u64,
    pub arena: ArenaKind,
    pub state: &'static str,
    pub stream: u64,
    pub requested: u64,
}

pub struct DevicePool {
    device: i32,
    backend: Arc<dyn Backend>,
    settings: PoolSettings,
    arenas: Vec<Arena>,
    /// Slab of blocks; `free_slots` lists unused indices.
    blocks: Vec<Block>,
    free_slots: Vec<BlockId>,
    /// Allocated, pending and lent blocks by address.
    live: HashMap<u64, BlockId, AddrHash>,
    /// Cached blocks by (arena, cache key, size, addr): best fit per stream
    /// (or per graph capture, see `cache_key`). The only index of them.
    cached_by_stream: BTreeSet<(ArenaKind, u64, u64, u64, BlockId)>,
    /// Holes by (arena, size, addr).
    holes: BTreeSet<(ArenaKind, u64, u64, BlockId)>,
    /// Slab of physical handles (None: released slot).
    handles: Vec<Option<Handle>>,
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
}

#[derive(Debug, Default)]
struct Epoch {
    event: Option<(EventId, u64)>,
    done_seq: u64,
}

/// What the history ring records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryAction {
    Alloc,
    Free,
    /// Handles mapped into an arena (PyTorch's segment_map).
    Map,
    /// Handles unmapped (segment_unmap).
    Unmap,
    Oom,
}

impl HistoryAction {
    /// PyTorch's name of the action, as in `torch.cuda.memory._snapshot()`.
    pub fn torch_name(self) -> &'static str {
        match self {
            HistoryAction::Alloc => "alloc",
            HistoryAction::Free => "free_requested",
            HistoryAction::Map => "segment_map",
            HistoryAction::Unmap => "segment_unmap",
            HistoryAction::Oom => "oom",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEvent {
    pub action: HistoryAction,
    pub addr: u64,
    /// Block size (bytes mapped, for Map/Unmap).
    pub size: u64,
    /// Bytes the caller asked for.
    pub requested: u64,
    pub stream: u64,
    /// Microseconds since the process first used tessera.
    pub time_us: u64,
}

fn now_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_micros() as u64
}

/// Hashes block addresses for the `live` map: one multiply (Fibonacci
/// hashing). Addresses are not attacker-chosen, and SipHash's cost is most
/// of a cached malloc+free pair.
#[derive(Clone, Copy, Default)]
pub(crate) struct AddrHash;

pub(crate) struct AddrHasher(u64);

impl std::hash::BuildHasher for AddrHash {
    type Hasher = AddrHasher;
    fn build_hasher(&self) -> AddrHasher {
        AddrHasher(0)
    }
}

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        // Blocks are 512-aligned: drop the zero bits, then spread. Mixing in
        // the previous state lets (stream, size) keys hash both fields.
        self.0 = (self.0 ^ (x >> 9)).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
}

impl Drop for DevicePool {
    /// A pool dropped with nothing live (tests, replays; never the global
    /// one, which lives until exit) gives its memory and address space back.
    /// With live blocks it leaks on purpose: someone may still use them.
    fn drop(&mut self) {
        if !self.live.is_empty() || self.poisoned.is_some() {
            return;
        }
        let mapped: Vec<u64> = self.mapped.keys().copied().collect();
        for va in mapped {
            let h = self.mapped[&va];
            let size = self.handles[h as usize].as_ref().map_or(0, |h| h.granules * self.settings.granule_bytes);
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

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Growths that may reuse the driver's last free-bytes answer.
const FREE_HINT_USES: u32 = 64;

/// Cache keys with this bit set name a graph capture's private cache.
const GRAPH_KEY: u64 = 1 << 63;
/// The capture of a block freed when the driver could not say whether its
/// stream was capturing.
const UNKNOWN_CAPTURE: u64 = 1 << 62;

/// The key under which a cached block waits: its stream, or its capture's
/// private cache.
fn cache_key(b: &Block) -> u64 {
    if b.graph != 0 { GRAPH_KEY | b.graph } else { b.stream }
}

/// PyTorch's rounding: at least 512 bytes, a multiple of 512.
pub fn round_size(size: u64) -> u64 {
    round_up(size.max(1), MIN_BLOCK_BYTES)
}

impl DevicePool {
    /// Reserves the arenas of `device`. Fails on a bad device or when the
    /// backend cannot reserve address space.
    pub fn new(device: i32, backend: Arc<dyn Backend>, mut settings: PoolSettings) -> Result<Self> {
        let backend_granule = backend.granularity(device)?;
        if !settings.granule_bytes.is_multiple_of(backend_granule) {
            return Err(Error::Config(format!(
                "page_size {} is not a multiple of the {} backend's granularity {}",
                settings.granule_bytes,
                backend.name(),
                backend_granule
            )));
        }
        let g = settings.granule_bytes;
        settings.max_handle_bytes = (settings.max_handle_bytes / g * g).max(g);
        settings.va_size_bytes = round_up(settings.va_size_bytes, g);
        let (_, total_bytes) = backend.mem_info(device)?;
        let mut pool = DevicePool {
            device,
            backend,
            arenas: Vec::new(),
            blocks: Vec::new(),
            free_slots: Vec::new(),
            live: HashMap::with_hasher(AddrHash),
            cached_by_stream: BTreeSet::new(),
            holes: BTreeSet::new(),
            handles: Vec::new(),
            free_handles: BTreeSet::new(),
            mapped: BTreeMap::new(),
            pending: Vec::new(),
            stats: TesseraStats::default(),
            arena_stats: [TesseraStats::default(); 2],
            free_seq: 0,
            epochs: HashMap::new(),
            last_free_stream: None,
            seen_capture: false,
            stale_events: Vec::new(),
            poisoned: None,
            history: None,
            total_bytes,
            free_hint: None,
            settings,
        };
        for kind in [ArenaKind::Small, ArenaKind::Large] {
            let size = match kind {
                ArenaKind::Small => round_up(pool.settings.va_size_bytes / 4, g),
                ArenaKind::Large => pool.settings.va_size_bytes,
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
                stream_uses: Vec::new(),
                freed_seq: 0,
                graph: 0,
            });
            pool.holes.insert((kind, size, base, id));
            pool.arenas.push(Arena { base, size, head: id });
        }
        Ok(pool)
    }

    pub fn device(&self) -> i32 {
        self.device
    }

    /// Why the pool stopped serving, after driver failures that left its
    /// mapping state unknown (fail-stop); None while healthy.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    pub fn stats(&self) -> TesseraStats {
        self.stats
    }

    pub fn stats_mut(&mut self) -> &mut TesseraStats {
        &mut self.stats
    }

    pub fn set_limit(&mut self, limit_bytes: Option<u64>) {
        self.settings.limit_bytes = limit_bytes;
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Statistics of one arena (block-level gauges only: allocated,
    /// requested, active, cached, mapped, pending).
    pub fn arena_stats(&self, arena: ArenaKind) -> TesseraStats {
        self.arena_stats[arena as usize]
    }

    /// Moves a gauge of the device and of one arena by `delta`.
    fn gauge(&mut self, arena: ArenaKind, g: G, delta: i64) {
        for s in [&mut self.stats, &mut self.arena_stats[arena as usize]] {
            if delta >= 0 {
                s.gauge_mut(g).add(delta);
            } else {
                s.gauge_mut(g).sub(-delta);
            }
        }
    }

    pub fn reset_peaks(&mut self) {
        self.stats.reset_peaks();
        for s in &mut self.arena_stats {
            s.reset_peaks();
        }
    }

    fn arena_at(&self, addr: u64) -> ArenaKind {
        let a = &self.arenas[ArenaKind::Small as usize];
        if addr >= a.base && addr < a.base + a.size { ArenaKind::Small } else { ArenaKind::Large }
    }

    // ----- history ----------------------------------------------------------

    /// Starts (with room for `max_entries` events) or stops recording.
    /// Stopping drops the recorded events.
    pub fn record_history(&mut self, enabled: bool, max_entries: usize) {
        self.history = (enabled && max_entries > 0).then(|| (VecDeque::with_capacity(max_entries.min(1 << 16)), max_entries));
    }

    fn record(&mut self, action: HistoryAction, addr: u64, size: u64, requested: u64, stream: u64) {
        if let Some((ring, cap)) = self.history.as_mut() {
            if ring.len() == *cap {
                ring.pop_front();
            }
            ring.push_back(HistoryEvent { action, addr, size, requested, stream, time_us: now_us() });
        }
    }

    /// The recorded events, oldest first.
    pub fn history(&self) -> Vec<HistoryEvent> {
        self.history.as_ref().map(|(r, _)| r.iter().copied().collect()).unwrap_or_default()
    }

    // ----- slab -------------------------------------------------------------

    fn new_block(&mut self, b: Block) -> BlockId {
        if let Some(id) = self.free_slots.pop() {
            self.blocks[id as usize] = b;
            id
        } else {
            self.blocks.push(b);
            (self.blocks.len() - 1) as BlockId
        }
    }

    fn drop_block(&mut self, id: BlockId) {
        self.blocks[id as usize].stream_uses = Vec::new();
        self.free_slots.push(id);
    }

    fn b(&self, id: BlockId) -> &Block {
        &self.blocks[id as usize]
    }

    fn bm(&mut self, id: BlockId) -> &mut Block {
        &mut self.blocks[id as usize]
    }

    // ----- index sets -------------------------------------------------------

    /// Removes a free block (cached or hole) from its index sets.
    fn unindex(&mut self, id: BlockId) {
        let b = &self.blocks[id as usize];
        match b.state {
            State::Cached => {
                self.cached_by_stream.remove(&(b.arena, cache_key(b), b.size, b.addr, id));
                let (arena, size) = (b.arena, b.size as i64);
                self.gauge(arena, G::CachedBytes, -size);
            }
            State::Hole => {
                self.holes.remove(&(b.arena, b.size, b.addr, id));
            }
            State::Allocated | State::Pending | State::Lent => {}
        }
    }

    fn index(&mut self, id: BlockId) {
        let b = &self.blocks[id as usize];
        match b.state {
            State::Cached => {
                self.cached_by_stream.insert((b.arena, cache_key(b), b.size, b.addr, id));
                let (arena, size) = (b.arena, b.size as i64);
                self.gauge(arena, G::CachedBytes, size);
            }
            State::Hole => {
                self.holes.insert((b.arena, b.size, b.addr, id));
            }
            State::Allocated | State::Pending | State::Lent => {}
        }
    }

    /// Splits `size` bytes off the front of unindexed block `id`; returns the
    /// remainder, a new block of the same state, also unindexed.
    fn split_front(&mut self, id: BlockId, size: u64) -> BlockId {
        let b = self.b(id).clone();
        debug_assert!(size < b.size);
        let rest = self.new_block(Block {
            addr: b.addr + size,
            size: b.size - size,
            arena: b.arena,
            state: b.state,
            stream: b.stream,
            requested: 0,
            prev: id,
            next: b.next,
            stream_uses: Vec::new(),
            freed_seq: b.freed_seq,
            graph: b.graph,
        });
        if b.next != NIL {
            self.bm(b.next).prev = rest;
        }
        let blk = self.bm(id);
        blk.next = rest;
        blk.size = size;
        rest
    }

    fn mergeable(&self, a: BlockId, b: BlockId) -> bool {
        let (x, y) = (self.b(a), self.b(b));
        match (x.state, y.state) {
            (State::Hole, State::Hole) => true,
            (State::Cached, State::Cached) => cache_key(x) == cache_key(y),
            _ => false,
        }
    }

    /// Merges unindexed free block `id` with mergeable neighbours, indexes
    /// the result and returns it.
    fn coalesce_and_index(&mut self, mut id: BlockId) -> BlockId {
        let prev = self.b(id).prev;
        if prev != NIL && self.mergeable(prev, id) {
            self.unindex(prev);
            self.absorb_next(prev);
            id = prev;
        }
        let next = self.b(id).next;
        if next != NIL && self.mergeable(id, next) {
            self.unindex(next);
            self.absorb_next(id);
        }
        self.index(id);
        id
    }

    /// Block `id` swallows its next neighbour (both unindexed).
    fn absorb_next(&mut self, id: BlockId) {
        let next = self.b(id).next;
        let (nsize, nnext, nseq) = (self.b(next).size, self.b(next).next, self.b(next).freed_seq);
        let blk = self.bm(id);
        blk.freed_seq = blk.freed_seq.max(nseq);
        self.bm(id).size += nsize;
        self.bm(id).next = nnext;
        if nnext != NIL {
            self.bm(nnext).prev = id;
        }
        self.drop_block(next);
    }

    fn arena_of(&self, size: u64) -> ArenaKind {
        if size <= self.settings.small_size_bytes { ArenaKind::Small } else { ArenaKind::Large }
    }

    // ----- allocate ---------------------------------------------------------

    /// Allocates `size` bytes for `stream`. Size 0 is the caller's business
    /// (the C ABI returns NULL for it, as PyTorch's own allocator does).
    pub fn malloc(&mut self, size: u64, stream: u64) -> Result<u64> {
        self.malloc_inner(size, stream).map_err(|e| self.driver_error(e))
    }

    fn malloc_inner(&mut self, size: u64, stream: u64) -> Result<u64> {
        if let Some(why) = &self.poisoned {
            return Err(Error::Driver { call: "malloc", code: -1, message: format!("device {} disabled: {why}", self.device) });
        }
        if !self.pending.is_empty() {
            self.process_pending()?;
        }
        let rounded = round_size(size);
        let arena = self.arena_of(rounded);
        // During a graph capture, memory comes from and goes to the
        // capture's private cache (see `Block::graph`).
        let graph = if self.settings.graph_pools {
            self.backend.capture_id(self.device, stream)?.unwrap_or(0)
        } else {
            0
        };
        self.seen_capture |= graph != 0;
        let key = if graph != 0 { GRAPH_KEY | graph } else { stream };
        if let Some(id) = self.find_cached(arena, key, rounded) {
            self.stats.bump(C::CacheHits, 1);
            return Ok(self.hand_out(id, rounded, size, stream, graph));
        }
        self.stats.bump(C::CacheMisses, 1);
        // Small requests take a block that another stream cached and the
        // device is done with before growing: each stream growing its own
        // granules would let a few small blocks per stream pin many granules.
        if arena == ArenaKind::Small && graph == 0 && let Some(id) = self.find_done_cached_other_stream(arena, rounded, stream)? {
            return Ok(self.hand_out(id, rounded, size, stream, 0));
        }
        // Nothing may wait on the device while the stream captures a graph
        // (the capture would break): grow, or fail, without waiting.
        let capturing = graph != 0 || (!self.settings.graph_pools && self.backend.is_capturing(self.device, stream)?);
        if capturing && graph == 0 && !self.seen_capture {
            self.seen_capture = true;
            tracing::warn!("a CUDA graph capture allocates through tessera without graph_pools");
            eprintln!(
                "tessera: a CUDA graph is being captured; set graph_pools:true in TESSERA_CONF so that memory \
                 the graph uses is never reused outside it"
            );
        }
        match self.grow(arena, rounded, stream, graph, capturing) {
            Ok(id) => return Ok(self.hand_out(id, rounded, size, stream, graph)),
            Err(Error::OutOfMemory(_)) => {}
            Err(e) => return Err(e),
        }
        // Under pressure: memory cached for other streams, then reclaimed
        // granules, then whatever the driver gives back after a full release.
        if capturing {
            return Err(Error::OutOfMemory(Box::new(self.oom_info(size))));
        }
        self.stats.bump(C::AllocRetries, 1);
        if let Some(id) = self.find_cached_other_stream(arena, rounded, stream)? {
            return Ok(self.hand_out(id, rounded, size, stream, 0));
        }
        let need = round_up(rounded, self.settings.granule_bytes) / self.settings.granule_bytes;
        if self.settings.expandable {
            let idle = self.reclaim(need)?;
            // Fewer granules free than a fresh range needs: the cached
            // fragments beside the holes make up the rest.
            if idle && self.free_handle_granules() < need
                && let Some(id) = self.grow_across_gap(arena, rounded, stream)? {
                    return Ok(self.hand_out(id, rounded, size, stream, 0));
                }
        } else {
            self.release_cached()?;
        }
        match self.grow(arena, rounded, stream, 0, false) {
            Ok(id) => Ok(self.hand_out(id, rounded, size, stream, 0)),
            Err(Error::OutOfMemory(_)) => Err(Error::OutOfMemory(Box::new(self.oom_info(size)))),
            Err(e) => Err(e),
        }
    }

    /// The caller gives up on a request that ran out of memory (after any
    /// OOM callbacks): count it, record it, and, as PyTorch's allocator
    /// does, give cached memory back to the driver so that other users of
    /// the device (cuBLAS, NCCL, other processes) can have it.
    pub fn on_final_oom(&mut self, requested_bytes: u64, stream: u64) {
        self.stats.bump(C::Ooms, 1);
        if self.history.is_some() {
            self.record(HistoryAction::Oom, 0, requested_bytes, requested_bytes, stream);
        }
        // Releasing waits for the device, which a capturing stream forbids.
        if self.backend.is_capturing(self.device, stream).unwrap_or(true) {
            return;
        }
        if let Err(e) = self.release_cached() {
            tracing::warn!("releasing the cache after an OOM failed: {e}");
        }
    }

    fn driver_error(&mut self, e: Error) -> Error {
        if matches!(e, Error::Driver { .. }) {
            self.stats.bump(C::DriverErrors, 1);
        }
        e
    }

    /// What the pool knows at an OOM: for the message and the report.
    pub fn oom_info(&self, requested_bytes: u64) -> OomInfo {
        let (free, total) = self.backend.mem_info(self.device).unwrap_or((0, self.total_bytes));
        let mut pending_bytes = 0;
        let mut largest: Vec<(u64, u64)> = Vec::new(); // (size, stream) of the largest live blocks
        for &id in self.live.values() {
            let b = self.b(id);
            match b.state {
                State::Pending => pending_bytes += b.size,
                State::Allocated => {
                    largest.push((b.size, b.stream));
                    if largest.len() > 64 {
                        largest.sort_unstable_by(|x, y| y.cmp(x));
                        largest.truncate(5);
                    }
                }
                _ => {}
            }
        }
        largest.sort_unstable_by(|x, y| y.cmp(x));
        largest.truncate(5);
        OomInfo {
            device: self.device,
            requested_bytes,
            total_capacity_bytes: total,
            driver_free_bytes: free,
            allocated_bytes: self.stats.gauge(G::AllocatedBytes).current as u64,
            reserved_bytes: self.stats.gauge(G::ReservedBytes).current as u64,
            limit_bytes: self.settings.limit_bytes,
            live_blocks: self.stats.gauge(G::ActiveBlocks).current as u64,
            cached_bytes: self.stats.gauge(G::CachedBytes).current as u64,
            largest_cached_bytes: self.largest_cached_bytes(),
            free_handle_bytes: self.free_handle_granules() * self.settings.granule_bytes,
            pending_bytes,
            largest_allocations: largest,
        }
    }

    /// Serves the request from a cached block of exactly its size on its
    /// stream, if there is one (no split, no growth, no driver call: the
    /// front caches' miss tries this before draining them). Never during
    /// graph capture watching, nor on a poisoned pool.
    pub fn malloc_if_exact(&mut self, size: u64, stream: u64) -> Option<u64> {
        if self.settings.graph_pools || self.poisoned.is_some() || self.history.is_some() {
            return None;
        }
        let rounded = round_size(size);
        let arena = self.arena_of(rounded);
        let &(_, _, found, _, id) = self
            .cached_by_stream
            .range((arena, stream, rounded, 0, 0)..=(arena, stream, rounded, u64::MAX, NIL))
            .next()?;
        debug_assert_eq!(found, rounded);
        self.unindex(id);
        self.stats.bump(C::CacheHits, 1);
        Some(self.hand_out(id, rounded, size, stream, 0))
    }

    fn find_cached(&mut self, arena: ArenaKind, stream: u64, rounded: u64) -> Option<BlockId> {
        let &(_, _, _, _, id) = self
            .cached_by_stream
            .range((arena, stream, rounded, 0, 0)..=(arena, stream, u64::MAX, u64::MAX, NIL))
            .next()?;
        self.unindex(id);
        Some(id)
    }

    /// Best fit among blocks cached for other streams that the device is
    /// known to be done with (their streams' epoch events passed the free):
    /// safe to reuse on any stream with no wait. Polls the epoch events
    /// first. A scan of one arena's cached blocks: for misses only.
    fn find_done_cached_other_stream(&mut self, arena: ArenaKind, rounded: u64, stream: u64) -> Result<Option<BlockId>> {
        let candidates: Vec<(u64, u64, BlockId)> = self
            .cached_by_stream
            .range((arena, 0, 0, 0, 0)..=(arena, u64::MAX, u64::MAX, u64::MAX, NIL))
            .filter(|&&(_, s, size, _, _)| s != stream && s & GRAPH_KEY == 0 && size >= rounded)
            .map(|&(_, _, size, addr, id)| (size, addr, id))
            .collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        // Polling events changes what is known done, not what is cached.
        self.advance_epochs()?;
        let Some((_, _, id)) = candidates.into_iter().filter(|&(_, _, id)| self.device_done(id)).min() else {
            return Ok(None);
        };
        self.unindex(id);
        // The device is done with all of it: the whole block (the rest that
        // hand_out splits off too) becomes this stream's, as never used.
        self.bm(id).stream = stream;
        self.bm(id).freed_seq = 0;
        self.stats.bump(C::CrossStreamReuses, 1);
        Ok(Some(id))
    }

    /// Best fit among blocks cached for other streams. The allocating stream
    /// waits (on the device, not the host) for the freeing stream to pass
    /// the point of the free, so the block is safe to reuse in stream order.
    fn find_cached_other_stream(&mut self, arena: ArenaKind, rounded: u64, stream: u64) -> Result<Option<BlockId>> {
        // A scan of every cached block: this is the pressure path only, and
        // one index (by stream) keeps the hot path to half the tree updates.
        let Some((_, id)) = self
            .cached_by_stream
            .iter()
            .filter(|&&(a, s, size, _, _)| a == arena && s != stream && s & GRAPH_KEY == 0 && size >= rounded)
            .map(|&(_, _, size, _, id)| (size, id))
            .min()
        else {
            return Ok(None);
        };
        let from = self.b(id).stream;
        let event = self.backend.record_event(self.device, from)?;
        let waited = self.backend.stream_wait_event(self.device, stream, event);
        self.destroy_event_or_keep(event);
        waited?;
        self.unindex(id);
        self.stats.bump(C::CrossStreamReuses, 1);
        Ok(Some(id))
    }

    /// Turns unindexed free block `id` (cached, at least `rounded` bytes)
    /// into an allocated block, splitting off the rest.
    fn hand_out(&mut self, id: BlockId, rounded: u64, requested: u64, stream: u64, graph: u64) -> u64 {
        let b = self.bm(id);
        b.state = State::Allocated;
        let rest_stream = b.stream;
        b.stream = stream;
        b.requested = requested;
        let rest_graph = b.graph;
        b.graph = graph;
        if b.size - rounded >= MIN_BLOCK_BYTES {
            // The rest stays cached for the stream it was cached for: when
            // `id` came from another stream, the device may still use the
            // rest there, and only that stream's epochs can tell when it is
            // done (the new stream's earlier epoch events say nothing of it).
            let rest = self.split_front(id, rounded);
            self.bm(rest).state = State::Cached;
            self.bm(rest).requested = 0;
            self.bm(rest).stream = rest_stream;
            self.bm(rest).graph = rest_graph;
            self.coalesce_and_index(rest);
        }
        let (addr, size, arena) = (self.b(id).addr, self.b(id).size, self.b(id).arena);
        self.live.insert(addr, id);
        self.gauge(arena, G::AllocatedBytes, size as i64);
        self.gauge(arena, G::RequestedBytes, requested as i64);
        self.gauge(arena, G::ActiveBlocks, 1);
        if self.history.is_some() {
            self.record(HistoryAction::Alloc, addr, size, requested, stream);
        }
        addr
    }

    /// Granules that growth for a request of `rounded` bytes maps at least:
    /// small large-arena requests grow by growth_bytes, as PyTorch's
    /// segments do, so that their neighbours hit the cache; others (0) by
    /// what they need. The step is at most 1/`GROWTH_STEP_SHARE` of what is
    /// reserved, so that a small pool does not grow by 20 MiB steps.
    fn least_growth_granules(&self, arena: ArenaKind, rounded: u64) -> u64 {
        let step = self.settings.growth_bytes.min(self.physical_bytes() / GROWTH_STEP_SHARE);
        if arena == ArenaKind::Large && rounded < step / 2 {
            step / self.settings.granule_bytes
        } else {
            0
        }
    }

    /// Maps new granules for a request that no cached block serves and
    /// returns an unindexed cached block of at least `rounded` bytes.
    ///
    /// Placement: the gap that needs fewest new granules (see `best_gap`):
    /// a cached block of the request's cache key before a hole, extended
    /// into it (the expandable-segment case), or a hole with such blocks on
    /// either side, mapped across; otherwise the best fitting hole takes a
    /// fresh range. Recycling (see `recycle_before_growth`) never takes the
    /// placement's own cached blocks.
    fn grow(&mut self, arena: ArenaKind, rounded: u64, stream: u64, graph: u64, capturing: bool) -> Result<BlockId> {
        let key = if graph != 0 { GRAPH_KEY | graph } else { stream };
        let g = self.settings.granule_bytes;
        let fresh_granules = round_up(rounded, g) / g;
        let same_key = move |p: &Self, x: BlockId| x != NIL && p.b(x).state == State::Cached && cache_key(p.b(x)) == key;
        let mut plan = if self.settings.expandable { self.best_gap(arena, rounded, &same_key) } else { None };
        if self.settings.expandable && !capturing {
            // Recycling frees handles for a fresh range even when the gap
            // needs fewer: one recycling round serves the next growths too,
            // and brings the cache under max_cached_fraction, so growth
            // keeps coarse handles (measured on the H100, bench_time's
            // KV-cache workload: 1.23x native with just the gap's granules,
            // 1.08x so; the sim agrees, 24% less modelled driver time).
            let keep = plan.map(|p| self.gap_span(p));
            if self.recycle_before_growth(fresh_granules.max(self.least_growth_granules(arena, rounded)), keep)? {
                // Recycling opened holes, maybe beside cached blocks: look again.
                plan = self.best_gap(arena, rounded, &same_key);
            }
        }
        // Still over max_cached_fraction after recycling (no memory limit):
        // what is cached lies in handles that live blocks share. Then growth
        // maps just what the request needs, in one-granule handles, so that
        // recycling can take any of them back later instead of the cache
        // growing again with every coarse handle.
        let fragmented = self.settings.expandable
            && !capturing
            && self.settings.limit_bytes.is_none()
            && self.cache_over_fraction();
        let plan = match plan {
            Some(p) => p,
            None => {
                let &(_, _, _, hole) = self
                    .holes
                    .range((arena, fresh_granules * g, 0, 0)..=(arena, u64::MAX, u64::MAX, NIL))
                    .next()
                    .ok_or_else(|| Error::OutOfMemory(Box::default()))?;
                Gap { new: fresh_granules, hole, first: hole, last: hole, back: false }
            }
        };
        // Only a range that ends in the hole may map more than it needs:
        // small large-arena requests map growth_size, as PyTorch's
        // segments do (exactly what is needed when memory is short).
        let room = self.b(plan.hole).size / g;
        let growth = if fragmented || plan.back || plan.last != plan.hole {
            plan.new
        } else {
            self.least_growth_granules(arena, rounded).clamp(plan.new, room)
        };
        let id = self.map_gap(plan, growth, stream, graph, fragmented, false)?;
        // Merge with a following cached block of the same key, but keep it
        // unindexed for the caller.
        let next = self.b(id).next;
        if next != NIL && self.mergeable(id, next) {
            self.unindex(next);
            self.absorb_next(id);
        }
        Ok(id)
    }

    /// The least gap that `rounded` bytes fit: the run of blocks that
    /// `in_run` accepts before a hole, the hole, and the run after it,
    /// mapping only the hole's granules the request covers. From the run
    /// before (mapping the hole's front, then, if that is not enough, all
    /// of it), or ending at the end of the run after (mapping the hole's
    /// back), whichever maps fewer. The gap that maps fewest new granules
    /// wins, if fewer than a fresh range (ties: the first in hole order).
    /// A scan of one arena's holes: for growth only.
    fn best_gap(&self, arena: ArenaKind, rounded: u64, in_run: &dyn Fn(&Self, BlockId) -> bool) -> Option<Gap> {
        let g = self.settings.granule_bytes;
        let fresh = round_up(rounded, g) / g;
        let mut best: Option<Gap> = None;
        for &(_, hole_bytes, _, hole) in self.holes.range((arena, 0, 0, 0)..=(arena, u64::MAX, u64::MAX, NIL)) {
            let room = hole_bytes / g;
            let (mut before, mut first) = (0, hole);
            while in_run(self, self.b(first).prev) {
                first = self.b(first).prev;
                before += self.b(first).size;
            }
            let (mut after, mut last) = (0, hole);
            while in_run(self, self.b(last).next) {
                last = self.b(last).next;
                after += self.b(last).size;
            }
            let least = best.map_or(fresh, |b| b.new);
            if before > 0 && rounded > before && rounded <= before + room * g + after {
                let new = (round_up(rounded - before, g) / g).min(room);
                let upto = if new * g + before >= rounded { hole } else { last };
                if new < least {
                    best = Some(Gap { new, hole, first, last: upto, back: false });
                }
            }
            let least = best.map_or(fresh, |b| b.new);
            if after > 0 && rounded > after && rounded - after <= room * g {
                let new = round_up(rounded - after, g) / g;
                if new < least {
                    best = Some(Gap { new, hole, first: hole, last, back: true });
                }
            }
        }
        best
    }

    /// The address range a gap's blocks cover (what recycling must leave).
    fn gap_span(&self, gap: Gap) -> (u64, u64) {
        let last = self.b(gap.last);
        (self.b(gap.first).addr, last.addr + last.size)
    }

    /// Maps `growth` granules (at least `gap.new`; exactly `gap.new` when
    /// mapping the hole's back) of `gap.hole` and joins `gap.first..=last`
    /// into one unindexed cached block of `stream`/`graph`, returned. New
    /// handles are one granule each when `fine`. After a synchronize
    /// (`synced`), the runs may hold other streams' blocks: the block
    /// becomes the stream's, as never used. On a failed map nothing
    /// changes but a partly mapped prefix, kept cached.
    fn map_gap(&mut self, gap: Gap, growth: u64, stream: u64, graph: u64, fine: bool, synced: bool) -> Result<BlockId> {
        let g = self.settings.granule_bytes;
        let Gap { new, hole, first, last, back } = gap;
        let hole_bytes = self.b(hole).size;
        // The granules to map: the front of `hole`, or a new hole block
        // split off its back.
        let (target, room) = if back && new * g < hole_bytes {
            self.unindex(hole);
            let target = self.split_front(hole, hole_bytes - new * g);
            self.index(hole);
            (target, new)
        } else {
            (hole, hole_bytes / g)
        };
        let va = self.b(target).addr;
        let count = if back { new } else { growth };
        let mapped = match self.map_granules(va, count, room, fine) {
            Err(Error::OutOfMemory(_)) if count > new => self.map_granules(va, new, room, false),
            other => other,
        };
        let mapped = match mapped {
            Ok(n) => n,
            Err(Error::PartialMap { mapped_bytes, cause }) => {
                // Keep the mapped prefix as a cached block: the tiling holds.
                self.carve_mapped_front(target, mapped_bytes, stream, graph);
                self.coalesce_and_index(target);
                return Err(*cause);
            }
            Err(e) => {
                if target != hole {
                    self.coalesce_and_index(target); // back into the hole
                }
                return Err(e);
            }
        };
        self.carve_mapped_front(target, mapped * g, stream, graph);
        // Join first..=last (the target's unmapped rest, if any, lies past
        // `last` when mapping from the front, and before `target` from the
        // back) into one cached block.
        let first = if back { target } else { first };
        let last = if back || last != hole { last } else { target };
        let mut cur = first;
        loop {
            if self.is_indexed_cached(cur) {
                self.unindex(cur);
            }
            if synced {
                let b = self.bm(cur);
                b.stream = stream;
                b.freed_seq = 0;
            }
            if cur == last {
                break;
            }
            cur = self.b(cur).next;
        }
        // `first` swallows its neighbours up to and including `last`.
        let mut absorbed = first;
        while absorbed != last {
            absorbed = self.b(first).next;
            self.absorb_next(first);
        }
        Ok(first)
    }

    /// The front `mapped_bytes` of hole `hole` were just mapped: they become
    /// a cached block (left unindexed) for `stream`/`graph`, never used by
    /// the device yet; the rest stays a hole.
    fn carve_mapped_front(&mut self, hole: BlockId, mapped_bytes: u64, stream: u64, graph: u64) {
        self.unindex(hole);
        if self.b(hole).size > mapped_bytes {
            let rest = self.split_front(hole, mapped_bytes);
            self.index(rest);
        }
        let b = self.bm(hole);
        b.state = State::Cached;
        b.stream = stream;
        b.graph = graph;
        b.freed_seq = 0;
    }

    /// Backs at least `count` granules from `va` (unmapped, the front of a
    /// hole of `room` granules) with whole handles: free handles that fit
    /// first, then new ones (a larger free handle is traded for them); if
    /// memory is short, one larger free handle when the hole has room for
    /// it. New handles are one granule each when `fine`. Returns the
    /// granules mapped.
    fn map_granules(&mut self, va: u64, count: u64, room: u64, fine: bool) -> Result<u64> {
        if self.near_capacity(count) {
            self.refine_free_handles()?;
        }
        let mut plan: Vec<HandleIdx> = Vec::new();
        let mut covered = 0;
        while covered < count {
            let Some(&(n, h)) = self.free_handles.range(..=(count - covered, HandleIdx::MAX)).next_back() else { break };
            self.free_handles.remove(&(n, h));
            plan.push(h);
            covered += n;
        }
        // Short, while a free handle larger than the rest waits: trade it for
        // handles of exactly the rest (release, then create), so that memory
        // already held serves the request without a handle that would stick
        // out past it. If memory runs out, the larger handle itself is the
        // last resort, when the hole has room for it.
        if covered < count
            && let Some(&(n, h)) = self.free_handles.range((count - covered, 0)..).next()
        {
            // A failed release keeps the handle: the last resort below.
            let _ = self.release_free_handle(n, h);
        }
        if covered < count {
            match self.create_handles(count - covered, fine) {
                Ok(new) => {
                    covered = count;
                    plan.extend(new);
                }
                Err(e) => {
                    let larger = self
                        .free_handles
                        .range((count - covered, 0)..)
                        .next()
                        .copied()
                        .filter(|&(n, _)| matches!(e, Error::OutOfMemory(_)) && covered + n <= room);
                    match larger {
                        Some((n, h)) => {
                            self.free_handles.remove(&(n, h));
                            plan.push(h);
                            covered += n;
                        }
                        None => {
                            self.return_handles(&plan);
                            return Err(e);
                        }
                    }
                }
            }
        }
        let g = self.settings.granule_bytes;
        let mut at = va;
        let mut result = Ok(());
        for (i, &h) in plan.iter().enumerate() {
            let (backend_id, n) = {
                let handle = self.handles[h as usize].as_ref().expect("live handle");
                (handle.backend_id, handle.granules)
            };
            if let Err(e) = self.driver(|b, d| b.map(d, at, n * g, backend_id)) {
                self.return_handles(&plan[i..]);
                result = Err(e);
                break;
            }
            self.stats.bump(C::DriverMapCalls, 1);
            self.handles[h as usize].as_mut().expect("live handle").va = Some(at);
            self.mapped.insert(at, h);
            let arena = self.arena_at(at);
            self.gauge(arena, G::MappedBytes, (n * g) as i64);
            at += n * g;
        }
        if result.is_ok() {
            result = self.driver(|b, d| b.set_access(d, va, at - va));
            if result.is_ok() && self.history.is_some() {
                self.record(HistoryAction::Map, va, at - va, at - va, 0);
            }
        }
        if let Err(e) = result {
            // Leave no half-mapped range behind: the hole stays a hole.
            if let Err(rollback) = self.unmap_handles(va, at) {
                // The mapped prefix cannot go: make it usable instead, and
                // report it to the caller as what was mapped.
                self.stats.bump(C::DriverErrors, 1);
                tracing::warn!("unmapping after a failed map failed too ({rollback}); keeping the prefix");
                if at > va && self.backend.set_access(self.device, va, at - va).is_ok() {
                    return Err(Error::PartialMap { mapped_bytes: at - va, cause: Box::new(e) });
                }
                if self.unmap_handles(va, at).is_err() {
                    self.poisoned = Some(format!("unrecoverable driver failures while mapping: {e}; then {rollback}"));
                    tracing::error!("tessera: device {} disabled: {}", self.device, self.poisoned.as_deref().unwrap_or(""));
                }
            }
            return Err(e);
        }
        Ok(covered)
    }

    /// Runs a slow-path driver call (handles, mappings, memory info, waits
    /// for the device), adding its wall time to the `driver_ns` counter.
    fn driver<T>(&mut self, call: impl FnOnce(&dyn Backend, i32) -> Result<T>) -> Result<T> {
        let start = std::time::Instant::now();
        let result = call(self.backend.as_ref(), self.device);
        self.stats.bump(C::DriverNs, start.elapsed().as_nanos() as u64);
        result
    }

    fn return_handles(&mut self, handles: &[HandleIdx]) {
        for &h in handles {
            let n = self.handles[h as usize].as_ref().expect("live handle").granules;
            self.free_handles.insert((n, h));
        }
    }

    fn physical_bytes(&self) -> u64 {
        self.stats.gauge(G::ReservedBytes).current as u64
    }

    /// Creates handles for `granules` granules (each at most
    /// `max_handle_bytes`; one granule each when `fine` or near capacity),
    /// within the limit. On failure, the handles made so far stay free for
    /// later use.
    fn create_handles(&mut self, granules: u64, fine: bool) -> Result<Vec<HandleIdx>> {
        let g = self.settings.granule_bytes;
        if let Some(limit) = self.settings.limit_bytes
            && self.physical_bytes() + granules * g > limit {
                return Err(Error::OutOfMemory(Box::default()));
            }
        let per_handle = if fine || self.near_capacity(granules) { 1 } else { self.settings.max_handle_bytes / g };
        self.create_handles_of(granules, per_handle)
    }

    /// Creates handles of `per_handle` granules (the last one smaller) for
    /// `granules` granules. On failure, the handles made so far stay free.
    fn create_handles_of(&mut self, granules: u64, per_handle: u64) -> Result<Vec<HandleIdx>> {
        let g = self.settings.granule_bytes;
        let mut made = Vec::new();
        let mut left = granules;
        while left > 0 {
            let n = left.min(per_handle);
            let backend_id = match self.driver(|b, d| b.create(d, n * g)) {
                Ok(id) => id,
                Err(e) => {
                    self.return_handles(&made);
                    return Err(e);
                }
            };
            self.stats.bump(C::DriverCreateCalls, 1);
            self.stats.gauge_mut(G::ReservedBytes).add((n * g) as i64);
            self.stats.gauge_mut(G::Handles).add(1);
            let h = Handle { backend_id, granules: n, va: None };
            let idx = match self.handles.iter().position(Option::is_none) {
                Some(i) => {
                    self.handles[i] = Some(h);
                    i
                }
                None => {
                    self.handles.push(Some(h));
                    self.handles.len() - 1
                }
            } as HandleIdx;
            made.push(idx);
            left -= n;
        }
        Ok(made)
    }

    /// Whether `granules` more would bring the reserved bytes past
    /// `fine_handles_above` of what tessera may hold (the memory limit, or
    /// what the device has: reserved plus the driver's free bytes). Past it,
    /// new handles are one granule each, so that reclamation can take back
    /// any single granule when memory is short.
    ///
    /// The driver's free bytes cost a call (tens of microseconds): while the
    /// last answer, less what the pool took since, leaves more than twice
    /// the margin, it is used again (for at most `FREE_HINT_USES` growths).
    fn near_capacity(&mut self, granules: u64) -> bool {
        let fraction = self.settings.fine_handles_above;
        if fraction >= 1.0 {
            return false;
        }
        let reserved = self.physical_bytes();
        let after = reserved + granules * self.settings.granule_bytes;
        let margin = (1.0 - fraction) * self.total_bytes as f64;
        let estimate = self.free_hint.and_then(|(free, at_reserved, uses)| {
            let free_now = (free + at_reserved).saturating_sub(reserved);
            (uses > 0 && free_now as f64 > 2.0 * margin).then_some((free_now, free, at_reserved, uses))
        });
        let free = match estimate {
            Some((free_now, free, at_reserved, uses)) => {
                self.free_hint = Some((free, at_reserved, uses - 1));
                free_now
            }
            None => match self.driver(|b, d| b.mem_info(d)) {
                Ok((free, _)) => {
                    self.free_hint = Some((free, reserved, FREE_HINT_USES));
                    free
                }
                Err(_) => return true,
            },
        };
        let device = reserved + free;
        let allowed = self.settings.limit_bytes.map_or(device, |l| l.min(device));
        after as f64 > fraction * allowed as f64
    }

    /// Gives free handle `h` (of `n` granules) back to the driver. On
    /// failure it stays free, and nothing changes.
    fn release_free_handle(&mut self, n: u64, h: HandleIdx) -> Result<()> {
        let backend_id = self.handles[h as usize].as_ref().expect("live handle").backend_id;
        self.driver(|b, d| b.release(d, backend_id))?;
        self.stats.bump(C::DriverReleaseCalls, 1);
        self.free_handles.remove(&(n, h));
        self.handles[h as usize] = None;
        self.stats.gauge_mut(G::ReservedBytes).sub((n * self.settings.granule_bytes) as i64);
        self.stats.gauge_mut(G::Handles).sub(1);
        Ok(())
    }

    /// Near capacity: replaces each free multi-granule handle by
    /// single-granule ones (release, then create), so that no handle mapped
    /// from now on can pin granules that its live blocks do not use.
    fn refine_free_handles(&mut self) -> Result<()> {
        let coarse: Vec<(u64, HandleIdx)> = self.free_handles.iter().filter(|&&(n, _)| n > 1).copied().collect();
        for (n, h) in coarse {
            self.release_free_handle(n, h)?;
            let singles = self.create_handles_of(n, 1)?;
            self.return_handles(&singles);
        }
        Ok(())
    }

    /// Unmaps every mapped handle in `[lo, hi)` (which holds whole handles
    /// only) in one backend call; the handles become free.
    fn unmap_handles(&mut self, lo: u64, hi: u64) -> Result<()> {
        if hi <= lo {
            return Ok(());
        }
        self.driver(|b, d| b.unmap(d, lo, hi - lo))?;
        self.stats.bump(C::DriverUnmapCalls, 1);
        let inside: Vec<(u64, HandleIdx)> = self.mapped.range(lo..hi).map(|(&va, &h)| (va, h)).collect();
        for (va, h) in inside {
            self.mapped.remove(&va);
            let handle = self.handles[h as usize].as_mut().expect("live handle");
            handle.va = None;
            let n = handle.granules;
            self.free_handles.insert((n, h));
        }
        let arena = self.arena_at(lo);
        self.gauge(arena, G::MappedBytes, -((hi - lo) as i64));
        if self.history.is_some() {
            self.record(HistoryAction::Unmap, lo, hi - lo, hi - lo, 0);
        }
        Ok(())
    }

    /// Unmaps handles that lie wholly inside the run of adjacent cached
    /// blocks (of any streams) around indexed cached block `id`, turning
    /// that range into a hole: the topmost ones until they hold at least
    /// `want_granules` (all of them for u64::MAX). The rest of the run, and
    /// the handles that straddle its ends, stay mapped and cached. Only
    /// blocks the device is known to be done with count when
    /// `only_device_done`; otherwise the caller has synchronized. Nothing in
    /// `keep` (an address range: where growth is about to place a request)
    /// is unmapped: the run ends at it, on `id`'s side. Returns the granules
    /// freed.
    fn unmap_cached_run(&mut self, id: BlockId, only_device_done: bool, want_granules: u64, keep: Option<(u64, u64)>) -> Result<u64> {
        let g = self.settings.granule_bytes;
        let cached = |p: &Self, x: BlockId| p.cached_no_graph(x) && (!only_device_done || p.device_done(x));
        if !cached(self, id) {
            return Ok(0);
        }
        let (mut first, mut last) = (id, id);
        while cached(self, self.b(first).prev) {
            first = self.b(first).prev;
        }
        while cached(self, self.b(last).next) {
            last = self.b(last).next;
        }
        let (mut start, mut end) = (self.b(first).addr, self.b(last).addr + self.b(last).size);
        // A range to keep mapped cuts the run: `id`'s side of it remains.
        if let Some((keep_lo, keep_hi)) = keep.filter(|&(lo, hi)| lo < end && hi > start) {
            let addr = self.b(id).addr;
            if addr >= keep_hi {
                start = keep_hi;
            } else if addr < keep_lo {
                end = keep_lo;
            } else {
                return Ok(0);
            }
        }
        // The handles wholly inside tile one contiguous range; take its top.
        let inside: Vec<(u64, u64)> = self
            .mapped
            .range(start..end)
            .map(|(&va, &h)| (va, self.handles[h as usize].as_ref().expect("live handle").granules))
            .filter(|&(va, n)| va + n * g <= end)
            .collect();
        let (mut lo, mut hi, mut taken) = (u64::MAX, 0, 0);
        for &(va, n) in inside.iter().rev() {
            if taken >= want_granules {
                break;
            }
            lo = va;
            hi = hi.max(va + n * g);
            taken += n;
        }
        if hi <= lo {
            return Ok(0);
        }
        let count = (hi - lo) / g;
        self.unmap_handles(lo, hi)?;
        self.stats.bump(C::ReclaimedGranules, count);
        let mut cur = first;
        while cur != NIL && self.b(cur).addr < end {
            let (addr, size, next) = (self.b(cur).addr, self.b(cur).size, self.b(cur).next);
            if addr + size <= lo || addr >= hi {
                cur = next;
                continue;
            }
            self.unindex(cur);
            let mut mid = cur;
            if addr < lo {
                mid = self.split_front(cur, lo - addr);
                self.index(cur);
            }
            let mid_addr = self.b(mid).addr;
            if mid_addr + self.b(mid).size > hi {
                let tail = self.split_front(mid, hi - mid_addr);
                self.index(tail);
            }
            self.bm(mid).state = State::Hole;
            self.bm(mid).stream = 0;
            let merged = self.coalesce_and_index(mid);
            cur = self.b(merged).next;
        }
        Ok(count)
    }

    fn free_handle_granules(&self) -> u64 {
        self.free_handles.iter().map(|&(n, _)| n).sum()
    }

    fn is_indexed_cached(&self, id: BlockId) -> bool {
        let b = self.b(id);
        b.state == State::Cached && self.cached_by_stream.contains(&(b.arena, cache_key(b), b.size, b.addr, id))
    }

    /// Under pressure: makes at least `need` granules free by unmapping
    /// cached granules, largest blocks first, after the device is done with
    /// them. Stops early when enough are free. Returns whether it
    /// synchronized the device: then every cached block outside graph pools
    /// is safe on any stream (until the lock is let go).
    fn reclaim(&mut self, need: u64) -> Result<bool> {
        // Blocks waiting for other streams (record_stream) count: after the
        // synchronize they are cached, and reclaimable.
        if self.free_handle_granules() >= need || (self.cached_by_stream.is_empty() && self.pending.is_empty()) {
            return Ok(false);
        }
        self.driver(|b, d| b.synchronize(d))?;
        self.process_pending()?;
        self.unmap_cached_blocks(need, false, None, false)?;
        Ok(true)
    }

    /// Under pressure, the device idle (the caller synchronized): serves
    /// `rounded` bytes across a gap, the run of cached blocks (any stream,
    /// no graph's) before a hole, the hole, and the run after it, mapping
    /// only the hole's granules the block covers. From the gap's start, or
    /// ending at its end (mapping the back of the hole), whichever maps
    /// fewer; the gap that maps fewest wins, if fewer than a fresh range.
    /// Returns an unindexed cached block of the stream, or None.
    fn grow_across_gap(&mut self, arena: ArenaKind, rounded: u64, stream: u64) -> Result<Option<BlockId>> {
        let Some(gap) = self.best_gap(arena, rounded, &|p: &Self, x| p.cached_no_graph(x)) else { return Ok(None) };
        match self.map_gap(gap, gap.new, stream, 0, false, true) {
            Ok(id) => {
                debug_assert!(self.b(id).size >= rounded);
                self.stats.bump(C::GapPlacements, 1);
                Ok(Some(id))
            }
            Err(Error::OutOfMemory(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Unmaps every cached granule and releases every handle with nothing
    /// mapped (torch.cuda.empty_cache). Live blocks keep their granules.
    pub fn release_cached(&mut self) -> Result<()> {
        self.retry_stale_events();
        self.driver(|b, d| b.synchronize(d))?;
        self.process_pending()?;
        let ids: Vec<BlockId> = self.cached_by_stream.iter().map(|&(_, _, _, _, id)| id).collect();
        for id in ids {
            if self.is_indexed_cached(id) {
                self.unmap_cached_run(id, false, u64::MAX, None)?;
            }
        }
        while let Some(&(n, h)) = self.free_handles.first() {
            self.release_free_handle(n, h)?;
        }
        Ok(())
    }

    pub fn empty_cache(&mut self) -> Result<()> {
        self.stats.bump(C::EmptyCacheCalls, 1);
        self.release_cached()
    }

    // ----- free -------------------------------------------------------------

    /// Whether `addr` is a live allocation of this pool.
    pub fn owns(&self, addr: u64) -> bool {
        self.live.get(&addr).is_some_and(|&id| self.b(id).state == State::Allocated)
    }

    /// Frees the allocation at `addr`. `size` and `stream` are what the
    /// caller believes; a mismatch is counted and reported, and the block's
    /// own values win. A block lent to a front cache is not freed here (an
    /// error: the allocator routes such frees to the front).
    pub fn free(&mut self, addr: u64, size: Option<u64>, stream: Option<u64>) -> Result<()> {
        match self.free_or_lend(addr, size, stream, |_| false)? {
            Freed::Done => Ok(()),
            Freed::Lent(_) => unreachable!("nothing is lent when lending is refused"),
            Freed::HeldByFront(_) => Err(Error::InvalidArgument(format!(
                "free of {addr:#x}: the block is held by a front cache (a double free, or a free routed wrongly)"
            ))),
        }
    }

    /// The block at `addr` if it is lent to a front cache.
    pub fn lent_at(&self, addr: u64) -> Option<LentBlock> {
        self.live.get(&addr).and_then(|&id| self.lent_block(id))
    }

    /// The stream of the block at `addr` if it is allocated, or lent to a
    /// front cache (where it may be handed out): a block a free may name.
    pub fn held_stream(&self, addr: u64) -> Option<u64> {
        let b = self.b(*self.live.get(&addr)?);
        matches!(b.state, State::Allocated | State::Lent).then_some(b.stream)
    }

    /// As `free`, but a block that would be cached whole for its stream (no
    /// other stream used it, no graph capture owns it, sizes and stream as
    /// allocated) is lent instead when `lend(stream)` says so: it becomes
    /// `State::Lent`, counted as cached, and the caller's front cache takes
    /// it. A block already lent is left alone: `HeldByFront(its stream)`.
    pub fn free_or_lend(&mut self, addr: u64, size: Option<u64>, stream: Option<u64>, lend: impl Fn(u64) -> bool) -> Result<Freed> {
        let id = match self.live.get(&addr) {
            Some(&id) if self.b(id).state == State::Allocated => id,
            Some(&id) if self.b(id).state == State::Lent => return Ok(Freed::HeldByFront(self.b(id).stream)),
            _ => {
                self.stats.bump(C::InvalidFrees, 1);
                return Err(Error::InvalidArgument(format!(
                    "free of {addr:#x}, which is not a live tessera allocation on device {} \
                     (never allocated by tessera, or freed twice)",
                    self.device
                )));
            }
        };
        // Freed while its stream captures a graph: the graph's replays may
        // still use it, so it joins that capture's private cache.
        if self.settings.graph_pools && self.b(id).graph == 0 {
            match self.backend.capture_id(self.device, self.b(id).stream) {
                Ok(Some(graph)) => {
                    self.bm(id).graph = graph;
                    self.seen_capture = true;
                }
                Ok(None) => {}
                Err(e) => {
                    // Unknown. Where graphs were captured, assume the worst:
                    // private to no capture in particular, the block waits
                    // for release_graph_pools. Elsewhere it is an ordinary free.
                    self.stats.bump(C::DriverErrors, 1);
                    tracing::warn!("asking whether a stream captures failed: {e}");
                    if self.seen_capture {
                        self.bm(id).graph = UNKNOWN_CAPTURE;
                    }
                }
            }
        }
        self.live.remove(&addr);
        let b = self.b(id).clone();
        let mismatch = size.is_some_and(|s| s != b.requested && s != b.size) || stream.is_some_and(|s| s != b.stream);
        self.gauge(b.arena, G::AllocatedBytes, -(b.size as i64));
        self.gauge(b.arena, G::RequestedBytes, -(b.requested as i64));
        self.gauge(b.arena, G::ActiveBlocks, -1);
        if self.history.is_some() {
            self.record(HistoryAction::Free, addr, b.size, b.requested, b.stream);
        }
        self.bm(id).requested = 0;
        let uses = std::mem::take(&mut self.bm(id).stream_uses);
        if uses.is_empty() && !mismatch && self.b(id).graph == 0 && lend(b.stream) {
            self.live.insert(addr, id);
            self.bm(id).state = State::Lent;
            self.gauge(b.arena, G::CachedBytes, b.size as i64);
            return Ok(Freed::Lent(LentBlock { id, addr, size: b.size, arena: b.arena, stream: b.stream }));
        }
        if uses.is_empty() {
            self.stamp_free(id);
            self.coalesce_and_index(id);
        } else {
            let mut events = Vec::with_capacity(uses.len());
            let mut needs_sync = false;
            for s in uses {
                match self.backend.record_event(self.device, s) {
                    Ok(e) => events.push((s, e)),
                    Err(e) => {
                        // Without an event the device may still use the
                        // block: it waits for a synchronize instead (tried
                        // now, and again at later allocations if it fails).
                        self.stats.bump(C::DriverErrors, 1);
                        tracing::warn!("record_event failed ({e}); the freed block waits for a synchronize");
                        needs_sync = true;
                        break;
                    }
                }
            }
            self.bm(id).state = State::Pending;
            self.live.insert(addr, id);
            self.gauge(b.arena, G::PendingFreeBlocks, 1);
            self.pending.push(PendingFree { block: id, events, needs_sync });
            if needs_sync {
                self.process_pending().map_err(|e| self.driver_error(e))?;
            }
        }
        if mismatch {
            self.stats.bump(C::MismatchedFrees, 1);
            return Err(Error::InvalidArgument(format!(
                "free of {addr:#x} with size {size:?} / stream {stream:?}, but it was allocated with \
                 size {} on stream {:#x}; freed it as allocated",
                b.requested, b.stream
            )));
        }
        Ok(Freed::Done)
    }

    /// Block `id` (unindexed) becomes cached for its stream, stamped with a
    /// new free number.
    fn stamp_free(&mut self, id: BlockId) {
        self.free_seq += 1;
        let stream = self.b(id).stream;
        let seq = self.free_seq;
        let b = self.bm(id);
        b.state = State::Cached;
        b.freed_seq = seq;
        if self.last_free_stream != Some(stream) {
            self.epochs.entry(stream).or_default();
            self.last_free_stream = Some(stream);
        }
    }

    /// The block `id` if it is lent (for the front caches' checks).
    pub fn lent_block(&self, id: u32) -> Option<LentBlock> {
        let b = self.blocks.get(id as usize).filter(|b| b.state == State::Lent)?;
        Some(LentBlock { id, addr: b.addr, size: b.size, arena: b.arena, stream: b.stream })
    }

    /// Number of lent blocks.
    pub fn lent_count(&self) -> usize {
        self.live.values().filter(|&&id| self.b(id).state == State::Lent).count()
    }

    /// A lent block comes back free: cached for its stream, stamped with a
    /// new free number (later than its real last use: only more careful),
    /// coalesced and indexed.
    pub fn return_lent(&mut self, id: BlockId) {
        let b = self.b(id);
        assert_eq!(b.state, State::Lent, "return_lent of a block that is not lent");
        let (addr, arena, size) = (b.addr, b.arena, b.size as i64);
        self.live.remove(&addr);
        self.gauge(arena, G::CachedBytes, -size);
        self.stamp_free(id);
        self.coalesce_and_index(id);
    }

    /// A lent block that a front cache handed out comes back allocated
    /// (before a record_stream, a free during a capture, or a drain). The
    /// front has already taken back its own count of the allocation.
    pub fn lent_to_live(&mut self, id: BlockId, requested: u64) {
        let b = self.bm(id);
        assert_eq!(b.state, State::Lent, "lent_to_live of a block that is not lent");
        b.state = State::Allocated;
        b.requested = requested;
        let (arena, size) = (b.arena, b.size as i64);
        self.gauge(arena, G::CachedBytes, -size);
        self.gauge(arena, G::AllocatedBytes, size);
        self.gauge(arena, G::RequestedBytes, requested as i64);
        self.gauge(arena, G::ActiveBlocks, 1);
    }

    /// Adds what a front cache counted since its last merge (see
    /// `FrontDelta`): current values, cumulative values and counters add up;
    /// a peak rises to the current value plus the front's own highest change
    /// (exact while one front changed between two merges, see front.rs).
    pub fn merge_front(&mut self, delta: &FrontDelta) {
        if delta.is_zero() {
            return;
        }
        let [small, large] = &mut self.arena_stats;
        for (scope, dst) in [&mut self.stats, small, large].into_iter().enumerate() {
            for (k, g) in [G::AllocatedBytes, G::RequestedBytes, G::ActiveBlocks].into_iter().enumerate() {
                let (g, d) = (dst.gauge_mut(g), &delta.gauges[scope][k]);
                g.peak = g.peak.max(g.current + d.peak);
                g.current += d.current;
                g.allocated += d.allocated;
                g.freed += d.freed;
            }
            let alloc = delta.gauges[scope][0];
            let c = dst.gauge_mut(G::CachedBytes);
            c.peak = c.peak.max(c.current - delta.alloc_low[scope]);
            c.current -= alloc.current;
            c.allocated += alloc.freed;
            c.freed += alloc.allocated;
        }
        self.stats.bump(C::CacheHits, delta.cache_hits);
    }

    /// Polls each stream's epoch event (advancing what the device is known
    /// to have passed) and records a new one where none is outstanding. Off
    /// the hot path: called when the pool must grow.
    fn advance_epochs(&mut self) -> Result<()> {
        self.retry_stale_events();
        let streams: Vec<u64> = self.epochs.keys().copied().collect();
        for stream in streams {
            if self.backend.is_capturing(self.device, stream)? {
                continue; // an event recorded now would belong to the graph
            }
            if let Some((event, seq)) = self.epochs[&stream].event {
                if !self.backend.event_done(self.device, event)? {
                    continue;
                }
                self.retire_epoch_event(stream, event, seq);
                if self.epochs[&stream].event.is_some() {
                    continue; // not destroyed: retried at the next poll
                }
            }
            if self.epochs[&stream].done_seq < self.free_seq {
                let event = self.backend.record_event(self.device, stream)?;
                self.epochs.get_mut(&stream).expect("listed").event = Some((event, self.free_seq));
            }
        }
        Ok(())
    }

    /// Whether cached bytes exceed `max_cached_fraction` of the reserved
    /// bytes (what recycling tries to undo before growth).
    fn cache_over_fraction(&self) -> bool {
        self.stats.gauge(G::CachedBytes).current as f64 > self.settings.cached_fraction * self.physical_bytes() as f64
    }

    /// Whether `x` is a cached block outside every graph pool: free, mapped,
    /// and (the device done with it, or after a synchronize) reusable by
    /// any stream, so it may be unmapped or joined with its neighbours.
    fn cached_no_graph(&self, x: BlockId) -> bool {
        x != NIL && self.b(x).state == State::Cached && self.b(x).graph == 0
    }

    /// Whether the device is known to be done with cached block `id`.
    fn device_done(&self, id: BlockId) -> bool {
        let b = self.b(id);
        if b.graph != 0 {
            return false; // a graph may replay over it at any time
        }
        b.freed_seq == 0 || self.epochs.get(&b.stream).is_some_and(|e| b.freed_seq <= e.done_seq)
    }

    /// Before growing by `need` granules: when too much is cached (see
    /// `cached_fraction` and `gc_threshold`), unmap cached handles the
    /// device is done with, so that growth maps them again instead of
    /// taking new memory. No synchronization: epoch events tell what is done.
    /// The blocks in `keep` (the growth's placement) stay. Returns whether
    /// it unmapped anything (else the blocks are as they were).
    fn recycle_before_growth(&mut self, need: u64, keep: Option<(u64, u64)>) -> Result<bool> {
        let free = self.free_handle_granules();
        if free >= need || self.cached_by_stream.is_empty() {
            return Ok(false);
        }
        let g = self.settings.granule_bytes;
        let reserved = self.physical_bytes() as f64;
        let allowed = self.settings.limit_bytes.unwrap_or(self.total_bytes) as f64;
        let over_gc = self.settings.gc_threshold > 0.0 && reserved + (need * g) as f64 > self.settings.gc_threshold * allowed;
        // Under a memory limit that the growth stays within, tessera may hold
        // up to the limit (as PyTorch caches up to its memory fraction):
        // recycling there would only move cached memory that a later request
        // of the same step needs back, over and over (seen on GPT-2 capped
        // at its frontier + 5%). garbage_collection_threshold still applies.
        let within_limit = self.settings.limit_bytes.is_some_and(|l| reserved + (need * g) as f64 <= l as f64);
        if (!self.cache_over_fraction() || within_limit) && !over_gc {
            return Ok(false);
        }
        // Smallest blocks first: the large cached blocks are the ones that
        // serve later large requests without growth. Against largest first
        // (sim, modelled driver time): GPT-2 222 -> 139 ms, KV trace 249 ->
        // 219, GPU KV workload 806 -> 756, 24 multi-stream seeds 331 -> 271,
        // churn 196 -> 207; reserved up by at most 0.015 (KV 1.034 -> 1.049).
        self.advance_epochs()?;
        self.unmap_cached_blocks(need, true, keep, true)?;
        if self.free_handle_granules() < need {
            // Not enough known done: wait for the streams' epoch events (a
            // wait on each stream's event, not a device synchronize), then
            // try again.
            self.wait_epochs()?;
            self.unmap_cached_blocks(need, true, keep, true)?;
        }
        Ok(self.free_handle_granules() > free)
    }

    /// Unmaps cached handles (only those the device is known to be done
    /// with, if `only_device_done`), smallest or largest blocks first, until
    /// `need` granules of handles are free. Nothing in the range `keep`.
    fn unmap_cached_blocks(&mut self, need: u64, only_device_done: bool, keep: Option<(u64, u64)>, smallest_first: bool) -> Result<()> {
        let mut free = self.free_handle_granules();
        // Near capacity, only what is needed: whatever else is unmapped must
        // be mapped again, handle by handle, at the next request.
        let exact = self.near_capacity(need.saturating_sub(free));
        let mut order: Vec<(u64, BlockId)> = self.cached_by_stream.iter().map(|&(_, _, s, _, id)| (s, id)).collect();
        if smallest_first {
            order.sort_unstable();
        } else {
            order.sort_unstable_by(|a, b| b.cmp(a));
        }
        for (_, id) in order {
            if free >= need {
                break;
            }
            // An earlier unmap may have merged this block away.
            if self.is_indexed_cached(id) {
                free += self.unmap_cached_run(id, only_device_done, if exact { need - free } else { u64::MAX }, keep)?;
            }
        }
        Ok(())
    }

    /// Waits for every stream's outstanding epoch event (recorded by
    /// `advance_epochs`) and marks its frees done.
    fn wait_epochs(&mut self) -> Result<()> {
        let streams: Vec<u64> = self.epochs.keys().copied().collect();
        for stream in streams {
            if let Some((event, seq)) = self.epochs[&stream].event {
                self.driver(|b, d| b.event_synchronize(d, event))?;
                self.retire_epoch_event(stream, event, seq);
            }
        }
        Ok(())
    }

    /// Destroys `event`; if the driver refuses, keeps it in `stale_events`
    /// to try again later (at growth, empty_cache and drop): no event is
    /// ever forgotten.
    fn destroy_event_or_keep(&mut self, event: EventId) {
        if let Err(e) = self.backend.destroy_event(self.device, event) {
            self.stats.bump(C::DriverErrors, 1);
            tracing::warn!("destroying an event failed ({e}); will retry");
            self.stale_events.push(event);
        }
    }

    fn retry_stale_events(&mut self) {
        let (backend, device) = (self.backend.clone(), self.device);
        self.stale_events.retain(|&e| backend.destroy_event(device, e).is_err());
    }

    /// Events kept after a failed destroy, waiting for another try.
    pub fn stale_events(&self) -> usize {
        self.stale_events.len()
    }

    /// The device passed `stream`'s epoch event: its frees up to `seq` are
    /// done. The event is destroyed; if that fails it stays, already known
    /// done, and is destroyed at a later poll (no leak, no lost progress).
    fn retire_epoch_event(&mut self, stream: u64, event: EventId, seq: u64) {
        let destroyed = self.backend.destroy_event(self.device, event);
        let epoch = self.epochs.get_mut(&stream).expect("listed");
        epoch.done_seq = epoch.done_seq.max(seq);
        match destroyed {
            Ok(()) => epoch.event = None,
            Err(e) => {
                self.stats.bump(C::DriverErrors, 1);
                tracing::warn!("destroying an epoch event failed: {e}");
            }
        }
    }

    /// The graphs captured so far are gone (their memory is no longer
    /// replayed into): their private caches join the general cache, and
    /// their live blocks will when freed. Returns the bytes released.
    /// Starts (never stops) asking the driver on every allocation and free
    /// whether the stream captures a CUDA graph (`graph_pools` at run time).
    pub fn watch_graphs(&mut self) {
        self.settings.graph_pools = true;
    }

    pub fn release_graph_pools(&mut self) -> u64 {
        let private: Vec<BlockId> = self
            .cached_by_stream
            .iter()
            .filter(|k| k.1 & GRAPH_KEY != 0)
            .map(|k| k.4)
            .collect();
        let mut bytes = 0;
        for id in private {
            if !self.is_indexed_cached(id) {
                continue; // merged away by an earlier one
            }
            self.unindex(id);
            bytes += self.b(id).size;
            self.bm(id).graph = 0;
            self.coalesce_and_index(id);
        }
        let live: Vec<BlockId> = self.live.values().copied().collect();
        for id in live {
            self.bm(id).graph = 0;
        }
        bytes
    }

    /// Marks the allocation at `addr` as used by `stream` too: its memory is
    /// not reused until `stream` passes the point of the free.
    pub fn record_stream(&mut self, addr: u64, stream: u64) -> Result<()> {
        let id = match self.live.get(&addr) {
            Some(&id) if self.b(id).state == State::Allocated => id,
            _ => {
                self.stats.bump(C::InvalidRequests, 1);
                return Err(Error::InvalidArgument(format!("record_stream on {addr:#x}, which is not a live allocation")));
            }
        };
        let b = self.bm(id);
        if stream != b.stream && !b.stream_uses.contains(&stream) {
            b.stream_uses.push(stream);
        }
        Ok(())
    }

    /// Moves pending frees whose events all completed to the cache.
    fn process_pending(&mut self) -> Result<()> {
        // Events of one stream complete in the order they were recorded, and
        // `pending` keeps that order: once one is found not done, the later
        // ones of its stream are not asked (about one query per busy stream
        // per call, not one per pending block). Up to BUSY streams are
        // remembered, inline: nothing is allocated here.
        const BUSY: usize = 8;
        let (mut busy, mut n_busy) = ([0u64; BUSY], 0usize);
        let mut i = 0;
        while i < self.pending.len() {
            let mut done = true;
            if self.pending[i].needs_sync {
                done = self.backend.synchronize(self.device).is_ok();
            } else {
                for k in 0..self.pending[i].events.len() {
                    let (stream, event) = self.pending[i].events[k];
                    let known_busy = busy[..n_busy].contains(&stream);
                    if known_busy || !self.backend.event_done(self.device, event)? {
                        if !known_busy && n_busy < BUSY {
                            busy[n_busy] = stream;
                            n_busy += 1;
                        }
                        done = false;
                        break;
                    }
                }
            }
            if !done {
                i += 1;
                continue;
            }
            let p = self.pending.remove(i); // keeps the order
            for (_, e) in p.events {
                // The block is free either way; an event that fails to go
                // is kept and destroyed later, never the block held back.
                self.destroy_event_or_keep(e);
            }
            let addr = self.b(p.block).addr;
            self.live.remove(&addr);
            self.stamp_free(p.block);
            let arena = self.b(p.block).arena;
            self.gauge(arena, G::PendingFreeBlocks, -1);
            self.coalesce_and_index(p.block);
        }
        Ok(())
    }

    // ----- views and checks -------------------------------------------------

    /// Every block of every arena in address order, holes excluded.
    pub fn blocks(&self) -> Vec<BlockView> {
        let mut out = Vec::new();
        for arena in &self.arenas {
            let mut id = arena.head;
            while id != NIL {
                let b = self.b(id);
                let state = match b.state {
                    State::Allocated => "active_allocated",
                    State::Cached | State::Lent => "inactive",
                    State::Pending => "active_pending_free",
                    State::Hole => "hole",
                };
                if b.state != State::Hole {
                    out.push(BlockView {
                        addr: b.addr,
                        size: b.size,
                        arena: b.arena,
                        state,
                        stream: b.stream,
                        requested: b.requested,
                    });
                }
                id = b.next;
            }
        }
        out
    }

    /// Segments in PyTorch's sense: the maximal runs of mapped (non-hole)
    /// blocks of each arena, with their blocks.
    pub fn segments(&self) -> Vec<(ArenaKind, Vec<BlockView>)> {
        let mut out: Vec<(ArenaKind, Vec<BlockView>)> = Vec::new();
        let mut last_end = None;
        for v in self.blocks() {
            let end = v.addr + v.size;
            match out.last_mut() {
                Some((arena, blocks)) if last_end == Some(v.addr) && *arena == v.arena => blocks.push(v),
                _ => out.push((v.arena, vec![v])),
            }
            last_end = Some(end);
        }
        out
    }

    /// Size of the largest cached block, in bytes.
    pub fn largest_cached_bytes(&self) -> u64 {
        self.cached_by_stream.iter().map(|k| k.2).max().unwrap_or(0)
    }

    /// Checks every invariant of the module doc; panics with a description
    /// of the first one broken. For tests and fuzzers.
    pub fn check_invariants(&self) {
        self.check_invariants_lent(&HashMap::new());
    }

    /// As `check_invariants`, with the lent blocks that front caches handed
    /// out (block → bytes requested; their merged counts say allocated):
    /// every other lent block counts as cached.
    pub fn check_invariants_lent(&self, lent_live: &HashMap<u32, u64>) {
        if self.poisoned.is_some() {
            return; // fail-stop: the mapping state is unknown by definition
        }
        let g = self.settings.granule_bytes;
        let (mut allocated, mut requested, mut cached, mut active, mut pending) = (0i64, 0i64, 0i64, 0i64, 0i64);
        let mut cached_blocks = 0i64;
        let mut lent_blocks = 0i64;
        let mut chain_blocks = 0usize;
        // Maximal runs of non-hole blocks: what the mapped handles must tile.
        let mut used_runs: Vec<(u64, u64)> = Vec::new();
        for arena in &self.arenas {
            let mut id = arena.head;
            let mut expect_addr = arena.base;
            let mut prev = NIL;
            while id != NIL {
                let b = self.b(id);
                chain_blocks += 1;
                assert_eq!(b.addr, expect_addr, "chain gap or overlap at block {id}");
                assert_eq!(b.prev, prev, "bad prev link at block {id}");
                assert!(b.size >= MIN_BLOCK_BYTES && b.size.is_multiple_of(MIN_BLOCK_BYTES), "bad size {}", b.size);
                if prev != NIL {
                    assert!(!self.mergeable(prev, id), "unmerged neighbours {prev} and {id}");
                }
                match b.state {
                    State::Hole => {
                        assert_eq!((b.addr - arena.base) % g, 0, "hole start not granule aligned");
                        assert_eq!(b.size % g, 0, "hole size not granule aligned");
                        assert!(self.holes.contains(&(b.arena, b.size, b.addr, id)), "hole not indexed");
                    }
                    state => {
                        match used_runs.last_mut() {
                            Some(run) if run.1 == b.addr => run.1 += b.size,
                            _ => used_runs.push((b.addr, b.addr + b.size)),
                        }
                        match state {
                            State::Allocated => {
                                allocated += b.size as i64;
                                requested += b.requested as i64;
                                active += 1;
                                assert_eq!(self.live.get(&b.addr), Some(&id), "allocated block not in live map");
                            }
                            State::Pending => {
                                pending += 1;
                                assert_eq!(self.live.get(&b.addr), Some(&id), "pending block not in live map");
                            }
                            State::Cached => {
                                cached += b.size as i64;
                                cached_blocks += 1;
                                assert!(self.cached_by_stream.contains(&(b.arena, cache_key(b), b.size, b.addr, id)));
                            }
                            State::Lent => {
                                lent_blocks += 1;
                                assert_eq!(self.live.get(&b.addr), Some(&id), "lent block not in live map");
                                assert_eq!(b.graph, 0, "a graph's block was lent");
                                if let Some(&req) = lent_live.get(&id) {
                                    allocated += b.size as i64;
                                    requested += req as i64;
                                    active += 1;
                                } else {
                                    cached += b.size as i64;
                                }
                            }
                            State::Hole => unreachable!(),
                        }
                    }
                }
                expect_addr = b.addr + b.size;
                prev = id;
                id = b.next;
            }
            assert_eq!(expect_addr, arena.base + arena.size, "chain does not cover the arena");
        }
        // Mapped handles, merged into contiguous runs, equal the used runs.
        let mut mapped_runs: Vec<(u64, u64)> = Vec::new();
        let mut mapped_bytes = 0u64;
        for (&va, &h) in &self.mapped {
            let handle = self.handles[h as usize].as_ref().expect("mapped handle is live");
            assert_eq!(handle.va, Some(va), "handle {h} does not know its address");
            assert!(!self.free_handles.contains(&(handle.granules, h)), "handle {h} both mapped and free");
            let end = va + handle.granules * g;
            mapped_bytes += handle.granules * g;
            match mapped_runs.last_mut() {
                Some(run) if run.1 == va => run.1 = end,
                Some(run) => {
                    assert!(run.1 < va, "mapped handles overlap at {va:#x}");
                    mapped_runs.push((va, end));
                }
                None => mapped_runs.push((va, end)),
            }
        }
        used_runs.sort_unstable();
        assert_eq!(mapped_runs, used_runs, "mapped handles do not tile the non-hole blocks");
        assert_eq!(chain_blocks + self.free_slots.len(), self.blocks.len(), "slab leak");
        assert_eq!(self.cached_by_stream.len() as i64, cached_blocks, "cached index holds other blocks");
        assert_eq!(self.live.len() as i64, active - lent_live.len() as i64 + pending + lent_blocks);
        assert!(lent_live.keys().all(|&id| self.b(id).state == State::Lent), "a front's live block is not lent");
        let (mut physical, mut handles) = (0i64, 0usize);
        for (h, handle) in self.handles.iter().enumerate() {
            let Some(handle) = handle else { continue };
            physical += (handle.granules * g) as i64;
            handles += 1;
            if handle.va.is_none() {
                assert!(self.free_handles.contains(&(handle.granules, h as HandleIdx)), "unmapped handle {h} lost");
            }
        }
        assert_eq!(handles, self.mapped.len() + self.free_handles.len(), "handle accounting");
        let s = &self.stats;
        let checks = [
            (G::AllocatedBytes, allocated),
            (G::RequestedBytes, requested),
            (G::ActiveBlocks, active),
            (G::CachedBytes, cached),
            (G::PendingFreeBlocks, pending),
            (G::MappedBytes, mapped_bytes as i64),
            (G::ReservedBytes, physical),
            (G::Handles, handles as i64),
        ];
        for (gauge, value) in checks {
            assert_eq!(s.gauge(gauge).current, value, "gauge {gauge:?} differs from a recount");
            assert!(s.gauge(gauge).peak >= s.gauge(gauge).current);
        }
        for gauge in [G::AllocatedBytes, G::RequestedBytes, G::ActiveBlocks, G::CachedBytes, G::MappedBytes, G::PendingFreeBlocks] {
            let sum: i64 = self.arena_stats.iter().map(|a| a.gauge(gauge).current).sum();
            assert_eq!(sum, s.gauge(gauge).current, "arena gauges of {gauge:?} do not sum to the device's");
        }
    }
}
