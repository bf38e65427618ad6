//! Physical handles: creating, mapping, unmapping and releasing them, and
//! the one timer of driver calls. A handle maps whole, at one address.
//! Invariants: every live handle is mapped (in `mapped`, by address) or free
//! (in `free_handles`), never both; mapped handles never overlap.
#![forbid(unsafe_code)]

use super::{DevicePool, HistoryAction};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::stats::{TesseraCounter as C, TesseraGauge as G};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Index of a handle in the slab (`DevicePool::handles`).
pub(super) type HandleIdx = u32;

/// One physical handle of `granules` granules, mapped whole at `va` or not
/// at all. While `paused` (pause.rs) it keeps its `va` but holds no memory:
/// `backend_id` is stale until resume creates a new one.
#[derive(Debug, Clone)]
pub(super) struct Handle {
    pub(super) backend_id: u64,
    pub(super) granules: u64,
    pub(super) va: Option<u64>,
    pub(super) paused: bool,
}

/// The physical bytes that every pool of one device holds together (the
/// untagged pool and each tag's, tags.rs): what memory_limit caps. Bytes
/// are taken before a handle is created and given back when it is released,
/// so that pools behind different locks never pass the limit together.
/// Invariant: equals the sum of the sharing pools' reserved gauges.
#[derive(Debug, Clone, Default)]
pub struct DeviceReserved(Arc<AtomicU64>);

impl DeviceReserved {
    /// The bytes held now.
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if the total stays within `limit_bytes` (always
    /// without a limit); says whether it did.
    fn take(&self, bytes: u64, limit_bytes: Option<u64>) -> bool {
        let Some(limit) = limit_bytes else {
            self.0.fetch_add(bytes, Ordering::Relaxed);
            return true;
        };
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| (held + bytes <= limit).then_some(held + bytes))
            .is_ok()
    }

