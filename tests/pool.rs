//! The policy layer on the sim backend: caching, split and coalesce, streams,
//! growth, reclamation, out of memory, statistics, bad input.

mod common;
use common::*;
use tessera::error::Error;
use tessera::stats::{TesseraCounter as C, TesseraGauge as G};

fn gauge(a: &tessera::allocator::Allocator, g: G) -> i64 {
    a.stats(0).unwrap().gauge(g).current
}

fn counter(a: &tessera::allocator::Allocator, c: C) -> u64 {
    a.stats(0).unwrap().counter(c)
}

/// Frees each of `ptrs` (all of `size` bytes, allocated on `stream`).
fn free_each(a: &tessera::allocator::Allocator, ptrs: &[u64], size: u64, stream: u64) {
    for &p in ptrs {
        a.free(p, Some(size), 0, Some(stream)).unwrap();
    }
}

#[test]
fn cached_block_is_reused_without_driver_calls() {
    let (a, _) = sim("");
    let p = a.malloc(3 * MIB, 0, 7).unwrap();
    let maps = counter(&a, C::DriverMapCalls);
    a.free(p, Some(3 * MIB), 0, Some(7)).unwrap();
    let q = a.malloc(3 * MIB, 0, 7).unwrap();
    assert_eq!(p, q, "same stream, same size: the cached block comes back");
    assert_eq!(counter(&a, C::DriverMapCalls), maps, "a hit makes no driver call");
    assert_eq!(counter(&a, C::CacheHits), 1);
    assert_eq!(counter(&a, C::CacheMisses), 1);
    check(&a, 0);
}

#[test]
fn stats_are_exact_for_a_known_sequence() {
    let (a, _) = sim("growth_size:0");
    let x = a.malloc(1000, 0, 0).unwrap(); // rounds to 1024, small arena
    let y = a.malloc(5 * MIB + 1, 0, 0).unwrap(); // rounds to 5 MiB + 512
    let s = a.stats(0).unwrap();
    assert_eq!(s.gauge(G::AllocatedBytes).current, (1024 + 5 * MIB + 512) as i64);
    assert_eq!(s.gauge(G::RequestedBytes).current, (1000 + 5 * MIB + 1) as i64);
    assert_eq!(s.gauge(G::ActiveBlocks).current, 2);
    // One granule for the small block, three for the large one.
    assert_eq!(s.gauge(G::MappedBytes).current, (8 * MIB) as i64);
    assert_eq!(s.gauge(G::ReservedBytes).current, (8 * MIB) as i64);
    a.free(x, Some(1000), 0, Some(0)).unwrap();
    a.free(y, Some(5 * MIB + 1), 0, Some(0)).unwrap();
    let s = a.stats(0).unwrap();
    assert_eq!(s.gauge(G::AllocatedBytes).current, 0);
    assert_eq!(s.gauge(G::AllocatedBytes).peak, (1024 + 5 * MIB + 512) as i64);
    assert_eq!(s.gauge(G::CachedBytes).current, (8 * MIB) as i64);
    a.reset_peak_stats(0).unwrap();
    assert_eq!(a.stats(0).unwrap().gauge(G::AllocatedBytes).peak, 0);
    check(&a, 0);
}

#[test]
fn split_and_coalesce() {
    let (a, _) = sim("");
    let big = a.malloc(8 * MIB, 0, 0).unwrap();
    a.free(big, None, 0, None).unwrap();
    let x = a.malloc(2 * MIB, 0, 0).unwrap();
    let y = a.malloc(2 * MIB, 0, 0).unwrap();
    let z = a.malloc(4 * MIB, 0, 0).unwrap();
    assert_eq!((x, y, z), (big, big + 2 * MIB, big + 4 * MIB), "split in address order");
    assert_eq!(counter(&a, C::CacheHits), 3);
    check(&a, 0);
    a.free(y, None, 0, None).unwrap();
    a.free(x, None, 0, None).unwrap();
    a.free(z, None, 0, None).unwrap();
    check(&a, 0);
    // Coalesced back into one 8 MiB block.
    assert_eq!(a.malloc(8 * MIB, 0, 0).unwrap(), big);
    check(&a, 0);
}

#[test]
fn small_and_large_requests_live_in_separate_arenas() {
    let (a, _) = sim("");
    let s = a.malloc(4096, 0, 0).unwrap();
    let l = a.malloc(4 * MIB, 0, 0).unwrap();
    assert!(s.abs_diff(l) > 1 << 30, "arenas are far apart");
    check(&a, 0);
}

#[test]
fn expandable_growth_extends_a_cached_block_at_the_top() {
    let (a, _) = sim("growth_size:0");
    let p = a.malloc(4 * MIB, 0, 0).unwrap();
    a.free(p, None, 0, None).unwrap();
    // 6 MiB does not fit the cached 4 MiB block; growth maps 2 MiB after it.
    let q = a.malloc(6 * MIB, 0, 0).unwrap();
    assert_eq!(q, p);
    assert_eq!(gauge(&a, G::ReservedBytes), (6 * MIB) as i64);
    check(&a, 0);
}

#[test]
fn small_large_requests_grow_by_growth_size_and_exactly_when_short() {
    let (a, _) = sim("growth_size:20M,device_capacity:1G");
    // In an empty pool, growth is exact: a step is at most an eighth of
    // what is reserved.
    let first = a.malloc(3 * MIB, 0, 0).unwrap();
    assert_eq!(gauge(&a, G::MappedBytes), (4 * MIB) as i64, "two granules, not 20 MiB");
    a.free(first, None, 0, None).unwrap();
    let base = a.malloc(160 * MIB, 0, 0).unwrap(); // 160 MiB held: steps of 20 MiB
    assert_eq!(base, first);
    let p = a.malloc(3 * MIB, 0, 0).unwrap();
    assert_eq!(gauge(&a, G::MappedBytes), (180 * MIB) as i64, "one 20 MiB growth");
    let q = a.malloc(3 * MIB, 0, 0).unwrap();
    assert_eq!(q, p + 3 * MIB, "the neighbour hits the cache");
    assert_eq!(counter(&a, C::CacheHits), 1);
    let big = a.malloc(30 * MIB, 0, 0).unwrap();
    // The cached 14 MiB at the top is extended by exactly the 16 MiB missing.
    assert_eq!(big, p + 6 * MIB);
    assert_eq!(gauge(&a, G::MappedBytes), (196 * MIB) as i64, "large requests map exactly");
    a.free(big, None, 0, None).unwrap();
    check(&a, 0);
    let (a, _) = sim("growth_size:20M,device_capacity:6M");
    assert!(a.malloc(3 * MIB, 0, 0).is_ok(), "with 6 MiB only, the growth is exact");
    assert_eq!(gauge(&a, G::MappedBytes), (4 * MIB) as i64);
    check(&a, 0);
}

