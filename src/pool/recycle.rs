//! Recycling and reclamation: every unmap of cached memory. Before growth,
//! while too much is cached, handles the device is done with (epoch events)
//! are unmapped, smallest blocks first; under pressure, after a synchronize,
//! largest first; empty_cache gives everything cached back.
//! Invariants: only handles wholly under cached blocks outside graph pools are
//! unmapped, never inside the range growth is about to place; every such
//! handle overlaps a candidate in `recyclable` or a block indexed since
//! recycling last looked (`unchecked`), which is all recycling walks.
#![forbid(unsafe_code)]

use super::{BlockId, DevicePool, State, NIL, READY_KEY};
use crate::error::Result;
use crate::stats::{TesseraCounter as C, TesseraGauge as G};
use std::ops::Bound::{Excluded, Unbounded};

/// How many neighbours `may_free_a_handle` walks, both sides together,
/// before it answers yes without looking further (a candidate too many
/// costs one look when recycling; one too few would hide a handle from it).
const RUN_WALK_BLOCKS: usize = 64;

impl DevicePool {
    /// Before growing by `need` granules: when too much is cached (see
    /// `cached_fraction` and `gc_threshold`), unmap cached handles the
    /// device is done with, so that growth maps them again instead of
    /// taking new memory. No synchronization: epoch events tell what is done.
    /// The blocks in `keep` (the growth's placement) stay; `request_bytes`
    /// is what the growth serves. Returns whether it unmapped anything
    /// (else the blocks are as they were).
    pub(super) fn recycle_before_growth(&mut self, need: u64, keep: Option<(u64, u64)>, request_bytes: u64) -> Result<bool> {
        let g = self.conf.page_size.0;
        let live = self.stats.gauge(G::AllocatedBytes).current as u64 + request_bytes;
        self.live_high_water_bytes = self.live_high_water_bytes.max(live);
        let free = self.free_handle_granules();
        if free >= need || !self.has_recyclable() {
            return Ok(false); // no handle lies wholly under cached blocks
        }
        let reserved = self.physical_bytes() as f64;
        let allowed = self.limit_bytes.unwrap_or(self.total_bytes) as f64;
        let over_gc = self.conf.garbage_collection_threshold.0 > 0.0 && reserved + (need * g) as f64 > self.conf.garbage_collection_threshold.0 * allowed;
        // Under a memory limit that the growth stays within, tessera may hold
        // up to the limit (as PyTorch caches up to its memory fraction):
        // recycling there would only move cached memory that a later request
        // of the same step needs back, over and over (seen on GPT-2 capped
        // at its frontier + 5%). garbage_collection_threshold still applies.
        let within_limit = self.limit_bytes.is_some() && self.within_limit(need * g);
        // Below the high-water mark of live memory (plus the cached share),
        // growth keeps reserved memory where the workload's peak already
        // took it: caching there costs no more memory than the peak did,
        // and recycling costs driver calls (sim, modelled driver time:
        // GPT-2 121 -> 105 ms, infer 62 -> 36; KV 211 -> 226, mixed
        // 117 -> 129; reserved within 0.004 of before on each trace).
        let under_high_water = reserved + (need * g) as f64 <= (1.0 + self.conf.max_cached_fraction.0) * self.live_high_water_bytes as f64;
        if (!self.recycling_due() || within_limit || under_high_water) && !over_gc {
            return Ok(false);
        }
        // Smallest blocks first: the large cached blocks are the ones that
        // serve later large requests without growth. Against largest first
        // (sim, modelled driver time): GPT-2 222 -> 139 ms, KV trace 249 ->
        // 219, GPU KV workload 806 -> 756, 24 multi-stream seeds 331 -> 271,
        // churn 196 -> 207; reserved up by at most 0.015 (KV 1.034 -> 1.049).
        // The ready reserve is spared: it serves misses that fit it, and
        // one that did not fit came here.
        self.advance_epochs()?;
        self.unmap_cached_blocks(need, true, keep, true, true, u64::MAX)?;
        if self.free_handle_granules() < need && !self.background {
            // Not enough known done: wait for the streams' epoch events (a
            // wait on each stream's event, not a device synchronize), then
            // try again. The driver thread never waits (it holds the lock).
            self.wait_epochs()?;
            self.unmap_cached_blocks(need, true, keep, true, true, u64::MAX)?;
        }
        Ok(self.free_handle_granules() > free)
    }

