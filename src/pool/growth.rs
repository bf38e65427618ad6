//! Growth: mapping new granules for a request no cached block serves. How
//! many (a growth step for mid-size requests, at most an eighth of what is
//! reserved), recycling first, and where (gap placement, else a hole).
//! Invariant: growth returns an unindexed cached block of at least the request.
#![forbid(unsafe_code)]

use super::{cache_key, round_up, ArenaKind, BlockId, DevicePool, Gap, State, GRAPH_KEY, NIL, READY_KEY};
use crate::stats::TesseraCounter as C;
use crate::error::{Error, Result};

/// Growth by `growth_size` steps maps at most this share (1/8) of the
/// reserved bytes. On the 24 multi-stream seeds (about 100 MiB live) it
/// took reserved/live from mean 1.107 (max 1.170) to 1.099 (1.145) and the
/// frontier from 1.092 to 1.089; the GPT-2, KV-cache, mixed and churn
/// traces, in pools of GiBs, grow as before.
pub(super) const GROWTH_STEP_SHARE: u64 = 8;

impl DevicePool {
    /// Granules that growth for a request of `rounded` bytes maps at least:
    /// small large-arena requests grow by growth_bytes, as PyTorch's
    /// segments do, so that their neighbours hit the cache; others (0) by
    /// what they need. The step is at most 1/`GROWTH_STEP_SHARE` of what is
    /// reserved, so that a small pool does not grow by 20 MiB steps.
    pub(super) fn least_growth_granules(&self, arena: ArenaKind, rounded: u64) -> u64 {
        let step = self.conf.growth_size.0.min(self.physical_bytes() / GROWTH_STEP_SHARE);
        if arena == ArenaKind::Large && rounded < step / 2 {
            step / self.conf.page_size.0
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
    pub(super) fn grow(&mut self, arena: ArenaKind, rounded: u64, stream: u64, graph: u64, capturing: bool) -> Result<BlockId> {
        let key = if graph != 0 { GRAPH_KEY | graph } else { stream };
        let g = self.conf.page_size.0;
        let fresh_granules = round_up(rounded, g) / g;
        // The ready reserve (never used) joins any stream's run, outside
        // graph captures: a miss larger than it maps only the difference.
        // A pool's blocks join only their own stream's run: another stream
        // may still use its blocks, which only its epochs tell.
        let same_key = move |p: &Self, x: BlockId| {
            x != NIL
                && p.b(x).state == State::Cached
                && ((cache_key(p.b(x)) == key && p.b(x).stream == stream) || (graph == 0 && p.b(x).stream == READY_KEY))
        };
        let mut plan = if self.conf.expandable_segments { self.best_gap(arena, rounded, &same_key) } else { None };
        if self.conf.expandable_segments && !capturing {
            // Recycling frees handles for a fresh range even when the gap
            // needs fewer: one recycling round serves the next growths too,
            // and brings the cache under max_cached_fraction, so growth
            // keeps coarse handles (measured on the H100, bench_time's
            // KV-cache workload: 1.23x native with just the gap's granules,
            // 1.08x so; the sim agrees, 24% less modelled driver time).
            let keep = plan.map(|p| self.gap_span(p));
            if self.recycle_before_growth(fresh_granules.max(self.least_growth_granules(arena, rounded)), keep, rounded)? {
                // Recycling opened holes, maybe beside cached blocks: look again.
                plan = self.best_gap(arena, rounded, &same_key);
            }
        }
        // Still over max_cached_fraction after recycling (no memory limit):
        // what is cached lies in handles that live blocks share. Then growth
        // maps just what the request needs, in one-granule handles, so that
        // recycling can take any of them back later instead of the cache
        // growing again with every coarse handle.
        let fragmented = self.conf.expandable_segments
            && !capturing
            && self.limit_bytes.is_none()
            && self.recycling_due();
        let plan = match plan {
            Some(p) => p,
            None => {
                let (_, hole) = self.holes_in(arena, fresh_granules * g).next().ok_or_else(|| Error::OutOfMemory(Box::default()))?;
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
        if self.b(id).stream == READY_KEY && key != READY_KEY {
            self.stats.bump(C::ReadyHits, 1);
            self.bm(id).stream = stream; // the run began with ready memory
        }
        // Merge with a following cached block of the same key, but keep it
        // unindexed for the caller.
        let next = self.b(id).next;
        if next != NIL && self.mergeable(id, next) {
            self.unindex(next);
            self.absorb_next(id);
        }
        Ok(id)
    }
}