#[test]
fn other_streams_wait_for_cached_blocks_until_memory_is_short() {
    // Recycling off (max_cached_fraction:1): this is about the pressure path.
    let (a, _) = sim("device_capacity:8M,max_cached_fraction:1");
    let p = a.malloc(8 * MIB, 0, 1).unwrap();
    a.free(p, None, 0, Some(1)).unwrap();
    // Stream 2 gets the block only because nothing else is left, and only
    // through a stream wait (counted).
    let q = a.malloc(8 * MIB, 0, 2).unwrap();
    assert_eq!(p, q);
    assert_eq!(counter(&a, C::CrossStreamReuses), 1);
    a.free(q, None, 0, Some(2)).unwrap();
    check(&a, 0);

    let (a, _) = sim("device_capacity:64M,max_cached_fraction:1");
    let p = a.malloc(8 * MIB, 0, 1).unwrap();
    a.free(p, None, 0, Some(1)).unwrap();
    let q = a.malloc(8 * MIB, 0, 2).unwrap();
    assert_ne!(p, q, "with memory to spare, another stream gets fresh memory");
    assert_eq!(counter(&a, C::CrossStreamReuses), 0);
    check(&a, 0);
}

#[test]
fn growth_recycles_cached_memory_once_the_device_is_done_with_it() {
    // A KV-cache-like pattern: each step allocates a larger buffer and frees
    // the old one. With recycling, reserved stays near live; without, the
    // cache balloons.
    let run = |conf: &str| {
        let (a, backend) = sim(&format!("growth_size:0,{conf}"));
        let mut old = a.malloc(4 * MIB, 0, 0).unwrap();
        for step in 1..40u64 {
            let new = a.malloc((4 + 2 * step) * MIB, 0, 0).unwrap();
            a.free(old, None, 0, None).unwrap();
            old = new;
            check(&a, 0);
        }
        let s = a.stats(0).unwrap();
        (s.gauge(G::ReservedBytes).peak, s.gauge(G::AllocatedBytes).peak, backend.live(0).1)
    };
    let (reserved, live, events) = run("");
    assert!(reserved as f64 <= 1.10 * live as f64, "reserved {reserved} vs live {live}");
    assert!(events <= 1, "epoch events are reused, not leaked: {events} live");
    let (reserved, live, _) = run("max_cached_fraction:1");
    assert!(reserved as f64 > 1.3 * live as f64, "without recycling the cache grows: {reserved} vs {live}");
}

#[test]
fn recycling_waits_for_the_stream_that_freed() {
    let (a, backend) = sim("growth_size:0,device_capacity:1G");
    let p = a.malloc(64 * MIB, 0, 1).unwrap();
    backend.hold_events(true); // the device is still running stream 1's work
    a.free(p, None, 0, Some(1)).unwrap();
    let q = a.malloc(96 * MIB, 0, 2).unwrap();
    // The 64 MiB cached for stream 1 was recycled for stream 2 only after a
    // wait on stream 1's event (in the sim, that wait releases the device).
    assert!(a.stats(0).unwrap().gauge(G::ReservedBytes).current <= (96 * MIB) as i64);
    a.free(q, None, 0, Some(2)).unwrap();
    check(&a, 0);
}

#[test]
fn record_stream_delays_reuse_until_events_complete() {
    let (a, backend) = sim("device_capacity:8M");
    let p = a.malloc(4 * MIB, 0, 1).unwrap();
    a.record_stream(p, 5).unwrap();
    backend.hold_events(true);
    a.free(p, None, 0, Some(1)).unwrap();
    assert_eq!(gauge(&a, G::PendingFreeBlocks), 1);
    let q = a.malloc(4 * MIB, 0, 1).unwrap();
    assert_ne!(p, q, "a block still used by stream 5 is not reused");
    check(&a, 0);
    backend.hold_events(false);
    a.free(q, None, 0, Some(1)).unwrap();
    let r = a.malloc(8 * MIB, 0, 1).unwrap(); // needs both blocks' memory
    assert_eq!(gauge(&a, G::PendingFreeBlocks), 0);
    a.free(r, None, 0, Some(1)).unwrap();
    check(&a, 0);
    assert_eq!(backend.live(0).1, 0, "no event leaks");
}

#[test]
fn out_of_memory_is_its_own_error_and_recoverable() {
    let (a, _) = sim("device_capacity:64M");
    let p = a.malloc(48 * MIB, 0, 0).unwrap();
    match a.malloc(32 * MIB, 0, 0) {
        Err(Error::OutOfMemory(info)) => {
            assert_eq!(info.requested_bytes, 32 * MIB);
            assert_eq!(info.total_capacity_bytes, 64 * MIB);
        }
        other => panic!("expected OOM, got {other:?}"),
    }
    let msg = a.malloc(32 * MIB, 0, 0).unwrap_err().to_string();
    assert!(msg.starts_with("CUDA out of memory. Tried to allocate 32.00 MiB. GPU 0"), "{msg}");
    assert_eq!(counter(&a, C::Ooms), 2);
    check(&a, 0);
    a.free(p, None, 0, None).unwrap();
    assert!(a.malloc(32 * MIB, 0, 0).is_ok());
    check(&a, 0);
}

