//! The allocator on the host backend, where memory is real: random sequences
//! of operations against a shadow model. After every step: the invariants
//! hold, live blocks never overlap, every live byte keeps its pattern
//! (through every unmap and remap), and, with one-granule handles, an
//! allocation fails only when the granules it needs are pinned by live
//! blocks (larger handles pin at handle grain, by design).

mod common;
use common::*;
use proptest::prelude::*;
use std::collections::BTreeSet;
use tessera::error::Error;
use tessera::stats::{TesseraCounter as C, TesseraGauge as G};

const G: u64 = 64 << 10; // granule of these tests
const CAPACITY: u64 = 8 << 20;

#[derive(Debug, Clone)]
enum Op {
    Alloc { size: u64, stream: u64 },
    Free { pick: usize },
    RecordStream { pick: usize, stream: u64 },
    EmptyCache,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop_oneof![1u64..4096, 4096u64..70_000, 70_000u64..1_500_000], 0u64..3)
            .prop_map(|(size, stream)| Op::Alloc { size, stream }),
        5 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<usize>(), 0u64..3).prop_map(|(pick, stream)| Op::RecordStream { pick, stream }),
        1 => Just(Op::EmptyCache),
    ]
}

struct Live {
    ptr: u64,
    size: u64,
    stream: u64,
    seed: u64,
}

/// Granules overlapped by live blocks, by absolute granule address.
fn pinned_granules(live: &[Live]) -> usize {
    let mut set = BTreeSet::new();
    for l in live {
        let rounded = tessera::pool::round_size(l.size);
        for g in (l.ptr / G)..=((l.ptr + rounded - 1) / G) {
            set.insert(g);
        }
    }
    set.len()
}

fn run(ops: Vec<Op>, conf: &str, strict_oom: bool) {
    let (a, backend) = host(&format!("page_size:64K,small_size:16K,device_capacity:{CAPACITY},{conf}"));
    let mut live: Vec<Live> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Alloc { size, stream } => match a.malloc(size, 0, stream) {
                Ok(ptr) => {
                    fill(ptr, size, step as u64);
                    live.push(Live { ptr, size, stream, seed: step as u64 });
                }
                Err(Error::OutOfMemory(_)) if strict_oom => {
                    let need = tessera::pool::round_size(size).div_ceil(G) as usize;
                    let pinned = pinned_granules(&live);
                    assert!(
                        pinned + need > (CAPACITY / G) as usize,
                        "step {step}: OOM for {size} bytes with only {pinned} of {} granules pinned",
                        CAPACITY / G
                    );
                }
                Err(Error::OutOfMemory(_)) => {}
                Err(e) => panic!("step {step}: {e}"),
            },
            Op::Free { pick } if !live.is_empty() => {
                let l = live.swap_remove(pick % live.len());
                assert!(verify(l.ptr, l.size, l.seed), "step {step}: block corrupted before its free");
                a.free(l.ptr, Some(l.size), 0, Some(l.stream)).unwrap();
            }
            Op::RecordStream { pick, stream } if !live.is_empty() => {
                let l = &live[pick % live.len()];
                a.record_stream(l.ptr, stream).unwrap();
            }
            Op::EmptyCache => a.empty_cache().unwrap(),
            _ => {}
        }
        check(&a, 0);
        let mut spans: Vec<(u64, u64)> = live.iter().map(|l| (l.ptr, l.ptr + l.size)).collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "step {step}: live blocks overlap");
        }
        for l in &live {
            assert!(verify(l.ptr, l.size, l.seed), "step {step}: a live block changed");
        }
    }
    for l in live.drain(..) {
        a.free(l.ptr, Some(l.size), 0, Some(l.stream)).unwrap();
    }
    a.empty_cache().unwrap();
    check(&a, 0);
    assert_eq!(backend.live_handles(0), 0, "handles leaked");
}

proptest! {
    // 64 cases each, or PROPTEST_CASES (an explicit `cases` would ignore it).
    #![proptest_config(ProptestConfig { cases: proptest_cases(64), ..ProptestConfig::default() })]

    #[test]
    fn random_operations_fail_only_at_the_physical_limit(ops in prop::collection::vec(op(), 1..300)) {
        run(ops, "max_handle_size:64K", true);
    }

    #[test]
    fn random_operations_keep_every_live_byte_with_large_handles(ops in prop::collection::vec(op(), 1..300)) {
        run(ops, "max_handle_size:256K", false);
    }

    #[test]
    fn random_operations_without_expandable_segments(ops in prop::collection::vec(op(), 1..200)) {
        run(ops, "max_handle_size:256K,expandable_segments:false", false);
    }
}