    fn give(&self, bytes: u64) {
        self.0.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Growths that may reuse the driver's last free-bytes answer.
pub(super) const FREE_HINT_USES: u32 = 64;

impl DevicePool {
    /// Backs at least `count` granules from `va` (unmapped, the front of a
    /// hole of `room` granules) with whole handles: free handles that fit
    /// first, then new ones (a larger free handle is traded for them); if
    /// memory is short, one larger free handle when the hole has room for
    /// it. New handles are one granule each when `fine`. Returns the
    /// granules mapped.
    pub(super) fn map_granules(&mut self, va: u64, count: u64, room: u64, fine: bool) -> Result<u64> {
        if self.near_capacity(count) {
            self.refine_free_handles()?;
        }
        let mut plan: Vec<HandleIdx> = Vec::new();
        let mut covered = 0;
        while covered < count {
            let Some(&(n, h)) = self.free_handles.range(..=(count - covered, HandleIdx::MAX)).next_back() else { break };
            self.free_handles.remove(&(n, h));
            plan.push(h);
            covered += n;
        }
        // Short, while a free handle larger than the rest waits: trade it for
        // handles of exactly the rest (release, then create), so that memory
        // already held serves the request without a handle that would stick
        // out past it. If memory runs out, the larger handle itself is the
        // last resort, when the hole has room for it.
        if covered < count
            && let Some(&(n, h)) = self.free_handles.range((count - covered, 0)..).next()
        {
            // A failed release keeps the handle: the last resort below.
            let _ = self.release_free_handle(n, h);
        }
        if covered < count {
            match self.create_handles(count - covered, fine) {
                Ok(new) => {
                    covered = count;
                    plan.extend(new);
                }
                Err(e) => {
                    let larger = self
                        .free_handles
                        .range((count - covered, 0)..)
                        .next()
                        .copied()
                        .filter(|&(n, _)| matches!(e, Error::OutOfMemory(_)) && covered + n <= room);
                    match larger {
                        Some((n, h)) => {
                            self.free_handles.remove(&(n, h));
                            plan.push(h);
                            covered += n;
                        }
                        None => {
                            self.return_handles(&plan);
                            return Err(e);
                        }
                    }
                }
            }
        }
        let g = self.conf.page_size.0;
        let mut at = va;
        let mut result = Ok(());
        for (i, &h) in plan.iter().enumerate() {
            let (backend_id, n) = {
                let handle = self.handles[h as usize].as_ref().expect("live handle");
                (handle.backend_id, handle.granules)
            };
            if let Err(e) = self.driver(|b, d| b.map(d, at, n * g, backend_id)) {
                self.return_handles(&plan[i..]);
                result = Err(e);
                break;
            }
            self.stats.bump(C::DriverMapCalls, 1);
            self.handles[h as usize].as_mut().expect("live handle").va = Some(at);
            // A segment is a maximal mapped run of an arena.
            let arena = self.arena_at(at);
            self.gauge(arena, G::Segments, 1 - self.mapped_neighbours(at, at + n * g));
            self.mapped.insert(at, h);
            let arena = self.arena_at(at);
            self.gauge(arena, G::MappedBytes, (n * g) as i64);
            at += n * g;
        }
        if result.is_ok() {
            result = self.driver(|b, d| b.set_access(d, va, at - va));
            if result.is_ok() && self.history.is_some() {
                self.record(HistoryAction::Map, va, at - va, at - va, 0);
            }
        }
        if let Err(e) = result {
            // Leave no half-mapped range behind: the hole stays a hole.
            if let Err(rollback) = self.unmap_handles(va, at) {
                // The mapped prefix cannot go: make it usable instead, and
                // report it to the caller as what was mapped.
                self.stats.bump(C::DriverErrors, 1);
                tracing::warn!("unmapping after a failed map failed too ({rollback}); keeping the prefix");
                if at > va && self.backend.set_access(self.device, va, at - va).is_ok() {
                    return Err(Error::PartialMap { mapped_bytes: at - va, cause: Box::new(e) });
                }
                if self.unmap_handles(va, at).is_err() {
                    self.poisoned = Some(format!("unrecoverable driver failures while mapping: {e}; then {rollback}"));
                    tracing::error!("tessera: device {} disabled: {}", self.device, self.poisoned.as_deref().unwrap_or(""));
                }
            }
            return Err(e);
        }
        Ok(covered)
    }

    /// Runs a slow-path driver call (handles, mappings, memory info, waits
    /// for the device), counting it and its wall time as the callers'
    /// (`driver_calls`, `driver_ns`) or, in a tidy step, the driver
    /// thread's (`background_driver_calls`, `background_driver_ns`).
    pub(super) fn driver<T>(&mut self, call: impl FnOnce(&dyn Backend, i32) -> Result<T>) -> Result<T> {
        let start = std::time::Instant::now();
        let result = call(self.backend.as_ref(), self.device);
        let ns = start.elapsed().as_nanos() as u64;
        let (calls, time) = if self.background { (C::BackgroundDriverCalls, C::BackgroundDriverNs) } else { (C::DriverCalls, C::DriverNs) };
        self.stats.bump(calls, 1);
        self.stats.bump(time, ns);
        result
    }

    pub(super) fn handle(&self, h: HandleIdx) -> &Handle {
        self.handles[h as usize].as_ref().expect("live handle")
    }

    pub(super) fn handle_mut(&mut self, h: HandleIdx) -> &mut Handle {
        self.handles[h as usize].as_mut().expect("live handle")
    }

    /// Handles taken for a mapping that did not happen become free again.
    pub(super) fn return_handles(&mut self, handles: &[HandleIdx]) {
        for &h in handles {
            let n = self.handles[h as usize].as_ref().expect("live handle").granules;
            self.free_handles.insert((n, h));
        }
    }

    /// Physical bytes held (every live handle): the reserved gauge.
    pub(super) fn physical_bytes(&self) -> u64 {
        self.stats.gauge(G::ReservedBytes).current as u64
    }

    /// Whether `more_bytes` more would stay within the memory limit, which
    /// caps every pool of the device together (true without a limit).
    pub(super) fn within_limit(&self, more_bytes: u64) -> bool {
        self.limit_bytes.is_none_or(|l| self.device_reserved.bytes() + more_bytes <= l)
    }

    /// Takes `bytes` of the device's memory limit for a handle about to be
    /// created (an out-of-memory error past it).
    pub(super) fn take_reserved(&mut self, bytes: u64) -> Result<()> {
        if self.device_reserved.take(bytes, self.limit_bytes) {
            Ok(())
        } else {
            Err(Error::OutOfMemory(Box::default()))
        }
    }

    /// Gives back `bytes` taken with `take_reserved` (a handle released, or
    /// one whose creation failed).
    pub(super) fn give_reserved(&self, bytes: u64) {
        self.device_reserved.give(bytes);
    }

    /// Granules in handles that are mapped nowhere: the reserved bytes that
    /// are not mapped (every live handle is one or the other).
    pub(super) fn free_handle_granules(&self) -> u64 {
        let unmapped = self.physical_bytes() - self.stats.gauge(G::MappedBytes).current as u64;
        unmapped / self.conf.page_size.0
    }

    /// Creates handles for `granules` granules (each at most
    /// `max_handle_bytes`; one granule each when `fine` or near capacity),
    /// within the limit. On failure, the handles made so far stay free for
    /// later use.
    pub(super) fn create_handles(&mut self, granules: u64, fine: bool) -> Result<Vec<HandleIdx>> {
        let g = self.conf.page_size.0;
        if !self.within_limit(granules * g) {
            return Err(Error::OutOfMemory(Box::default()));
        }
        let per_handle = if fine || self.near_capacity(granules) { 1 } else { self.conf.max_handle_size.0 / g };
        self.create_handles_of(granules, per_handle)
    }

    /// Creates handles of `per_handle` granules (the last one smaller) for
    /// `granules` granules. On failure, the handles made so far stay free.
    pub(super) fn create_handles_of(&mut self, granules: u64, per_handle: u64) -> Result<Vec<HandleIdx>> {
        let g = self.conf.page_size.0;
        let mut made = Vec::new();
        let mut left = granules;
        while left > 0 {
            let n = left.min(per_handle);
            let created = self.take_reserved(n * g).and_then(|_| {
                self.driver(|b, d| b.create(d, n * g)).inspect_err(|_| self.give_reserved(n * g))
            });
            let backend_id = match created {
                Ok(id) => id,
                Err(e) => {
                    self.return_handles(&made);
                    return Err(e);
                }
            };
            self.stats.bump(C::DriverCreateCalls, 1);
            self.stats.gauge_mut(G::ReservedBytes).add((n * g) as i64);
            self.stats.gauge_mut(G::Handles).add(1);
            made.push(self.put_handle(Handle { backend_id, granules: n, va: None, paused: false }));
            left -= n;
        }
        Ok(made)
    }

    /// Puts handle `h` in a slab slot (a freed one first).
    pub(super) fn put_handle(&mut self, h: Handle) -> HandleIdx {
        match self.free_handle_slots.pop() {
            Some(i) => {
                self.handles[i as usize] = Some(h);
                i
            }
            None => {
                self.handles.push(Some(h));
                (self.handles.len() - 1) as HandleIdx
            }
        }
    }

    /// Empties handle `h`'s slab slot for `put_handle` to use again.
    pub(super) fn free_handle_slot(&mut self, h: HandleIdx) {
        self.handles[h as usize] = None;
        self.free_handle_slots.push(h);
    }

    /// Whether `granules` more would bring the reserved bytes past
    /// `fine_handles_above` of what tessera may hold (the memory limit, or
    /// what the device has: reserved plus the driver's free bytes). Past it,
    /// new handles are one granule each, so that reclamation can take back
    /// any single granule when memory is short.
    ///
    /// The driver's free bytes cost a call (tens of microseconds): while the
    /// last answer, less what the pool took since, leaves more than twice
    /// the margin, it is used again (for at most `FREE_HINT_USES` growths).
    pub(super) fn near_capacity(&mut self, granules: u64) -> bool {
        let fraction = self.conf.fine_handles_above.0;
        if fraction >= 1.0 {
            return false;
        }
        let reserved = self.physical_bytes();
        let after = reserved + granules * self.conf.page_size.0;
        let margin = (1.0 - fraction) * self.total_bytes as f64;
        let estimate = self.free_hint.and_then(|(free, at_reserved, uses)| {
            let free_now = (free + at_reserved).saturating_sub(reserved);
            (uses > 0 && free_now as f64 > 2.0 * margin).then_some((free_now, free, at_reserved, uses))
        });
        let free = match estimate {
            Some((free_now, free, at_reserved, uses)) => {
                self.free_hint = Some((free, at_reserved, uses - 1));
                free_now
            }
            None => match self.driver(|b, d| b.mem_info(d)) {
                Ok((free, _)) => {
                    self.free_hint = Some((free, reserved, FREE_HINT_USES));
                    free
                }
                Err(_) => return true,
            },
        };
        let device = reserved + free;
        // Under a limit below what the device has, the limit caps every pool
        // of the device together (the driver's free bytes count the others').
        match self.limit_bytes {
            Some(limit) if limit < device => {
                (self.device_reserved.bytes() + granules * self.conf.page_size.0) as f64 > fraction * limit as f64
            }
            _ => after as f64 > fraction * device as f64,
        }
    }

    /// Gives free handle `h` (of `n` granules) back to the driver. On
    /// failure it stays free, and nothing changes.
    pub(super) fn release_free_handle(&mut self, n: u64, h: HandleIdx) -> Result<()> {
        let backend_id = self.handles[h as usize].as_ref().expect("live handle").backend_id;
        self.driver(|b, d| b.release(d, backend_id))?;
        self.stats.bump(C::DriverReleaseCalls, 1);
        self.free_handles.remove(&(n, h));
        self.free_handle_slot(h);
        self.stats.gauge_mut(G::ReservedBytes).sub((n * self.conf.page_size.0) as i64);
        self.give_reserved(n * self.conf.page_size.0);
        self.stats.gauge_mut(G::Handles).sub(1);
        Ok(())
    }

    /// Near capacity: replaces each free multi-granule handle by
    /// single-granule ones (release, then create), so that no handle mapped
    /// from now on can pin granules that its live blocks do not use.
    pub(super) fn refine_free_handles(&mut self) -> Result<()> {
        let coarse: Vec<(u64, HandleIdx)> = self.free_handles.iter().filter(|&&(n, _)| n > 1).copied().collect();
        for (n, h) in coarse {
            self.release_free_handle(n, h)?;
            let singles = self.create_handles_of(n, 1)?;
            self.return_handles(&singles);
        }
        Ok(())
    }

    /// How many of the unmapped range `[lo, hi)`'s neighbours in its arena
    /// are mapped: a handle ending at `lo`, one starting at `hi`.
    pub(super) fn mapped_neighbours(&self, lo: u64, hi: u64) -> i64 {
        let g = self.conf.page_size.0;
        let arena = self.arena_at(lo);
        let before = self.mapped.range(..lo).next_back().is_some_and(|(&va, &h)| {
            va + self.handles[h as usize].as_ref().expect("live handle").granules * g == lo && self.arena_at(va) == arena
        });
        let after = self.mapped.contains_key(&hi) && self.arena_at(hi) == arena;
        before as i64 + after as i64
    }

    /// Unmaps every mapped handle in `[lo, hi)` (which holds whole handles
    /// only) in one backend call; the handles become free.
    pub(super) fn unmap_handles(&mut self, lo: u64, hi: u64) -> Result<()> {
        if hi <= lo {
            return Ok(());
        }
        self.driver(|b, d| b.unmap(d, lo, hi - lo))?;
        self.stats.bump(C::DriverUnmapCalls, 1);
        let inside: Vec<(u64, HandleIdx)> = self.mapped.range(lo..hi).map(|(&va, &h)| (va, h)).collect();
        for (va, h) in inside {
            self.mapped.remove(&va);
            let handle = self.handles[h as usize].as_mut().expect("live handle");
            handle.va = None;
            let n = handle.granules;
            self.free_handles.insert((n, h));
        }
        let arena = self.arena_at(lo);
        self.gauge(arena, G::MappedBytes, -((hi - lo) as i64));
        // The range lay inside one segment: what stays mapped either side
        // of it is a segment of its own.
        self.gauge(arena, G::Segments, self.mapped_neighbours(lo, hi) - 1);
        if self.history.is_some() {
            self.record(HistoryAction::Unmap, lo, hi - lo, hi - lo, 0);
        }
        Ok(())
    }
}
