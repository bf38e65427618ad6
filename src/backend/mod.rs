//! The primitive layer: what the allocator needs from a device, and nothing
//! more. No policy and no counting live here; [`crate::pool`] does both.
//!
//! Contract, for every implementation:
//! - Addresses and sizes given to `map`, `unmap` and `set_access`, and sizes
//!   given to `create`, are multiples of `granularity()`. `reserve` returns a
//!   base aligned to `alignment`.
//! - A handle maps whole, at one address at a time (CUDA answers 801, not
//!   supported, to a map at a non-zero offset into a handle). `unmap` may
//!   cover several whole handles mapped side by side. `release` is called only when
//!   no piece of the handle is mapped. `unreserve` only when nothing in the
//!   range is mapped.
//! - `map` makes the range readable and writable from the device only once
//!   `set_access` covered it (the allocator calls it once per new range).
//! - `create` reports lack of memory as [`crate::error::Error::OutOfMemory`] and every
//!   other failure as [`crate::error::Error::Driver`]; it never panics.
//! - Streams and events are opaque `u64`s. Work on one stream runs in order.
//!   `record_event(s)` marks the point that `s` has reached in its queue;
//!   `event_done` says whether the device has passed it; `stream_wait_event`
//!   makes a stream wait for an event without blocking the host. An event id
//!   may be reused for a new record once `destroy_event` returned.
//! - `unmap` and `release` are not stream-ordered: the caller makes sure that
//!   no queued work touches the range (by events or `synchronize`) first.
//! - `backup` copies a mapped range into host memory that the backend holds
//!   (page-locked on CUDA) and `restore` copies it back to a mapped,
//!   accessible range of the same size; each returns once its copy is done.
//!   The caller makes sure that no queued work writes the range first. A
//!   backup lives until `drop_backup`. Given `reuse`, an earlier backup of
//!   the same size, `backup` copies into it (overwriting it) and takes no
//!   new host memory; when that copy fails, `reuse` is still a live backup.
//! - Every method may be called from any thread; implementations are Sync.

pub mod cuda;
/// cbindgen:ignore
#[cfg(feature = "testing")]
pub mod faulty;
pub mod host;
pub mod sim;

use crate::config::{BackendKind, Config};
use crate::error::Result;

/// A physical allocation, as the backend names it.
pub type HandleId = u64;
/// A recorded point in a stream, as the backend names it.
pub type EventId = u64;
/// A copy of device memory held in host memory, as the backend names it.
pub type BackupId = u64;

pub trait Backend: Send + Sync {
    /// Name for logs and reports ("cuda", "host", "sim").
    fn name(&self) -> &'static str;
    /// The unit of create/map sizes, offsets and addresses, in bytes.
    fn granularity(&self, device: i32) -> Result<u64>;
    fn device_count(&self) -> Result<i32>;
    /// `(free_bytes, total_bytes)` of the device as its owner sees it.
    fn mem_info(&self, device: i32) -> Result<(u64, u64)>;

    fn reserve(&self, device: i32, size_bytes: u64, alignment: u64) -> Result<u64>;
    fn unreserve(&self, device: i32, base: u64, size_bytes: u64) -> Result<()>;
    fn create(&self, device: i32, size_bytes: u64) -> Result<HandleId>;
    fn release(&self, device: i32, handle: HandleId) -> Result<()>;
    /// Maps the whole handle (of `size_bytes`) at `va`.
    fn map(&self, device: i32, va: u64, size_bytes: u64, handle: HandleId) -> Result<()>;
    fn set_access(&self, device: i32, va: u64, size_bytes: u64) -> Result<()>;
    fn unmap(&self, device: i32, va: u64, size_bytes: u64) -> Result<()>;

    /// Waits until all work queued on the device is done.
    fn synchronize(&self, device: i32) -> Result<()>;
    fn record_event(&self, device: i32, stream: u64) -> Result<EventId>;
    fn event_done(&self, device: i32, event: EventId) -> Result<bool>;
    /// The id of the CUDA graph capture `stream` takes part in now, if any
    /// (0 never names a capture). Work queued on a capturing stream does not
    /// run, so no wait on it may be asked then.
    fn capture_id(&self, device: i32, stream: u64) -> Result<Option<u64>>;
    /// Whether `stream` is capturing a CUDA graph now.
    fn is_capturing(&self, device: i32, stream: u64) -> Result<bool> {
        Ok(self.capture_id(device, stream)?.is_some())
    }
    /// Blocks the calling thread until the device has passed `event`.
    fn event_synchronize(&self, device: i32, event: EventId) -> Result<()>;
    fn destroy_event(&self, device: i32, event: EventId) -> Result<()>;
    fn stream_wait_event(&self, device: i32, stream: u64, event: EventId) -> Result<()>;

    /// Copies `size_bytes` at `va` into host memory, or into backup `reuse`
    /// of the same size (see the contract); returns the backup. Lack of
    /// host memory is [`crate::error::Error::OutOfMemory`].
    fn backup(&self, device: i32, va: u64, size_bytes: u64, reuse: Option<BackupId>) -> Result<BackupId>;
    /// Copies `backup` (of `size_bytes`) back to `va`.
    fn restore(&self, device: i32, backup: BackupId, va: u64, size_bytes: u64) -> Result<()>;
    /// Frees the host memory of `backup` (of `size_bytes`).
    fn drop_backup(&self, device: i32, backup: BackupId, size_bytes: u64);
}

/// Builds the backend that the configuration names.
pub fn create(config: &Config) -> Result<Box<dyn Backend>> {
    Ok(match config.backend {
        BackendKind::Cuda => Box::new(cuda::CudaBackend::new()?),
        BackendKind::Host => Box::new(host::HostBackend::new(config.device_count as i32, config.device_capacity.0)),
        BackendKind::Sim => Box::new(sim::SimBackend::new(config.device_count as i32, config.device_capacity.0)),
    })
}
