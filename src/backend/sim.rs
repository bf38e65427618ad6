//! Simulated device: physical bytes are counted against a capacity, addresses
//! are numbers that nothing dereferences. Lets the pool run traces at sizes
//! larger than any GPU, fast. Events complete at once unless a test holds
//! them ([`SimBackend::hold_events`]), which models a device still busy.
//! Each handle and mapping call adds what it costs on an H200 to a modelled
//! driver time ([`SimBackend::modelled_driver_ns`]), so that policies can be
//! compared by time as well as by calls on the CPU.
#![forbid(unsafe_code)]

use super::{Backend, BackupId, EventId, HandleId};
use crate::error::{Error, OomInfo, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

const GRANULARITY: u64 = 4096;

/// What each call costs on an H200 (docs/driver-costs.md, driver 580), in
/// microseconds: a fixed part plus a part per MiB of the handle, or per
/// handle in the range (set access and unmap over many handles cost about
/// the same per handle). One 8 MiB handle: create 11, map 1, set access 29,
/// unmap 21, release 14; the parts per MiB and per handle are the H100's
/// shape (2 MiB to 512 MiB, 200 handles in one range) fitted to those.
const CREATE_US: (f64, f64) = (10.8, 0.02);
const RELEASE_US: (f64, f64) = (9.6, 0.55);
const MAP_US: f64 = 1.0;
const SET_ACCESS_US: (f64, f64) = (11.5, 17.5);
const UNMAP_US: (f64, f64) = (1.0, 20.0);
const MIB: f64 = (1u64 << 20) as f64;

#[derive(Default)]
struct SimDevice {
    used_bytes: u64,
    next_va: u64,
    next_id: u64,
    /// Handle id -> size in bytes, for every live handle.
    handles: HashMap<HandleId, u64>,
    /// Events recorded and not yet destroyed.
    live_events: u64,
    /// Backup id -> size: the simulated device has no bytes to copy.
    backups: HashMap<u64, u64>,
    /// Mapped bytes: a cheap cross-check of the pool's own counts.
    mapped_bytes: u64,
    /// Address -> size of every mapping, to count the handles a range holds.
    mappings: BTreeMap<u64, u64>,
    /// What the calls so far would have cost on an H200 (see `CREATE_US`).
    modelled_ns: f64,
}

impl SimDevice {
    fn handles_in(&self, va: u64, size_bytes: u64) -> f64 {
        self.mappings.range(va..va + size_bytes).count() as f64
    }
}

pub struct SimBackend {
    capacity_bytes: u64,
    devices: Vec<Mutex<SimDevice>>,
    held: AtomicBool,
    /// The stream that captures a graph, if any (every stream value is one).
    capturing: Mutex<Option<u64>>,
}

impl SimBackend {
    pub fn new(device_count: i32, capacity_bytes: u64) -> Self {
        let devices = (0..device_count)
            .map(|d| Mutex::new(SimDevice { next_va: 0x7e00_0000_0000 + ((d as u64) << 44), ..Default::default() }))
            .collect();
        SimBackend { capacity_bytes, devices, held: AtomicBool::new(false), capturing: Mutex::new(None) }
    }

    /// While held, no event completes: the simulated device is still busy.
    pub fn hold_events(&self, held: bool) {
        self.held.store(held, Ordering::SeqCst);
    }

    /// Marks `stream` as capturing a graph (None: no stream captures).
    pub fn set_capturing(&self, stream: Option<u64>) {
        *self.capturing.lock().unwrap_or_else(|p| p.into_inner()) = stream;
    }

    /// `(live handles, live events, mapped bytes)`, for leak checks.
    pub fn live(&self, device: i32) -> (usize, u64, u64) {
        let d = self.dev(device).unwrap();
        (d.handles.len(), d.live_events, d.mapped_bytes)
    }

    /// Live backups and their bytes, for leak checks.
    pub fn live_backups(&self, device: i32) -> (usize, u64) {
        self.dev(device).map(|d| (d.backups.len(), d.backups.values().sum())).unwrap_or((0, 0))
    }

    /// Nanoseconds the handle and mapping calls so far would have taken on
    /// an H200 (a model: see `CREATE_US`). Waits for the device cost nothing
    /// here: the simulated device is never busy for long.
    pub fn modelled_driver_ns(&self, device: i32) -> u64 {
        self.dev(device).map_or(0, |d| d.modelled_ns as u64)
    }

    fn dev(&self, device: i32) -> Result<std::sync::MutexGuard<'_, SimDevice>> {
        let d = self
            .devices
            .get(usize::try_from(device).map_err(|_| bad_device(device))?)
            .ok_or_else(|| bad_device(device))?;
        Ok(d.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn bad_device(device: i32) -> Error {
    Error::InvalidArgument(format!("device {device} does not exist"))
}

/// Ok if `id` is a live backup of `size_bytes`.
fn check_backup(d: &SimDevice, id: BackupId, size_bytes: u64) -> Result<()> {
    match d.backups.get(&id) {
        Some(&n) if n == size_bytes => Ok(()),
        _ => Err(Error::InvalidArgument(format!("no backup {id} of {size_bytes} bytes"))),
    }
}

impl Backend for SimBackend {
    fn name(&self) -> &'static str {
        "sim"
    }
    fn granularity(&self, _device: i32) -> Result<u64> {
        Ok(GRANULARITY)
    }
    fn device_count(&self) -> Result<i32> {
        Ok(self.devices.len() as i32)
    }
    fn mem_info(&self, device: i32) -> Result<(u64, u64)> {
        let d = self.dev(device)?;
        Ok((self.capacity_bytes - d.used_bytes, self.capacity_bytes))
    }
    fn reserve(&self, device: i32, size_bytes: u64, alignment: u64) -> Result<u64> {
        let mut d = self.dev(device)?;
        let base = d.next_va.div_ceil(alignment) * alignment;
        d.next_va = base + size_bytes;
        Ok(base)
    }
    fn unreserve(&self, _device: i32, _base: u64, _size_bytes: u64) -> Result<()> {
        Ok(())
    }
    fn create(&self, device: i32, size_bytes: u64) -> Result<HandleId> {
        let mut d = self.dev(device)?;
        if d.used_bytes + size_bytes > self.capacity_bytes {
            return Err(Error::OutOfMemory(Box::new(OomInfo { device, requested_bytes: size_bytes, ..Default::default() })));
        }
        d.used_bytes += size_bytes;
        d.modelled_ns += 1e3 * (CREATE_US.0 + CREATE_US.1 * size_bytes as f64 / MIB);
        d.next_id += 1;
        let id = d.next_id;
        d.handles.insert(id, size_bytes);
        Ok(id)
    }
    fn release(&self, device: i32, handle: HandleId) -> Result<()> {
        let mut d = self.dev(device)?;
        let size = d.handles.remove(&handle).ok_or_else(|| Error::Driver {
            call: "sim_release",
            code: 1,
            message: format!("unknown handle {handle}"),
        })?;
        d.used_bytes -= size;
        d.modelled_ns += 1e3 * (RELEASE_US.0 + RELEASE_US.1 * size as f64 / MIB);
        Ok(())
    }
    fn map(&self, device: i32, va: u64, size_bytes: u64, handle: HandleId) -> Result<()> {
        let mut d = self.dev(device)?;
        match d.handles.get(&handle) {
            Some(&hsize) if size_bytes == hsize => {
                d.mapped_bytes += size_bytes;
                d.mappings.insert(va, size_bytes);
                d.modelled_ns += 1e3 * MAP_US;
                Ok(())
            }
            _ => Err(Error::Driver { call: "sim_map", code: 1, message: format!("bad handle {handle} or range") }),
        }
    }
    fn set_access(&self, device: i32, va: u64, size_bytes: u64) -> Result<()> {
        let mut d = self.dev(device)?;
        d.modelled_ns += 1e3 * (SET_ACCESS_US.0 + SET_ACCESS_US.1 * d.handles_in(va, size_bytes));
        Ok(())
    }
    fn unmap(&self, device: i32, va: u64, size_bytes: u64) -> Result<()> {
        let mut d = self.dev(device)?;
        d.mapped_bytes -= size_bytes;
        let inside: Vec<u64> = d.mappings.range(va..va + size_bytes).map(|(&a, _)| a).collect();
        d.modelled_ns += 1e3 * (UNMAP_US.0 + UNMAP_US.1 * inside.len() as f64);
        for a in inside {
            d.mappings.remove(&a);
        }
        Ok(())
    }
    fn synchronize(&self, _device: i32) -> Result<()> {
        // A synchronize waits for the device: held events complete now.
        self.held.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn record_event(&self, device: i32, _stream: u64) -> Result<EventId> {
        let mut d = self.dev(device)?;
        d.live_events += 1;
        d.next_id += 1;
        Ok(d.next_id)
    }
    fn event_done(&self, _device: i32, _event: EventId) -> Result<bool> {
        Ok(!self.held.load(Ordering::SeqCst))
    }
    fn capture_id(&self, _device: i32, stream: u64) -> Result<Option<u64>> {
        let capturing = *self.capturing.lock().unwrap_or_else(|p| p.into_inner());
        // The capture's id: the capturing stream, plus a base (never 0).
        Ok((capturing == Some(stream)).then_some(1001u64.wrapping_add(stream).max(1)))
    }
    fn event_synchronize(&self, _device: i32, _event: EventId) -> Result<()> {
        // Waiting for the simulated device: held events complete now.
        self.held.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn destroy_event(&self, device: i32, _event: EventId) -> Result<()> {
        self.dev(device)?.live_events -= 1;
        Ok(())
    }
    fn stream_wait_event(&self, _device: i32, _stream: u64, _event: EventId) -> Result<()> {
        Ok(())
    }
    fn backup(&self, device: i32, _va: u64, size_bytes: u64, reuse: Option<BackupId>) -> Result<BackupId> {
        let mut d = self.dev(device)?;
        if let Some(id) = reuse {
            return check_backup(&d, id, size_bytes).map(|_| id);
        }
        d.next_id += 1;
        let id = d.next_id;
        d.backups.insert(id, size_bytes);
        Ok(id)
    }
    fn restore(&self, device: i32, backup: BackupId, _va: u64, size_bytes: u64) -> Result<()> {
        check_backup(&*self.dev(device)?, backup, size_bytes)
    }
    fn drop_backup(&self, device: i32, backup: BackupId, _size_bytes: u64) {
        if let Ok(mut d) = self.dev(device) {
            d.backups.remove(&backup);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stream_value_is_a_stream_for_captures() {
        let sim = SimBackend::new(1, 1 << 30);
        for s in [0, 1, u64::MAX - 1, u64::MAX] {
            assert_eq!(sim.capture_id(0, s).unwrap(), None, "stream {s:#x} reads as capturing");
        }
        sim.set_capturing(Some(u64::MAX));
        assert!(sim.capture_id(0, u64::MAX).unwrap().is_some_and(|id| id != 0));
        assert_eq!(sim.capture_id(0, 0).unwrap(), None);
    }

    #[test]
    fn modelled_time_counts_handles_in_a_range() {
        let sim = SimBackend::new(1, 1 << 30);
        let g = 2 << 20;
        let va = sim.reserve(0, 64 * g, g).unwrap();
        let hs: Vec<HandleId> = (0..3).map(|_| sim.create(0, g).unwrap()).collect();
        let after_create = sim.modelled_driver_ns(0);
        assert!((after_create as f64 - 3.0 * 1e3 * (CREATE_US.0 + CREATE_US.1 * 2.0)).abs() < 2.0);
        for (i, &h) in hs.iter().enumerate() {
            sim.map(0, va + i as u64 * g, g, h).unwrap();
        }
        sim.set_access(0, va, 3 * g).unwrap();
        let mapped = sim.modelled_driver_ns(0) - after_create;
        let want = 1e3 * (3.0 * MAP_US + SET_ACCESS_US.0 + 3.0 * SET_ACCESS_US.1);
        assert!((mapped as f64 - want).abs() < 2.0, "{mapped} ns, want {want}");
        // Unmapping two of the three handles costs two handles' worth.
        let before = sim.modelled_driver_ns(0);
        sim.unmap(0, va + g, 2 * g).unwrap();
        let unmapped = sim.modelled_driver_ns(0) - before;
        assert!((unmapped as f64 - 1e3 * (UNMAP_US.0 + 2.0 * UNMAP_US.1)).abs() < 2.0);
        assert_eq!(sim.live(0).2, g, "one handle still mapped");
    }
}
