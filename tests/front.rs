//! The front caches (src/front.rs) through the allocator: exact reuse per
//! stream without the pool, and every way a block leaves a front (bad frees,
//! record_stream, another device, history, drains) leaving the fronts and
//! the pool consistent (`check` runs both invariant sets).

mod common;
use common::*;
use tessera::error::Error;
use tessera::stats::{TesseraCounter as C, TesseraGauge as G};

fn gauge(a: &tessera::allocator::Allocator, device: i32, g: G) -> tessera::stats::TesseraStat {
    *a.stats(device).unwrap().gauge(g)
}

fn counter(a: &tessera::allocator::Allocator, c: C) -> u64 {
    a.stats(0).unwrap().counter(c)
}

#[test]
fn a_stream_gets_its_freed_block_back_with_exact_statistics() {
    let (a, backend) = sim("growth_size:0");
    let p = a.malloc(3000, 0, 7).unwrap();
    let cached = gauge(&a, 0, G::CachedBytes).current; // the rest of the granule
    a.free(p, Some(3000), 0, Some(7)).unwrap(); // lent to stream 7's shard
    let maps = backend.live(0);
    let hits = counter(&a, C::CacheHits);
    for _ in 0..100 {
        let q = a.malloc(3000, 0, 7).unwrap();
        assert_eq!(q, p, "the stream's own block, again");
        let s = gauge(&a, 0, G::AllocatedBytes);
        assert_eq!((s.current, s.peak), (3072, 3072));
        assert_eq!(gauge(&a, 0, G::RequestedBytes).current, 3000);
        assert_eq!(gauge(&a, 0, G::CachedBytes).current, cached);
        a.free(q, Some(3000), 0, Some(7)).unwrap();
        assert_eq!(gauge(&a, 0, G::CachedBytes).current, cached + 3072);
    }
    assert_eq!(counter(&a, C::CacheHits), hits + 100);
    assert_eq!(backend.live(0), maps, "no driver call");
    check(&a, 0);
}

#[test]
fn peaks_are_exact_on_one_stream() {
    let (a, _) = sim("growth_size:0");
    let mut rng = 0x5eed_u64;
    let mut live: Vec<(u64, u64)> = Vec::new();
    let (mut now, mut peak) = (0u64, 0u64);
    for i in 0..20_000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if rng.is_multiple_of(2) || live.is_empty() {
            let size = [512, 1024, 4096, 1 << 20, 3 << 20][(rng >> 8) as usize % 5];
            live.push((a.malloc(size, 0, 1).unwrap(), size));
            now += size;
            peak = peak.max(now);
        } else {
            let (p, size) = live.swap_remove((rng >> 8) as usize % live.len());
            a.free(p, Some(size), 0, Some(1)).unwrap();
            now -= size;
        }
        if i % 97 == 0 {
            let s = gauge(&a, 0, G::AllocatedBytes);
            assert_eq!((s.current as u64, s.peak as u64), (now, peak), "after {i} operations");
        }
        if i == 10_000 {
            a.reset_peak_stats(0).unwrap();
            peak = now;
        }
    }
    check(&a, 0);
}

#[test]
fn a_double_free_of_a_block_in_a_front_is_an_error_that_changes_nothing() {
    let (a, _) = sim("");
    let p = a.malloc(4096, 0, 3).unwrap();
    a.free(p, Some(4096), 0, Some(3)).unwrap();
    let err = a.free(p, Some(4096), 0, Some(3)).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("freed twice"), "{err}");
    assert_eq!(counter(&a, C::InvalidFrees), 1);
    check(&a, 0);
    // Handed out once only.
    let q = a.malloc(4096, 0, 3).unwrap();
    let r = a.malloc(4096, 0, 3).unwrap();
    assert_eq!(q, p);
    assert_ne!(r, p);
    check(&a, 0);
}