#[test]
fn fragmented_free_granules_serve_a_large_request() {
    // 64 MiB device filled with 4 MiB blocks; every other one freed leaves
    // 32 MiB free in 4 MiB holes. A 32 MiB request must still succeed: the
    // free granules are unmapped and mapped again where the request is.
    let (a, _) = sim("device_capacity:64M,max_handle_size:2M");
    let blocks: Vec<u64> = (0..16).map(|_| a.malloc(4 * MIB, 0, 0).unwrap()).collect();
    for (i, &b) in blocks.iter().enumerate() {
        if i % 2 == 0 {
            a.free(b, None, 0, None).unwrap();
        }
    }
    check(&a, 0);
    let big = a.malloc(32 * MIB, 0, 0).expect("32 MiB free in pieces must serve 32 MiB");
    assert!(counter(&a, C::ReclaimedGranules) >= 16);
    assert_eq!(gauge(&a, G::ReservedBytes), (64 * MIB) as i64);
    check(&a, 0);
    a.free(big, None, 0, None).unwrap();
    check(&a, 0);
}

#[test]
fn without_expandable_segments_pressure_releases_everything_first() {
    let (a, _) = sim("device_capacity:64M,expandable_segments:false,max_handle_size:2M");
    let blocks: Vec<u64> = (0..16).map(|_| a.malloc(4 * MIB, 0, 0).unwrap()).collect();
    for &b in blocks.iter().step_by(2) {
        a.free(b, None, 0, None).unwrap();
    }
    assert!(a.malloc(32 * MIB, 0, 0).is_ok());
    assert!(counter(&a, C::DriverReleaseCalls) == 0 || gauge(&a, G::ReservedBytes) <= (64 * MIB) as i64);
    check(&a, 0);
}

#[test]
fn empty_cache_gives_back_every_cached_granule() {
    let (a, backend) = sim("max_handle_size:2M");
    let keep = a.malloc(3 * MIB, 0, 0).unwrap();
    let p = a.malloc(20 * MIB, 0, 0).unwrap();
    let small: Vec<u64> = (0..100).map(|_| a.malloc(10_000, 0, 0).unwrap()).collect();
    a.free(p, None, 0, None).unwrap();
    for s in small {
        a.free(s, None, 0, None).unwrap();
    }
    a.empty_cache().unwrap();
    check(&a, 0);
    // Only the two granules under the live 3 MiB block stay.
    assert_eq!(gauge(&a, G::ReservedBytes), (4 * MIB) as i64);
    assert_eq!(backend.live(0).0, 2);
    a.free(keep, None, 0, None).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(gauge(&a, G::ReservedBytes), 0);
    assert_eq!(backend.live(0), (0, 0, 0), "no handle, event or mapping left");
    check(&a, 0);
}

#[test]
fn memory_limit_and_fraction_cap_physical_memory() {
    let (a, _) = sim("device_capacity:1G,memory_limit:64M");
    assert!(a.malloc(60 * MIB, 0, 0).is_ok());
    assert!(matches!(a.malloc(8 * MIB, 0, 0), Err(Error::OutOfMemory(_))));
    let (a, _) = sim("device_capacity:1G");
    a.set_memory_fraction(0.25, 0).unwrap();
    assert!(a.malloc(250 * MIB, 0, 0).is_ok());
    assert!(a.malloc(8 * MIB, 0, 0).is_err());
    assert!(a.set_memory_fraction(1.5, 0).is_err());
    assert!(a.set_memory_fraction(0.5, 3).is_err());
}

#[test]
fn bad_frees_are_counted_and_change_nothing() {
    let (a, _) = sim("");
    let p = a.malloc(MIB, 0, 0).unwrap();
    let before = a.stats(0).unwrap();
    let e = a.free(p + 512, None, 0, None).unwrap_err().to_string();
    assert!(e.contains("not a live tessera allocation"), "{e}");
    assert_eq!(counter(&a, C::InvalidFrees), 1);
    a.free(p, Some(MIB), 0, Some(0)).unwrap();
    assert!(a.free(p, Some(MIB), 0, Some(0)).is_err(), "double free");
    assert_eq!(counter(&a, C::InvalidFrees), 2);
    assert_eq!(before.gauge(G::AllocatedBytes).current, MIB as i64);
    assert_eq!(gauge(&a, G::AllocatedBytes), 0);
    // Wrong size or stream: freed as allocated, reported.
    let q = a.malloc(MIB, 0, 3).unwrap();
    assert!(a.free(q, Some(12), 0, Some(3)).is_err());
    assert_eq!(counter(&a, C::MismatchedFrees), 1);
    assert_eq!(gauge(&a, G::AllocatedBytes), 0);
    assert!(a.malloc(MIB, 5, 0).is_err(), "device out of range");
    assert!(a.record_stream(q, 9).is_err(), "record_stream on a freed pointer");
    assert_eq!(counter(&a, C::InvalidRequests), 1);
    check(&a, 0);
}

#[test]
fn free_on_the_wrong_device_frees_where_the_pointer_lives() {
    let (a, _) = sim("device_count:2");
    let p = a.malloc(MIB, 1, 0).unwrap();
    let _ = a.malloc(MIB, 0, 0).unwrap();
    assert!(a.free(p, None, 0, None).is_err());
    assert_eq!(a.stats(1).unwrap().gauge(G::AllocatedBytes).current, 0);
    assert_eq!(a.stats(1).unwrap().counter(C::MismatchedFrees), 1);
    check(&a, 0);
    check(&a, 1);
}

#[test]
fn a_capturing_stream_never_waits_and_fails_cleanly_under_pressure() {
    let (a, backend) = sim("device_capacity:16M,growth_size:0");
    let p = a.malloc(8 * MIB, 0, 1).unwrap();
    backend.hold_events(true);
    a.free(p, None, 0, Some(1)).unwrap();
    backend.set_capturing(Some(2));
    // Growth during capture takes fresh memory and waits for nothing.
    let q = a.malloc(8 * MIB, 0, 2).unwrap();
    assert_ne!(p, q);
    // Under pressure, no wait (it would break the capture): a clean OOM.
    assert!(matches!(a.malloc(4 * MIB, 0, 2), Err(tessera::error::Error::OutOfMemory(_))));
    assert_eq!(a.stats(0).unwrap().counter(C::CrossStreamReuses), 0);
    assert_eq!(a.stats(0).unwrap().counter(C::DriverReleaseCalls), 0, "no release (it waits) during capture");
    backend.set_capturing(None);
    backend.hold_events(false);
    assert!(a.malloc(4 * MIB, 0, 2).is_ok(), "after the capture, the pressure path works again");
    check(&a, 0);
}