#[test]
fn remapped_granules_keep_data_of_neighbours() {
    // Large blocks interleaved; freeing every other and asking for one large
    // block forces granules to move while neighbours stay live.
    let (a, _) = host("page_size:64K,device_capacity:4M,max_handle_size:1M");
    let blocks: Vec<u64> = (0..16).map(|_| a.malloc(256 << 10, 0, 0).unwrap()).collect();
    for (i, &b) in blocks.iter().enumerate() {
        fill(b, 256 << 10, i as u64);
    }
    for &b in blocks.iter().step_by(2) {
        a.free(b, None, 0, None).unwrap();
    }
    let big = a.malloc(2 << 20, 0, 0).expect("2 MiB free in holes");
    fill(big, 2 << 20, 99);
    for (i, &b) in blocks.iter().enumerate().skip(1).step_by(2) {
        assert!(verify(b, 256 << 10, i as u64), "neighbour {i} changed");
    }
    assert!(verify(big, 2 << 20, 99));
    check(&a, 0);
}

#[test]
fn near_capacity_handles_are_one_page_so_reclaim_can_take_any_page() {
    // 4 MiB device of 64 KiB pages; blocks of 3 pages each fill it, every
    // other one is freed. A request for the freed pages succeeds only if the
    // handles under the live blocks hold nothing else: one page each.
    let run = |fine: &str| {
        let (a, _) = host(&format!("page_size:64K,device_capacity:4M,max_handle_size:1M,small_size:64K,growth_size:1M,{fine}"));
        let blocks: Vec<u64> = (0..21).map(|_| a.malloc(192 << 10, 0, 0).unwrap()).collect();
        for (i, &b) in blocks.iter().enumerate() {
            fill(b, 192 << 10, i as u64);
        }
        for &b in blocks.iter().step_by(2) {
            a.free(b, None, 0, None).unwrap();
        }
        let big = a.malloc(11 * (192 << 10), 0, 0);
        if let Ok(big) = big {
            fill(big, 11 * (192 << 10), 99);
            assert!(verify(big, 11 * (192 << 10), 99));
        }
        for (i, &b) in blocks.iter().enumerate().skip(1).step_by(2) {
            assert!(verify(b, 192 << 10, i as u64), "neighbour {i} changed");
        }
        check(&a, 0);
        big.is_ok()
    };
    assert!(run("fine_handles_above:0"), "one-page handles: every freed page can move");
    assert!(!run("fine_handles_above:1"), "1 MiB handles under live blocks pin the freed pages");
}

#[test]
fn near_capacity_free_coarse_handles_are_split_into_pages() {
    let (a, _) = host("page_size:64K,device_capacity:4M,max_handle_size:1M,growth_size:0,fine_handles_above:0.5");
    let x = a.malloc(1 << 20, 0, 0).unwrap(); // one 16-page handle (1 MiB < half the device)
    fill(x, 1 << 20, 1);
    a.free(x, None, 0, None).unwrap();
    assert_eq!(a.stats(0).unwrap().gauge(G::Handles).current, 1);
    // Another stream needs 2.5 MiB: recycling unmaps the cached handle, and
    // past half the device it comes back as 16 one-page handles.
    let y = a.malloc(40 << 16, 0, 1).unwrap();
    fill(y, 40 << 16, 2);
    let s = a.stats(0).unwrap();
    assert_eq!(s.gauge(G::Handles).current, 40, "every handle is one page");
    assert!(s.counter(C::DriverReleaseCalls) >= 1, "the coarse handle was released");
    assert_eq!(s.gauge(G::ReservedBytes).current, 40 << 16);
    assert!(verify(y, 40 << 16, 2));
    check(&a, 0);
}