#[test]
fn a_free_naming_the_wrong_stream_frees_the_block_once() {
    let (a, _) = sim("");
    let p = a.malloc(4096, 0, 1).unwrap();
    a.free(p, None, 0, Some(1)).unwrap();
    let q = a.malloc(4096, 0, 1).unwrap(); // handed out by stream 1's shard
    assert_eq!(q, p);
    let err = a.free(q, None, 0, Some(2)).unwrap_err();
    assert!(err.to_string().contains("stream"), "{err}");
    assert_eq!(counter(&a, C::MismatchedFrees), 1);
    assert_eq!(gauge(&a, 0, G::AllocatedBytes).current, 0, "freed as allocated");
    check(&a, 0);
    assert!(a.free(q, None, 0, Some(1)).is_err(), "not live any more");
    assert_eq!(counter(&a, C::InvalidFrees), 1);
    // A free that names no stream finds the block's.
    let r = a.malloc(4096, 0, 1).unwrap();
    a.free(r, None, 0, None).unwrap();
    let s = a.malloc(4096, 0, 1).unwrap();
    a.free(s, Some(4096), 0, None).unwrap();
    check(&a, 0);
}

#[test]
fn record_stream_on_a_block_a_front_handed_out_delays_its_reuse() {
    let (a, backend) = sim("");
    let p = a.malloc(4096, 0, 1).unwrap();
    a.free(p, None, 0, Some(1)).unwrap();
    let q = a.malloc(4096, 0, 1).unwrap();
    assert_eq!(q, p);
    a.record_stream(q, 2).unwrap();
    check(&a, 0);
    backend.hold_events(true); // stream 2's work is still queued
    a.free(q, None, 0, Some(1)).unwrap();
    assert_eq!(gauge(&a, 0, G::PendingFreeBlocks).current, 1);
    let r = a.malloc(4096, 0, 1).unwrap();
    assert_ne!(r, p, "reused while stream 2 may still use it");
    check(&a, 0);
    backend.hold_events(false);
    a.free(r, None, 0, Some(1)).unwrap();
    let _big = a.malloc(8192, 0, 1).unwrap(); // a miss processes pending frees
    assert_eq!(gauge(&a, 0, G::PendingFreeBlocks).current, 0);
    check(&a, 0);
}

#[test]
fn a_free_naming_another_device_frees_a_front_block_where_it_lives() {
    let (a, _) = host("device_count:2,page_size:64K,device_capacity:64M");
    let p = a.malloc(4096, 1, 5).unwrap();
    a.free(p, None, 1, Some(5)).unwrap();
    let q = a.malloc(4096, 1, 5).unwrap();
    assert_eq!(q, p);
    let err = a.free(q, Some(4096), 0, Some(5)).unwrap_err();
    assert!(err.to_string().contains("allocated on device 1"), "{err}");
    assert_eq!(a.stats(1).unwrap().counter(C::MismatchedFrees), 1);
    assert_eq!(gauge(&a, 1, G::AllocatedBytes).current, 0);
    check(&a, 0);
    check(&a, 1);
}

#[test]
fn history_recording_turns_the_fronts_off_and_back_on() {
    let (a, _) = sim("");
    let p = a.malloc(4096, 0, 1).unwrap();
    a.free(p, None, 0, Some(1)).unwrap();
    a.record_history(true, 1000);
    for _ in 0..10 {
        let q = a.malloc(4096, 0, 1).unwrap();
        a.free(q, None, 0, Some(1)).unwrap();
    }
    let trace = a.history_trace(0).unwrap();
    assert_eq!(trace.lines().filter(|l| !l.starts_with('#')).count(), 20, "every call recorded:\n{trace}");
    check(&a, 0);
    a.record_history(false, 0);
    let hits = counter(&a, C::CacheHits);
    for _ in 0..10 {
        let q = a.malloc(4096, 0, 1).unwrap();
        a.free(q, None, 0, Some(1)).unwrap();
    }
    assert_eq!(counter(&a, C::CacheHits), hits + 10);
    check(&a, 0);
}