#[test]
fn memory_of_a_graph_capture_stays_private_to_it_until_released() {
    let (a, backend) = sim("device_capacity:1G,growth_size:0,graph_pools:true");
    graph_memory_stays_private(&a, &backend, false);
}

#[test]
fn watching_graphs_at_run_time_keeps_capture_memory_private() {
    // What tessera_torch does at the first capture_begin, with the default
    // configuration and a pool already in use.
    let (a, backend) = sim("device_capacity:1G,growth_size:0");
    graph_memory_stays_private(&a, &backend, true);
}

fn graph_memory_stays_private(a: &tessera::allocator::Allocator, backend: &tessera::backend::sim::SimBackend, watch: bool) {
    let before = a.malloc(4 * MIB, 0, 2).unwrap(); // allocated before the capture
    if watch {
        a.watch_graphs();
    }
    backend.set_capturing(Some(2));
    let x = a.malloc(4 * MIB, 0, 2).unwrap();
    a.free(x, None, 0, Some(2)).unwrap();
    let y = a.malloc(4 * MIB, 0, 2).unwrap();
    assert_eq!(x, y, "inside the capture, its own freed memory is reused");
    a.free(y, None, 0, Some(2)).unwrap();
    a.free(before, None, 0, Some(2)).unwrap(); // freed while capturing: the graph may use it
    backend.set_capturing(None);
    check(a, 0);
    // Outside the capture, neither block comes back, and nothing unmaps them.
    let z = a.malloc(4 * MIB, 0, 2).unwrap();
    assert!(z != x && z != before, "memory private to a graph was reused outside it");
    a.empty_cache().unwrap();
    assert!(gauge(a, G::MappedBytes) >= (12 * MIB) as i64, "empty_cache unmapped a graph's memory");
    check(a, 0);
    // Once the graphs are gone, their memory is reusable.
    assert_eq!(a.release_graph_pools(), 8 * MIB);
    check(a, 0);
    let w = a.malloc(4 * MIB, 0, 2).unwrap();
    assert!(w == x || w == before, "released graph memory is reused");
    check(a, 0);
}

#[test]
fn a_new_capture_does_not_take_another_captures_memory() {
    let (a, backend) = sim("device_capacity:1G,growth_size:0,graph_pools:true");
    backend.set_capturing(Some(2));
    let x = a.malloc(4 * MIB, 0, 2).unwrap();
    a.free(x, None, 0, Some(2)).unwrap();
    backend.set_capturing(Some(3)); // another stream, another capture id
    let y = a.malloc(4 * MIB, 0, 3).unwrap();
    assert_ne!(x, y, "two graphs shared memory");
    backend.set_capturing(None);
    check(&a, 0);
}

#[test]
fn small_requests_take_blocks_other_streams_are_done_with() {
    // Recycling off: it would wait for stream 1 (which the sim models by
    // finishing its work) and map the granule again for stream 2.
    let (a, backend) = sim("max_cached_fraction:1");
    let p = a.malloc(4096, 0, 1).unwrap();
    a.free(p, None, 0, Some(1)).unwrap();
    // The device may still run stream 1's work: stream 2 must not take it.
    backend.hold_events(true);
    let q = a.malloc(4096, 0, 2).unwrap();
    assert_ne!(p, q, "a block stream 1 may still use went to stream 2");
    check(&a, 0);
    a.free(q, None, 0, Some(2)).unwrap();
    let mapped = gauge(&a, G::MappedBytes);
    // Once stream 1 has passed the free, stream 3 takes the block, no growth.
    backend.hold_events(false);
    let r = a.malloc(4096, 0, 3).unwrap();
    assert!(r == p || r == q, "a done block of another stream serves the small request");
    assert_eq!(gauge(&a, G::MappedBytes), mapped, "no granule mapped for it");
    assert!(counter(&a, C::CrossStreamReuses) >= 1);
    a.free(r, None, 0, Some(3)).unwrap();
    check(&a, 0);
    assert!(backend.live(0).1 <= 3, "at most one epoch event per stream: {}", backend.live(0).1);
}

#[test]
fn front_blocks_serve_exact_sizes_and_coalesce_before_anything_else() {
    let (a, _) = sim("growth_size:0");
    // Four adjacent 2 MiB blocks, freed: they wait whole in a front's list.
    let blocks: Vec<u64> = (0..4).map(|_| a.malloc(2 * MIB, 0, 0).unwrap()).collect();
    for &b in &blocks {
        a.free(b, None, 0, None).unwrap();
        check(&a, 0);
    }
    assert_eq!(gauge(&a, G::CachedBytes), (8 * MIB) as i64, "blocks in the fronts count as cached");
    let mapped = gauge(&a, G::MappedBytes);
    // The same size comes back at once, most recently freed first.
    let again = a.malloc(2 * MIB, 0, 0).unwrap();
    assert_eq!(again, blocks[3]);
    a.free(again, None, 0, None).unwrap();
    // A larger request: the fronts' blocks coalesce and serve it, no growth.
    let big = a.malloc(8 * MIB, 0, 0).unwrap();
    assert_eq!(big, blocks[0]);
    assert_eq!(gauge(&a, G::MappedBytes), mapped, "served from the coalesced blocks");
    check(&a, 0);
    a.free(big, None, 0, None).unwrap();
    // A smaller request splits only after the fronts are drained: best
    // fit sees every free block.
    let small = a.malloc(MIB + 512, 0, 0).unwrap();
    assert_eq!(small, blocks[0]);
    a.free(small, None, 0, None).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(gauge(&a, G::CachedBytes), 0, "empty_cache releases the fronts' blocks too");
    assert_eq!(gauge(&a, G::ReservedBytes), 0);
    check(&a, 0);
}