#[test]
fn near_capacity_recycling_unmaps_only_what_the_request_needs() {
    let (a, _) = host("page_size:64K,device_capacity:4M,max_handle_size:64K,growth_size:0,small_size:64K");
    let x = a.malloc(2 << 20, 0, 1).unwrap();
    let y = a.malloc(1 << 20, 0, 1).unwrap();
    let w = a.malloc(512 << 10, 0, 1).unwrap();
    fill(x, 2 << 20, 1);
    fill(y, 1 << 20, 2);
    a.free(x, None, 0, Some(1)).unwrap();
    a.free(w, None, 0, Some(1)).unwrap(); // 2.5 MiB cached for stream 1, in two runs, of 3.5 MiB held
    // Stream 2 needs 36 pages (more than either cached block, which it
    // would take as it is), near the 4 MiB device's end: recycling takes
    // the 8 pages of w's run and 28 of x's, not all 32 (they would have to
    // be mapped again, page by page, by the next request that needs them).
    let z = a.malloc(2304 << 10, 0, 2).unwrap();
    fill(z, 2304 << 10, 3);
    let s = a.stats(0).unwrap();
    assert_eq!(s.counter(C::ReclaimedGranules), 36);
    assert_eq!(s.gauge(G::CachedBytes).current, 256 << 10);
    assert!(verify(y, 1 << 20, 2) && verify(z, 2304 << 10, 3));
    check(&a, 0);
}

/// Pages of 64 KiB, every handle one page, growth exact, every block in the
/// large arena: the pressure path's gap placement, page by page.
const GAP_CONF: &str = "page_size:64K,device_capacity:1M,max_handle_size:64K,growth_size:0,small_size:16K";

#[test]
fn under_pressure_a_request_starts_in_the_free_tail_of_a_pinned_page() {
    let (a, _) = host(GAP_CONF);
    // x pins pages 0-1 and leaves 32 KiB of page 1 free (cached on stream 1).
    let x = a.malloc(96 << 10, 0, 1).unwrap();
    fill(x, 96 << 10, 1);
    let z = a.malloc(896 << 10, 0, 1).unwrap();
    a.free(z, None, 0, Some(1)).unwrap();
    a.empty_cache().unwrap(); // z's 14 pages go back; the 32 KiB tail stays, pinned by x
    let s = a.stats(0).unwrap();
    assert_eq!(s.gauge(G::ReservedBytes).current, 2 << 16);
    // Stream 2 asks for 14 pages and 16 KiB: a fresh range needs 15 pages,
    // 14 are free. The 32 KiB tail and 14 new pages after it serve it.
    let r = a.malloc((14 << 16) + (16 << 10), 0, 2).expect("served across the gap");
    fill(r, (14 << 16) + (16 << 10), 2);
    assert_eq!(r, x + (96 << 10), "the request starts in x's page");
    let s = a.stats(0).unwrap();
    assert_eq!(s.counter(C::GapPlacements), 1);
    assert_eq!(s.gauge(G::ReservedBytes).current, 16 << 16, "every page of the device, none more");
    assert!(verify(x, 96 << 10, 1), "x changed");
    assert!(verify(r, (14 << 16) + (16 << 10), 2));
    check(&a, 0);
    a.free(r, None, 0, Some(2)).unwrap();
    a.free(x, None, 0, Some(1)).unwrap();
    a.empty_cache().unwrap();
    check(&a, 0);
    assert_eq!(a.stats(0).unwrap().gauge(G::ReservedBytes).current, 0);
}

