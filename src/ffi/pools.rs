//! The C ABI of blocks and private pools: every mapped block as it is, and
//! the pools a caller names (PyTorch's memory pools, through the torch
//! adaptor): allocation into one, its live blocks, an exact claim out of its
//! cache (a checkpoint put back), its release.

use super::{check_size, cudaStream_t, guarded};
use crate::allocator;
use crate::error::Error;
use crate::pool::BlockState;
use std::ffi::{c_int, c_void};

/// What a block is, in `TesseraBlock.state`.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TesseraBlockState {
    /// Handed out to a caller.
    Allocated = 0,
    /// Free and mapped, ready for reuse.
    Cached = 1,
    /// Freed, waiting for other streams (record_stream).
    PendingFree = 2,
}

/// One block, as `tessera_blocks` and `tessera_pool_blocks` write it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TesseraBlock {
    pub addr: u64,
    pub size: u64,
    /// Bytes the caller asked for (allocated blocks).
    pub requested: u64,
    pub stream: u64,
    /// The named private pool it belongs to (0: none).
    pub pool: u64,
    /// 0: the small arena (PyTorch's small pool), 1: the large one.
    pub arena: i32,
    /// A `TesseraBlockState`.
    pub state: i32,
}

/// Writes `items` into `out` (at most `capacity`); returns how many there are.
fn write_blocks(items: &[TesseraBlock], out: *mut TesseraBlock, capacity: usize) -> Result<i64, Error> {
    if out.is_null() && capacity > 0 {
        return Err(Error::InvalidArgument("block output pointer is NULL".into()));
    }
    for (i, b) in items.iter().take(capacity).enumerate() {
        // SAFETY: out holds `capacity` entries (caller's contract), i < capacity.
        unsafe { out.add(i).write(*b) };
    }
    Ok(items.len() as i64)
}

/// Writes every mapped block of `device`, in address order, into `out` (at
/// most `capacity` of them; blocks handed out by the front caches show as
/// allocated), without changing anything. Consecutive blocks of one arena
/// with no gap between them form a segment. Returns how many blocks there
/// are (call with NULL, 0 to ask), or -1.
/// # Safety
/// `out` is NULL or points to `capacity` writable `TesseraBlock`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_blocks(device: c_int, out: *mut TesseraBlock, capacity: usize) -> i64 {
    guarded("blocks", -1, || {
        let views = allocator::global()?.device(device)?.segments();
        let items: Vec<TesseraBlock> = views
            .iter()
            .flat_map(|(_, blocks)| blocks.iter())
            .map(|v| TesseraBlock {
                addr: v.addr,
                size: v.size,
                requested: v.requested,
                stream: v.stream,
                pool: v.pool,
                arena: v.arena as i32,
                state: match v.state {
                    BlockState::Allocated => TesseraBlockState::Allocated,
                    BlockState::Cached => TesseraBlockState::Cached,
                    BlockState::PendingFree => TesseraBlockState::PendingFree,
                } as i32,
            })
            .collect();
        write_blocks(&items, out, capacity)
    })
}

/// Allocates as `tessera_try_malloc`, in private pool `pool` (a number of
/// the caller's, 1 to 2^61 - 1): the block comes from and goes back to that
/// pool's own cache, which nothing outside the pool uses, until
/// `tessera_release_pool`. For PyTorch's memory pools (the torch adaptor).
#[unsafe(no_mangle)]
pub extern "C" fn tessera_try_malloc_in_pool(size: libc::ssize_t, device: c_int, stream: cudaStream_t, pool: u64) -> *mut c_void {
    guarded("malloc_in_pool", std::ptr::null_mut(), || {
        let size = check_size(size, device)?;
        if size == 0 {
            return Ok(std::ptr::null_mut());
        }
        Ok(allocator::global()?.malloc_in_pool(size, device, stream as u64, check_pool(pool)?)? as *mut c_void)
    })
}

/// A pool number a caller may name: 1 to 2^61 - 1.
fn check_pool(pool: u64) -> Result<u64, Error> {
    if pool == 0 || pool >= 1 << 61 {
        return Err(Error::InvalidArgument(format!("pool {pool} is not a pool number (1 to 2^61 - 1)")));
    }
    Ok(pool)
}

/// Private pool `pool` of `device` is gone: its cached memory joins the
/// general cache, its live blocks will when freed. Returns the bytes
/// released, or -1.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_release_pool(device: c_int, pool: u64) -> i64 {
    guarded("release_pool", -1, || Ok(allocator::global()?.device(device)?.release_pool(check_pool(pool)?)? as i64))
}

/// Writes the live blocks of private pool `pool` of `device`, in address
/// order, into `out` (at most `capacity`). Returns how many there are, or -1.
/// # Safety
/// `out` is NULL or points to `capacity` writable `TesseraBlock`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_pool_blocks(device: c_int, pool: u64, out: *mut TesseraBlock, capacity: usize) -> i64 {
    guarded("pool_blocks", -1, || {
        let blocks = allocator::global()?.device(device)?.pool_blocks(check_pool(pool)?)?;
        let items: Vec<TesseraBlock> = blocks
            .iter()
            .map(|b| TesseraBlock {
                addr: b.addr,
                size: b.size,
                requested: b.requested,
                stream: b.stream,
                pool,
                arena: -1,
                state: TesseraBlockState::Allocated as i32,
            })
            .collect();
        write_blocks(&items, out, capacity)
    })
}

/// Allocates exactly `[ptr, ptr + size)` for `stream` out of private pool
/// `pool`'s cache (`requested` bytes asked for): a checkpoint of the pool
/// put back (PyTorch's cudagraph trees). Returns `ptr`, or NULL if no cached
/// block of the pool holds that range.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_claim_in_pool(
    device: c_int,
    pool: u64,
    ptr: *mut c_void,
    size: libc::ssize_t,
    requested: libc::ssize_t,
    stream: cudaStream_t,
) -> *mut c_void {
    guarded("claim_in_pool", std::ptr::null_mut(), || {
        let size = check_size(size, device)?;
        let requested = check_size(requested, device)?;
        let dev = allocator::global()?.device(device)?;
        Ok(dev.claim_in_pool(check_pool(pool)?, ptr as u64, size, requested, stream as u64)? as *mut c_void)
    })
}