#[test]
fn front_lists_are_bounded() {
    let (a, _) = sim("growth_size:0");
    let blocks: Vec<u64> = (0..100).map(|_| a.malloc(4096, 0, 0).unwrap()).collect();
    for &b in &blocks {
        a.free(b, None, 0, None).unwrap();
    }
    // check_invariants asserts each list's bound; the rest coalesced.
    check(&a, 0);
    let sizes: Vec<u64> = (1..400).map(|i| i * 512).collect();
    let many: Vec<u64> = sizes.iter().map(|&s| a.malloc(s, 0, 0).unwrap()).collect();
    for (&p, &s) in many.iter().zip(&sizes) {
        a.free(p, Some(s), 0, None).unwrap();
    }
    check(&a, 0); // and the number of lists
}

#[test]
fn growth_trades_a_larger_free_handle_for_an_exact_one_instead_of_taking_more() {
    let (a, backend) = sim("growth_size:0");
    let p = a.malloc(8 * MIB, 0, 1).unwrap(); // one 8 MiB handle
    a.free(p, None, 0, Some(1)).unwrap();
    a.reset_peak_stats(0).unwrap(); // no high-water mark of 8 MiB live
    // Stream 2 needs 4 MiB while the device still runs stream 1's work (so
    // stream 1's block is not taken as it is): recycling waits for it and
    // unmaps stream 1's cached handle, larger than the need.
    backend.hold_events(true);
    let q = a.malloc(4 * MIB, 0, 2).unwrap();
    assert_eq!(gauge(&a, G::ReservedBytes), (4 * MIB) as i64, "no memory beyond what the request needs");
    assert!(counter(&a, C::DriverReleaseCalls) >= 1, "the 8 MiB handle went back");
    check(&a, 0);
    a.free(q, None, 0, Some(2)).unwrap();
    check(&a, 0);
}

#[test]
fn growth_over_a_cache_that_recycling_cannot_shrink_is_exact_in_one_granule_handles() {
    let (a, _) = sim("growth_size:20M,max_handle_size:8M,device_capacity:1G,max_cached_fraction:0.02");
    let _base = a.malloc(160 * MIB, 0, 0).unwrap(); // 20 handles of 8 MiB: steps of 20 MiB
    // 3 MiB grows by 20 MiB: handles of 8, 8 and 4 MiB; 17 MiB cached.
    let p = a.malloc(3 * MIB, 0, 0).unwrap();
    assert_eq!((gauge(&a, G::ReservedBytes), gauge(&a, G::Handles)), ((180 * MIB) as i64, 23));
    // Stream 1 misses with 18 MiB, more than the 17 MiB cached (which it
    // would otherwise take as it is: never used). Recycling takes back the
    // two handles under nothing live (12 MiB); 5 MiB stay cached in p's
    // handle, over max_cached_fraction of what is held. So the growth maps
    // the 9 granules the request needs, not more: the two free handles (6
    // granules) and three new one-granule handles.
    let q = a.malloc(18 * MIB, 0, 1).unwrap();
    assert_eq!(gauge(&a, G::ReservedBytes), (186 * MIB) as i64, "nothing beyond what the request needs");
    assert_eq!(gauge(&a, G::Handles), 26);
    assert_eq!(gauge(&a, G::CachedBytes), (5 * MIB) as i64, "p's 5 MiB");
    check(&a, 0);
    a.free(p, None, 0, Some(0)).unwrap();
    a.free(q, None, 0, Some(1)).unwrap();
    check(&a, 0);
}

#[test]
fn within_a_memory_limit_growth_caches_up_to_it_unless_gc_asks() {
    let run = |conf: &str| {
        let (a, _) = sim(&format!("growth_size:0,{conf}"));
        let p = a.malloc(8 * MIB, 0, 1).unwrap();
        a.free(p, None, 0, Some(1)).unwrap();
        let q = a.malloc(8 * MIB, 0, 2).unwrap();
        check(&a, 0);
        a.free(q, None, 0, Some(2)).unwrap();
        gauge(&a, G::ReservedBytes)
    };
    assert_eq!(run(""), (8 * MIB) as i64, "no limit: stream 1's cached memory is recycled");
    assert_eq!(run("memory_limit:64M"), (16 * MIB) as i64, "within the limit: cached, not moved");
    assert_eq!(run("memory_limit:64M,garbage_collection_threshold:0.1"), (8 * MIB) as i64, "gc threshold recycles");
}

#[test]
fn under_pressure_blocks_waiting_for_other_streams_are_waited_for() {
    // The whole device is one block freed while stream 2 still uses it
    // (record_stream); nothing else is cached. A new request must wait for
    // the device (pressure path) and get it, not fail.
    let (a, backend) = sim("device_capacity:8M,growth_size:0");
    let p = a.malloc(8 * MIB, 0, 1).unwrap();
    a.record_stream(p, 2).unwrap();
    backend.hold_events(true);
    a.free(p, None, 0, Some(1)).unwrap();
    assert_eq!(gauge(&a, G::PendingFreeBlocks), 1);
    let q = a.malloc(8 * MIB, 0, 1).expect("the pending block's memory, after a synchronize");
    assert_eq!(gauge(&a, G::PendingFreeBlocks), 0);
    assert_eq!(counter(&a, C::Ooms), 0);
    a.free(q, None, 0, Some(1)).unwrap();
    check(&a, 0);
}

#[test]
fn sizes_that_cannot_round_safely_are_refused_at_every_entry() {
    let (a, _) = sim("");
    let first = a.malloc(4096, 0, 0).unwrap();
    for size in [u64::MAX, u64::MAX - 511, u64::MAX - 4096, (1 << 62) + 1] {
        let e = a.malloc(size, 0, 0).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("absurd"), "{size}: {e}");
        let e = a.with_pool(0, |p| p.malloc(size, 0)).unwrap_err();
        assert!(e.to_string().contains("absurd"), "the pool's own entry, {size}: {e}");
    }
    assert_eq!(counter(&a, C::InvalidRequests), 8);
    // Nothing changed: no 0-byte block at the next address.
    assert_eq!(gauge(&a, G::ActiveBlocks), 1);
    let next = a.malloc(4096, 0, 0).unwrap();
    assert_ne!(next, first);
    assert_eq!(gauge(&a, G::AllocatedBytes), 8192);
    check(&a, 0);
}

