//! Host backend (Linux): a reservation is an anonymous `PROT_NONE` mapping,
//! a handle is a memfd of the handle's size, and mapping a granule run is
//! `mmap(MAP_FIXED | MAP_SHARED)` of the memfd at an offset. The memory is
//! real, so tests write and read every allocated byte, and a run mapped at
//! two places shows overlap as shared bytes. Streams are synchronous here:
//! events complete at once.

use super::{Backend, EventId, HandleId};
use crate::error::{Error, OomInfo, Result};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
struct HostDevice {
    used_bytes: u64,
    /// Handle id (the memfd) -> size in bytes.
    handles: HashMap<HandleId, u64>,
}

pub struct HostBackend {
    capacity_bytes: u64,
    page_bytes: u64,
    devices: Vec<Mutex<HostDevice>>,
}

fn os_error(call: &'static str) -> Error {
    let e = std::io::Error::last_os_error();
    Error::Driver { call, code: e.raw_os_error().unwrap_or(-1) as i64, message: e.to_string() }
}

impl HostBackend {
    pub fn new(device_count: i32, capacity_bytes: u64) -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        HostBackend {
            capacity_bytes,
            page_bytes: page,
            devices: (0..device_count).map(|_| Mutex::new(HostDevice::default())).collect(),
        }
    }

    fn dev(&self, device: i32) -> Result<std::sync::MutexGuard<'_, HostDevice>> {
        let d = usize::try_from(device)
            .ok()
            .and_then(|i| self.devices.get(i))
            .ok_or_else(|| Error::InvalidArgument(format!("device {device} does not exist")))?;
        Ok(d.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Live handles, for leak checks in tests.
    pub fn live_handles(&self, device: i32) -> usize {
        self.dev(device).map(|d| d.handles.len()).unwrap_or(0)
    }
}

impl Backend for HostBackend {
    fn name(&self) -> &'static str {
        "host"
    }
    fn granularity(&self, _device: i32) -> Result<u64> {
        Ok(self.page_bytes)
    }
    fn device_count(&self) -> Result<i32> {
        Ok(self.devices.len() as i32)
    }
    fn mem_info(&self, device: i32) -> Result<(u64, u64)> {
        let d = self.dev(device)?;
        Ok((self.capacity_bytes - d.used_bytes, self.capacity_bytes))
    }
    fn reserve(&self, _device: i32, size_bytes: u64, alignment: u64) -> Result<u64> {
        let total = size_bytes + alignment;
        // SAFETY: a fresh anonymous PROT_NONE mapping; the kernel picks the place.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_error("mmap(reserve)"));
        }
        let start = p as u64;
        let base = start.div_ceil(alignment) * alignment;
        // SAFETY: both trims lie inside the mapping just made, outside [base, base+size).
        unsafe {
            if base > start {
                libc::munmap(p, (base - start) as usize);
            }
            let end = base + size_bytes;
            if start + total > end {
                libc::munmap(end as *mut libc::c_void, (start + total - end) as usize);
            }
        }
        Ok(base)
    }
    fn unreserve(&self, _device: i32, base: u64, size_bytes: u64) -> Result<()> {
        // SAFETY: [base, base+size) is a reservation made by `reserve`; the
        // pool calls this only once nothing in it is in use.
        if unsafe { libc::munmap(base as *mut libc::c_void, size_bytes as usize) } != 0 {
            return Err(os_error("munmap(unreserve)"));
        }
        Ok(())
    }
    fn create(&self, device: i32, size_bytes: u64) -> Result<HandleId> {
        let mut d = self.dev(device)?;
        if d.used_bytes + size_bytes > self.capacity_bytes {
            return Err(Error::OutOfMemory(Box::new(OomInfo { device, requested_bytes: size_bytes, ..Default::default() })));
        }
        // SAFETY: the name is a valid NUL-terminated string.
        let fd = unsafe { libc::memfd_create(c"tessera".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os_error("memfd_create"));
        }
        // SAFETY: fd is the memfd just created and owned here.
        if unsafe { libc::ftruncate(fd, size_bytes as libc::off_t) } != 0 {
            let e = os_error("ftruncate");
            // SAFETY: fd is ours and not used after this.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        d.used_bytes += size_bytes;
        d.handles.insert(fd as HandleId, size_bytes);
        Ok(fd as HandleId)
    }
    fn release(&self, device: i32, handle: HandleId) -> Result<()> {
        let mut d = self.dev(device)?;
        let size = d.handles.remove(&handle).ok_or_else(|| Error::Driver {
            call: "close(handle)",
            code: libc::EBADF as i64,
            message: format!("unknown handle {handle}"),
        })?;
        d.used_bytes -= size;
        // SAFETY: the fd was created by `create` and is closed once, here.
        unsafe { libc::close(handle as i32) };
        Ok(())
    }
    fn map(&self, device: i32, va: u64, size_bytes: u64, handle: HandleId) -> Result<()> {
        match self.dev(device)?.handles.get(&handle) {
            Some(&hsize) if size_bytes == hsize => {}
            _ => return Err(Error::Driver { call: "mmap(map)", code: libc::EINVAL as i64, message: "bad handle or range".into() }),
        }
        // SAFETY: [va, va+size) lies in one of our reservations and is
        // currently unmapped (the pool's invariant), so MAP_FIXED replaces
        // only our own PROT_NONE placeholder.
        let p = unsafe {
            libc::mmap(
                va as *mut libc::c_void,
                size_bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                handle as i32,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_error("mmap(map)"));
        }
        Ok(())
    }
    fn set_access(&self, _device: i32, _va: u64, _size_bytes: u64) -> Result<()> {
        Ok(())
    }
    fn unmap(&self, _device: i32, va: u64, size_bytes: u64) -> Result<()> {
        // SAFETY: the range lies in one of our reservations; it goes back to
        // a PROT_NONE placeholder so the address space stays reserved.
        let p = unsafe {
            libc::mmap(
                va as *mut libc::c_void,
                size_bytes as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_error("mmap(unmap)"));
        }
        Ok(())
    }
    fn synchronize(&self, _device: i32) -> Result<()> {
        Ok(())
    }
    fn record_event(&self, _device: i32, _stream: u64) -> Result<EventId> {
        Ok(1)
    }
    fn event_done(&self, _device: i32, _event: EventId) -> Result<bool> {
        Ok(true)
    }
    fn capture_id(&self, _device: i32, _stream: u64) -> Result<Option<u64>> {
        Ok(None)
    }
    fn event_synchronize(&self, _device: i32, _event: EventId) -> Result<()> {
        Ok(())
    }
    fn destroy_event(&self, _device: i32, _event: EventId) -> Result<()> {
        Ok(())
    }
    fn stream_wait_event(&self, _device: i32, _stream: u64, _event: EventId) -> Result<()> {
        Ok(())
    }
}