#[test]
fn snapshots_show_front_blocks_in_their_true_state() {
    let (a, _) = sim("");
    let p = a.malloc(4096, 0, 1).unwrap();
    a.free(p, None, 0, Some(1)).unwrap();
    let q = a.malloc(4096, 0, 1).unwrap(); // handed out by the front
    let json = a.snapshot_json();
    assert!(json.contains(&format!("\"address\":{q},\"size\":4096,\"requested_size\":4096,\"state\":\"active_allocated\"")), "{json}");
    check(&a, 0);
    a.free(q, None, 0, Some(1)).unwrap();
    check(&a, 0);
}

#[test]
fn with_front_caches_off_every_call_takes_the_pool() {
    let (a, _) = sim("front_caches:false");
    let p = a.malloc(4096, 0, 1).unwrap();
    a.free(p, None, 0, Some(1)).unwrap();
    let q = a.malloc(4096, 0, 1).unwrap();
    assert_eq!(q, p, "the pool's best fit finds it");
    a.free(q, None, 0, Some(1)).unwrap();
    a.free(q, None, 0, Some(1)).unwrap_err();
    assert_eq!(counter(&a, C::InvalidFrees), 1);
    check(&a, 0);
}

#[test]
fn empty_cache_releases_what_the_fronts_hold() {
    let (a, _) = sim("growth_size:0");
    let blocks: Vec<u64> = (0..8).map(|s| a.malloc(4 << 20, 0, s).unwrap()).collect();
    for (s, &p) in blocks.iter().enumerate() {
        a.free(p, None, 0, Some(s as u64)).unwrap();
    }
    assert_eq!(gauge(&a, 0, G::CachedBytes).current, 32 << 20);
    a.empty_cache().unwrap();
    assert_eq!(gauge(&a, 0, G::CachedBytes).current, 0);
    assert_eq!(gauge(&a, 0, G::ReservedBytes).current, 0);
    check(&a, 0);
}

#[test]
fn during_a_graph_capture_the_fronts_neither_serve_nor_take_the_stream_s_blocks() {
    let (a, backend) = sim("graph_pools:true");
    let before = a.malloc(4096, 0, 1).unwrap();
    a.free(before, None, 0, Some(1)).unwrap(); // lent to stream 1's shard
    let out = a.malloc(4096, 0, 1).unwrap(); // handed out by it
    assert_eq!(out, before);
    let spare = a.malloc(4096, 0, 1).unwrap();
    a.free(spare, None, 0, Some(1)).unwrap(); // free in the front
    backend.set_capturing(Some(1));
    let captured = a.malloc(4096, 0, 1).unwrap();
    assert_ne!(captured, spare, "a capture took memory that work outside it may reuse");
    a.free(out, None, 0, Some(1)).unwrap(); // freed during the capture: the graph's now
    a.free(captured, None, 0, Some(1)).unwrap();
    check(&a, 0);
    backend.set_capturing(None);
    for _ in 0..4 {
        let p = a.malloc(4096, 0, 1).unwrap();
        assert!(p != out && p != captured, "memory a graph may replay into was reused outside it");
    }
    check(&a, 0);
}

#[test]
fn a_double_free_naming_another_device_is_reported_as_a_double_free() {
    let (a, _) = host("device_count:2,page_size:64K,device_capacity:64M");
    let p = a.malloc(4096, 1, 5).unwrap();
    a.free(p, None, 1, Some(5)).unwrap(); // free in device 1's front
    let err = a.free(p, Some(4096), 0, Some(5)).unwrap_err();
    assert!(err.to_string().contains("freed twice"), "{err}");
    assert_eq!(a.stats(1).unwrap().counter(C::InvalidFrees), 1);
    assert_eq!(a.stats(1).unwrap().counter(C::MismatchedFrees), 0);
    check(&a, 0);
    check(&a, 1);
}