#[test]
fn a_named_pool_keeps_its_blocks_to_itself_until_released() {
    let (a, _) = sim("growth_size:0");
    let dev = a.device(0).unwrap();
    let p = a.malloc_in_pool(3 * MIB, 0, 1, 7).unwrap();
    let q = a.malloc_in_pool(MIB + 512, 0, 1, 7).unwrap();
    let blocks = dev.pool_blocks(7).unwrap();
    assert_eq!(blocks.iter().map(|b| (b.addr, b.size)).collect::<Vec<_>>(), vec![(p.min(q), if p < q { 3 * MIB } else { MIB + 512 }), (p.max(q), if p < q { MIB + 512 } else { 3 * MIB })]);
    a.free(p, Some(3 * MIB), 0, Some(1)).unwrap();
    check(&a, 0);
    // Outside the pool the block is not there, same stream and size or not.
    let outside = a.malloc(3 * MIB, 0, 1).unwrap();
    assert_ne!(outside, p, "a pool's cached block served a request outside it");
    // Inside, it is.
    let again = a.malloc_in_pool(3 * MIB, 0, 9, 7).unwrap();
    assert_eq!(again, p);
    a.free(again, None, 0, None).unwrap();
    // A checkpoint put back: exactly that block, out of the pool's cache.
    assert_eq!(dev.claim_in_pool(7, p, 3 * MIB, 3 * MIB - 5, 1).unwrap(), p);
    assert_eq!(dev.pool_blocks(7).unwrap().iter().find(|b| b.addr == p).map(|b| b.requested), Some(3 * MIB - 5));
    assert!(dev.claim_in_pool(7, p, 3 * MIB, 3 * MIB, 1).is_err(), "a live block claimed twice");
    assert!(dev.claim_in_pool(8, outside, MIB, MIB, 1).is_err(), "another pool's memory claimed");
    // Ranges that no block can start or end: refused, the pool unchanged.
    let cached = a.malloc_in_pool(MIB, 0, 1, 7).unwrap();
    a.free(cached, None, 0, None).unwrap();
    for (addr, what) in [(u64::MAX - 100, "a range past the address space"), (cached + 1, "an address inside a granule of 512")] {
        let e = dev.claim_in_pool(7, addr, 512, 512, 1).expect_err(what);
        assert!(e.to_string().contains("not a block's address range"), "{what}: {e}");
        check(&a, 0);
    }
    assert_eq!(dev.claim_in_pool(7, cached, MIB, MIB, 1).unwrap(), cached, "the cached block is whole");
    a.free(cached, None, 0, None).unwrap();
    check(&a, 0);
    for x in [p, q, outside] {
        a.free(x, None, 0, None).unwrap();
    }
    // Released: the pool's cache joins the general one, and serves others.
    assert!(dev.release_pool(7).unwrap() >= 3 * MIB);
    assert!(dev.pool_blocks(7).unwrap().is_empty());
    let reused = a.malloc(3 * MIB, 0, 1).unwrap();
    assert!(reused == p || reused == outside);
    check(&a, 0);
}

#[test]
fn pool_numbers_over_2_61_are_refused() {
    let (a, _) = sim("");
    assert!(a.malloc_in_pool(4096, 0, 0, 1 << 61).unwrap_err().to_string().contains("2^61"));
    check(&a, 0);
}

/// The driver thread's round (run here by hand): after a miss it maps the
/// ready reserve, and the next miss that fits takes it with no driver call
/// on the caller's thread; empty_cache gives it back for good.
#[test]
fn the_ready_reserve_serves_a_miss_with_no_driver_call_on_the_caller() {
    let (a, _) = sim("driver_thread:true,ready_fraction:0.5,max_cached_fraction:1,growth_size:0");
    a.set_tidied(None);
    let p = a.malloc(64 * MIB, 0, 1).unwrap();
    let caller_calls = counter(&a, C::DriverCalls);
    assert!(caller_calls > 0 && counter(&a, C::BackgroundDriverCalls) == 0, "the first miss grows on the caller");
    assert!(a.wants_tidy(), "a miss leaves the driver thread work");
    a.tidy();
    check(&a, 0);
    assert!(counter(&a, C::BackgroundDriverCalls) > 0, "the round made the driver calls");
    assert_eq!(counter(&a, C::DriverCalls), caller_calls, "none of them on the caller");
    // Twice the miss, at most half the reserved bytes: 32 MiB.
    assert_eq!(gauge(&a, G::CachedBytes), 32 * MIB as i64, "the reserve is cached, mapped memory");
    assert!(!a.wants_tidy(), "a full reserve leaves nothing to do");
    let q = a.malloc(16 * MIB, 0, 2).unwrap();
    check(&a, 0);
    assert_eq!(counter(&a, C::ReadyHits), 1);
    assert_eq!(counter(&a, C::DriverCalls), caller_calls, "another stream's miss took the reserve: no driver call");
    assert_eq!(counter(&a, C::CrossStreamReuses), 0, "never used memory needs no wait");
    a.free(q, Some(16 * MIB), 0, Some(2)).unwrap();
    a.free(p, Some(64 * MIB), 0, Some(1)).unwrap();
    a.empty_cache().unwrap();
    a.tidy();
    check(&a, 0);
    assert_eq!(gauge(&a, G::ReservedBytes), 0, "empty_cache gives the reserve back and it is not remade");
}