#[test]
fn under_pressure_a_request_ends_in_the_free_head_of_a_pinned_page() {
    let (a, _) = host(GAP_CONF);
    let l = a.malloc(256 << 10, 0, 3).unwrap(); // pages 0-3
    let s3 = a.malloc(64 << 10, 0, 3).unwrap(); // page 4: keeps l's hole apart from p's
    let p = a.malloc(608 << 10, 0, 1).unwrap(); // pages 5-14, the last one half
    let y = a.malloc(96 << 10, 0, 1).unwrap(); // the rest of page 14, and page 15
    assert_eq!((s3, p, y), (l + (256 << 10), l + (320 << 10), l + (928 << 10)));
    fill(s3, 64 << 10, 3);
    fill(y, 96 << 10, 4);
    a.free(l, None, 0, Some(3)).unwrap();
    a.free(p, None, 0, Some(1)).unwrap();
    a.empty_cache().unwrap(); // holes: pages 0-3 and 5-13; page 14's first 32 KiB cached
    let k = a.malloc(256 << 10, 0, 3).unwrap(); // best fit: the 4-page hole
    assert_eq!(k, l);
    fill(k, 256 << 10, 5);
    a.set_memory_fraction(0.75, 0).unwrap(); // 12 pages: 7 held, 5 free
    // 5 pages and 16 KiB on stream 2: a fresh range needs 6 pages. The back
    // 5 pages of the 9-page hole and the 32 KiB before y serve it.
    let want = (5 << 16) + (16 << 10);
    let r = a.malloc(want, 0, 2).expect("served across the gap");
    fill(r, want, 6);
    assert_eq!(r, y - (32 << 10) - (5 << 16), "the request ends in y's page");
    let s = a.stats(0).unwrap();
    assert_eq!(s.counter(C::GapPlacements), 1);
    assert_eq!(s.gauge(G::ReservedBytes).current, 12 << 16);
    for (ptr, len, seed) in [(s3, 64 << 10, 3), (y, 96 << 10, 4), (k, 256 << 10, 5), (r, want, 6)] {
        assert!(verify(ptr, len, seed), "block at {ptr:#x} changed");
    }
    check(&a, 0);
    // The device is full now: one more page fails cleanly, nothing moves.
    assert!(matches!(a.malloc(64 << 10, 0, 2), Err(Error::OutOfMemory(_))));
    for (ptr, len, seed) in [(s3, 64 << 10, 3), (y, 96 << 10, 4), (k, 256 << 10, 5), (r, want, 6)] {
        assert!(verify(ptr, len, seed), "block at {ptr:#x} changed after the OOM");
    }
    check(&a, 0);
}

/// Pages of 64 KiB, one page per handle, exact growth, all in the large
/// arena, memory plentiful: growth's placement across gaps.
const PLACE_CONF: &str = "page_size:64K,device_capacity:64M,max_handle_size:64K,growth_size:0,small_size:16K";
const P: u64 = 64 << 10;

/// Stream 1's blocks a (pages 0-3), b (4-7), c (8-11), d (12), with b
/// unmapped (a hole) and a, c cached: returns (a, d), d live and filled.
fn hole_between_cached_blocks(a: &tessera::allocator::Allocator) -> (u64, u64) {
    let x = a.malloc(4 * P, 0, 1).unwrap();
    let b = a.malloc(4 * P, 0, 1).unwrap();
    let c = a.malloc(4 * P, 0, 1).unwrap();
    let d = a.malloc(P, 0, 1).unwrap();
    assert_eq!((b, c, d), (x + 4 * P, x + 8 * P, x + 12 * P));
    fill(d, P, 9);
    a.free(b, None, 0, Some(1)).unwrap();
    a.empty_cache().unwrap(); // b's pages go; x, c and d are live
    a.free(x, None, 0, Some(1)).unwrap();
    a.free(c, None, 0, Some(1)).unwrap();
    (x, d)
}

#[test]
fn growth_maps_only_the_hole_between_two_cached_blocks_of_its_stream() {
    let (a, _) = host(&format!("{PLACE_CONF},max_cached_fraction:1"));
    let (x, d) = hole_between_cached_blocks(&a);
    assert_eq!(a.stats(0).unwrap().gauge(G::ReservedBytes).current, (9 * P) as i64);
    // 10 pages: a fresh range maps 10; a, the hole and c map 4.
    let r = a.malloc(10 * P, 0, 1).unwrap();
    fill(r, 10 * P, 1);
    assert_eq!(r, x, "the request starts at a, spans the hole, ends in c");
    let s = a.stats(0).unwrap();
    assert_eq!(s.gauge(G::ReservedBytes).current, (13 * P) as i64, "only the hole's 4 pages are new");
    assert_eq!(s.gauge(G::CachedBytes).current, (2 * P) as i64, "c's rest stays cached");
    assert!(verify(r, 10 * P, 1) && verify(d, P, 9));
    check(&a, 0);
    a.free(r, None, 0, Some(1)).unwrap();
    a.free(d, None, 0, Some(1)).unwrap();
    check(&a, 0);
}

