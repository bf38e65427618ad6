//! The C ABI of tags (tags.rs): the calling thread's current tag, and
//! pausing and resuming a tag's memory. Same conventions as the rest of the
//! ABI: a negative return and `tessera_last_error` on failure, no panic out.

use super::{copy_out, guarded, write_out};
use crate::allocator;
use crate::error::Error;
use crate::stats::TesseraStats;
use std::ffi::{CStr, c_char, c_int};

/// The tag named by a C string; NULL is None.
/// # Safety
/// `tag` is NULL or a NUL-terminated string.
unsafe fn tag_arg<'a>(tag: *const c_char) -> Result<Option<&'a str>, Error> {
    if tag.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller passes a NUL-terminated string (non-null here); it
    // is read within the call only.
    let text = unsafe { CStr::from_ptr(tag) }.to_str().map_err(|_| Error::InvalidArgument("tag is not UTF-8".into()))?;
    Ok(Some(text))
}

/// The tag named, which must not be NULL.
/// # Safety
/// As `tag_arg`.
unsafe fn named_tag<'a>(tag: *const c_char, what: &str) -> Result<&'a str, Error> {
    // SAFETY: passed through (this function's contract).
    unsafe { tag_arg(tag) }?.ok_or_else(|| Error::InvalidArgument(format!("{what}: tag is NULL")))
}

/// Makes `tag` the calling thread's current tag: its allocations from now
/// on belong to that tag (NULL or "": untagged again). Returns 0, or -1
/// for a bad name (1 to 128 bytes of printable ASCII).
/// # Safety
/// `tag` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_set_tag(tag: *const c_char) -> i32 {
    guarded("set_tag", -1, || {
        // SAFETY: the caller's contract.
        let id = match unsafe { tag_arg(tag) }? {
            None | Some("") => 0,
            Some(name) => crate::tags::intern(name)?,
        };
        crate::tags::set_current(id);
        Ok(0)
    })
}

/// The calling thread's allocations are untagged again.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_clear_tag() {
    guarded("clear_tag", (), || {
        crate::tags::set_current(0);
        Ok(())
    })
}

/// Writes the calling thread's current tag ("" if none) into `buf` if
/// `len` bytes suffice. Returns the bytes needed (NUL included; call with
/// NULL, 0 to ask).
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_get_tag(buf: *mut c_char, len: usize) -> i64 {
    guarded("get_tag", -1, || Ok(copy_out(&crate::tags::name(crate::tags::current()), buf, len)))
}

/// Pauses `tag` on every device: waits for the streams that used its
/// memory, then gives its physical memory back to the driver, keeping every
/// address. With `backup` non-zero, its live blocks are first copied to
/// page-locked host memory (with keep_backups, into the copies the last
/// resume kept), and `tessera_resume` copies them back; without, their
/// contents are lost. Frees of paused blocks are allowed; allocations
/// into a paused tag fail. Returns the bytes given back, or -1.
/// # Safety
/// `tag` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_pause(tag: *const c_char, backup: c_int) -> i64 {
    guarded("pause", -1, || {
        // SAFETY: the caller's contract.
        let tag = unsafe { named_tag(tag, "pause") }?;
        Ok(allocator::global()?.pause(tag, backup != 0)?.bytes as i64)
    })
}

/// Maps new physical memory at `tag`'s addresses on every device where it
/// is paused, and restores its backups. Returns the bytes mapped, or -1:
/// out of memory ("CUDA out of memory..." in `tessera_last_error`, naming
/// what the tag needs) leaves the tag paused with its backups intact, and a
/// later call may succeed.
/// # Safety
/// `tag` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_resume(tag: *const c_char) -> i64 {
    guarded("resume", -1, || {
        // SAFETY: the caller's contract.
        let tag = unsafe { named_tag(tag, "resume") }?;
        Ok(allocator::global()?.resume(tag)?.bytes as i64)
    })
}

/// Copies the statistics of `tag`'s memory on `device` into `*out` (zeros
/// for a tag never used there); `paused_bytes` is what a pause gave back,
/// `backup_bytes` the host copies held. Returns 0 or -1.
/// # Safety
/// `tag` is NULL or a NUL-terminated string; `out` is NULL or points to
/// writable memory for one `TesseraStats`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_get_tag_stats(device: c_int, tag: *const c_char, out: *mut TesseraStats) -> i32 {
    guarded("get_tag_stats", -1, || {
        // SAFETY: the caller's contract.
        let tag = unsafe { named_tag(tag, "get_tag_stats") }?;
        // SAFETY: out is NULL or points to a TesseraStats (caller's contract).
        unsafe { write_out(out, "stats", || allocator::global()?.tag_stats(device, tag)) }
    })
}
