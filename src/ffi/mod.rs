//! The C ABI (`include/tessera.h`). Every exported function catches panics,
//! never aborts the host on bad input, and reports failures through
//! `tessera_last_error` (a thread-local message), the log and a counter.
//!
//! Which symbol is which:
//! - `tessera_malloc`: the entry point for PyTorch. On failure it throws a
//!   C++ `std::runtime_error` (from `src/shim.cpp`) whose message starts with
//!   "CUDA out of memory. Tried to allocate" for lack of memory; PyTorch
//!   raises it as a Python `RuntimeError`. It never returns NULL for a
//!   non-zero size.
//! - `tessera_try_malloc`: the same allocation for plain C callers: NULL and
//!   a `tessera_last_error` message on failure; no exception.
//! - Size 0 returns NULL from both, as PyTorch's own allocator does.
//!
//! The error channel, errno-like but cleared for you: every function that
//! can fail (all but `tessera_last_error`, `tessera_version` and the
//! name and count functions) clears this thread's last error when it
//! starts, so that after it returns `tessera_last_error()` is "" if it
//! succeeded and says why if not, void functions (`tessera_free`) included.

mod pools;
mod tags;

pub use pools::{TesseraBlock, TesseraBlockState};

use crate::allocator;
use crate::error::Error;
use crate::pool::ArenaKind;
use crate::stats::{self, COUNTER_COUNT, GAUGE_COUNT, TesseraStats};
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// A CUDA stream, as `cudaStream_t` (the header declares it the way CUDA does).
#[allow(non_camel_case_types)]
pub type cudaStream_t = *mut c_void;

/// Bytes of the last error message kept, its NUL included; longer ones end
/// in "...".
const LAST_ERROR_BYTES: usize = 4096;

/// This thread's last error, NUL-terminated. A plain array: no destructor,
/// so no thread-exit hook that would pin the library in memory (dlclose).
struct LastError([u8; LAST_ERROR_BYTES]);

thread_local! {
    static LAST_ERROR: RefCell<LastError> = const { RefCell::new(LastError([0; LAST_ERROR_BYTES])) };
}

fn set_last_error(message: &str) {
    LAST_ERROR.with(|e| {
        let buf = &mut e.borrow_mut().0;
        let mut n = message.len().min(LAST_ERROR_BYTES - 1);
        if n < message.len() {
            n = (0..=n - 3).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
            buf[n..n + 3].copy_from_slice(b"...");
            buf[..n].copy_from_slice(&message.as_bytes()[..n]);
            n += 3;
        } else {
            buf[..n].copy_from_slice(&message.as_bytes()[..n]);
        }
        for b in &mut buf[..n] {
            if *b == 0 {
                *b = b' ';
            }
        }
        buf[n] = 0;
    });
}

fn clear_last_error() {
    LAST_ERROR.with(|e| e.borrow_mut().0[0] = 0);
}

/// Runs `f`, turning an error or a panic into `fallback` plus a message.
/// Clears the last error first (see the module doc).
fn guarded<T>(what: &str, fallback: T, f: impl FnOnce() -> Result<T, Error>) -> T {
    clear_last_error();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            let text = e.to_string();
            match e {
                Error::OutOfMemory(_) => tracing::info!("{what}: {text}"),
                _ => tracing::warn!("{what}: {text}"),
            }
            set_last_error(&text);
            fallback
        }
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            let text = format!("tessera: internal error in {what}: {detail}");
            tracing::error!("{text}");
            set_last_error(&text);
            fallback
        }
    }
}

fn check_size(size: libc::ssize_t, device: c_int) -> Result<u64, Error> {
    // Sizes above 2^62 the allocator refuses (and counts) itself.
    if size < 0 {
        if let Ok(a) = allocator::global() {
            a.count_invalid_request(device);
        }
        return Err(Error::InvalidArgument(format!("allocation size {size} is negative or absurd")));
    }
    Ok(size as u64)
}

/// Allocates `size` bytes on `device` for use on `stream`. Returns NULL on
/// failure (message in `tessera_last_error`) and for size 0. The plain-C
/// entry point: PyTorch must be given `tessera_malloc` instead.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_try_malloc(size: libc::ssize_t, device: c_int, stream: cudaStream_t) -> *mut c_void {
    guarded("malloc", std::ptr::null_mut(), || {
        let size = check_size(size, device)?;
        if size == 0 {
            return Ok(std::ptr::null_mut());
        }
        let ptr = allocator::global()?.malloc(size, device, stream as u64)?;
        Ok(ptr as *mut c_void)
    })
}

/// The C++ shim (src/shim.cpp): internal, so not in the header.
/// cbindgen:ignore
mod shim {
    unsafe extern "C-unwind" {
        /// Throws `std::runtime_error(message)`.
        pub fn tessera_throw_runtime_error(message: *const std::ffi::c_char) -> !;
    }
}

