//! Free: a block goes back cached for its stream (coalesced), pending for
//! the other streams that used it, lent whole to a front cache, or, freed
//! during a capture, into the graph's private cache. Bad frees are counted
//! and change nothing.
#![forbid(unsafe_code)]

use super::{DevicePool, Freed, HistoryAction, State};
use crate::error::{Error, Result};
use crate::stats::{TesseraCounter as C, TesseraGauge as G};

impl DevicePool {
    /// Whether `addr` is a live allocation of this pool.
    pub fn owns(&self, addr: u64) -> bool {
        self.live.get(&addr).is_some_and(|&id| self.b(id).state == State::Allocated)
    }

    /// The stream of the block at `addr` if it is allocated, or lent to a
    /// front cache (where it may be handed out): a block a free may name.
    pub fn held_stream(&self, addr: u64) -> Option<u64> {
        let b = self.b(*self.live.get(&addr)?);
        matches!(b.state, State::Allocated | State::Lent).then_some(b.stream)
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

    /// The error for a free of `addr` that no live block answers, counted
    /// in `invalid_frees`; `why` says what the pointer may have been.
    pub fn invalid_free(&mut self, addr: u64, why: &str) -> Error {
        self.stats.bump(C::InvalidFrees, 1);
        Error::InvalidArgument(format!(
            "free of {addr:#x}, which is not a live tessera allocation on device {} ({why})",
            self.device
        ))
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
            _ => return Err(self.invalid_free(addr, "never allocated by tessera, or freed twice")),
        };
        self.claim_for_capture_at_free(id);
        self.live.remove(&addr);
        let mut uses = match self.b(id).has_uses {
            true => self.stream_uses.remove(&id).expect("a block with uses is listed"),
            false => Vec::new(),
        };
        self.bm(id).has_uses = false;
        uses.sort_unstable(); // one event a stream (record_stream keeps repeats)
        uses.dedup();
        let b = *self.b(id);
        let mismatch = size.is_some_and(|s| s != b.requested && s != b.size) || stream.is_some_and(|s| s != b.stream);
        self.gauge(b.arena, G::AllocatedBytes, -(b.size as i64));
        self.gauge(b.arena, G::RequestedBytes, -(b.requested as i64));
        self.gauge(b.arena, G::ActiveBlocks, -1);
        if self.history.is_some() {
            self.record(HistoryAction::Free, addr, b.size, b.requested, b.stream);
        }
        self.bm(id).requested = 0;
        if uses.is_empty() && !mismatch && self.b(id).graph == 0 && lend(b.stream) {
            return Ok(Freed::Lent(self.lend(id)));
        }
        if uses.is_empty() {
            self.stamp_free(id);
            self.coalesce_and_index(id);
        } else {
            self.free_pending(id, uses)?;
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
}
