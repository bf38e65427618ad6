//! Allocation: best fit among the stream's cached blocks and the hand-out
//! (split), then, on a miss, the order of the fallbacks: another stream's
//! done blocks (small requests), growth, and under pressure other streams'
//! blocks, reclamation, gap placement; then out of memory.
//! Invariant: a handed-out block is allocated, in `live`, counted once.
#![forbid(unsafe_code)]

use super::graphs::pool_key;
use super::{check_request, round_size, round_up, ArenaKind, BlockId, DevicePool, HistoryAction, State, GRAPH_KEY, MIN_BLOCK_BYTES};
use crate::error::{Error, OomInfo, Result};
use crate::stats::{TesseraCounter as C, TesseraGauge as G};

impl DevicePool {
    /// Allocates `size` bytes for `stream`. Size 0 is the caller's business
    /// (the C ABI returns NULL for it, as PyTorch's own allocator does).
    pub fn malloc(&mut self, size: u64, stream: u64) -> Result<u64> {
        self.malloc_in(size, stream, None)
    }

    /// Allocates `size` bytes for `stream` in private pool `pool` (see
    /// graphs.rs): the block comes from and goes back to that pool's cache.
    pub fn malloc_in_pool(&mut self, size: u64, stream: u64, pool: u64) -> Result<u64> {
        self.malloc_in(size, stream, Some(pool_key(pool)?))
    }

    fn malloc_in(&mut self, size: u64, stream: u64, pool: Option<u64>) -> Result<u64> {
        if let Err(e) = check_request(size) {
            self.stats.bump(C::InvalidRequests, 1);
            return Err(e);
        }
        self.malloc_inner(size, stream, pool).map_err(|e| self.driver_error(e))
    }

    /// `malloc` without the counting of driver errors: the order of
    /// fallbacks. `pool`: the private pool's graph value, if the caller
    /// named one.
    pub(super) fn malloc_inner(&mut self, size: u64, stream: u64, pool: Option<u64>) -> Result<u64> {
        self.refuse_if_poisoned("malloc")?;
        if self.paused.is_some() {
            self.stats.bump(C::InvalidRequests, 1);
            return Err(Error::InvalidArgument(format!(
                "allocation of {size} bytes into a paused tag on device {}: resume the tag first, or allocate outside its region",
                self.device
            )));
        }
        if !self.pending.is_empty() {
            self.process_pending()?;
        }
        let rounded = round_size(size);
        let arena = self.arena_of(rounded);
        // During a graph capture, memory comes from and goes to the
        // capture's private cache (see `Block::graph`).
        let graph = match pool {
            Some(graph) => graph,
            None => self.capture_of_request(stream)?,
        };
        let key = if graph != 0 { GRAPH_KEY | graph } else { stream };
        if let Some(id) = self.find_cached(arena, key, rounded) {
            self.stats.bump(C::CacheHits, 1);
            return Ok(self.hand_out(id, rounded, size, stream, graph));
        }
        self.stats.bump(C::CacheMisses, 1);
        // Granules a fresh range for the request needs.
        let need = round_up(rounded, self.conf.page_size.0) / self.conf.page_size.0;
        self.note_miss(arena, rounded);
        if let Some(id) = self.take_ready(arena, rounded) {
            return Ok(self.hand_out(id, rounded, size, stream, graph));
        }
        // Small requests take a block that another stream cached and the
        // device is done with before growing: each stream growing its own
        // granules would let a few small blocks per stream pin many granules.
        // Large ones too once recycling is due (no memory limit: under one,
        // each stream caches up to it): growth would unmap such a block and
        // map its handles again, where taking it costs no call.
        let done_other = arena == ArenaKind::Small
            || (self.conf.expandable_segments
                && self.limit_bytes.is_none()
                && self.recycling_due()
                && !self.near_capacity(need));
        if done_other && graph == 0 && let Some(id) = self.find_done_cached_other_stream(arena, rounded, stream)? {
            return Ok(self.hand_out(id, rounded, size, stream, 0));
        }
        // Nothing may wait on the device while the stream captures a graph
        // (the capture would break): grow, or fail, without waiting.
        let capturing = match pool {
            Some(_) => self.backend.is_capturing(self.device, stream)?,
            None => self.request_is_capturing(stream, graph)?,
        };
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
            return Ok(self.hand_out(id, rounded, size, stream, graph));
        }
        if self.conf.expandable_segments {
            let idle = self.reclaim(need)?;
            // Fewer granules free than a fresh range needs: the cached
            // fragments beside the holes make up the rest.
            if idle && self.free_handle_granules() < need
                && let Some(id) = self.grow_across_gap(arena, rounded, stream, graph)? {
                    return Ok(self.hand_out(id, rounded, size, stream, graph));
                }
        } else {
            self.release_cached()?;
        }
        match self.grow(arena, rounded, stream, graph, false) {
            Ok(id) => Ok(self.hand_out(id, rounded, size, stream, graph)),
            Err(Error::OutOfMemory(_)) => Err(Error::OutOfMemory(Box::new(self.oom_info(size)))),
            Err(e) => Err(e),
        }
    }

    /// Serves the request from a cached block of exactly its size on its
    /// stream, if there is one (no split, no growth, no driver call: the
    /// front caches' miss tries this before draining them). Never during
    /// graph capture watching, nor on a poisoned pool.
    pub fn malloc_if_exact(&mut self, size: u64, stream: u64) -> Option<u64> {
        if self.conf.graph_pools || self.poisoned.is_some() || self.history.is_some() {
            return None;
        }
        let rounded = round_size(size);
        let arena = self.arena_of(rounded);
        let (_, _, id) = self.cached_under(arena, stream, rounded).next().filter(|&(size, _, _)| size == rounded)?;
        self.unindex(id);
        self.stats.bump(C::CacheHits, 1);
        Some(self.hand_out(id, rounded, size, stream, 0))
    }

    /// Best fit among the blocks cached under `key` (a stream or a capture),
    /// taken out of the index.
    pub(super) fn find_cached(&mut self, arena: ArenaKind, stream: u64, rounded: u64) -> Option<BlockId> {
        let (_, _, id) = self.cached_under(arena, stream, rounded).next()?;
        self.unindex(id);
        Some(id)
    }

    /// Turns unindexed free block `id` (cached, at least `rounded` bytes)
    /// into an allocated block, splitting off the rest.
    pub(super) fn hand_out(&mut self, id: BlockId, rounded: u64, requested: u64, stream: u64, graph: u64) -> u64 {
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
            limit_bytes: self.limit_bytes,
            other_pools_bytes: self.device_reserved.bytes().saturating_sub(self.physical_bytes()),
            live_blocks: self.stats.gauge(G::ActiveBlocks).current as u64,
            cached_bytes: self.stats.gauge(G::CachedBytes).current as u64,
            largest_cached_bytes: self.largest_cached_bytes(),
            free_handle_bytes: self.free_handle_granules() * self.conf.page_size.0,
            pending_bytes,
            largest_allocations: largest,
            resuming: None,
        }
    }
}
