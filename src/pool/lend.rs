//! Lending to the front caches: a freed block lent whole to the front cache
//! of its stream, what comes back (free, or handed out), and the counts a
//! front kept meanwhile (`FrontDelta`), merged into the pool's.
//! Invariant: a lent block is in `live` and in no index; the pool counts it
//! as cached, and the front's delta holds the difference while it is out.
#![forbid(unsafe_code)]

use super::{ArenaKind, BlockId, DevicePool, State};
use crate::stats::{TesseraCounter as C, TesseraGauge as G, TesseraStat};

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
/// (allocated, requested, active); cached bytes and blocks move opposite to
/// allocated bytes and active blocks: they are derived at the merge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontDelta {
    /// `[scope][gauge]`, scope 0 the device, 1 + `ArenaKind` an arena; gauge
    /// 0 allocated bytes, 1 requested bytes, 2 active blocks. Each a change
    /// from zero: `current` the net change, `peak` the highest.
    pub gauges: [[TesseraStat; 3]; 3],
    /// Per scope, the lowest net change of allocated bytes (so the highest
    /// of cached bytes).
    pub alloc_low: [i64; 3],
    /// Per scope, the lowest net change of active blocks (so the highest of
    /// cached blocks).
    pub active_low: [i64; 3],
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
            self.active_low[scope] = self.active_low[scope].min(g[2].current);
        }
    }

    /// Whether nothing was counted since the last merge.
    pub fn is_zero(&self) -> bool {
        *self == FrontDelta::default()
    }
}

impl DevicePool {
    /// Freed block `id` (out of `live`, counted free) is lent whole to a
    /// front cache: back in `live`, counted as cached, in no index.
    pub(super) fn lend(&mut self, id: BlockId) -> LentBlock {
        let b = self.bm(id);
        b.state = State::Lent;
        let lent = LentBlock { id, addr: b.addr, size: b.size, arena: b.arena, stream: b.stream };
        self.live.insert(lent.addr, id);
        self.gauge(lent.arena, G::CachedBytes, lent.size as i64);
        self.gauge(lent.arena, G::CachedBlocks, 1);
        lent
    }

    /// The block at `addr` if it is lent to a front cache.
    pub fn lent_at(&self, addr: u64) -> Option<LentBlock> {
        self.live.get(&addr).and_then(|&id| self.lent_block(id))
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
        self.gauge(arena, G::CachedBlocks, -1);
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
        self.gauge(arena, G::CachedBlocks, -1);
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
            // Cached bytes move opposite to allocated bytes, cached blocks to
            // active blocks: the highest cached is at the lowest allocated.
            for (cached, k, low) in [(G::CachedBytes, 0, delta.alloc_low[scope]), (G::CachedBlocks, 2, delta.active_low[scope])] {
                let (c, moved) = (dst.gauge_mut(cached), delta.gauges[scope][k]);
                c.peak = c.peak.max(c.current - low);
                c.current -= moved.current;
                c.allocated += moved.freed;
                c.freed += moved.allocated;
            }
        }
        self.stats.bump(C::CacheHits, delta.cache_hits);
    }
}