/// Allocates `size` bytes on `device` for use on `stream`: the entry point
/// to give PyTorch and LibTorch. On failure it throws a C++
/// `std::runtime_error` whose message starts with "CUDA out of memory.
/// Tried to allocate" when memory is short (PyTorch raises it as a Python
/// RuntimeError); it never returns NULL for a non-zero size. Size 0 returns
/// NULL, as PyTorch's own allocator does. C callers: use tessera_try_malloc.
#[unsafe(no_mangle)]
pub extern "C-unwind" fn tessera_malloc(size: libc::ssize_t, device: c_int, stream: cudaStream_t) -> *mut c_void {
    let ptr = tessera_try_malloc(size, device, stream);
    if ptr.is_null() && size != 0 {
        // SAFETY: the message is a valid C string owned by this thread; the
        // exception unwinds through this frame only, which owns nothing.
        unsafe { shim::tessera_throw_runtime_error(tessera_last_error()) }
    }
    ptr
}

/// Frees `ptr`, allocated with `size` bytes on `device` and `stream`, as
/// PyTorch passes them. A NULL pointer is ignored. A pointer tessera does
/// not own (or a double free) is reported and counted, never a crash.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_free(ptr: *mut c_void, size: libc::ssize_t, device: c_int, stream: cudaStream_t) {
    guarded("free", (), || {
        if ptr.is_null() {
            return Ok(());
        }
        let a = allocator::global()?;
        match u64::try_from(size) {
            Ok(size) => a.free(ptr as u64, Some(size), device, Some(stream as u64)),
            Err(_) => a.free_negative_size(ptr as u64, size as i64, device, Some(stream as u64)),
        }
    })
}

/// Gives every cached granule back to the driver (torch.cuda.empty_cache).
/// Live allocations are untouched.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_empty_cache() {
    guarded("empty_cache", (), || allocator::global()?.empty_cache())
}

/// Marks `ptr` as used on `stream` as well (Tensor.record_stream): its
/// memory is not reused until `stream` has passed the point of its free.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_record_stream(ptr: *mut c_void, stream: cudaStream_t) {
    guarded("record_stream", (), || allocator::global()?.record_stream(ptr as u64, stream as u64))
}

/// PyTorch's init hook: builds the allocator now so that a bad
/// configuration is reported early (in the log and `tessera_last_error`).
#[unsafe(no_mangle)]
pub extern "C" fn tessera_init(device_count: c_int) {
    guarded("init", (), || {
        let a = allocator::global()?;
        if device_count != a.device_count() {
            tracing::warn!("PyTorch sees {device_count} devices, tessera {}", a.device_count());
        }
        Ok(())
    })
}

/// Caps the physical memory tessera holds on `device` at `fraction` of its
/// total (torch.cuda.set_per_process_memory_fraction).
#[unsafe(no_mangle)]
pub extern "C" fn tessera_set_memory_fraction(fraction: f64, device: c_int) {
    guarded("set_memory_fraction", (), || allocator::global()?.set_memory_fraction(fraction, device))
}

/// Sets the configuration (the `TESSERA_CONF` syntax), in place of the
/// environment, before the first allocation. Returns 0, or -1 with a message
/// naming the bad key or value.
/// # Safety
/// `conf` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_configure(conf: *const c_char) -> i32 {
    guarded("configure", -1, || {
        if conf.is_null() {
            return Err(Error::InvalidArgument("configuration string is NULL".into()));
        }
        // SAFETY: the caller passes a NUL-terminated string (checked non-null above).
        let text = unsafe { CStr::from_ptr(conf) }
            .to_str()
            .map_err(|_| Error::Config("configuration is not UTF-8".into()))?;
        allocator::configure(text)?;
        Ok(0)
    })
}

/// Checks the configuration that is (or will be) in force, and that the
/// backend can start. Returns 0, or -1 with a message.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_check_config() -> i32 {
    guarded("check_config", -1, || allocator::check_config().map(|_| 0))
}

/// Writes `value()` through `out` and returns 0; a NULL `out` is the error
/// "{what} output pointer is NULL", checked before `value` runs.
/// # Safety
/// `out` is NULL or points to writable memory for one `T`.
unsafe fn write_out<T>(out: *mut T, what: &str, value: impl FnOnce() -> Result<T, Error>) -> Result<i32, Error> {
    if out.is_null() {
        return Err(Error::InvalidArgument(format!("{what} output pointer is NULL")));
    }
    let v = value()?;
    // SAFETY: out is non-null and writable for one T (this function's contract).
    unsafe { out.write(v) };
    Ok(0)
}

