//! Private pools: memory a CUDA graph capture allocated, or freed while its
//! stream captured, is cached only for that capture (its cache key) until
//! the graphs are declared gone; and pools a caller names (PyTorch's
//! `MempoolId`s, through the torch adaptor: graph captures, `MemPool`),
//! whose blocks come from and go back to the pool's own cache until it is
//! released.
//! Invariant: a private pool's block is never lent, recycled, reclaimed or
//! reused outside its pool.
#![forbid(unsafe_code)]

use super::{round_size, ArenaKind, BlockId, DevicePool, State, GRAPH_KEY, MIN_BLOCK_BYTES};
use crate::error::{Error, Result};
use crate::stats::TesseraCounter as C;

/// Graph values of the pools callers name: this bit and the pool's number
/// (capture ids from the driver, and UNKNOWN_CAPTURE, stay below it).
const NAMED_POOL: u64 = 1 << 61;

/// The graph value of named pool `pool`.
pub(super) fn pool_key(pool: u64) -> Result<u64> {
    if pool >= NAMED_POOL {
        return Err(Error::InvalidArgument(format!("pool number {pool} is not under 2^61")));
    }
    Ok(NAMED_POOL | pool)
}

/// The named pool a block of graph value `graph` belongs to (0: none).
pub(super) fn named_pool_of(graph: u64) -> u64 {
    if graph & NAMED_POOL != 0 { graph & !NAMED_POOL } else { 0 }
}

/// A live block of a named pool: what a checkpoint of the pool keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolBlock {
    pub addr: u64,
    pub size: u64,
    pub requested: u64,
    pub stream: u64,
}

/// The capture of a block freed when the driver could not say whether its
/// stream was capturing.
pub(super) const UNKNOWN_CAPTURE: u64 = 1 << 62;

impl DevicePool {
    /// The capture a request on `stream` belongs to (0: none), asked of the
    /// driver only while graph pools are watched. During a capture, memory
    /// comes from and goes to the capture's private cache.
    pub(super) fn capture_of_request(&mut self, stream: u64) -> Result<u64> {
        let graph = if self.conf.graph_pools { self.backend.capture_id(self.device, stream)?.unwrap_or(0) } else { 0 };
        self.seen_capture |= graph != 0;
        Ok(graph)
    }

    /// Whether a request on `stream` (of capture `graph`, see
    /// `capture_of_request`) comes from a capturing stream: then nothing may
    /// wait on the device (the capture would break). Without graph pools a
    /// capture is detected here, and said once: its memory is not kept
    /// private to it.
    pub(super) fn request_is_capturing(&mut self, stream: u64, graph: u64) -> Result<bool> {
        let capturing = graph != 0 || (!self.conf.graph_pools && self.backend.is_capturing(self.device, stream)?);
        if capturing && graph == 0 && !self.seen_capture {
            self.seen_capture = true;
            tracing::warn!("a CUDA graph capture allocates through tessera without graph_pools");
            eprintln!(
                "tessera: a CUDA graph is being captured; set graph_pools:true in TESSERA_CONF so that memory \
                 the graph uses is never reused outside it"
            );
        }
        Ok(capturing)
    }

    /// Allocated block `id` is being freed: if its stream captures a graph,
    /// the graph's replays may still use it, so it joins that capture's
    /// private cache.
    pub(super) fn claim_for_capture_at_free(&mut self, id: BlockId) {
        if !self.conf.graph_pools || self.b(id).graph != 0 {
            return;
        }
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

    /// Starts (never stops) asking the driver on every allocation and free
    /// whether the stream captures a CUDA graph (`graph_pools` at run time).
    pub fn watch_graphs(&mut self) {
        self.conf.graph_pools = true;
    }

    /// Named pool `pool` is released (PyTorch released it: its graphs and
    /// MemPool are gone): its cached blocks join the general cache, its
    /// live blocks will when freed. Returns the bytes released.
    pub fn release_pool(&mut self, pool: u64) -> Result<u64> {
        let key = pool_key(pool)?;
        Ok(self.release_private(|graph| graph == key))
    }

    /// The live (allocated) blocks of named pool `pool`, by address.
    pub fn pool_blocks(&self, pool: u64) -> Result<Vec<PoolBlock>> {
        let key = pool_key(pool)?;
        let mut out: Vec<PoolBlock> = self
            .live
            .values()
            .map(|&id| self.b(id))
            .filter(|b| b.state == State::Allocated && b.graph == key)
            .map(|b| PoolBlock { addr: b.addr, size: b.size, requested: b.requested, stream: b.stream })
            .collect();
        out.sort_unstable_by_key(|b| b.addr);
        Ok(out)
    }

    /// Allocates exactly `[addr, addr + size)` for `stream` out of named
    /// pool `pool`'s cache (a checkpoint of the pool restored: PyTorch's
    /// cudagraph trees put back blocks that graphs recorded at these
    /// addresses). An error if no cached block of the pool covers it.
    pub fn claim_in_pool(&mut self, pool: u64, addr: u64, size: u64, requested: u64, stream: u64) -> Result<u64> {
        let key = pool_key(pool)?;
        let rounded = round_size(size);
        // Blocks start on MIN_BLOCK_BYTES; a range past the end of the
        // address space is no block's.
        let end = addr.checked_add(rounded).filter(|_| addr.is_multiple_of(MIN_BLOCK_BYTES));
        let Some(end) = end else {
            return Err(Error::InvalidArgument(format!(
                "claim of {addr:#x} ({rounded} bytes) in pool {pool}: not a block's address range"
            )));
        };
        let gk = GRAPH_KEY | key;
        let found = [ArenaKind::Small, ArenaKind::Large].into_iter().find_map(|arena| {
            self.cached_under(arena, gk, 0)
                .find(|&(bsize, baddr, _)| baddr <= addr && end <= baddr + bsize)
                .map(|(_, _, id)| id)
        });
        let Some(id) = found else {
            return Err(Error::InvalidArgument(format!(
                "claim of {addr:#x} ({rounded} bytes) in pool {pool}: no cached block of the pool holds it"
            )));
        };
        self.unindex(id);
        let at = if self.b(id).addr < addr {
            let rest = self.split_front(id, addr - self.b(id).addr);
            self.index(id);
            rest
        } else {
            id
        };
        Ok(self.hand_out(at, rounded, requested, stream, key))
    }

    /// The graphs captured so far are gone (their memory is no longer
    /// replayed into): their private caches join the general cache, and
    /// their live blocks will when freed. Returns the bytes released.
    pub fn release_graph_pools(&mut self) -> u64 {
        self.release_private(|graph| graph & NAMED_POOL == 0)
    }

    /// The private pools whose graph value `which` accepts are gone: their
    /// cached blocks join the general cache, their live blocks will when
    /// freed. Returns the cached bytes released.
    fn release_private(&mut self, which: impl Fn(u64) -> bool) -> u64 {
        let private: Vec<BlockId> = self
            .cached_by_stream
            .iter()
            .filter(|(k, _)| k.0 & GRAPH_KEY != 0 && which(k.0 & !GRAPH_KEY))
            .map(|(_, &id)| id)
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
        let live: Vec<BlockId> = self.live.values().copied().filter(|&id| self.b(id).graph != 0 && which(self.b(id).graph)).collect();
        for id in live {
            self.bm(id).graph = 0;
        }
        bytes
    }
}
