//! Gap placement: where a request maps fewest new granules, joined with the
//! cached blocks around a hole (before it, after it, or both), and the one
//! routine that maps a gap. Serves growth and, under pressure, any stream's
//! fragments once the device is idle.
//! Invariant: a failed map leaves the hole a hole (or a mapped prefix cached).
#![forbid(unsafe_code)]

use super::{round_up, ArenaKind, BlockId, DevicePool, State};
use crate::error::{Error, Result};
use crate::stats::TesseraCounter as C;

/// Where growth maps a request (see `DevicePool::best_gap`): `new` granules
/// of hole `hole`, joined with the blocks `first..=last` around it. From
/// the front of the hole (`first` may precede it; `last` is the hole when
/// its front suffices) or, when `back`, its back (`first` is the hole).
#[derive(Debug, Clone, Copy)]
pub(super) struct Gap {
    pub(super) new: u64,
    pub(super) hole: BlockId,
    pub(super) first: BlockId,
    pub(super) last: BlockId,
    pub(super) back: bool,
}

impl DevicePool {
    /// The least gap that `rounded` bytes fit: the run of blocks that
    /// `in_run` accepts before a hole, the hole, and the run after it,
    /// mapping only the hole's granules the request covers. From the run
    /// before (mapping the hole's front, then, if that is not enough, all
    /// of it), or ending at the end of the run after (mapping the hole's
    /// back), whichever maps fewer. The gap that maps fewest new granules
    /// wins, if fewer than a fresh range (ties: the first in hole order).
    /// A scan of one arena's holes: for growth only.
    pub(super) fn best_gap(&self, arena: ArenaKind, rounded: u64, in_run: &dyn Fn(&Self, BlockId) -> bool) -> Option<Gap> {
        let g = self.conf.page_size.0;
        let fresh = round_up(rounded, g) / g;
        let mut best: Option<Gap> = None;
        for (hole_bytes, hole) in self.holes_in(arena, 0) {
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
    pub(super) fn gap_span(&self, gap: Gap) -> (u64, u64) {
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
    pub(super) fn map_gap(&mut self, gap: Gap, growth: u64, stream: u64, graph: u64, fine: bool, synced: bool) -> Result<BlockId> {
        let g = self.conf.page_size.0;
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
    pub(super) fn carve_mapped_front(&mut self, hole: BlockId, mapped_bytes: u64, stream: u64, graph: u64) {
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

    /// Under pressure, the device idle (the caller synchronized): serves
    /// `rounded` bytes across a gap, the run of cached blocks (any stream,
    /// no graph's) before a hole, the hole, and the run after it, mapping
    /// only the hole's granules the block covers. From the gap's start, or
    /// ending at its end (mapping the back of the hole), whichever maps
    /// fewer; the gap that maps fewest wins, if fewer than a fresh range.
    /// Returns an unindexed cached block of the stream (its newly mapped
    /// part of private pool `graph`, 0 for none; the caller hands it out),
    /// or None.
    pub(super) fn grow_across_gap(&mut self, arena: ArenaKind, rounded: u64, stream: u64, graph: u64) -> Result<Option<BlockId>> {
        let Some(gap) = self.best_gap(arena, rounded, &|p: &Self, x| p.cached_no_graph(x)) else { return Ok(None) };
        match self.map_gap(gap, gap.new, stream, graph, false, true) {
            Ok(id) => {
                debug_assert!(self.b(id).size >= rounded);
                self.stats.bump(C::GapPlacements, 1);
                Ok(Some(id))
            }
            Err(Error::OutOfMemory(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