    /// Unmaps cached handles (only those the device is known to be done
    /// with, if `only_device_done`), taking the candidates (`recyclable`)
    /// smallest or largest first, until `need` granules of handles are free,
    /// at most `max_run_granules` (about) from one run of cached blocks.
    /// Nothing in the range `keep`, nor the ready reserve if `spare_ready`.
    /// Looks at candidates only (the blocks freed since it last looked are
    /// asked first, once each): its cost follows what it unmaps, the frees
    /// and the stale candidates it drops, not the number of cached blocks.
    pub(super) fn unmap_cached_blocks(
        &mut self,
        need: u64,
        only_device_done: bool,
        keep: Option<(u64, u64)>,
        smallest_first: bool,
        spare_ready: bool,
        max_run_granules: u64,
    ) -> Result<()> {
        self.check_unchecked();
        let mut free = self.free_handle_granules();
        // Near capacity, only what is needed: whatever else is unmapped must
        // be mapped again, handle by handle, at the next request.
        let exact = self.near_capacity(need.saturating_sub(free));
        let mut cursor: Option<(u64, BlockId)> = None;
        while free < need {
            let next = match (cursor, smallest_first) {
                (None, true) => self.recyclable.first(),
                (None, false) => self.recyclable.last(),
                (Some(c), true) => self.recyclable.range((Excluded(c), Unbounded)).next(),
                (Some(c), false) => self.recyclable.range(..c).next_back(),
            };
            let Some(&(size, id)) = next else { break };
            cursor = Some((size, id));
            if !self.may_free_a_handle(id) {
                self.drop_candidate(size, id);
                continue;
            }
            let want = if exact { need - free } else { u64::MAX };
            free += self.unmap_cached_run(id, only_device_done, want.min(max_run_granules), keep, spare_ready)?;
            // Unmapped, split or merged, it left the set or came back under
            // its new size; as it is, it stays only while it may free one.
            if self.b(id).candidate && self.b(id).size == size && !self.may_free_a_handle(id) {
                self.drop_candidate(size, id);
            }
        }
        Ok(())
    }

    /// Asks the blocks indexed since recycling last looked (`unchecked`)
    /// whether they may free a handle, and makes those that may candidates.
    /// Each indexing is asked once: the cost follows the frees.
    fn check_unchecked(&mut self) {
        let mut ids = std::mem::take(&mut self.unchecked);
        for &id in &ids {
            self.bm(id).queued = false;
            let b = self.b(id);
            if self.is_indexed_cached(id) && b.graph == 0 && !b.candidate && self.may_free_a_handle(id) {
                self.recyclable.insert((b.size, id));
                self.bm(id).candidate = true;
            }
        }
        ids.clear();
        self.unchecked = ids;
    }

    /// Whether some candidate may free a handle; drops those in front that
    /// cannot.
    fn has_recyclable(&mut self) -> bool {
        self.check_unchecked();
        while let Some(&(size, id)) = self.recyclable.first() {
            if self.may_free_a_handle(id) {
                return true;
            }
            self.drop_candidate(size, id);
        }
        false
    }

    /// Candidate `id`, of `size` bytes, no longer may free a handle: it
    /// leaves the set until it is indexed again.
    fn drop_candidate(&mut self, size: u64, id: BlockId) {
        self.recyclable.remove(&(size, id));
        self.bm(id).candidate = false;
    }

    /// Whether a mapped handle overlapping cached block `id` may lie wholly
    /// under cached blocks outside graph pools: one inside the block, or an
    /// end one that the neighbours cover (walking at most
    /// `RUN_WALK_BLOCKS` of them in all; beyond, yes). Done-ness is not
    /// asked: the device may finish with the blocks later.
    pub(super) fn may_free_a_handle(&self, id: BlockId) -> bool {
        let g = self.conf.page_size.0;
        let (addr, end) = (self.b(id).addr, self.b(id).addr + self.b(id).size);
        let span = |p: &Self, va: u64, h: &super::HandleIdx| (va, va + p.handles[*h as usize].as_ref().expect("live handle").granules * g);
        // The handle holding `addr`, then those starting inside the block:
        // an inner one answers yes, and only the two end ones can straddle.
        let first = self.mapped.range(..=addr).next_back().map(|(&va, h)| span(self, va, h)).filter(|&(_, he)| he > addr);
        let inner = self.mapped.range(addr.saturating_add(1)..end).map(|(&va, h)| span(self, va, h));
        for (hs, he) in first.into_iter().chain(inner) {
            if (hs >= addr && he <= end) || self.covered_by_cached(id, hs, he) {
                return true;
            }
            if he >= end {
                break;
            }
        }
        false
    }

