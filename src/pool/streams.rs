//! Streams: when the device is done with freed memory. Per-stream epoch
//! events stamp frees (no synchronize); frees of blocks other streams used
//! (record_stream) wait as pending until those streams pass events; blocks
//! cached for one stream serve another once done, or after a device-side wait.
//! Invariants: a pending block is in `live` and in `pending`, in free order;
//! every event recorded is destroyed or kept in `stale_events`.
#![forbid(unsafe_code)]

use super::{ArenaKind, BlockId, DevicePool, State, READY_KEY};
use crate::backend::EventId;
use crate::error::{Error, Result};
use crate::stats::{TesseraCounter as C, TesseraGauge as G};

/// A block freed while other streams may still use it.
#[derive(Debug)]
pub(super) struct PendingFree {
    pub(super) block: BlockId,
    /// (stream, event recorded on it at the free), one per stream that used
    /// the block.
    pub(super) events: Vec<(u64, EventId)>,
    /// Recording an event failed: the block waits for a successful
    /// device synchronize instead.
    pub(super) needs_sync: bool,
}

/// What the device is known to have passed on one stream that freed blocks.
#[derive(Debug, Default)]
pub(super) struct Epoch {
    /// The outstanding epoch event and the free number when it was recorded
    /// (the stream is then in `DevicePool::epochs_waiting`).
    pub(super) event: Option<(EventId, u64)>,
    /// The highest free number the device has passed on this stream.
    pub(super) done_seq: u64,
    /// The stream freed blocks since its last event was recorded (it is then
    /// in `DevicePool::epochs_dirty`).
    pub(super) dirty: bool,
}

/// record_stream looks this far back for a repeat of its stream.
const RECENT_USES: usize = 4;

impl DevicePool {
    /// Freed block `id` (out of `live`, counted free) was used by the
    /// streams `uses` too (record_stream): it waits, pending, for an event
    /// recorded on each of them now. If recording fails, it waits for a
    /// synchronize instead (tried now, and again at later allocations).
    pub(super) fn free_pending(&mut self, id: BlockId, uses: Vec<u64>) -> Result<()> {
        let mut events = Vec::with_capacity(uses.len());
        let mut needs_sync = false;
        for s in uses {
            match self.backend.record_event(self.device, s) {
                Ok(e) => events.push((s, e)),
                Err(e) => {
                    // Without an event the device may still use the block.
                    self.stats.bump(C::DriverErrors, 1);
                    tracing::warn!("record_event failed ({e}); the freed block waits for a synchronize");
                    needs_sync = true;
                    break;
                }
            }
        }
        let b = self.bm(id);
        b.state = State::Pending;
        let (addr, arena, size) = (b.addr, b.arena, b.size as i64);
        self.live.insert(addr, id);
        self.gauge(arena, G::PendingFreeBlocks, 1);
        self.gauge(arena, G::PendingFreeBytes, size);
        self.pending.push(PendingFree { block: id, events, needs_sync });
        if needs_sync {
            self.process_pending().map_err(|e| self.driver_error(e))?;
        }
        Ok(())
    }

    /// Block `id` (unindexed) becomes cached for its stream, stamped with a
    /// new free number.
    pub(super) fn stamp_free(&mut self, id: BlockId) {
        self.free_seq += 1;
        let stream = self.b(id).stream;
        let seq = self.free_seq;
        let b = self.bm(id);
        b.state = State::Cached;
        b.freed_seq = seq;
        if self.last_free_stream != Some(stream) {
            let epoch = self.epochs.entry(stream).or_default();
            if !epoch.dirty {
                epoch.dirty = true;
                self.epochs_dirty.push(stream);
            }
            self.last_free_stream = Some(stream);
        }
    }

    /// Whether the device is known to be done with cached block `id`.
    pub(super) fn device_done(&self, id: BlockId) -> bool {
        let b = self.b(id);
        if b.graph != 0 {
            return false; // a graph may replay over it at any time
        }
        b.freed_seq == 0 || self.epochs.get(&b.stream).is_some_and(|e| b.freed_seq <= e.done_seq)
    }

    /// Polls the outstanding epoch events (advancing what the device is
    /// known to have passed) and records one on each stream that freed
    /// blocks since its last, where none is outstanding. Visits only those
    /// streams, never every stream seen. Off the hot path: called when the
    /// pool must grow or serve a stream from another's blocks.
    pub(super) fn advance_epochs(&mut self) -> Result<()> {
        self.retry_stale_events();
        let mut i = 0;
        while i < self.epochs_waiting.len() {
            let stream = self.epochs_waiting[i];
            let (event, seq) = self.epochs[&stream].event.expect("a waiting stream has an event");
            // An event query is refused while the stream captures a graph.
            if self.backend.is_capturing(self.device, stream)? || !self.backend.event_done(self.device, event)? {
                i += 1;
                continue;
            }
            self.retire_epoch_event(stream, event, seq);
            if self.epochs[&stream].event.is_none() {
                self.epochs_waiting.swap_remove(i);
            } else {
                i += 1; // not destroyed: retried at the next poll
            }
        }
        let dirty = std::mem::take(&mut self.epochs_dirty);
        let mut still = Vec::new();
        let mut result = Ok(());
        for stream in dirty {
            if result.is_err() || self.epochs[&stream].event.is_some() {
                still.push(stream); // after the outstanding event passes
                continue;
            }
            let event = match self.backend.is_capturing(self.device, stream) {
                Ok(true) => Ok(None), // an event recorded now would belong to the graph
                Ok(false) => self.backend.record_event(self.device, stream).map(Some),
                Err(e) => Err(e),
            };
            match event {
                Ok(Some(event)) => {
                    let epoch = self.epochs.get_mut(&stream).expect("listed");
                    epoch.event = Some((event, self.free_seq));
                    epoch.dirty = false;
                    self.epochs_waiting.push(stream);
                }
                Ok(None) => still.push(stream),
                Err(e) => {
                    still.push(stream);
                    result = Err(e);
                }
            }
        }
        self.epochs_dirty = still;
        // The next free on the last stream marks it dirty again.
        self.last_free_stream = None;
        result
    }

