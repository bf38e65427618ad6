//! Random operations straight on a DevicePool (sim backend), the pool's
//! invariants checked after every one: allocation on four streams and in two
//! named pools, frees (some lent to a front and taken back), record_stream,
//! held events, graph captures, pool releases, empty_cache, pause and
//! resume, the driver thread's tidy steps, under seven configurations.
//! TESSERA_RANDOM_SEEDS and TESSERA_RANDOM_STEPS run more.
use std::sync::Arc;
use tessera::backend::sim::SimBackend;
use tessera::config::Config;
use tessera::error::Error;
use tessera::pool::DevicePool;
use tessera::stats::TesseraCounter as C;

const MIB: u64 = 1 << 20;

fn xs(s: &mut u64) -> u64 { *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; *s }

/// One random run; returns (cross-stream reuses, reclaimed granules, gap placements).
fn run(conf: &str, seed: u64, steps: usize) -> [u64; 3] {
    let config = Config::parse(&format!("backend:sim,{conf}")).unwrap();
    let backend = Arc::new(SimBackend::new(1, config.device_capacity.0));
    let mut p = DevicePool::new(0, backend.clone(), &config, None).unwrap();
    let mut rng = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut live: Vec<u64> = Vec::new();
    let mut capturing = false;
    let mut lent: Vec<tessera::pool::LentBlock> = Vec::new();
    let lend_on = seed.is_multiple_of(2);
    for step in 0..steps {
        let r = xs(&mut rng);
        let op = r % 100;
        let what;
        if op < 40 {
            let size = match (r >> 8) % 4 { 0 => 1 + (r >> 12) % (512 << 10), 1 => 1 + (r >> 12) % (4 * MIB), 2 => 1 + (r >> 12) % (24 * MIB), _ => MIB * (1 + (r >> 12) % 8) };
            let stream = 1 + (r >> 40) % 4;
            what = format!("malloc {size} s{stream}");
            match p.malloc(size, stream) { Ok(a) => live.push(a), Err(Error::OutOfMemory(_)) => {}, Err(Error::InvalidArgument(_)) if p.is_paused() => {}, Err(e) => panic!("step {step} {what}: {e:?}") }
        } else if op < 45 {
            let size = 1 + (r >> 12) % (6 * MIB);
            let pool = 1 + (r >> 40) % 2;
            what = format!("malloc_in_pool {size} pool{pool}");
            match p.malloc_in_pool(size, 1 + (r >> 44) % 3, pool) { Ok(a) => live.push(a), Err(Error::OutOfMemory(_)) => {}, Err(Error::InvalidArgument(_)) if p.is_paused() => {}, Err(e) => panic!("step {step} {what}: {e:?}") }
        } else if op < 78 {
            if live.is_empty() { continue; }
            let i = ((r >> 8) as usize) % live.len();
            let a = live.swap_remove(i);
            what = format!("free {a:#x}");
            if lend_on && (r >> 50).is_multiple_of(2) {
                if let tessera::pool::Freed::Lent(lb) = p.free_or_lend(a, None, None, |_| true).unwrap_or_else(|e| panic!("step {step} {what}: {e:?}")) { lent.push(lb) }
            } else {
                p.free(a, None, None).unwrap_or_else(|e| panic!("step {step} {what}: {e:?}"));
            }
        } else if op < 84 {
            if live.is_empty() { continue; }
            let a = live[((r >> 8) as usize) % live.len()];
            what = format!("record_stream {a:#x}");
            p.record_stream(a, 1 + (r >> 40) % 5).unwrap();
        } else if op < 86 && lend_on && !lent.is_empty() {
            let lb = lent.swap_remove(((r >> 8) as usize) % lent.len());
            if (r >> 30).is_multiple_of(2) { what = "return_lent".into(); p.return_lent(lb.id); } else { what = "lent_to_live".into(); p.lent_to_live(lb.id, lb.size); live.push(lb.addr); }
        } else if op < 86 {
            what = "hold".into();
            backend.hold_events((r >> 8).is_multiple_of(2));
        } else if op < 88 {
            what = "release_pool".into();
            p.release_pool(1 + (r >> 8) % 2).unwrap();
        } else if op < 89 {
            what = "release_graph_pools".into();
            p.release_graph_pools();
        } else if op < 91 {
            what = "capture".into();
            capturing = !capturing;
            backend.set_capturing(if capturing { Some(1 + (r >> 8) % 4) } else { None });
        } else if op < 92 {
            what = "empty_cache".into();
            p.empty_cache().unwrap();
        } else if op < 94 {
            what = "pause/resume".into();
            if p.is_paused() { let _ = p.resume("t"); } else if !capturing { let _ = p.pause(false); }
        } else if op < 98 {
            what = "tidy".into();
            let _ = p.tidy_step(true);
        } else {
            what = "malloc_if_exact".into();
            if let Some(a) = p.malloc_if_exact(MIB * (1 + (r >> 12) % 4), 1 + (r >> 40) % 4) { live.push(a); }
        }
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.check_invariants()));
        if res.is_err() { panic!("seed {seed} step {step} after {what}: invariants broken"); }
    }
    let st = p.stats();
    let seen = [C::CrossStreamReuses, C::ReclaimedGranules, C::GapPlacements].map(|c| st.counter(c));
    backend.set_capturing(None);
    backend.hold_events(false);
    if p.is_paused() { p.resume("t").unwrap(); }
    for lb in lent { p.return_lent(lb.id); }
    for a in live { p.free(a, None, None).unwrap(); p.check_invariants(); }
    p.release_graph_pools(); p.release_pool(1).unwrap(); p.release_pool(2).unwrap();
    p.empty_cache().unwrap();
    p.check_invariants();
    seen
}