/// Copies the statistics of `device` into `*out`. Returns 0, or -1 with a
/// message (bad device, NULL `out`).
/// # Safety
/// `out` is NULL or points to writable memory for one `TesseraStats`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_get_stats(device: c_int, out: *mut TesseraStats) -> i32 {
    guarded("get_stats", -1, || {
        // SAFETY: out is NULL or points to a TesseraStats (caller's contract).
        unsafe { write_out(out, "stats", || allocator::global()?.stats(device)) }
    })
}

/// Resets the peaks of `device` to the current values. Returns 0 or -1.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_reset_peak_stats(device: c_int) -> i32 {
    guarded("reset_peak_stats", -1, || allocator::global()?.reset_peak_stats(device).map(|_| 0))
}

/// Copies the statistics of one arena of `device` into `*out`: `arena` 0
/// is the small arena (PyTorch's small_pool), 1 the large one. Only the
/// block-level gauges are kept per arena (allocated, requested, active,
/// cached, mapped, pending); the rest are zero. Returns 0 or -1.
/// # Safety
/// `out` is NULL or points to writable memory for one `TesseraStats`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_get_arena_stats(device: c_int, arena: c_int, out: *mut TesseraStats) -> i32 {
    guarded("get_arena_stats", -1, || {
        // SAFETY: out is NULL or points to a TesseraStats (caller's contract).
        unsafe {
            write_out(out, "stats", || {
                let kind = match arena {
                    0 => ArenaKind::Small,
                    1 => ArenaKind::Large,
                    _ => return Err(Error::InvalidArgument(format!("arena {arena} is neither 0 (small) nor 1 (large)"))),
                };
                allocator::global()?.arena_stats(device, kind)
            })
        }
    })
}

/// Writes into `*largest_cached_bytes` the size of the largest cached block
/// of `device`: the largest request tessera serves there without mapping
/// memory (PyTorch's cacheInfo; blocks waiting whole in front caches for a
/// request of their exact size are not counted). Returns 0, or -1 with a
/// message (bad device, NULL pointer).
/// # Safety
/// `largest_cached_bytes` is NULL or points to a writable `uint64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_cache_info(device: c_int, largest_cached_bytes: *mut u64) -> i32 {
    guarded("cache_info", -1, || {
        // SAFETY: NULL or points to a u64 (caller's contract).
        unsafe { write_out(largest_cached_bytes, "cache_info", || allocator::global()?.largest_cached_bytes(device)) }
    })
}

/// Writes one line of memory status (allocated, reserved, their peaks,
/// fragmentation, OOMs) into `buf` if `len` bytes suffice: of `device`, or,
/// for -1, of every device in use. Returns the bytes needed (NUL included;
/// call with NULL, 0 to ask), or -1.
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_status_line(device: c_int, buf: *mut c_char, len: usize) -> i64 {
    guarded("status_line", -1, || {
        let device = (device != -1).then_some(device);
        Ok(copy_out(&allocator::global()?.status_line(device)?, buf, len))
    })
}

/// Writes the warnings of the configuration in force (or to be), one a
/// line, into `buf` if `len` bytes suffice: PyTorch's keys it accepted that
/// mean nothing to tessera, each with why ("" if none). Returns the bytes
/// needed (call with NULL, 0 to ask), or -1 (a bad configuration).
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_config_warnings(buf: *mut c_char, len: usize) -> i64 {
    guarded("config_warnings", -1, || Ok(copy_out(&allocator::active_config_with_warnings()?.1.join("\n"), buf, len)))
}

/// Sets the cumulative values (`allocated`, `freed`) of `device`'s gauges
/// to their current values and every counter to zero (PyTorch's
/// reset_accumulated_memory_stats). Returns 0 or -1.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_reset_accumulated_stats(device: c_int) -> i32 {
    guarded("reset_accumulated_stats", -1, || {
        allocator::global()?.device(device)?.reset_accumulated_stats();
        Ok(0)
    })
}

/// Copies `text` and a NUL into `buf` if `len` bytes suffice; returns the
/// bytes needed (NUL included) either way.
fn copy_out(text: &str, buf: *mut c_char, len: usize) -> i64 {
    let needed = text.len() + 1;
    if !buf.is_null() && len >= needed {
        // SAFETY: buf holds at least len >= needed bytes (caller's contract).
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf as *mut u8, text.len());
            *buf.add(text.len()) = 0;
        }
    }
    needed as i64
}

/// Writes every device's memory as JSON in the shape of
/// `torch.cuda.memory._snapshot()` (`segments` with their `blocks`, and
/// `device_traces` when history is recorded) into `buf` if `len` bytes
/// suffice. Returns the bytes needed (call with NULL, 0 to ask), or -1.
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_snapshot_json(buf: *mut c_char, len: usize) -> i64 {
    guarded("snapshot_json", -1, || Ok(copy_out(&allocator::global()?.snapshot_json(), buf, len)))
}

