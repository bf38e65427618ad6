//! Host backend (Linux): a reservation is an anonymous `PROT_NONE` mapping;
//! each device has one memfd, and a handle is a range of it (freed ranges
//! are reused; released memory is punched out of the file), so handles cost
//! no file descriptor each; mapping a handle is `mmap(MAP_FIXED |
//! MAP_SHARED)` of its range. The memory is real, so tests write and read
//! every allocated byte, and a run mapped at two places shows overlap as
//! shared bytes. Streams are synchronous here: events complete at once.
//! Invariants: the handles' ranges never overlap; free ranges are
//! coalesced; `used_bytes` is the sum of the handles' sizes.

use super::{Backend, BackupId, EventId, HandleId};
use crate::error::{Error, OomInfo, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Default)]
struct HostDevice {
    used_bytes: u64,
    /// The device's memfd (-1 before the first handle) and its size.
    fd: i32,
    file_bytes: u64,
    /// Handle id -> (offset in the file, size in bytes).
    handles: HashMap<HandleId, (u64, u64)>,
    /// Backup id -> the bytes copied (see `Backend::backup`).
    backups: HashMap<u64, Vec<u8>>,
    /// Ranges of the file no handle holds: offset -> size.
    free: BTreeMap<u64, u64>,
    next_id: HandleId,
}

impl HostDevice {
    /// A range of `size` bytes of the file: the smallest free one that
    /// fits, else new bytes at its end.
    fn take_range(&mut self, size: u64) -> Result<u64> {
        if self.fd < 0 {
            // SAFETY: the name is a valid NUL-terminated string.
            let fd = unsafe { libc::memfd_create(c"tessera".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(os_error("memfd_create"));
            }
            self.fd = fd;
        }
        let fit = self.free.iter().filter(|&(_, &n)| n >= size).min_by_key(|&(&at, &n)| (n, at)).map(|(&at, &n)| (at, n));
        if let Some((at, n)) = fit {
            self.free.remove(&at);
            if n > size {
                self.free.insert(at + size, n - size);
            }
            return Ok(at);
        }
        let at = self.file_bytes;
        // SAFETY: fd is this device's memfd; growing it allocates nothing.
        if unsafe { libc::ftruncate(self.fd, (at + size) as libc::off_t) } != 0 {
            return Err(os_error("ftruncate"));
        }
        self.file_bytes = at + size;
        Ok(at)
    }

    /// Gives `[at, at + size)` back: its memory is punched out of the file
    /// and the range joins its free neighbours.
    fn give_range(&mut self, mut at: u64, mut size: u64) {
        // SAFETY: fd is this device's memfd; the range is one no handle holds now.
        unsafe {
            libc::fallocate(self.fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, at as libc::off_t, size as libc::off_t);
        }
        if let Some((&before, &n)) = self.free.range(..at).next_back()
            && before + n == at
        {
            self.free.remove(&before);
            at = before;
            size += n;
        }
        if let Some(n) = self.free.remove(&(at + size)) {
            size += n;
        }
        self.free.insert(at, size);
    }
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
            devices: (0..device_count).map(|_| Mutex::new(HostDevice { fd: -1, ..HostDevice::default() })).collect(),
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

    /// Live backups and their bytes, for leak checks in tests.
    pub fn live_backups(&self, device: i32) -> (usize, u64) {
        self.dev(device).map(|d| (d.backups.len(), d.backups.values().map(|b| b.len() as u64).sum())).unwrap_or((0, 0))
    }
}

impl Drop for HostBackend {
    /// Closes the devices' memfds (what is still mapped keeps its memory).
    fn drop(&mut self) {
        for d in &self.devices {
            let d = d.lock().unwrap_or_else(|p| p.into_inner());
            if d.fd >= 0 {
                // SAFETY: the memfd is this backend's and used by nothing after it.
                unsafe { libc::close(d.fd) };
            }
        }
    }
}

/// The bytes of live backup `id`, which must hold `size_bytes`.
fn backup_of(d: &mut HostDevice, id: BackupId, size_bytes: u64) -> Result<&mut Vec<u8>> {
    let bytes = d.backups.get_mut(&id).ok_or_else(|| Error::InvalidArgument(format!("no backup {id}")))?;
    if bytes.len() as u64 != size_bytes {
        return Err(Error::InvalidArgument(format!("backup {id} holds {} bytes, not {size_bytes}", bytes.len())));
    }
    Ok(bytes)
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
        let at = d.take_range(size_bytes)?;
        d.used_bytes += size_bytes;
        d.next_id += 1;
        let id = d.next_id;
        d.handles.insert(id, (at, size_bytes));
        Ok(id)
    }
    fn release(&self, device: i32, handle: HandleId) -> Result<()> {
        let mut d = self.dev(device)?;
        let (at, size) = d.handles.remove(&handle).ok_or_else(|| Error::Driver {
            call: "release(handle)",
            code: libc::EBADF as i64,
            message: format!("unknown handle {handle}"),
        })?;
        d.used_bytes -= size;
        d.give_range(at, size);
        Ok(())
    }
    fn map(&self, device: i32, va: u64, size_bytes: u64, handle: HandleId) -> Result<()> {
        let d = self.dev(device)?;
        let at = match d.handles.get(&handle) {
            Some(&(at, hsize)) if size_bytes == hsize => at,
            _ => return Err(Error::Driver { call: "mmap(map)", code: libc::EINVAL as i64, message: "bad handle or range".into() }),
        };
        // SAFETY: [va, va+size) lies in one of our reservations and is
        // currently unmapped (the pool's invariant), so MAP_FIXED replaces
        // only our own PROT_NONE placeholder; the file range is the handle's.
        let p = unsafe {
            libc::mmap(
                va as *mut libc::c_void,
                size_bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                d.fd,
                at as libc::off_t,
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
    fn backup(&self, device: i32, va: u64, size_bytes: u64, reuse: Option<BackupId>) -> Result<BackupId> {
        if let Some(id) = reuse {
            let mut d = self.dev(device)?;
            let bytes = backup_of(&mut d, id, size_bytes)?;
            // SAFETY: the range is mapped read-write (contract) and nothing
            // writes it meanwhile; `bytes` holds size_bytes.
            unsafe { std::ptr::copy_nonoverlapping(va as *const u8, bytes.as_mut_ptr(), size_bytes as usize) };
            return Ok(id);
        }
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(size_bytes as usize).map_err(|_| Error::OutOfMemory(Box::default()))?;
        // SAFETY: the range is mapped read-write (contract) and nothing writes
        // it meanwhile; `bytes` has room for size_bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(va as *const u8, bytes.as_mut_ptr(), size_bytes as usize);
            bytes.set_len(size_bytes as usize);
        }
        let mut d = self.dev(device)?;
        d.next_id += 1;
        let id = d.next_id;
        d.backups.insert(id, bytes);
        Ok(id)
    }
    fn restore(&self, device: i32, backup: BackupId, va: u64, size_bytes: u64) -> Result<()> {
        let mut d = self.dev(device)?;
        let bytes = backup_of(&mut d, backup, size_bytes)?;
        // SAFETY: the range is mapped read-write (contract) and of size_bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), va as *mut u8, size_bytes as usize) };
        Ok(())
    }
    fn drop_backup(&self, device: i32, backup: BackupId, _size_bytes: u64) {
        if let Ok(mut d) = self.dev(device) {
            d.backups.remove(&backup);
        }
    }
}
