//! Fault injection for tests and fuzzing: wraps any [`Backend`], fails chosen
//! calls (by call number, or by chance from a seeded xorshift) and keeps a
//! ledger of what passed through (handles, events, mapped ranges, reservations).
//! Invariants: an injected failure never reaches the inner backend (no effect);
//! the ledger changes only on inner success; contract breaches go to `violations`.
#![forbid(unsafe_code)]

use super::{Backend, BackupId, EventId, HandleId};
use crate::error::{Error, OomInfo, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

/// The code of every injected `Error::Driver`.
pub const INJECTED_CODE: i64 = -7777;

mod plan;

pub use plan::{CreateFault, FaultPoint, XorShift64};
use plan::Plan;

const POINTS: usize = FaultPoint::ALL.len();

/// What went through the wrapper on one device.
#[derive(Debug, Default)]
struct Ledger {
    granularity: Option<u64>,
    /// Live handle -> size.
    handles: HashMap<HandleId, u64>,
    /// Mapped range start -> (size, handle).
    mapped: BTreeMap<u64, (u64, HandleId)>,
    mapped_bytes: u64,
    live_events: u64,
    /// Live reservation base -> size.
    reservations: BTreeMap<u64, u64>,
    /// Live backup -> size.
    backups: HashMap<BackupId, u64>,
}

struct State {
    rng: XorShift64,
    enabled: bool,
    /// Injections left before injection pauses (None: no cap).
    budget: Option<u64>,
    create_fault: CreateFault,
    plans: [Plan; POINTS],
    calls: [u64; POINTS],
    injected: [u64; POINTS],
    ledgers: HashMap<i32, Ledger>,
    violations: Vec<String>,
}

/// A backend that fails on demand. See the module doc.
pub struct FaultyBackend<B: Backend> {
    inner: B,
    state: Mutex<State>,
}

impl<B: Backend> FaultyBackend<B> {
    /// Wraps `inner`; nothing fails until a plan says so. `seed` drives the
    /// probabilistic faults.
    pub fn new(inner: B, seed: u64) -> Self {
        FaultyBackend {
            inner,
            state: Mutex::new(State {
                rng: XorShift64::new(seed),
                enabled: true,
                budget: None,
                create_fault: CreateFault::OutOfMemory,
                plans: Default::default(),
                calls: [0; POINTS],
                injected: [0; POINTS],
                ledgers: HashMap::new(),
                violations: Vec::new(),
            }),
        }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- plans ------------------------------------------------------------

    /// Fails the `n`th call (1-based, counted since creation) to `point`.
    pub fn fail_at(&self, point: FaultPoint, n: u64) {
        self.st().plans[point as usize].at.insert(n);
    }

    /// Fails the next `count` calls to `point`.
    pub fn fail_next(&self, point: FaultPoint, count: u64) {
        let mut s = self.st();
        let done = s.calls[point as usize];
        s.plans[point as usize].at.extend(done + 1..=done + count);
    }

    /// Fails each call to `point` with probability `p`.
    pub fn set_probability(&self, point: FaultPoint, p: f64) {
        self.st().plans[point as usize].probability = p;
    }

    /// How injected `create` failures read (default: out of memory).
    pub fn set_create_fault(&self, kind: CreateFault) {
        self.st().create_fault = kind;
    }

    /// Pauses (false) or resumes (true) every injection; calls are still
    /// counted and plans kept.
    pub fn set_enabled(&self, enabled: bool) {
        self.st().enabled = enabled;
    }

    /// Injects at most `n` more faults (None: no cap). A harness that sets
    /// `Some(1)` before each operation gets the single-fault model: one
    /// failure per operation, never a failure during its recovery.
    pub fn set_fault_budget(&self, n: Option<u64>) {
        self.st().budget = n;
    }

    /// Forgets every plan and probability.
    pub fn disarm(&self) {
        self.st().plans = Default::default();
    }

    // ----- ledger -----------------------------------------------------------

    /// Calls made to `point` so far (failed ones included).
    pub fn calls(&self, point: FaultPoint) -> u64 {
        self.st().calls[point as usize]
    }

    /// Failures injected into `point` so far.
    pub fn injected(&self, point: FaultPoint) -> u64 {
        self.st().injected[point as usize]
    }

    /// Failures injected so far, all points.
    pub fn injected_total(&self) -> u64 {
        self.st().injected.iter().sum()
    }

    /// Handles created through the wrapper and not released.
    pub fn live_handles(&self, device: i32) -> usize {
        self.st().ledgers.get(&device).map_or(0, |l| l.handles.len())
    }

    /// Events recorded through the wrapper and not destroyed.
    pub fn live_events(&self, device: i32) -> u64 {
        self.st().ledgers.get(&device).map_or(0, |l| l.live_events)
    }

    /// Bytes mapped through the wrapper and not unmapped.
    pub fn mapped_bytes(&self, device: i32) -> u64 {
        self.st().ledgers.get(&device).map_or(0, |l| l.mapped_bytes)
    }

    /// Mapped ranges `(va, size)` in address order.
    pub fn mapped_ranges(&self, device: i32) -> Vec<(u64, u64)> {
        self.st().ledgers.get(&device).map_or(Vec::new(), |l| l.mapped.iter().map(|(&va, &(n, _))| (va, n)).collect())
    }

    /// Backups made through the wrapper and not dropped.
    pub fn live_backups(&self, device: i32) -> usize {
        self.st().ledgers.get(&device).map_or(0, |l| l.backups.len())
    }

    /// Reservations made through the wrapper and not unreserved.
    pub fn live_reservations(&self, device: i32) -> usize {
        self.st().ledgers.get(&device).map_or(0, |l| l.reservations.len())
    }

    /// Contract breaches seen so far (empty when the caller behaved).
    pub fn violations(&self) -> Vec<String> {
        self.st().violations.clone()
    }

    /// Unreserves every live reservation of `device` (the pool never does;
    /// tests that make many allocators call this after dropping one, so that
    /// address space and mappings do not pile up). Call only once nothing of
    /// the device is mapped.
    pub fn unreserve_all(&self, device: i32) -> Result<()> {
        let ranges: Vec<(u64, u64)> = self
            .st()
            .ledgers
            .get_mut(&device)
            .map_or(Vec::new(), |l| std::mem::take(&mut l.reservations).into_iter().collect());
        for (base, size) in ranges {
            self.inner.unreserve(device, base, size)?;
        }
        Ok(())
    }

    // ----- machinery --------------------------------------------------------

    /// Counts the call and says whether it fails now.
    fn should_fail(&self, point: FaultPoint) -> bool {
        let mut s = self.st();
        let i = point as usize;
        s.calls[i] += 1;
        if !s.enabled {
            return false;
        }
        let n = s.calls[i];
        let planned = s.plans[i].at.remove(&n);
        let p = s.plans[i].probability;
        let fail = (planned || s.rng.chance(p)) && s.budget != Some(0);
        if fail {
            s.injected[i] += 1;
            if let Some(b) = s.budget.as_mut() {
                *b -= 1;
            }
        }
        fail
    }

    fn injected_error(&self, point: FaultPoint) -> Error {
        let n = self.st().calls[point as usize];
        Error::Driver { call: point.name(), code: INJECTED_CODE, message: format!("injected fault (call {n})") }
    }

    fn violation(&self, text: String) {
        self.st().violations.push(text);
    }

    fn granularity_of(&self, device: i32) -> Option<u64> {
        if let Some(g) = self.st().ledgers.get(&device).and_then(|l| l.granularity) {
            return Some(g);
        }
        let g = self.inner.granularity(device).ok()?;
        self.st().ledgers.entry(device).or_default().granularity = Some(g);
        Some(g)
    }

    fn check_aligned(&self, call: &str, device: i32, va: u64, size: u64) {
        if let Some(g) = self.granularity_of(device)
            && (!va.is_multiple_of(g) || !size.is_multiple_of(g) || size == 0)
        {
            self.violation(format!("{call}({va:#x}, {size}) on device {device}: not whole granules of {g}"));
        }
    }

    /// Whether `[va, va+size)` is exactly covered by whole mapped ranges.
    fn covered_exactly(l: &Ledger, va: u64, size: u64) -> bool {
        let end = va + size;
        if let Some((&start, &(n, _))) = l.mapped.range(..va).next_back()
            && start + n > va
        {
            return false; // straddles the front
        }
        let mut at = va;
        for (&start, &(n, _)) in l.mapped.range(va..end) {
            if start != at || start + n > end {
                return false;
            }
            at = start + n;
        }
        at == end
    }

    /// Whether every byte of `[va, va + size)` is mapped (by handles side by
    /// side, the range's ends anywhere inside them).
    fn covered(l: &Ledger, va: u64, size: u64) -> bool {
        let end = va + size;
        let mut at = va;
        if let Some((&start, &(n, _))) = l.mapped.range(..=va).next_back()
            && start + n > va
        {
            at = start + n;
        }
        if at >= end {
            return true; // inside one mapping
        }
        for (&start, &(n, _)) in l.mapped.range(at..end) {
            if start != at {
                return false;
            }
            at = start + n;
        }
        at >= end
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn granularity(&self, device: i32) -> Result<u64> {
        self.inner.granularity(device)
    }
    fn device_count(&self) -> Result<i32> {
        self.inner.device_count()
    }
    fn mem_info(&self, device: i32) -> Result<(u64, u64)> {
        self.inner.mem_info(device)
    }

    fn reserve(&self, device: i32, size_bytes: u64, alignment: u64) -> Result<u64> {
        if self.should_fail(FaultPoint::Reserve) {
            return Err(self.injected_error(FaultPoint::Reserve));
        }
        let base = self.inner.reserve(device, size_bytes, alignment)?;
        self.st().ledgers.entry(device).or_default().reservations.insert(base, size_bytes);
        Ok(base)
    }

    fn unreserve(&self, device: i32, base: u64, size_bytes: u64) -> Result<()> {
        let mapped_inside =
            self.st().ledgers.get(&device).is_some_and(|l| l.mapped.range(base..base + size_bytes).next().is_some());
        if mapped_inside {
            self.violation(format!("unreserve({base:#x}, {size_bytes}) while part of it is mapped"));
        }
        self.inner.unreserve(device, base, size_bytes)?;
        if let Some(l) = self.st().ledgers.get_mut(&device) {
            l.reservations.remove(&base);
        }
        Ok(())
    }

    fn create(&self, device: i32, size_bytes: u64) -> Result<HandleId> {
        if let Some(g) = self.granularity_of(device)
            && (size_bytes == 0 || !size_bytes.is_multiple_of(g))
        {
            self.violation(format!("create({size_bytes}) on device {device}: not whole granules of {g}"));
        }
        if self.should_fail(FaultPoint::Create) {
            let mut s = self.st();
            let oom = match s.create_fault {
                CreateFault::OutOfMemory => true,
                CreateFault::Driver => false,
                CreateFault::Either => s.rng.next_u64() & 1 == 0,
            };
            drop(s);
            return Err(if oom {
                Error::OutOfMemory(Box::new(OomInfo { device, requested_bytes: size_bytes, ..Default::default() }))
            } else {
                self.injected_error(FaultPoint::Create)
            });
        }
        let h = self.inner.create(device, size_bytes)?;
        let mut s = self.st();
        if s.ledgers.entry(device).or_default().handles.insert(h, size_bytes).is_some() {
            s.violations.push(format!("create returned handle {h}, which is already live"));
        }
        Ok(h)
    }

    fn release(&self, device: i32, handle: HandleId) -> Result<()> {
        {
            let mut s = self.st();
            let l = s.ledgers.entry(device).or_default();
            let known = l.handles.contains_key(&handle);
            let mapped = l.mapped.values().any(|&(_, h)| h == handle);
            if !known {
                s.violations.push(format!("release of unknown handle {handle} on device {device}"));
            } else if mapped {
                s.violations.push(format!("release of handle {handle} while it is mapped"));
            }
        }
        if self.should_fail(FaultPoint::Release) {
            return Err(self.injected_error(FaultPoint::Release));
        }
        self.inner.release(device, handle)?;
        self.st().ledgers.entry(device).or_default().handles.remove(&handle);
        Ok(())
    }

    fn map(&self, device: i32, va: u64, size_bytes: u64, handle: HandleId) -> Result<()> {
        self.check_aligned("map", device, va, size_bytes);
        {
            let mut s = self.st();
            let l = s.ledgers.entry(device).or_default();
            let mut problems = Vec::new();
            match l.handles.get(&handle) {
                None => problems.push(format!("map of unknown handle {handle}")),
                Some(&n) if n != size_bytes => {
                    problems.push(format!("map of {size_bytes} bytes of handle {handle} of {n} bytes (handles map whole)"))
                }
                _ => {}
            }
            if l.mapped.values().any(|&(_, h)| h == handle) {
                problems.push(format!("map of handle {handle}, which is already mapped"));
            }
            let overlaps = l.mapped.range(..va + size_bytes).next_back().is_some_and(|(&start, &(n, _))| start + n > va);
            if overlaps {
                problems.push(format!("map at {va:#x} (+{size_bytes}) over a mapped range"));
            }
            s.violations.extend(problems);
        }
        if self.should_fail(FaultPoint::Map) {
            return Err(self.injected_error(FaultPoint::Map));
        }
        self.inner.map(device, va, size_bytes, handle)?;
        let mut s = self.st();
        let l = s.ledgers.entry(device).or_default();
        l.mapped.insert(va, (size_bytes, handle));
        l.mapped_bytes += size_bytes;
        Ok(())
    }

    fn set_access(&self, device: i32, va: u64, size_bytes: u64) -> Result<()> {
        self.check_aligned("set_access", device, va, size_bytes);
        {
            let mut s = self.st();
            let l = s.ledgers.entry(device).or_default();
            if !Self::covered_exactly(l, va, size_bytes) {
                s.violations.push(format!("set_access({va:#x}, {size_bytes}) over a range not wholly mapped"));
            }
        }
        if self.should_fail(FaultPoint::SetAccess) {
            return Err(self.injected_error(FaultPoint::SetAccess));
        }
        self.inner.set_access(device, va, size_bytes)
    }

    fn unmap(&self, device: i32, va: u64, size_bytes: u64) -> Result<()> {
        self.check_aligned("unmap", device, va, size_bytes);
        {
            let mut s = self.st();
            let l = s.ledgers.entry(device).or_default();
            if !Self::covered_exactly(l, va, size_bytes) {
                s.violations.push(format!(
                    "unmap({va:#x}, {size_bytes}): not exactly whole mapped handles side by side"
                ));
            }
        }
        if self.should_fail(FaultPoint::Unmap) {
            return Err(self.injected_error(FaultPoint::Unmap));
        }
        self.inner.unmap(device, va, size_bytes)?;
        let mut s = self.st();
        let l = s.ledgers.entry(device).or_default();
        let inside: Vec<u64> = l.mapped.range(va..va + size_bytes).map(|(&start, _)| start).collect();
        for start in inside {
            let (n, _) = l.mapped.remove(&start).expect("listed above");
            l.mapped_bytes -= n;
        }
        Ok(())
    }

    fn synchronize(&self, device: i32) -> Result<()> {
        if self.should_fail(FaultPoint::Synchronize) {
            return Err(self.injected_error(FaultPoint::Synchronize));
        }
        self.inner.synchronize(device)
    }

    fn record_event(&self, device: i32, stream: u64) -> Result<EventId> {
        if self.should_fail(FaultPoint::RecordEvent) {
            return Err(self.injected_error(FaultPoint::RecordEvent));
        }
        let e = self.inner.record_event(device, stream)?;
        self.st().ledgers.entry(device).or_default().live_events += 1;
        Ok(e)
    }

    fn event_done(&self, device: i32, event: EventId) -> Result<bool> {
        if self.should_fail(FaultPoint::EventDone) {
            return Err(self.injected_error(FaultPoint::EventDone));
        }
        self.inner.event_done(device, event)
    }

    fn capture_id(&self, device: i32, stream: u64) -> Result<Option<u64>> {
        if self.should_fail(FaultPoint::IsCapturing) {
            return Err(self.injected_error(FaultPoint::IsCapturing));
        }
        self.inner.capture_id(device, stream)
    }

    fn event_synchronize(&self, device: i32, event: EventId) -> Result<()> {
        if self.should_fail(FaultPoint::EventSynchronize) {
            return Err(self.injected_error(FaultPoint::EventSynchronize));
        }
        self.inner.event_synchronize(device, event)
    }

    fn destroy_event(&self, device: i32, event: EventId) -> Result<()> {
        if self.st().ledgers.get(&device).is_none_or(|l| l.live_events == 0) {
            self.violation(format!("destroy_event({event}) with no live event on device {device}"));
        }
        if self.should_fail(FaultPoint::DestroyEvent) {
            return Err(self.injected_error(FaultPoint::DestroyEvent));
        }
        self.inner.destroy_event(device, event)?;
        let mut s = self.st();
        let l = s.ledgers.entry(device).or_default();
        l.live_events = l.live_events.saturating_sub(1);
        Ok(())
    }

    fn stream_wait_event(&self, device: i32, stream: u64, event: EventId) -> Result<()> {
        if self.should_fail(FaultPoint::StreamWaitEvent) {
            return Err(self.injected_error(FaultPoint::StreamWaitEvent));
        }
        self.inner.stream_wait_event(device, stream, event)
    }
    fn backup(&self, device: i32, va: u64, size_bytes: u64, reuse: Option<BackupId>) -> Result<BackupId> {
        {
            let mut s = self.st();
            let l = s.ledgers.entry(device).or_default();
            let covered = Self::covered(l, va, size_bytes);
            let reuse_known = reuse.is_none_or(|id| l.backups.get(&id) == Some(&size_bytes));
            if !covered {
                s.violations.push(format!("backup({va:#x}, {size_bytes}) of a range not wholly mapped"));
            }
            if !reuse_known {
                s.violations.push(format!("backup({va:#x}, {size_bytes}) into {reuse:?}: not a live backup of that size"));
            }
        }
        if self.should_fail(FaultPoint::Backup) {
            // A copy into an earlier backup fails as a driver call does; only
            // new host memory can be short.
            return Err(match reuse {
                Some(_) => self.injected_error(FaultPoint::Backup),
                None => Error::OutOfMemory(Box::default()),
            });
        }
        let id = self.inner.backup(device, va, size_bytes, reuse)?;
        self.st().ledgers.entry(device).or_default().backups.insert(id, size_bytes);
        Ok(id)
    }
    fn restore(&self, device: i32, backup: BackupId, va: u64, size_bytes: u64) -> Result<()> {
        {
            let mut s = self.st();
            let l = s.ledgers.entry(device).or_default();
            let known = l.backups.get(&backup) == Some(&size_bytes);
            if !known || !Self::covered(l, va, size_bytes) {
                s.violations.push(format!("restore({backup}, {va:#x}, {size_bytes}): unknown backup or range not wholly mapped"));
            }
        }
        if self.should_fail(FaultPoint::Restore) {
            return Err(self.injected_error(FaultPoint::Restore));
        }
        self.inner.restore(device, backup, va, size_bytes)
    }
    fn drop_backup(&self, device: i32, backup: BackupId, size_bytes: u64) {
        let mut s = self.st();
        if s.ledgers.entry(device).or_default().backups.remove(&backup).is_none() {
            s.violations.push(format!("drop_backup({backup}): not a live backup"));
        }
        drop(s);
        self.inner.drop_backup(device, backup, size_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim::SimBackend;

    #[test]
    fn xorshift_is_deterministic_and_spread() {
        let (mut a, mut b) = (XorShift64::new(1), XorShift64::new(1));
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..8).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(XorShift64::new(1).next_u64(), XorShift64::new(2).next_u64());
        let mut r = XorShift64::new(7);
        let hits = (0..10_000).filter(|_| r.chance(0.25)).count();
        assert!((2000..3000).contains(&hits), "{hits}");
        assert!((0..1000).all(|_| r.below(10) < 10));
    }

    #[test]
    fn planned_faults_fail_exactly_those_calls_and_leave_no_trace() {
        let f = FaultyBackend::new(SimBackend::new(1, 1 << 30), 1);
        f.fail_at(FaultPoint::Create, 2);
        let h1 = f.create(0, 4096).unwrap();
        assert!(matches!(f.create(0, 4096), Err(Error::OutOfMemory(_))));
        f.set_create_fault(CreateFault::Driver);
        f.fail_next(FaultPoint::Create, 1);
        assert!(matches!(f.create(0, 4096), Err(Error::Driver { code: INJECTED_CODE, .. })));
        assert_eq!(f.live_handles(0), 1);
        assert_eq!(f.inner().live(0).0, 1, "failed creates never reached the inner backend");
        f.fail_next(FaultPoint::Map, 1);
        assert!(f.map(0, 1 << 20, 4096, h1).is_err());
        assert_eq!(f.mapped_bytes(0), 0);
        f.map(0, 1 << 20, 4096, h1).unwrap();
        assert_eq!(f.mapped_bytes(0), 4096);
        assert_eq!(f.calls(FaultPoint::Map), 2);
        assert_eq!(f.injected(FaultPoint::Map), 1);
        f.unmap(0, 1 << 20, 4096).unwrap();
        f.release(0, h1).unwrap();
        assert_eq!((f.live_handles(0), f.mapped_bytes(0)), (0, 0));
        assert!(f.violations().is_empty(), "{:?}", f.violations());
    }

    #[test]
    fn contract_breaches_are_recorded() {
        let f = FaultyBackend::new(SimBackend::new(1, 1 << 30), 1);
        let h = f.create(0, 8192).unwrap();
        f.map(0, 1 << 20, 8192, h).unwrap();
        f.release(0, h).ok(); // while mapped
        f.unmap(0, 1 << 20, 4096).ok(); // half a handle
        f.destroy_event(0, 5).ok(); // never recorded
        let v = f.violations();
        assert_eq!(v.len(), 3, "{v:?}");
    }

    #[test]
    fn probability_and_pause() {
        let f = FaultyBackend::new(SimBackend::new(1, 1 << 30), 3);
        f.set_probability(FaultPoint::Synchronize, 0.5);
        let fails = (0..1000).filter(|_| f.synchronize(0).is_err()).count();
        assert!((400..600).contains(&fails), "{fails}");
        f.set_enabled(false);
        assert!((0..100).all(|_| f.synchronize(0).is_ok()));
        f.set_enabled(true);
        f.disarm();
        assert!((0..100).all(|_| f.synchronize(0).is_ok()));
        assert_eq!(f.calls(FaultPoint::Synchronize), 1200);
    }
}
