//! Tidying: the driver work that can wait, done by tessera's driver thread
//! (worker.rs, through device.rs) one step at a time, off the callers'
//! threads: keeping the ready reserve mapped for the next miss, made of
//! recycled memory (cached handles the device is done with) while the cache
//! is over max_cached_fraction, and polling the streams' events.
//! Invariants: the ready reserve is the cached blocks of key `READY_KEY`:
//! in the large arena, outside graph pools, never used by a stream since
//! mapped (`freed_seq` 0); a step makes one round of driver calls of at most
//! about a handle (`max_handle_size`) and never waits for the device.
#![forbid(unsafe_code)]

use super::{round_up, ArenaKind, BlockId, DevicePool, State, READY_KEY};
use crate::error::Result;
use crate::stats::{TesseraCounter as C, TesseraGauge as G};

/// What a tidy step found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tidy {
    /// It made driver calls; there may be more to do.
    Worked,
    /// Nothing to do now, but the ready reserve waits for cached blocks
    /// the device has not passed yet: ask again after the device progressed.
    Waiting,
    /// Nothing to do until the callers change something.
    Idle,
}

impl DevicePool {
    /// Whether a driver thread tidies this pool (see `DevicePool::deferred`).
    pub fn set_deferred(&mut self, on: bool) {
        self.deferred = on;
    }

    /// Bytes in the ready reserve.
    pub(super) fn ready_bytes(&self) -> u64 {
        self.cached_under(ArenaKind::Large, READY_KEY, 0).map(|(size, _, _)| size).sum()
    }

    /// What the ready reserve should hold, `have_bytes` being what it holds
    /// (`ready_bytes`): twice the largest recent miss, at most
    /// `ready_fraction` (and half of `max_cached_fraction`) of the other
    /// reserved bytes, in whole granules; nothing without a driver thread.
    fn ready_target_bytes(&self, have_bytes: u64) -> u64 {
        if !self.deferred {
            return 0;
        }
        let share = self.conf.ready_fraction.0.min(self.conf.max_cached_fraction.0 / 2.0);
        let cap = (share * self.physical_bytes().saturating_sub(have_bytes) as f64) as u64;
        let g = self.conf.page_size.0;
        (2 * self.ready_demand_bytes).min(cap) / g * g
    }

    /// A miss of `rounded` bytes in `arena`: what the ready reserve
    /// prepares for (the largest of about the last 16 misses).
    pub(super) fn note_miss(&mut self, arena: ArenaKind, rounded: u64) {
        if arena == ArenaKind::Large {
            let decayed = self.ready_demand_bytes - self.ready_demand_bytes / 16;
            self.ready_demand_bytes = decayed.max(round_up(rounded, self.conf.page_size.0));
        }
    }

    /// Best fit in the ready reserve for a miss of `rounded` bytes, taken
    /// out of the index (the caller hands it out; the rest stays ready).
    pub(super) fn take_ready(&mut self, arena: ArenaKind, rounded: u64) -> Option<BlockId> {
        let (_, _, id) = self.cached_under(arena, READY_KEY, rounded).next()?;
        self.unindex(id);
        self.stats.bump(C::ReadyHits, 1);
        Some(id)
    }

    /// Whether the cache is over the share that this thread should bring
    /// back before growing: max_cached_fraction, or twice it on a caller's
    /// thread while a driver thread tidies (it is then behind).
    pub(super) fn recycling_due(&self) -> bool {
        let factor = if self.deferred && !self.background { 2.0 } else { 1.0 };
        self.stats.gauge(G::CachedBytes).current as f64 > factor * self.conf.max_cached_fraction.0 * self.physical_bytes() as f64
    }

    /// Whether a tidy step would find work (cheap: gauges and the reserve's
    /// few blocks): for waking the driver thread after a call.
    pub fn wants_tidy(&self) -> bool {
        self.deferred
            && self.poisoned.is_none()
            && self.tidied_at != (self.stats.counter(C::CacheMisses), self.free_seq)
            && {
                let have = self.ready_bytes();
                have + self.conf.page_size.0 <= self.ready_target_bytes(have)
            }
    }

    /// One step of tidying (see the module doc); the first of a round also
    /// polls the streams' events and pending frees. Driver calls count as
    /// the driver thread's. A failure is counted and ends the round; the
    /// pool stays as it was before the failed call.
    pub fn tidy_step(&mut self, first: bool) -> Tidy {
        if !self.deferred || self.poisoned.is_some() {
            return Tidy::Idle;
        }
        self.background = true;
        let result = self.tidy_step_inner(first);
        self.background = false;
        let tidy = result.unwrap_or_else(|e| {
            self.driver_error(e);
            Tidy::Idle
        });
        if tidy != Tidy::Worked {
            self.tidied_at = (self.stats.counter(C::CacheMisses), self.free_seq);
        }
        tidy
    }

    fn tidy_step_inner(&mut self, first: bool) -> Result<Tidy> {
        let g = self.conf.page_size.0;
        let handle_granules = self.conf.max_handle_size.0 / g;
        if first {
            if !self.pending.is_empty() {
                self.process_pending()?;
            }
            self.advance_epochs()?;
        }
        let have = self.ready_bytes();
        let target = self.ready_target_bytes(have);
        if have + g > target {
            return Ok(Tidy::Idle);
        }
        let mut want = round_up((target - have).min(handle_granules * g), g);
        if !self.within_limit(want) || self.near_capacity(want / g) {
            return Ok(Tidy::Idle);
        }
        // Over max_cached_fraction, the reserve is made of recycled memory
        // only (cached handles the device is done with, the reserve
        // spared), as growth on a caller's thread would recycle: what is
        // not done yet is asked for again after the device progressed.
        if self.recycling_due() && self.limit_bytes.is_none() {
            let need = want / g;
            if self.free_handle_granules() < need {
                self.unmap_cached_blocks(need, true, None, true, true, handle_granules)?;
            }
            let free = self.free_handle_granules();
            if free == 0 {
                let waiting = !self.epochs_waiting.is_empty() || !self.epochs_dirty.is_empty();
                return Ok(if waiting { Tidy::Waiting } else { Tidy::Idle });
            }
            want = want.min(free * g);
        }
        let id = self.grow(ArenaKind::Large, want, READY_KEY, 0, false)?;
        self.coalesce_and_index(id);
        Ok(Tidy::Worked)
    }

    /// The ready reserve's blocks are what the module doc says.
    pub(super) fn check_ready(&self) {
        for arena in [ArenaKind::Small, ArenaKind::Large] {
            for (_, _, id) in self.cached_under(arena, READY_KEY, 0) {
                let b = self.b(id);
                assert!(b.state == State::Cached && b.arena == ArenaKind::Large && b.graph == 0 && b.freed_seq == 0,
                        "ready block {id} is not fresh large-arena memory");
            }
        }
    }
}
