//! The invariant check: walks every chain, index and handle and recounts
//! every gauge; panics with the first broken invariant (see each file's).
//! For tests and fuzzers, after every operation.
#![forbid(unsafe_code)]

use super::block::sized;
use super::{cache_key, CrossIndex, DevicePool, HandleIdx, State, MIN_BLOCK_BYTES, NIL};
use crate::stats::TesseraGauge as G;
use std::collections::HashMap;

impl DevicePool {
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
        let g = self.conf.page_size.0;
        let (mut allocated, mut requested, mut cached, mut active, mut pending) = (0i64, 0i64, 0i64, 0i64, 0i64);
        let mut cached_blocks = 0i64;
        let mut lent_blocks = 0i64;
        // Per arena: segments (mapped runs), cached blocks (lent free ones
        // too), pending bytes.
        let mut per_arena = [[0i64; 3]; 2];
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
                // Holes and cached blocks are each checked below to be in
                // their index set; the flag says so and nothing else.
                assert_eq!(b.indexed, matches!(b.state, State::Hole | State::Cached), "block {id}'s indexed flag differs from its state");
                match b.state {
                    State::Hole => {
                        assert_eq!((b.addr - arena.base) % g, 0, "hole start not granule aligned");
                        assert_eq!(b.size % g, 0, "hole size not granule aligned");
                        assert!(self.holes.get(&(sized(b.arena, b.size), b.addr)) == Some(&id), "hole not indexed");
                    }
                    state => {
                        let counts = &mut per_arena[b.arena as usize];
                        if prev == NIL || self.b(prev).state == State::Hole {
                            counts[0] += 1;
                        }
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
                                counts[2] += b.size as i64;
                                assert_eq!(self.live.get(&b.addr), Some(&id), "pending block not in live map");
                            }
                            State::Cached => {
                                cached += b.size as i64;
                                cached_blocks += 1;
                                counts[1] += 1;
                                assert!(self.cached_by_stream.get(&(cache_key(b), sized(b.arena, b.size), b.addr)) == Some(&id), "cached block not indexed");
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
                                    counts[1] += 1;
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
        // Paused handles (pause.rs) keep their place but hold nothing.
        let (mut mapped_bytes, mut paused_bytes) = (0u64, 0u64);
        for (&va, &h) in &self.mapped {
            let handle = self.handles[h as usize].as_ref().expect("mapped handle is live");
            assert_eq!(handle.va, Some(va), "handle {h} does not know its address");
            assert!(!self.free_handles.contains(&(handle.granules, h)), "handle {h} both mapped and free");
            assert!(!handle.paused || self.paused.is_some(), "handle {h} paused in a pool that is not");
            let end = va + handle.granules * g;
            if handle.paused {
                paused_bytes += handle.granules * g;
            } else {
                mapped_bytes += handle.granules * g;
            }
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
        let outside_graphs = self.cached_by_stream.iter().filter(|&(_, &id)| self.b(id).graph == 0);
        assert_eq!(outside_graphs.clone().count(), self.cached_outside_graphs, "cached blocks outside graph pools miscounted");
        match self.cross_index {
            CrossIndex::Built => {
                assert!(outside_graphs.clone().all(|(&(_, size, addr), id)| self.cached_by_size.get(&(size, addr)) == Some(id)),
                        "a cached block outside graph pools is missing from the cross-stream index");
                assert_eq!(self.cached_outside_graphs, self.cached_by_size.len(), "the cross-stream index holds other blocks");
                assert!(self.cached_outside_graphs > 0, "the cross-stream index kept with nothing to hold");
            }
            CrossIndex::Sole(sole) => {
                assert!(self.cached_by_size.is_empty(), "the cross-stream index holds blocks while not kept");
                assert!(outside_graphs.clone().all(|(k, _)| Some(k.0) == sole), "blocks of two keys outside graph pools, no cross-stream index");
                assert!(sole.is_none() || self.cached_outside_graphs > 0, "a sole key with nothing cached");
            }
        }
        assert_eq!(self.live.len() as i64, active - lent_live.len() as i64 + pending + lent_blocks);
        assert!(lent_live.keys().all(|&id| self.b(id).state == State::Lent), "a front's live block is not lent");
        let (mut physical, mut handles, mut paused_handles) = (0i64, 0usize, 0usize);
        for (h, handle) in self.handles.iter().enumerate() {
            let Some(handle) = handle else { continue };
            if handle.paused {
                paused_handles += 1;
                continue;
            }
            physical += (handle.granules * g) as i64;
            handles += 1;
            if handle.va.is_none() {
                assert!(self.free_handles.contains(&(handle.granules, h as HandleIdx)), "unmapped handle {h} lost");
            }
        }
        assert_eq!(handles + paused_handles, self.mapped.len() + self.free_handles.len(), "handle accounting");
        assert!(self.paused.is_none() || self.free_handles.is_empty(), "a paused pool holds free handles");
        assert!(self.paused.is_none() || self.kept_backups.is_empty(), "a paused pool keeps copies outside its backups");
        assert!(self.conf.keep_backups || self.kept_backups.is_empty(), "copies kept without keep_backups");
        let free_granules: u64 = self.free_handles.iter().map(|&(n, _)| n).sum();
        assert_eq!(free_granules, self.free_handle_granules(), "free handles differ from reserved less mapped");
        self.check_ready();
        let mut slots: Vec<HandleIdx> = self.free_handle_slots.clone();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), self.free_handle_slots.len(), "a handle slot listed free twice");
        assert!(slots.iter().all(|&h| self.handles[h as usize].is_none()), "a live handle's slot listed free");
        assert_eq!(slots.len() + handles + paused_handles, self.handles.len(), "a released handle slot not listed free");
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
            (G::PausedBytes, paused_bytes as i64),
            (
                G::BackupBytes,
                self.paused.as_ref().map_or(0, |p| p.backups.iter().map(|&(_, n, _)| n as i64).sum::<i64>())
                    + self.kept_backups.values().map(|&(n, _)| n as i64).sum::<i64>(),
            ),
        ];
        for (gauge, value) in checks {
            assert_eq!(s.gauge(gauge).current, value, "gauge {gauge:?} differs from a recount");
            assert!(s.gauge(gauge).peak >= s.gauge(gauge).current);
        }
        for (arena, counts) in per_arena.iter().enumerate() {
            for (gauge, value) in [G::Segments, G::CachedBlocks, G::PendingFreeBytes].into_iter().zip(counts) {
                let stat = self.arena_stats[arena].gauge(gauge);
                assert_eq!(stat.current, *value, "arena {arena}'s gauge {gauge:?} differs from a recount");
                assert!(stat.peak >= stat.current);
            }
        }
        for gauge in [
            G::AllocatedBytes,
            G::RequestedBytes,
            G::ActiveBlocks,
            G::CachedBytes,
            G::MappedBytes,
            G::PendingFreeBlocks,
            G::Segments,
            G::CachedBlocks,
            G::PendingFreeBytes,
        ] {
            let sum: i64 = self.arena_stats.iter().map(|a| a.gauge(gauge).current).sum();
            assert_eq!(sum, s.gauge(gauge).current, "arena gauges of {gauge:?} do not sum to the device's");
        }
        self.check_epochs();
        self.check_recyclable();
        for (&id, uses) in &self.stream_uses {
            let b = self.b(id);
            assert!(b.has_uses && b.state == State::Allocated && self.live.get(&b.addr) == Some(&id),
                    "block {id} listed with stream uses is not a live allocated block flagged so");
            assert!(uses.iter().all(|&s| s != b.stream), "block {id}'s own stream listed among its uses");
        }
        let flagged = self.live.values().filter(|&&id| self.b(id).has_uses).count();
        assert_eq!(flagged, self.stream_uses.len(), "a block flagged with stream uses is not listed");
    }

    /// Recycling's candidates: each is an indexed cached block outside graph
    /// pools, under its own size, flagged; the slots in `unchecked` are
    /// listed once each, exactly those flagged queued; every mapped handle
    /// wholly under cached blocks outside graph pools overlaps a candidate
    /// or a queued block.
    fn check_recyclable(&self) {
        for &(size, id) in &self.recyclable {
            let b = self.b(id);
            assert!(self.is_indexed_cached(id) && b.size == size && b.graph == 0 && b.candidate,
                    "candidate {id} is not an indexed cached block of {size} bytes");
        }
        let mut listed = vec![false; self.blocks.len()];
        for &id in &self.unchecked {
            assert!(!std::mem::replace(&mut listed[id as usize], true), "slot {id} listed twice as unchecked");
        }
        for (id, b) in self.blocks.iter().enumerate() {
            assert_eq!(b.queued, listed[id], "slot {id}'s queued flag differs from the unchecked list");
        }
        let g = self.conf.page_size.0;
        // Non-hole blocks by address, every arena.
        let (mut blocks, mut candidates): (Vec<(u64, u64, u32)>, usize) = (Vec::new(), 0);
        for arena in &self.arenas {
            let mut id = arena.head;
            while id != NIL {
                let b = self.b(id);
                if b.state != State::Hole {
                    blocks.push((b.addr, b.addr + b.size, id));
                }
                candidates += b.candidate as usize;
                id = b.next;
            }
        }
        assert_eq!(candidates, self.recyclable.len(), "a block flagged as a candidate is not one");
        blocks.sort_unstable();
        for (&va, &h) in &self.mapped {
            let end = va + self.handles[h as usize].as_ref().expect("live").granules * g;
            let from = blocks.partition_point(|&(_, e, _)| e <= va);
            let under: Vec<u32> = blocks[from..].iter().take_while(|&&(a, _, _)| a < end).map(|&(_, _, id)| id).collect();
            if under.iter().all(|&id| self.cached_no_graph(id)) {
                assert!(under.iter().any(|&id| self.b(id).candidate || self.b(id).queued),
                        "handle at {va:#x} lies wholly under cached blocks, none of them a candidate or unchecked");
            }
        }
    }

    /// The streams' epochs: `epochs_waiting` lists exactly the streams with
    /// an outstanding event, `epochs_dirty` exactly the dirty ones, each
    /// once; a stream that is neither covers every free it stamped.
    fn check_epochs(&self) {
        let listed = |list: &[u64], what: &str, has: &dyn Fn(&super::Epoch) -> bool| {
            let mut seen = std::collections::HashSet::new();
            for stream in list {
                assert!(seen.insert(*stream), "stream {stream} listed twice as {what}");
                assert!(self.epochs.get(stream).is_some_and(has), "stream {stream} listed as {what} but is not");
            }
            let count = self.epochs.values().filter(|e| has(e)).count();
            assert_eq!(count, list.len(), "{what} streams not all listed");
        };
        listed(&self.epochs_waiting, "waiting", &|e| e.event.is_some());
        listed(&self.epochs_dirty, "dirty", &|e| e.dirty);
        for &id in self.cached_by_stream.values() {
            let b = self.b(id);
            let Some(epoch) = self.epochs.get(&b.stream).filter(|_| b.freed_seq != 0) else { continue };
            let covered = epoch.done_seq >= b.freed_seq || epoch.event.is_some_and(|(_, seq)| seq >= b.freed_seq);
            assert!(covered || epoch.dirty,
                    "block {id}'s free on stream {} is covered by no epoch event and the stream is not dirty", b.stream);
        }
    }
}
