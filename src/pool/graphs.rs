//! Graph pools: memory a CUDA graph capture allocated, or freed while its
//! stream captured, is cached only for that capture (its cache key) until
//! the graphs are declared gone.
//! Invariant: a graph's block is never lent, recycled, reclaimed or reused
//! outside its capture.
#![forbid(unsafe_code)]

use super::{BlockId, DevicePool, GRAPH_KEY};
use crate::error::Result;
use crate::stats::TesseraCounter as C;

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

    /// The graphs captured so far are gone (their memory is no longer
    /// replayed into): their private caches join the general cache, and
    /// their live blocks will when freed. Returns the bytes released.
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
}