#[test]
fn growth_maps_the_back_of_a_hole_before_a_cached_block_of_its_stream() {
    let (a, _) = host(&format!("{PLACE_CONF},max_cached_fraction:1"));
    let x = a.malloc(4 * P, 0, 1).unwrap();
    let h = a.malloc(6 * P, 0, 1).unwrap();
    let c = a.malloc(4 * P, 0, 1).unwrap();
    let d = a.malloc(P, 0, 1).unwrap();
    fill(x, 4 * P, 7);
    fill(d, P, 9);
    a.free(h, None, 0, Some(1)).unwrap();
    a.empty_cache().unwrap(); // a 6-page hole between live x and live c
    a.free(c, None, 0, Some(1)).unwrap();
    // 7 pages: nothing cached before the hole (x is live); the hole's back
    // 3 pages and c serve it.
    let r = a.malloc(7 * P, 0, 1).unwrap();
    fill(r, 7 * P, 1);
    assert_eq!(r, c - 3 * P, "the request ends where c ends");
    let s = a.stats(0).unwrap();
    assert_eq!(s.gauge(G::ReservedBytes).current, (12 * P) as i64, "3 new pages, not 7");
    assert!(verify(r, 7 * P, 1) && verify(x, 4 * P, 7) && verify(d, P, 9));
    check(&a, 0);
    // The hole's front 3 pages are still a hole: a 3-page request maps them.
    let y = a.malloc(3 * P, 0, 2).unwrap();
    assert_eq!(y, h);
    fill(y, 3 * P, 2);
    assert!(verify(r, 7 * P, 1) && verify(x, 4 * P, 7) && verify(y, 3 * P, 2));
    check(&a, 0);
}

#[test]
fn recycling_before_growth_leaves_the_cached_block_growth_extends() {
    let (a, _) = host(PLACE_CONF); // max_cached_fraction 0.08: recycling on
    let x = a.malloc(8 * P, 0, 1).unwrap(); // pages 0-7
    let h = a.malloc(4 * P, 0, 1).unwrap(); // 8-11
    let d = a.malloc(P, 0, 1).unwrap(); // 12
    let e = a.malloc(4 * P, 0, 2).unwrap(); // 13-16
    let f = a.malloc(P, 0, 2).unwrap(); // 17
    fill(d, P, 4);
    fill(f, P, 6);
    a.free(h, None, 0, Some(1)).unwrap();
    a.empty_cache().unwrap(); // h's pages go: a hole after x
    a.free(x, None, 0, Some(1)).unwrap();
    a.free(e, None, 0, Some(2)).unwrap();
    // 10 pages on stream 1: x and 2 pages of the hole. The cache (12 of 14
    // pages) is over max_cached_fraction, so recycling frees 2 pages first:
    // from e, though x is the largest cached block, for x is where the
    // request goes.
    let reclaimed = a.stats(0).unwrap().counter(C::ReclaimedGranules);
    let r = a.malloc(10 * P, 0, 1).unwrap();
    fill(r, 10 * P, 1);
    assert_eq!(r, x);
    let s = a.stats(0).unwrap();
    assert_eq!(s.counter(C::ReclaimedGranules) - reclaimed, 4, "e's pages, not x's");
    assert_eq!(s.gauge(G::ReservedBytes).current, (14 * P) as i64, "nothing new from the driver");
    assert!(verify(r, 10 * P, 1) && verify(d, P, 4) && verify(f, P, 6));
    check(&a, 0);
    let _ = e;
}

#[test]
fn recycling_takes_the_smallest_cached_blocks_first() {
    let (a, _) = host(PLACE_CONF); // max_cached_fraction 0.08: recycling on
    let big = a.malloc(8 * P, 0, 2).unwrap();
    let s1 = a.malloc(P, 0, 2).unwrap();
    let small = a.malloc(2 * P, 0, 2).unwrap();
    let s2 = a.malloc(P, 0, 2).unwrap();
    fill(s1, P, 1);
    fill(s2, P, 2);
    a.free(big, None, 0, Some(2)).unwrap();
    a.free(small, None, 0, Some(2)).unwrap();
    // 2 pages on stream 1, with 10 of 12 pages cached: recycling frees the
    // 2-page block's pages and keeps the 8-page block, which a later large
    // request can take whole.
    let r = a.malloc(2 * P, 0, 1).unwrap();
    fill(r, 2 * P, 3);
    let s = a.stats(0).unwrap();
    assert_eq!(s.gauge(G::CachedBytes).current, (8 * P) as i64, "the large block stays cached");
    assert_eq!(s.gauge(G::ReservedBytes).current, (12 * P) as i64);
    assert!(verify(r, 2 * P, 3) && verify(s1, P, 1) && verify(s2, P, 2));
    check(&a, 0);
    let again = a.malloc(8 * P, 0, 2).unwrap();
    assert_eq!(again, big, "served by the cached block, no growth");
    check(&a, 0);
}
