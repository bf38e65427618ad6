//! Simulated device: physical bytes are counted against a capacity, addresses
//! are numbers that nothing dereferences. Lets the pool run traces at sizes
//! larger than any GPU, fast. Events complete at once unless a test holds
//! them ([`SimBackend::hold_events`]), which models a device still busy.
#![forbid(unsafe_code)]

use super::{Backend, EventId, HandleId};
use crate::error::{Error, OomInfo, Result};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const GRANULARITY: u64 = 4096;

#[derive(Default)]
struct SimDevice {
    used_bytes: u64,
    next_va: u64,
    next_id: u64,
    /// Handle id -> size in bytes, for every live handle.
    handles: HashMap<HandleId, u64>,
    /// Events recorded and not yet destroyed.
    live_events: u64,
    /// Mapped bytes: a cheap cross-check of the pool's own counts.
    mapped_bytes: u64,
}

pub struct SimBackend {
    capacity_bytes: u64,
    devices: Vec<Mutex<SimDevice>>,
    held: AtomicBool,
    /// The stream that captures a graph, plus one (0: none).
    capturing: AtomicU64,
}

impl SimBackend {
    pub fn new(device_count: i32, capacity_bytes: u64) -> Self {
        let devices = (0..device_count)
            .map(|d| Mutex::new(SimDevice { next_va: 0x7e00_0000_0000 + ((d as u64) << 44), ..Default::default() }))
            .collect();
        SimBackend { capacity_bytes, devices, held: AtomicBool::new(false), capturing: AtomicU64::new(0) }
    }

    /// While held, no event completes: the simulated device is still busy.
    pub fn hold_events(&self, held: bool) {
        self.held.store(held, Ordering::SeqCst);
    }

    /// Marks `stream` as capturing a graph (None: no stream captures).
    pub fn set_capturing(&self, stream: Option<u64>) {
        self.capturing.store(stream.map_or(0, |s| s.wrapping_add(1)), Ordering::SeqCst);
    }

    /// `(live handles, live events, mapped bytes)`, for leak checks.
    pub fn live(&self, device: i32) -> (usize, u64, u64) {
        let d = self.dev(device).unwrap();
        (d.handles.len(), d.live_events, d.mapped_bytes)
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
        Ok(())
    }
    fn map(&self, device: i32, _va: u64, size_bytes: u64, handle: HandleId) -> Result<()> {
        let mut d = self.dev(device)?;
        match d.handles.get(&handle) {
            Some(&hsize) if size_bytes == hsize => {
                d.mapped_bytes += size_bytes;
                Ok(())
            }
            _ => Err(Error::Driver { call: "sim_map", code: 1, message: format!("bad handle {handle} or range") }),
        }
    }
    fn set_access(&self, _device: i32, _va: u64, _size_bytes: u64) -> Result<()> {
        Ok(())
    }
    fn unmap(&self, device: i32, _va: u64, size_bytes: u64) -> Result<()> {
        let mut d = self.dev(device)?;
        d.mapped_bytes -= size_bytes;
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
        let capturing = self.capturing.load(Ordering::SeqCst);
        // The capture's id is the capturing stream plus one, plus a base.
        Ok((capturing == stream.wrapping_add(1)).then_some(1000 + capturing))
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
}