/// A miss larger than the reserve grows from it: only the difference is
/// mapped, and the block is the caller's stream's.
#[test]
fn a_miss_larger_than_the_reserve_maps_only_the_difference() {
    let (a, _) = sim("driver_thread:true,ready_fraction:0.5,max_cached_fraction:1,growth_size:0");
    a.set_tidied(None);
    let p = a.malloc(64 * MIB, 0, 1).unwrap();
    a.tidy();
    let reserved = gauge(&a, G::ReservedBytes);
    let q = a.malloc(48 * MIB, 0, 3).unwrap();
    check(&a, 0);
    assert_eq!(gauge(&a, G::ReservedBytes), reserved + 16 * MIB as i64, "32 MiB ready, 16 MiB mapped");
    assert_eq!(counter(&a, C::ReadyHits), 1);
    a.free(q, Some(48 * MIB), 0, Some(3)).unwrap();
    let r = a.malloc(48 * MIB, 0, 3).unwrap();
    assert_eq!(r, q, "cached for stream 3, the caller's");
    a.free(r, Some(48 * MIB), 0, Some(3)).unwrap();
    a.free(p, Some(64 * MIB), 0, Some(1)).unwrap();
    check(&a, 0);
}

/// Over max_cached_fraction the reserve is made of recycled memory only,
/// and only what the device is done with: a busy device leaves the round
/// waiting, with nothing new taken from the driver.
#[test]
fn over_the_cached_fraction_the_reserve_is_recycled_once_the_device_is_done() {
    let (a, sim) = sim("driver_thread:true,ready_fraction:0.04,growth_size:0");
    a.set_tidied(None);
    let blocks: Vec<u64> = (0..20).map(|_| a.malloc(8 * MIB, 0, 1).unwrap()).collect();
    sim.hold_events(true);
    // 24 MiB cached of 172: over 8%, under the 16% at which the caller
    // would recycle itself.
    free_each(&a, &blocks[..3], 8 * MIB, 1);
    let big = a.malloc(12 * MIB, 0, 2).unwrap(); // a miss: demand for 24 MiB
    let reserved = gauge(&a, G::ReservedBytes);
    assert_eq!(a.tidy(), tessera::pool::Tidy::Waiting, "the cache waits for the device");
    assert_eq!(gauge(&a, G::ReservedBytes), reserved, "nothing new taken while cached memory waits");
    sim.hold_events(false);
    a.tidy();
    check(&a, 0);
    assert!(gauge(&a, G::ReservedBytes) <= reserved, "the reserve came from recycled memory");
    assert!(gauge(&a, G::CachedBytes) < 24 * MIB as i64, "recycled, not added to");
    assert!(counter(&a, C::ReclaimedGranules) > 0 && counter(&a, C::BackgroundDriverCalls) > 0);
    a.free(big, Some(12 * MIB), 0, Some(2)).unwrap();
    free_each(&a, &blocks[3..], 8 * MIB, 1);
    check(&a, 0);
}