/// Starts (`enabled` non-zero) or stops recording alloc, free, map, unmap
/// and OOM events, at most `max_entries` per device (the oldest go first).
/// Cheap when off. Returns 0 or -1.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_record_history(enabled: c_int, max_entries: usize) -> i32 {
    guarded("record_history", -1, || {
        allocator::global()?.record_history(enabled != 0, max_entries);
        Ok(0)
    })
}

/// Writes the recorded alloc and free events of `device` in the trace
/// format that `tessera-replay` reads (`a|f ADDR SIZE STREAM` lines) into
/// `buf` if `len` bytes suffice. Returns the bytes needed, or -1.
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_history_trace(device: c_int, buf: *mut c_char, len: usize) -> i64 {
    guarded("history_trace", -1, || Ok(copy_out(&allocator::global()?.history_trace(device)?, buf, len)))
}

/// A function tessera calls before it gives up on an allocation:
/// `(device, bytes requested, user_data)`. It may free memory (e.g. run a
/// garbage collection); tessera retries once after all callbacks ran. A
/// nullable function pointer (`Option` of one is what C sees as a plain
/// pointer, NULL for `None`).
pub type TesseraOomCallback = Option<extern "C" fn(device: c_int, size: u64, user_data: *mut c_void)>;

/// Registers an OOM callback (called on the allocating thread, with no
/// tessera lock held). Returns 0 or -1.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_register_oom_callback(callback: TesseraOomCallback, user_data: *mut c_void) -> i32 {
    guarded("register_oom_callback", -1, || {
        let cb = callback.ok_or_else(|| Error::InvalidArgument("OOM callback is NULL".into()))?;
        let data = user_data as usize;
        allocator::global()?.on_oom(Box::new(move |device, size| cb(device, size, data as *mut c_void)));
        Ok(0)
    })
}

/// Switches `graph_pools` on at run time, for every device: from now on
/// tessera asks the driver on every allocation and free whether the stream
/// captures a CUDA graph, and keeps the memory of each capture private to
/// it. Call it before the first capture (tessera_torch.install() arranges
/// that torch.cuda.CUDAGraph.capture_begin does). Returns 0 or -1.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_watch_graphs() -> i32 {
    guarded("watch_graphs", -1, || {
        allocator::global()?.watch_graphs();
        Ok(0)
    })
}

/// Declares that every CUDA graph captured so far has been destroyed: the
/// memory tessera kept private to those captures (allocated during capture,
/// or freed while its stream captured) becomes reusable. Call it after
/// deleting the graphs (torch.cuda.CUDAGraph) and never while one may still
/// replay. Returns the bytes released, or -1.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_release_graph_pools() -> i64 {
    guarded("release_graph_pools", -1, || Ok(allocator::global()?.release_graph_pools() as i64))
}

/// Writes the configuration options as JSON (`[{"name", "default",
/// "accepts", "doc"}, ...]`, defaults in `TESSERA_CONF` syntax) into `buf`
/// if `len` bytes suffice. Returns the bytes needed (call with NULL, 0 to
/// ask). Needs no initialisation.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_options_json(buf: *mut c_char, len: usize) -> i64 {
    guarded("options_json", -1, || Ok(copy_out(&crate::config::Config::options_json(), buf, len)))
}

/// Number of entries of `TesseraStats.gauges`.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_gauge_count() -> i32 {
    GAUGE_COUNT as i32
}

/// Number of entries of `TesseraStats.counters`.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_counter_count() -> i32 {
    COUNTER_COUNT as i32
}

fn c_names(names: &'static [String]) -> Vec<CString> {
    names.iter().map(|n| CString::new(n.as_str()).unwrap_or_default()).collect()
}

/// Name of gauge `i` in snake_case ("allocated_bytes"), or NULL.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_gauge_name(i: i32) -> *const c_char {
    static NAMES: std::sync::OnceLock<Vec<CString>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| c_names(stats::gauge_names()));
    usize::try_from(i).ok().and_then(|i| names.get(i)).map_or(std::ptr::null(), |n| n.as_ptr())
}

/// Name of counter `i` in snake_case ("cache_hits"), or NULL.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_counter_name(i: i32) -> *const c_char {
    static NAMES: std::sync::OnceLock<Vec<CString>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| c_names(stats::counter_names()));
    usize::try_from(i).ok().and_then(|i| names.get(i)).map_or(std::ptr::null(), |n| n.as_ptr())
}

/// Why this thread's last call that can fail failed, or "" if it succeeded
/// (each such call clears it when it starts). Valid until the next tessera
/// call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().0.as_ptr() as *const c_char)
}

/// The library's version ("0.1.0").
#[unsafe(no_mangle)]
pub extern "C" fn tessera_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}