    /// Waits for every outstanding epoch event (recorded by
    /// `advance_epochs`) and marks its frees done.
    pub(super) fn wait_epochs(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.epochs_waiting.len() {
            let stream = self.epochs_waiting[i];
            let (event, seq) = self.epochs[&stream].event.expect("a waiting stream has an event");
            self.driver(|b, d| b.event_synchronize(d, event))?;
            self.retire_epoch_event(stream, event, seq);
            if self.epochs[&stream].event.is_none() {
                self.epochs_waiting.swap_remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// The device passed `stream`'s epoch event: its frees up to `seq` are
    /// done. The event is destroyed; if that fails it stays, already known
    /// done, and is destroyed at a later poll (no leak, no lost progress).
    pub(super) fn retire_epoch_event(&mut self, stream: u64, event: EventId, seq: u64) {
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

    /// Destroys `event`; if the driver refuses, keeps it in `stale_events`
    /// to try again later (at growth, empty_cache and drop): no event is
    /// ever forgotten.
    pub(super) fn destroy_event_or_keep(&mut self, event: EventId) {
        if let Err(e) = self.backend.destroy_event(self.device, event) {
            self.stats.bump(C::DriverErrors, 1);
            tracing::warn!("destroying an event failed ({e}); will retry");
            self.stale_events.push(event);
        }
    }

    /// Tries again to destroy the events kept after a failed destroy.
    pub(super) fn retry_stale_events(&mut self) {
        let (backend, device) = (self.backend.clone(), self.device);
        self.stale_events.retain(|&e| backend.destroy_event(device, e).is_err());
    }

    /// Events kept after a failed destroy, waiting for another try.
    pub fn stale_events(&self) -> usize {
        self.stale_events.len()
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
        if stream == self.b(id).stream {
            return Ok(());
        }
        self.bm(id).has_uses = true;
        let uses = self.stream_uses.entry(id).or_default();
        if uses.iter().rev().take(RECENT_USES).any(|&s| s == stream) {
            return Ok(());
        }
        // Repeats further back are dropped when the list fills its
        // capacity, which then at least doubles: each call costs O(log)
        // amortised, however many streams, and the list holds at most
        // twice the distinct ones.
        if uses.len() == uses.capacity() && uses.len() >= RECENT_USES {
            uses.sort_unstable();
            uses.dedup();
            if uses.len() > uses.capacity() / 2 {
                uses.reserve(uses.capacity());
            }
        }
        uses.push(stream);
        Ok(())
    }

    /// Moves pending frees whose events all completed to the cache.
    pub(super) fn process_pending(&mut self) -> Result<()> {
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
            let (arena, size) = (self.b(p.block).arena, self.b(p.block).size as i64);
            self.gauge(arena, G::PendingFreeBlocks, -1);
            self.gauge(arena, G::PendingFreeBytes, -size);
            self.coalesce_and_index(p.block);
        }
        Ok(())
    }

    /// Best fit among blocks cached for other streams that the device is
    /// known to be done with (their streams' epoch events passed the free):
    /// safe to reuse on any stream with no wait. Polls the epoch events
    /// first. Walks the cross-stream index (or the one caching stream's
    /// range) from the request's size up, past blocks not known done: for
    /// misses only.
    pub(super) fn find_done_cached_other_stream(&mut self, arena: ArenaKind, rounded: u64, stream: u64) -> Result<Option<BlockId>> {
        if self.cached_across(arena, rounded, stream).next().is_none() {
            return Ok(None);
        }
        // Polling events changes what is known done, not what is cached.
        let find = |p: &Self| p.cached_across(arena, rounded, stream).find(|&id| p.device_done(id));
        let recorded = !self.epochs_dirty.is_empty();
        self.advance_epochs()?;
        let mut found = find(self);
        // A stream with nothing of its own cached asks the events this poll
        // recorded again (an idle device has passed them): otherwise each
        // of many streams in turn unmaps and maps at every miss (sim,
        // 64 streams: modelled driver time 1,291 -> 224 ms). With cached
        // blocks of its own it waits for the next poll: taking others'
        // sooner fragments (24 multi-stream seeds' reserved mean 1.100 ->
        // 1.125 when every miss asks again).
        if found.is_none()
            && recorded
            && self.cached_under(arena, stream, 0).next().is_none()
        {
            self.advance_epochs()?;
            found = find(self);
        }
        let Some(id) = found else {
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
    pub(super) fn find_cached_other_stream(&mut self, arena: ArenaKind, rounded: u64, stream: u64) -> Result<Option<BlockId>> {
        let Some(id) = self.cached_across(arena, rounded, stream).next() else {
            return Ok(None);
        };
        // The ready reserve's blocks were never used: nothing to wait for.
        let from = self.b(id).stream;
        if from != READY_KEY {
            let event = self.backend.record_event(self.device, from)?;
            let waited = self.backend.stream_wait_event(self.device, stream, event);
            self.destroy_event_or_keep(event);
            waited?;
        }
        self.unindex(id);
        self.stats.bump(C::CrossStreamReuses, 1);
        Ok(Some(id))
    }
}
