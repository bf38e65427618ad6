//! Pause and resume: a pool's physical memory goes back to the driver and
//! comes back later at the same addresses (a tag's pool, see tags.rs). A
//! pause waits for the streams that used the pool (an event each, no device
//! synchronize), gives the cache back, copies live blocks to host memory if
//! asked, then unmaps and releases every handle; a resume creates and maps
//! new handles where the old ones were, only where blocks still held need
//! them (the memory of blocks freed while paused becomes address space, as
//! after recycling), and copies the backups back. Paused handles side by
//! side merge (they hold nothing, so this is bookkeeping only), up to
//! `MERGED_HANDLE_SHARE` of the device each: a resume creates and maps far
//! fewer handles, and so does the next pause.
//! With keep_backups, a resume keeps its host copies for the next pause.
//! Invariants: a paused handle keeps its slot, granules and address in
//! `mapped`, but holds no backend handle and counts in no physical gauge
//! (reserved, mapped, handles); `PausedBytes` is the sum of paused handles'
//! bytes, `BackupBytes` that of the pause's backups and the kept ones. A
//! resume that fails leaves every handle paused and every backup intact:
//! nothing is lost, and it may be tried again (a poisoned pool refuses).
#![forbid(unsafe_code)]

use super::{DevicePool, HandleIdx, State, NIL};
use crate::backend::BackupId;
use crate::error::{format_bytes, Error, Result};
use crate::stats::{TesseraCounter as C, TesseraGauge as G};

/// Paused handles merge into handles of at most this share of the device
/// (1/64: 2.2 GB on an H200), and at least `max_handle_size`. A handle maps
/// whole, so a larger one pins more when only part of it is live later;
/// each handle costs a create, a map and a set-access (~40 us) to resume.
const MERGED_HANDLE_SHARE: u64 = 64;

/// What a paused pool holds until its resume.
#[derive(Debug, Default)]
pub(super) struct Paused {
    /// Per live block copied: (address, bytes, backup).
    pub(super) backups: Vec<(u64, u64, BackupId)>,
}

/// Host copies kept from the last resume (keep_backups), by block address:
/// (bytes, backup). Each counts in `BackupBytes`.
pub(super) type KeptBackups = std::collections::HashMap<u64, (u64, BackupId)>;

/// What a pause or a resume did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PauseReport {
    /// Physical bytes given back (pause) or taken again (resume).
    pub bytes: u64,
    /// Bytes copied to host memory (pause) or back from it (resume).
    pub backup_bytes: u64,
}

impl DevicePool {
    /// Whether the pool is paused (a resume has work to do).
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Gives the pool's physical memory back to the driver, keeping every
    /// address; with `backup`, live blocks are copied to host memory first.
    /// Waits for every stream that used the pool's memory. On an error
    /// before any handle was released nothing changed but the cache; after,
    /// the pool is paused with what was released (resume maps it again).
    pub fn pause(&mut self, backup: bool) -> Result<PauseReport> {
        if self.paused.is_some() {
            return Err(Error::InvalidArgument("already paused".into()));
        }
        self.refuse_if_poisoned("pause")?;
        self.wait_for_users()?;
        self.release_cached_now()?;
        let mut backups = Vec::new();
        if backup {
            let live: Vec<(u64, u64)> = self
                .live
                .values()
                .map(|&id| self.b(id))
                .filter(|b| b.state == State::Allocated)
                .map(|b| (b.addr, b.size))
                .collect();
            for (addr, size) in live {
                // A copy kept from the last resume for this very block.
                let reuse = match self.kept_backups.get(&addr) {
                    Some(&(n, id)) if n == size => Some(id),
                    _ => None,
                };
                match self.driver(|b, d| b.backup(d, addr, size, reuse)) {
                    Ok(id) => backups.push((addr, size, id)),
                    Err(e) => {
                        // Nothing changed: the new copies go, the kept ones
                        // stay kept (a failed copy into one leaves it live).
                        for &(addr, n, id) in &backups {
                            if self.kept_backups.get(&addr) != Some(&(n, id)) {
                                self.backend.drop_backup(self.device, id, n);
                            }
                        }
                        return Err(e);
                    }
                }
            }
        }
        // The kept copies now in `backups` move there (still counted); the
        // others (blocks freed since, or no backup asked) go.
        for &(addr, n, id) in &backups {
            if self.kept_backups.get(&addr) == Some(&(n, id)) {
                self.kept_backups.remove(&addr);
                self.stats.gauge_mut(G::BackupBytes).sub(n as i64);
            }
        }
        self.drop_kept_backups();
        let backup_bytes: u64 = backups.iter().map(|&(_, n, _)| n).sum();
        self.stats.gauge_mut(G::BackupBytes).add(backup_bytes as i64);
        self.paused = Some(Paused { backups });
        let mut bytes = 0;
        let handles: Vec<(u64, HandleIdx)> = self.mapped.iter().map(|(&va, &h)| (va, h)).collect();
        for (va, h) in handles {
            match self.pause_handle(va, h) {
                Ok(n) => bytes += n,
                Err(e) => {
                    self.merge_paused_runs();
                    return Err(e);
                }
            }
        }
        self.merge_paused_runs();
        Ok(PauseReport { bytes, backup_bytes })
    }