const CONFS: &[&str] = &[
    "device_capacity:96M,growth_size:0,graph_pools:true",
    "device_capacity:128M,growth_size:8M,max_cached_fraction:0.1,graph_pools:true,driver_thread:true,ready_fraction:0.1",
    "device_capacity:64M,growth_size:0,max_cached_fraction:0,max_handle_size:2M",
    "device_capacity:256M,max_handle_size:8M,garbage_collection_threshold:0.5",
    "device_capacity:80M,expandable_segments:false,graph_pools:true",
    "device_capacity:512M,growth_size:4M,max_cached_fraction:0.05,max_handle_size:2M,driver_thread:true,ready_fraction:0.05",
    "device_capacity:1G,growth_size:0,max_cached_fraction:0.02,graph_pools:true",
];

#[test]
fn random_ops_keep_invariants() {
    let seeds: u64 = std::env::var("TESSERA_RANDOM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let steps: usize = std::env::var("TESSERA_RANDOM_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let mut seen = [0u64; 3];
    for (ci, conf) in CONFS.iter().enumerate() {
        for seed in 0..seeds {
            let s = seed * 31 + ci as u64 + 1;
            match std::panic::catch_unwind(|| run(conf, s, steps)) {
                Ok(counts) => (0..3).for_each(|k| seen[k] += counts[k]),
                Err(e) => {
                    eprintln!("conf {conf} seed {s} failed");
                    std::panic::resume_unwind(e);
                }
            }
        }
    }
    // The runs reached the paths they are for.
    assert!(seen.iter().all(|&n| n > 0), "cross-stream reuses, reclaimed granules, gap placements: {seen:?}");
}

/// A stream value with the top bit set (no CUDA stream has one) is an
/// ordinary stream to the cache's counts.
#[test]
fn a_stream_with_the_top_bit_is_counted_as_a_stream() {
    let config = Config::parse("backend:sim,device_capacity:64M").unwrap();
    let backend = Arc::new(SimBackend::new(1, config.device_capacity.0));
    let mut p = DevicePool::new(0, backend.clone(), &config, None).unwrap();
    let s = (1u64 << 63) | 0x10;
    let a = p.malloc(4 * MIB, s).unwrap();
    p.free(a, None, None).unwrap();
    p.check_invariants();
}

/// A named pool's cached blocks of two streams stay apart: merged, the
/// block would carry one stream and the other's free number, which that
/// stream's epochs cannot tell done.
#[test]
fn a_pools_blocks_of_two_streams_do_not_merge() {
    let config = Config::parse("backend:sim,device_capacity:64M,growth_size:0").unwrap();
    let backend = Arc::new(SimBackend::new(1, config.device_capacity.0));
    let mut p = DevicePool::new(0, backend.clone(), &config, None).unwrap();
    let big = p.malloc_in_pool(4 * MIB, 1, 1).unwrap();
    p.free(big, None, None).unwrap();
    let a = p.malloc_in_pool(2 * MIB, 1, 1).unwrap();
    let b = p.malloc_in_pool(2 * MIB, 2, 1).unwrap();
    assert_eq!(b, a + 2 * MIB);
    p.free(a, None, None).unwrap(); // stream 1 dirty
    let c = p.malloc(1000, 3).unwrap();
    p.free(c, None, None).unwrap();
    let d = p.malloc(1000, 4).unwrap(); // a miss: polls epochs, stream 1 gets its event
    p.check_invariants();
    p.free(b, None, None).unwrap(); // beside a's block, apart from it
    p.check_invariants();
    assert_eq!(p.stats().gauge(tessera::stats::TesseraGauge::CachedBlocks).current, 3, "a and b apart, c's block");
    p.free(d, None, None).unwrap();
}
