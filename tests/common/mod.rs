//! Helpers shared by the integration tests: allocators over sim and host
//! backends that the test keeps a handle on.
#![allow(dead_code)]

use std::sync::Arc;
use tessera::allocator::Allocator;
use tessera::backend::host::HostBackend;
use tessera::backend::sim::SimBackend;
use tessera::config::Config;

pub const MIB: u64 = 1 << 20;

pub fn sim(conf: &str) -> (Allocator, Arc<SimBackend>) {
    let config = Config::parse(&format!("backend:sim,{conf}")).unwrap();
    let backend = Arc::new(SimBackend::new(config.device_count as i32, config.device_capacity.0));
    (Allocator::with_backend(config, backend.clone()).unwrap(), backend)
}

pub fn host(conf: &str) -> (Allocator, Arc<HostBackend>) {
    let config = Config::parse(&format!("backend:host,va_size:1G,{conf}")).unwrap();
    let backend = Arc::new(HostBackend::new(config.device_count as i32, config.device_capacity.0));
    (Allocator::with_backend(config, backend.clone()).unwrap(), backend)
}

/// Proptest cases: PROPTEST_CASES if set, else `default` (a literal `cases`
/// in a proptest config would ignore the variable).
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn check(a: &Allocator, device: i32) {
    a.check_invariants(device).unwrap();
}

/// Fills `len` bytes at `addr` with a pattern derived from `seed`.
pub fn fill(addr: u64, len: u64, seed: u64) {
    // SAFETY: tests call this only on live host-backend allocations of at least `len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len as usize) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) >> 1) as u8;
    }
}

/// Checks the pattern written by `fill`.
pub fn verify(addr: u64, len: u64, seed: u64) -> bool {
    // SAFETY: as in `fill`.
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
    bytes.iter().enumerate().all(|(i, &b)| b == (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) >> 1) as u8)
}