    /// Merges paused handles side by side (in one arena) into handles of at
    /// most `MERGED_HANDLE_SHARE` of the device: their slots go back, their
    /// granules join the first's of each run.
    fn merge_paused_runs(&mut self) {
        let g = self.conf.page_size.0;
        let most_granules = (self.total_bytes / MERGED_HANDLE_SHARE).max(self.conf.max_handle_size.0) / g;
        let handles: Vec<(u64, HandleIdx)> = self.mapped.iter().map(|(&va, &h)| (va, h)).collect();
        let mut run: Option<(u64, HandleIdx)> = None; // (end, head) of the run so far
        for (va, h) in handles {
            if !self.handle(h).paused {
                run = None;
                continue;
            }
            match run {
                Some((end, head))
                    if end == va
                        && self.arena_at(va) == self.arena_at(self.handle(head).va.expect("mapped"))
                        && self.handle(head).granules + self.handle(h).granules <= most_granules =>
                {
                    let n = self.handle(h).granules;
                    self.handle_mut(head).granules += n;
                    self.mapped.remove(&va);
                    self.free_handle_slot(h);
                    run = Some((end + n * g, head));
                }
                _ => run = Some((va + self.handle(h).granules * g, h)),
            }
        }
    }

    /// Maps new physical memory where the paused handles were and copies
    /// the backups of the blocks still live back. Out of memory (or any
    /// failure) undoes what this call mapped and leaves the pool paused with
    /// its backups: the error says what is missing, and a later call may
    /// succeed. Not paused: nothing to do.
    pub fn resume(&mut self, tag: &str) -> Result<PauseReport> {
        if self.paused.is_none() {
            return Ok(PauseReport::default());
        }
        // Fail-stop: the mapping state is unknown, so nothing may be copied
        // into it (a restore into an unmapped range faults the process).
        self.refuse_if_poisoned("resume")?;
        self.shed_unneeded_paused();
        let g = self.conf.page_size.0;
        let paused = self.paused_handles();
        let want: u64 = paused.iter().map(|&(_, h)| self.handle(h).granules * g).sum();
        let mut done: Vec<(u64, HandleIdx)> = Vec::new();
        for &(va, h) in &paused {
            if let Err(e) = self.resume_handle(va, h) {
                let got: u64 = done.iter().map(|&(_, h)| self.handle(h).granules * g).sum();
                for &(va, h) in done.iter().rev() {
                    // A handle that cannot go back stays mapped: still the
                    // tag's, and its contents come from its backup later.
                    let _ = self.pause_handle(va, h);
                }
                let e = self.driver_error(e);
                return Err(match e {
                    Error::OutOfMemory(_) => {
                        let mut info = self.oom_info(want);
                        info.resuming = Some(format!(
                            "resuming tag '{tag}' needs {} of physical memory and got {} of it; the tag stays \
                             paused with its backups, resume it again once memory is free",
                            format_bytes(want),
                            format_bytes(got)
                        ));
                        self.stats.bump(C::Ooms, 1);
                        Error::OutOfMemory(Box::new(info))
                    }
                    other => other,
                });
            }
            done.push((va, h));
        }
        let Paused { backups } = self.paused.take().expect("paused");
        let mut restored = 0;
        let mut failed = None;
        for (addr, size, id) in backups {
            let live = self.live.get(&addr).is_some_and(|&b| self.b(b).state == State::Allocated && self.b(b).size == size);
            if live && failed.is_none() {
                match self.driver(|b, d| b.restore(d, id, addr, size)) {
                    Ok(()) => restored += size,
                    Err(e) => failed = Some(self.driver_error(e)),
                }
            }
            if live && self.conf.keep_backups {
                // Still counted in BackupBytes, for the next pause.
                self.kept_backups.insert(addr, (size, id));
            } else {
                self.backend.drop_backup(self.device, id, size);
                self.stats.gauge_mut(G::BackupBytes).sub(size as i64);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(PauseReport { bytes: want, backup_bytes: restored }),
        }
    }

    /// The paused handles, by address: (address, handle).
    fn paused_handles(&self) -> Vec<(u64, HandleIdx)> {
        self.mapped.iter().filter(|&(_, &h)| self.handle(h).paused).map(|(&va, &h)| (va, h)).collect()
    }

    /// Gives up the paused memory that no block needs any more (blocks
    /// freed while paused): the granules of paused handles that only cached
    /// blocks outside graph pools cover become holes, so that a resume
    /// creates and maps only what the blocks still held need. Bookkeeping
    /// only (a paused handle holds nothing, so it splits anywhere); walks
    /// the pool's blocks once. Returns the bytes given up.
    fn shed_unneeded_paused(&mut self) -> u64 {
        let g = self.conf.page_size.0;
        // Granule-aligned ranges, ascending, that a block other than a
        // cached one outside graph pools touches: what a resume must map.
        let mut needed: Vec<(u64, u64)> = Vec::new();
        for arena in &self.arenas {
            let (mut id, first) = (arena.head, needed.len());
            while id != NIL {
                let b = self.b(id);
                if b.state != State::Hole && !self.cached_no_graph(id) {
                    let lo = arena.base + (b.addr - arena.base) / g * g;
                    let hi = arena.base + (b.addr + b.size - arena.base).div_ceil(g) * g;
                    match needed[first..].last_mut() {
                        Some(run) if run.1 >= lo => run.1 = run.1.max(hi),
                        _ => needed.push((lo, hi)),
                    }
                }
                id = b.next;
            }
        }
        needed.sort_unstable(); // the arenas' own ranges do not overlap
        // Each paused handle keeps the pieces some block needs; the rest
        // of it goes (adjacent pieces of one arena join into one hole).
        let paused = self.paused_handles();
        let mut holes: Vec<(u64, u64)> = Vec::new();
        for (va, h) in paused {
            let end = va + self.handle(h).granules * g;
            let first = needed.partition_point(|&(_, hi)| hi <= va);
            let keep: Vec<(u64, u64)> =
                needed[first..].iter().take_while(|&&(lo, _)| lo < end).map(|&(lo, hi)| (lo.max(va), hi.min(end))).collect();
            if keep.len() == 1 && keep[0] == (va, end) {
                continue;
            }
            let mut at = va;
            for &(lo, hi) in keep.iter().chain(std::iter::once(&(end, end))) {
                if lo > at {
                    match holes.last_mut() {
                        Some(hole) if hole.1 == at && self.arena_at(hole.0) == self.arena_at(at) => hole.1 = lo,
                        _ => holes.push((at, lo)),
                    }
                }
                at = hi;
            }
            let backend_id = self.handle(h).backend_id;
            self.mapped.remove(&va);
            self.free_handle_slot(h);
            for (lo, hi) in keep {
                let piece = self.put_handle(super::Handle { backend_id, granules: (hi - lo) / g, va: Some(lo), paused: true });
                self.mapped.insert(lo, piece);
            }
        }
        let mut shed = 0;
        let mut from = NIL;
        for &(lo, hi) in &holes {
            let arena = self.arena_at(lo);
            if from == NIL || self.b(from).arena != arena || self.b(from).addr > lo {
                from = self.arenas[arena as usize].head;
            }
            self.gauge(arena, G::Segments, self.mapped_neighbours(lo, hi) - 1);
            from = self.cached_to_hole(from, lo, hi);
            shed += hi - lo;
        }
        self.stats.gauge_mut(G::PausedBytes).sub(shed as i64);
        shed
    }

    /// Blocks until the device has passed every stream's work on the pool's
    /// memory: the streams of its live, pending and cached blocks (and
    /// those that used them through record_stream), an event each.
    fn wait_for_users(&mut self) -> Result<()> {
        let mut streams: Vec<u64> = self.epochs.keys().copied().collect();
        streams.extend(self.live.values().map(|&id| self.b(id).stream));
        streams.extend(self.stream_uses.values().flatten());
        for p in &self.pending {
            streams.extend(p.events.iter().map(|&(s, _)| s));
        }
        streams.sort_unstable();
        streams.dedup();
        streams.retain(|&s| s != super::READY_KEY);
        for s in streams {
            let event = self.driver(|b, d| b.record_event(d, s))?;
            let waited = self.driver(|b, d| b.event_synchronize(d, event));
            if let Err(e) = self.backend.destroy_event(self.device, event) {
                tracing::warn!("destroying a pause's event failed: {e}");
                self.stale_events.push(event);
            }
            waited?;
        }
        Ok(())
    }

    /// Unmaps and releases mapped handle `h` at `va`, which becomes paused.
    /// Returns its bytes.
    fn pause_handle(&mut self, va: u64, h: HandleIdx) -> Result<u64> {
        let g = self.conf.page_size.0;
        let (backend_id, bytes) = {
            let handle = self.handle(h);
            (handle.backend_id, handle.granules * g)
        };
        self.driver(|b, d| b.unmap(d, va, bytes))?;
        self.stats.bump(C::DriverUnmapCalls, 1);
        let arena = self.arena_at(va);
        self.gauge(arena, G::MappedBytes, -(bytes as i64));
        if let Err(e) = self.driver(|b, d| b.release(d, backend_id)) {
            // Unmapped but held: map it back so that the pool stays whole.
            let back = self.driver(|b, d| b.map(d, va, bytes, backend_id)).and_then(|_| self.driver(|b, d| b.set_access(d, va, bytes)));
            if back.is_err() {
                self.poisoned = Some(format!("a paused handle could be neither released ({e}) nor mapped again"));
            }
            self.gauge(arena, G::MappedBytes, bytes as i64);
            return Err(e);
        }
        self.stats.bump(C::DriverReleaseCalls, 1);
        self.stats.gauge_mut(G::ReservedBytes).sub(bytes as i64);
        self.give_reserved(bytes);
        self.stats.gauge_mut(G::Handles).sub(1);
        self.stats.gauge_mut(G::PausedBytes).add(bytes as i64);
        self.handle_mut(h).paused = true;
        Ok(bytes)
    }

    /// Creates a handle for paused `h` and maps it at `va` again.
    fn resume_handle(&mut self, va: u64, h: HandleIdx) -> Result<()> {
        let bytes = self.handle(h).granules * self.conf.page_size.0;
        self.take_reserved(bytes)?;
        let backend_id = self.driver(|b, d| b.create(d, bytes)).inspect_err(|_| self.give_reserved(bytes))?;
        self.stats.bump(C::DriverCreateCalls, 1);
        let mapped = self.driver(|b, d| b.map(d, va, bytes, backend_id));
        let mut undone = Ok(());
        let mapped = mapped.and_then(|_| {
            self.stats.bump(C::DriverMapCalls, 1);
            self.driver(|b, d| b.set_access(d, va, bytes)).inspect_err(|_| {
                undone = self.backend.unmap(self.device, va, bytes);
            })
        });
        if let Err(e) = mapped {
            // Taking the new handle back failed too: the pool no longer knows
            // what the driver holds at `va` (fail-stop, never corrupt).
            if let Err(second) = undone.and_then(|_| self.backend.release(self.device, backend_id)) {
                self.poisoned = Some(format!("a resumed handle could be neither mapped ({e}) nor taken back ({second})"));
            } else {
                self.give_reserved(bytes);
            }
            return Err(e);
        }
        let handle = self.handle_mut(h);
        handle.backend_id = backend_id;
        handle.paused = false;
        self.stats.gauge_mut(G::ReservedBytes).add(bytes as i64);
        self.stats.gauge_mut(G::Handles).add(1);
        self.stats.gauge_mut(G::PausedBytes).sub(bytes as i64);
        let arena = self.arena_at(va);
        self.gauge(arena, G::MappedBytes, bytes as i64);
        Ok(())
    }

    /// Drops the backups of a paused pool and the kept ones (the pool is
    /// going away).
    pub(super) fn drop_backups(&mut self) {
        if let Some(p) = self.paused.as_mut() {
            for (_, size, id) in std::mem::take(&mut p.backups) {
                self.backend.drop_backup(self.device, id, size);
            }
        }
        self.drop_kept_backups();
    }

    /// Lets every copy kept from the last resume go.
    fn drop_kept_backups(&mut self) {
        for (_, (size, id)) in std::mem::take(&mut self.kept_backups) {
            self.backend.drop_backup(self.device, id, size);
            self.stats.gauge_mut(G::BackupBytes).sub(size as i64);
        }
    }
}