/// The real thread: four threads allocate and free while it tidies; every
/// invariant holds, and stopping it joins it.
#[test]
fn the_driver_thread_tidies_while_threads_allocate() {
    let (a, _) = sim("driver_thread:true,ready_fraction:0.5,max_cached_fraction:0.5");
    let a = std::sync::Arc::new(a);
    let t = a.clone();
    let signal = tessera::worker::start(move || Some(t.tidy())).expect("the thread starts");
    a.set_tidied(Some(signal));
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let a = a.clone();
            std::thread::spawn(move || {
                let mut rng = w * 7919 + 1;
                let mut live = Vec::new();
                for _ in 0..3000 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if live.len() < 16 && rng % 3 != 0 {
                        let size = (rng >> 8) % (24 * MIB) + 1;
                        live.push((a.malloc(size, 0, w).unwrap(), size));
                    } else if !live.is_empty() {
                        let (p, size) = live.swap_remove((rng >> 20) as usize % live.len());
                        a.free(p, Some(size), 0, Some(w)).unwrap();
                    }
                }
                for (p, size) in live {
                    a.free(p, Some(size), 0, Some(w)).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    check(&a, 0);
    // Whether the thread ran during the workers' loops is up to the
    // scheduler (CI's two cores run other tests beside this one). Once they
    // are done it has the pool to itself: misses on fresh streams, with time
    // between them, find the reserve within a bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut stream = 100;
    while counter(&a, C::ReadyHits) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
        let p = a.malloc(4 * MIB, 0, stream).unwrap();
        a.free(p, Some(4 * MIB), 0, Some(stream)).unwrap();
        stream += 1;
    }
    tessera::worker::stop();
    check(&a, 0);
    let s = a.stats(0).unwrap();
    assert!(s.counter(C::BackgroundDriverCalls) > 0, "the thread made driver calls");
    assert!(s.counter(C::ReadyHits) > 0, "misses found the reserve ({} fresh streams tried)", stream - 100);
    assert_eq!(s.gauge(G::AllocatedBytes).current, 0);
}

/// Under the high-water mark of live memory (plus max_cached_fraction),
/// growth caches instead of recycling: the peak already took that much.
/// After empty_cache the mark starts again, and recycling with it.
#[test]
fn growth_under_the_high_water_mark_of_live_memory_does_not_recycle() {
    let (a, _) = sim("growth_size:0");
    let big: Vec<u64> = (0..10).map(|_| a.malloc(10 * MIB, 0, 1).unwrap()).collect(); // 100 MiB live
    free_each(&a, &big[..5], 10 * MIB, 1);
    // 50 MiB cached of 100: far over 8%. A 6 MiB miss stays under
    // 1.08 x 100 MiB: it grows without recycling.
    let q = a.malloc(6 * MIB, 0, 2).unwrap();
    assert_eq!(counter(&a, C::ReclaimedGranules), 0, "recycled under the high-water mark");
    assert_eq!(counter(&a, C::DriverUnmapCalls), 0);
    check(&a, 0);
    a.free(q, Some(6 * MIB), 0, Some(2)).unwrap();
    free_each(&a, &big[5..], 10 * MIB, 1);
    // After empty_cache the mark is gone: the cache over 8% is recycled.
    a.empty_cache().unwrap();
    let small: Vec<u64> = (0..4).map(|_| a.malloc(10 * MIB, 0, 1).unwrap()).collect();
    free_each(&a, &small[..2], 10 * MIB, 1);
    let r = a.malloc(12 * MIB, 0, 2).unwrap();
    assert!(counter(&a, C::ReclaimedGranules) > 0, "over the fraction and past the mark: growth recycles");
    a.free(r, Some(12 * MIB), 0, Some(2)).unwrap();
    free_each(&a, &small[2..], 10 * MIB, 1);
    check(&a, 0);
}

/// A sim pool with no growth rounding, reserve or front caches where
/// stream 1 freed a 40 MiB block at `p` a moment ago and holds 8 MiB at
/// `keep`; the high-water mark is down to what is live (8 MiB), so that
/// recycling is due at the next growth. Returns (allocator, p, keep).
fn stream_1_freed_40_mib() -> (tessera::allocator::Allocator, u64, u64) {
    let (a, _) = sim("growth_size:0,ready_fraction:0,front_caches:false");
    let p = a.malloc(40 * MIB, 0, 1).unwrap();
    let keep = a.malloc(8 * MIB, 0, 1).unwrap();
    a.free(p, Some(40 * MIB), 0, Some(1)).unwrap();
    a.reset_peak_stats(0).unwrap();
    (a, p, keep)
}

/// Once recycling is due, a large miss takes a block that another stream
/// cached and the device is done with, as it is: no driver call (growth
/// would unmap it and map its handles again).
#[test]
fn a_large_miss_takes_another_streams_done_block_once_recycling_is_due() {
    let (a, p, keep) = stream_1_freed_40_mib();
    // Two rounds of the driver thread's (no reserve: they only poll the
    // epochs) record stream 1's event and see it passed.
    a.set_tidied(None);
    a.tidy();
    a.tidy();
    let (calls, reuses) = (counter(&a, C::DriverCalls), counter(&a, C::CrossStreamReuses));
    let q = a.malloc(32 * MIB, 0, 2).unwrap();
    assert!(q >= p && q + 32 * MIB <= p + 40 * MIB, "stream 1's done block, taken by stream 2");
    assert_eq!(counter(&a, C::DriverCalls), calls, "no driver call");
    assert_eq!(counter(&a, C::CrossStreamReuses), reuses + 1);
    check(&a, 0);
    a.free(q, Some(32 * MIB), 0, Some(2)).unwrap();
    a.free(keep, Some(8 * MIB), 0, Some(1)).unwrap();
    check(&a, 0);
}

/// Cross-stream reuse takes the best fit across every other stream's cache:
/// here stream 1's block, cached while it was the only stream with cached
/// blocks, before stream 2's larger one joined them.
#[test]
fn cross_stream_reuse_takes_the_best_fit_across_two_streams() {
    let (a, _) = sim("growth_size:0,ready_fraction:0,front_caches:false");
    let p1 = a.malloc(20 * MIB, 0, 1).unwrap();
    let keep1 = a.malloc(8 * MIB, 0, 1).unwrap();
    let p2 = a.malloc(40 * MIB, 0, 2).unwrap();
    let keep2 = a.malloc(8 * MIB, 0, 2).unwrap();
    a.free(p1, Some(20 * MIB), 0, Some(1)).unwrap();
    check(&a, 0);
    a.free(p2, Some(40 * MIB), 0, Some(2)).unwrap();
    check(&a, 0);
    a.reset_peak_stats(0).unwrap();
    let reuses = counter(&a, C::CrossStreamReuses);
    let q = a.malloc(16 * MIB, 0, 3).unwrap();
    assert!(q >= p1 && q + 16 * MIB <= p1 + 20 * MIB, "stream 1's 20 MiB block, the best fit, taken by stream 3");
    assert_eq!(counter(&a, C::CrossStreamReuses), reuses + 1);
    check(&a, 0);
    for (x, n, st) in [(q, 16 * MIB, 3), (keep1, 8 * MIB, 1), (keep2, 8 * MIB, 2)] {
        a.free(x, Some(n), 0, Some(st)).unwrap();
        check(&a, 0);
    }
    a.empty_cache().unwrap();
    check(&a, 0);
    // With nothing cached, one stream's blocks again need no second index.
    let r = a.malloc(4 * MIB, 0, 1).unwrap();
    a.free(r, Some(4 * MIB), 0, Some(1)).unwrap();
    assert_eq!(a.malloc(4 * MIB, 0, 1).unwrap(), r, "the block comes back from its stream's cache");
    check(&a, 0);
}

/// A stream with nothing cached of its own asks the events that the miss's
/// poll recorded again, so that a block another stream freed a moment ago
/// and the device has passed serves it with no map (64 streams in turn,
/// each allocating and freeing once: otherwise each miss unmaps and maps).
/// A stream with cached blocks of its own waits for the next poll (taking
/// other streams' blocks sooner fragments the multi-stream traces).
#[test]
fn a_stream_with_nothing_cached_takes_a_block_just_freed_elsewhere() {
    let (a, p, keep) = stream_1_freed_40_mib();
    let (maps, reuses) = (counter(&a, C::DriverMapCalls), counter(&a, C::CrossStreamReuses));
    let q = a.malloc(32 * MIB, 0, 2).unwrap();
    assert!(q >= p && q + 32 * MIB <= p + 40 * MIB, "stream 1's block, freed a moment ago, taken by stream 2");
    assert_eq!(counter(&a, C::DriverMapCalls), maps, "no map");
    assert_eq!(counter(&a, C::CrossStreamReuses), reuses + 1);
    check(&a, 0);

    // Stream 3 has a cached block of its own (too small): the block stream
    // 2 frees now is not known done to it until a later poll.
    let small = a.malloc(4 * MIB, 0, 3).unwrap();
    a.free(small, Some(4 * MIB), 0, Some(3)).unwrap();
    a.free(q, Some(32 * MIB), 0, Some(2)).unwrap();
    let (maps, reuses) = (counter(&a, C::DriverMapCalls), counter(&a, C::CrossStreamReuses));
    let r = a.malloc(32 * MIB, 0, 3).unwrap();
    assert_eq!(counter(&a, C::CrossStreamReuses), reuses, "stream 2's block waits for the next poll");
    assert!(counter(&a, C::DriverMapCalls) > maps, "the request grew the pool instead");
    check(&a, 0);
    for (x, n, st) in [(r, 32 * MIB, 3), (keep, 8 * MIB, 1)] {
        a.free(x, Some(n), 0, Some(st)).unwrap();
    }
    check(&a, 0);
}