    /// Whether the cached neighbours of cached block `id` cover `hs..he`.
    fn covered_by_cached(&self, id: BlockId, hs: u64, he: u64) -> bool {
        let (mut lo, mut hi) = (id, id);
        for _ in 0..RUN_WALK_BLOCKS {
            if self.b(lo).addr > hs {
                lo = self.b(lo).prev;
                if !self.cached_no_graph(lo) {
                    return false;
                }
            } else if self.b(hi).addr + self.b(hi).size < he {
                hi = self.b(hi).next;
                if !self.cached_no_graph(hi) {
                    return false;
                }
            } else {
                return true;
            }
        }
        true
    }

    /// Unmaps handles that lie wholly inside the run of adjacent cached
    /// blocks (of any streams) around indexed cached block `id`, turning
    /// that range into a hole: the topmost ones until they hold at least
    /// `want_granules` (all of them for u64::MAX). The rest of the run, and
    /// the handles that straddle its ends, stay mapped and cached. Only
    /// blocks the device is known to be done with count when
    /// `only_device_done`; otherwise the caller has synchronized. Nothing in
    /// `keep` (an address range: where growth is about to place a request)
    /// is unmapped: the run ends at it, on `id`'s side; with `spare_ready`,
    /// the ready reserve's blocks end it too. Returns the granules freed.
    pub(super) fn unmap_cached_run(
        &mut self,
        id: BlockId,
        only_device_done: bool,
        want_granules: u64,
        keep: Option<(u64, u64)>,
        spare_ready: bool,
    ) -> Result<u64> {
        let g = self.conf.page_size.0;
        let cached = |p: &Self, x: BlockId| {
            p.cached_no_graph(x) && (!only_device_done || p.device_done(x)) && !(spare_ready && p.b(x).stream == READY_KEY)
        };
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
        self.cached_to_hole(first, lo, hi);
        Ok(count)
    }

    /// Turns the range `[lo, hi)` (granule-aligned, no longer mapped, under
    /// cached blocks outside graph pools only) into a hole, splitting the
    /// blocks at its ends; `from` is a block of the chain at or before `lo`.
    /// Returns the first block after the hole (NIL at the arena's end).
    pub(super) fn cached_to_hole(&mut self, from: BlockId, lo: u64, hi: u64) -> BlockId {
        let mut cur = from;
        while cur != NIL && self.b(cur).addr < hi {
            let (addr, size, next) = (self.b(cur).addr, self.b(cur).size, self.b(cur).next);
            if addr + size <= lo {
                cur = next;
                continue;
            }
            debug_assert!(self.cached_no_graph(cur), "a hole over block {cur}, which is not cached");
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
        cur
    }

    /// Under pressure: makes at least `need` granules free by unmapping
    /// cached granules, largest blocks first, after the device is done with
    /// them. Stops early when enough are free. Returns whether it
    /// synchronized the device: then every cached block outside graph pools
    /// is safe on any stream (until the lock is let go).
    pub(super) fn reclaim(&mut self, need: u64) -> Result<bool> {
        // Blocks waiting for other streams (record_stream) count: after the
        // synchronize they are cached, and reclaimable.
        if self.free_handle_granules() >= need || (self.cached_by_stream.is_empty() && self.pending.is_empty()) {
            return Ok(false);
        }
        self.driver(|b, d| b.synchronize(d))?;
        self.process_pending()?;
        self.unmap_cached_blocks(need, false, None, false, false, u64::MAX)?;
        Ok(true)
    }

    /// Unmaps every cached granule and releases every handle with nothing
    /// mapped (torch.cuda.empty_cache). Live blocks keep their granules.
    /// The ready reserve goes too, and is not refilled until the next miss;
    /// the high-water mark of live memory starts again.
    /// A paused pool holds nothing to release.
    pub fn release_cached(&mut self) -> Result<()> {
        if self.paused.is_some() {
            return Ok(());
        }
        self.driver(|b, d| b.synchronize(d))?;
        self.release_cached_now()
    }

    /// `release_cached` once the device is known done with the pool's
    /// cached memory (the caller synchronized or waited on its streams).
    pub(super) fn release_cached_now(&mut self) -> Result<()> {
        self.ready_demand_bytes = 0;
        self.live_high_water_bytes = 0;
        self.retry_stale_events();
        self.process_pending()?;
        let ids: Vec<BlockId> = self.cached_by_stream.values().copied().collect();
        for id in ids {
            if self.is_indexed_cached(id) {
                self.unmap_cached_run(id, false, u64::MAX, None, false)?;
            }
        }
        while let Some(&(n, h)) = self.free_handles.first() {
            self.release_free_handle(n, h)?;
        }
        Ok(())
    }

    /// torch.cuda.empty_cache: counted, then `release_cached`.
    pub fn empty_cache(&mut self) -> Result<()> {
        self.stats.bump(C::EmptyCacheCalls, 1);
        self.release_cached()
    }
}
