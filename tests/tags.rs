//! Tags, pause and resume on the host backend, where memory is real: every
//! live byte is checked through pause and resume (with a backup, a tagged
//! block's contents come back; untagged blocks are never touched), memory
//! goes back to the device and returns, a resume that cannot get its memory
//! fails as out of memory and leaves the tag paused with its backups, and
//! random sequences against a shadow model keep the invariants.

mod common;
mod fault_ops;
use common::*;
use fault_ops::{faulty_host, Faulty};
use proptest::prelude::*;
use std::sync::Arc;
use tessera::allocator::Allocator;
use tessera::backend::faulty::{CreateFault, FaultPoint};
use tessera::error::Error;
use tessera::stats::TesseraGauge as G;
use tessera::tags;

const CAPACITY: u64 = 64 << 20;
const CONF: &str = "page_size:64K,small_size:16K,max_handle_size:256K,device_capacity:64M";

/// Runs `f` with `tag` as this thread's current tag.
fn tagged<T>(tag: &str, f: impl FnOnce() -> T) -> T {
    let previous = tags::set_current(tags::intern(tag).unwrap());
    let out = f();
    tags::set_current(previous);
    out
}

fn reserved(a: &Allocator) -> i64 {
    a.stats(0).unwrap().gauge(G::ReservedBytes).current
}

#[test]
fn pause_with_backup_gives_memory_back_and_restores_every_byte() {
    let (a, backend) = host(CONF);
    let plain: Vec<(u64, u64)> = (0..6u64).map(|i| (a.malloc(100_000 + i * 30_000, 0, 0).unwrap(), 100_000 + i * 30_000)).collect();
    let weights: Vec<(u64, u64)> =
        tagged("weights", || (0..8u64).map(|i| (a.malloc(1_000_000 + i * 77_777, 0, 0).unwrap(), 1_000_000 + i * 77_777)).collect());
    for (i, &(p, n)) in plain.iter().chain(&weights).enumerate() {
        fill(p, n, i as u64);
    }
    let before = reserved(&a);
    let tag_reserved = a.tag_stats(0, "weights").unwrap().gauge(G::ReservedBytes).current;
    let tag_handles = a.tag_stats(0, "weights").unwrap().gauge(G::Handles).current;
    assert!(tag_reserved > 0 && tag_handles > 1);

    let report = a.pause("weights", true).unwrap();
    check(&a, 0);
    let json = a.snapshot_json();
    assert!(json.contains("\"tessera_tag\":\"weights\""), "the snapshot marks the tag's segments");
    assert!(json.contains("\"tag\":\"weights\",\"allocated_bytes\":"), "{json}");
    assert!(json.contains(&format!("\"paused_bytes\":{tag_reserved}")), "the snapshot says what is paused");
    assert!(a.status_line(Some(0)).unwrap().contains("paused"), "the status line says what is paused");
    let s = a.tag_stats(0, "weights").unwrap();
    assert_eq!(report.bytes as i64, tag_reserved, "pause gives back all the tag's memory");
    assert_eq!(s.gauge(G::ReservedBytes).current, 0);
    assert_eq!(s.gauge(G::PausedBytes).current, tag_reserved);
    let live_bytes: u64 = weights.iter().map(|&(_, n)| tessera::pool::round_size(n)).sum();
    assert_eq!(s.gauge(G::BackupBytes).current as u64, live_bytes, "every live block is backed up");
    assert_eq!(reserved(&a), before - tag_reserved);
    assert_eq!(backend.live_backups(0).0, weights.len());
    for (i, &(p, n)) in plain.iter().enumerate() {
        assert!(verify(p, n, i as u64), "untagged block {i} changed by the pause");
    }

    // The freed memory serves untagged work: more than was free before.
    let free_before_pause = CAPACITY as i64 - before;
    let big = a.malloc(free_before_pause as u64 + (4 << 20), 0, 0).expect("the paused tag's memory is free");
    fill(big, 1 << 20, 99);
    a.free(big, None, 0, None).unwrap();
    a.empty_cache().unwrap();

    let report = a.resume("weights").unwrap();
    check(&a, 0);
    assert_eq!(report.bytes as i64, tag_reserved);
    assert_eq!(report.backup_bytes, live_bytes);
    let s = a.tag_stats(0, "weights").unwrap();
    assert_eq!((s.gauge(G::PausedBytes).current, s.gauge(G::BackupBytes).current), (0, 0));
    assert!(s.gauge(G::Handles).current < tag_handles, "the paused handles side by side came back as one per run");
    assert_eq!(s.gauge(G::ReservedBytes).current, tag_reserved);
    assert_eq!(backend.live_backups(0), (0, 0), "the backups are freed after the restore");
    for (i, &(p, n)) in plain.iter().chain(&weights).enumerate() {
        assert!(verify(p, n, i as u64), "block {i} lost its contents through pause and resume");
    }
    for &(p, _) in plain.iter().chain(&weights) {
        a.free(p, None, 0, None).unwrap();
    }
    check(&a, 0);
}

#[test]
fn a_paused_tag_refuses_allocations_and_takes_frees() {
    let (a, _backend) = host(CONF);
    let (p, q) = tagged("kv", || (a.malloc(3 << 20, 0, 0).unwrap(), a.malloc(2 << 20, 0, 0).unwrap()));
    a.pause("kv", false).unwrap();
    let err = tagged("kv", || a.malloc(1 << 20, 0, 0)).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("paused"), "{err}");
    assert!(a.pause("kv", false).unwrap_err().to_string().contains("already paused"));
    a.free(q, None, 0, None).unwrap(); // nothing to restore
    check(&a, 0);
    a.resume("kv").unwrap();
    assert_eq!(a.resume("kv").unwrap().bytes, 0, "resuming a tag that is not paused does nothing");
    fill(p, 3 << 20, 5); // mapped and writable again (contents were not kept)
    assert!(verify(p, 3 << 20, 5));
    let r = tagged("kv", || a.malloc(1 << 20, 0, 0)).unwrap();
    for x in [p, r] {
        a.free(x, None, 0, None).unwrap();
    }
    check(&a, 0);
    assert!(a.pause("never-used", false).is_err(), "an unknown tag is an error, not a silent no-op");
}

#[test]
fn a_resume_maps_only_what_the_blocks_still_held_need() {
    let (a, backend) = host(CONF);
    let g = 64 << 10;
    let blocks: Vec<(u64, u64)> = tagged("kv", || (0..12u64).map(|i| (a.malloc((1 << 20) + i * 70_000, 0, 0).unwrap(), (1 << 20) + i * 70_000)).collect());
    for (i, &(p, n)) in blocks.iter().enumerate() {
        fill(p, n, i as u64);
    }
    let held = a.tag_stats(0, "kv").unwrap().gauge(G::ReservedBytes).current as u64;
    a.pause("kv", true).unwrap();
    // Freed while paused: runs of neighbours (several handles' worth) and
    // single blocks between held ones.
    let (freed, kept): (Vec<_>, Vec<_>) = blocks.iter().enumerate().partition(|&(i, _)| !matches!(i, 0 | 3 | 4 | 9));
    for &(_, &(p, _)) in &freed {
        a.free(p, None, 0, None).unwrap();
    }
    check(&a, 0);
    let handles_before = backend.live_handles(0);
    let report = a.resume("kv").unwrap();
    check(&a, 0);
    let s = a.tag_stats(0, "kv").unwrap();
    // Each held block touches at most its granules plus one.
    let most: u64 = kept.iter().map(|&(_, &(_, n))| (tessera::pool::round_size(n).div_ceil(g) + 1) * g).sum();
    assert!(report.bytes <= most && report.bytes < held / 2, "resumed {} of {held} bytes for blocks needing at most {most}", report.bytes);
    assert_eq!(s.gauge(G::ReservedBytes).current as u64, report.bytes, "the tag holds what the resume mapped");
    assert_eq!(s.gauge(G::PausedBytes).current, 0, "nothing is left paused");
    assert_eq!(backend.live_handles(0) - handles_before, s.gauge(G::Handles).current as usize, "the backend holds what the pool counts");
    for &(i, &(p, n)) in &kept {
        assert!(verify(p, n, i as u64), "held block {i} lost its contents");
    }
    // The freed range is address space again: new requests map it.
    let again: Vec<(u64, u64)> = tagged("kv", || (0..4u64).map(|i| (a.malloc((2 << 20) + i * 4096, 0, 0).unwrap(), (2 << 20) + i * 4096)).collect());
    for (i, &(p, n)) in again.iter().enumerate() {
        fill(p, n, 100 + i as u64);
    }
    check(&a, 0);
    for &(i, &(p, n)) in &kept {
        assert!(verify(p, n, i as u64), "held block {i} changed by the new requests");
    }
    for (i, &(p, n)) in again.iter().enumerate() {
        assert!(verify(p, n, 100 + i as u64));
        a.free(p, None, 0, None).unwrap();
    }
    for &(_, &(p, _)) in &kept {
        a.free(p, None, 0, None).unwrap();
    }
    check(&a, 0);
}

#[test]
fn resume_out_of_memory_keeps_the_tag_paused_and_can_be_retried() {
    let (a, backend) = host(CONF);
    let blocks: Vec<u64> = tagged("engine", || (0..4).map(|_| a.malloc(6 << 20, 0, 0).unwrap()).collect());
    for (i, &p) in blocks.iter().enumerate() {
        fill(p, 6 << 20, 10 + i as u64);
    }
    a.pause("engine", true).unwrap();
    let paused = a.tag_stats(0, "engine").unwrap();
    // Untagged work takes nearly the whole device meanwhile.
    let hog = a.malloc(CAPACITY - (8 << 20), 0, 0).unwrap();
    let err = a.resume("engine").unwrap_err();
    assert!(matches!(err, Error::OutOfMemory(_)), "{err}");
    let text = err.to_string();
    assert!(text.starts_with("CUDA out of memory") && text.contains("resuming tag 'engine'"), "{text}");
    check(&a, 0);
    let still = a.tag_stats(0, "engine").unwrap();
    assert_eq!(still.gauge(G::PausedBytes).current, paused.gauge(G::PausedBytes).current, "nothing resumed half-way");
    assert_eq!(still.gauge(G::BackupBytes).current, paused.gauge(G::BackupBytes).current, "the backups are intact");
    assert_eq!(backend.live_backups(0).0, blocks.len());
    a.free(hog, None, 0, None).unwrap();
    a.resume("engine").unwrap();
    for (i, &p) in blocks.iter().enumerate() {
        assert!(verify(p, 6 << 20, 10 + i as u64), "block {i} lost its contents");
        a.free(p, None, 0, None).unwrap();
    }
    check(&a, 0);
}

/// An allocator over a fault injector on the host backend, with three 2 MiB
/// blocks of tag `tag` filled from `seed` and paused with a backup. Create
/// faults read as driver failures, not lack of memory (which the device
/// retries once).
fn paused_under_faults(tag: &str, seed: u64) -> (Allocator, Arc<Faulty>, Vec<u64>) {
    let (a, backend) = faulty_host(&format!("backend:host,va_size:1G,{CONF}"), seed);
    backend.set_create_fault(CreateFault::Driver);
    let blocks: Vec<u64> = tagged(tag, || (0..3).map(|_| a.malloc(2 << 20, 0, 0).unwrap()).collect());
    for (i, &p) in blocks.iter().enumerate() {
        fill(p, 2 << 20, seed + i as u64);
    }
    a.pause(tag, true).unwrap();
    (a, backend, blocks)
}

#[test]
fn injected_failures_in_resume_lose_nothing() {
    let (a, backend, blocks) = paused_under_faults("faulty", 40);
    for point in [FaultPoint::Create, FaultPoint::Map, FaultPoint::SetAccess, FaultPoint::Restore] {
        let handles = backend.live_handles(0);
        backend.fail_next(point, 1);
        let result = a.resume("faulty");
        check(&a, 0);
        if point == FaultPoint::Restore {
            // Mapped, but one block's contents could not come back: said so.
            assert!(result.is_err());
            break;
        }
        assert!(result.is_err(), "{point:?}: the injected failure is reported");
        assert_eq!(backend.live_handles(0), handles, "{point:?}: the failed resume holds no handle");
        assert_eq!(backend.live_backups(0), blocks.len(), "{point:?}: the backups are intact");
    }
    assert!(backend.violations().is_empty(), "{:?}", backend.violations());
    for &p in &blocks {
        a.free(p, None, 0, None).unwrap();
    }
    check(&a, 0);
}

#[test]
fn a_failed_create_before_the_last_handle_rolls_back_every_handle() {
    let (a, backend, blocks) = paused_under_faults("rollback", 70);
    let handles = backend.live_handles(0);
    let creates = backend.calls(FaultPoint::Create);
    backend.fail_at(FaultPoint::Create, creates + 5); // several handles in, then a failure
    assert!(a.resume("rollback").is_err());
    check(&a, 0);
    assert_eq!(backend.live_handles(0), handles, "the handles made before the failure went back");
    a.resume("rollback").unwrap();
    for (i, &p) in blocks.iter().enumerate() {
        assert!(verify(p, 2 << 20, 70 + i as u64));
        a.free(p, None, 0, None).unwrap();
    }
    assert!(backend.violations().is_empty(), "{:?}", backend.violations());
}

#[derive(Debug, Clone)]
enum Op {
    Alloc { size: u64, tag: bool },
    Free { pick: usize },
    Pause { backup: bool },
    Resume,
    Rewrite { pick: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop_oneof![1u64..16_384, 16_384u64..600_000, 600_000u64..3_000_000], any::<bool>())
            .prop_map(|(size, tag)| Op::Alloc { size, tag }),
        4 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => any::<bool>().prop_map(|backup| Op::Pause { backup }),
        1 => Just(Op::Resume),
        1 => any::<usize>().prop_map(|pick| Op::Rewrite { pick }),
    ]
}

struct Live {
    ptr: u64,
    size: u64,
    tag: bool,
    seed: u64,
    /// The contents are known (untagged, or tagged and kept by a backup).
    known: bool,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: proptest_cases(48), ..ProptestConfig::default() })]

    /// Against a shadow model: untagged bytes never change; a tagged
    /// block's bytes come back through a pause with backup (with
    /// keep_backups too, where later pauses copy into the kept copies);
    /// paused tags refuse allocations; the invariants and the gauges hold
    /// after every step; at the end, nothing leaks.
    #[test]
    fn random_pause_resume_sequences(ops in proptest::collection::vec(op(), 1..80), keep in any::<bool>()) {
        let (a, backend) = host(&format!("{CONF},keep_backups:{keep}"));
        let tag = "prop";
        tags::intern(tag).unwrap();
        let (mut live, mut paused, mut seed) = (Vec::<Live>::new(), false, 0u64);
        for op in ops {
            match op {
                Op::Alloc { size, tag: t } => {
                    let r = if t { tagged(tag, || a.malloc(size, 0, 0)) } else { a.malloc(size, 0, 0) };
                    match r {
                        Ok(ptr) => {
                            prop_assert!(!(t && paused), "an allocation into a paused tag succeeded");
                            seed += 1;
                            fill(ptr, size, seed);
                            live.push(Live { ptr, size, tag: t, seed, known: true });
                        }
                        Err(Error::InvalidArgument(m)) => prop_assert!(t && paused, "{m}"),
                        Err(Error::OutOfMemory(_)) => {}
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                Op::Free { pick } if !live.is_empty() => {
                    let l = live.swap_remove(pick % live.len());
                    a.free(l.ptr, Some(l.size), 0, Some(0)).unwrap();
                }
                Op::Pause { backup } if !paused => {
                    a.pause(tag, backup).unwrap();
                    paused = true;
                    for l in live.iter_mut().filter(|l| l.tag) {
                        l.known &= backup;
                    }
                }
                Op::Resume if paused => match a.resume(tag) {
                    Ok(_) => paused = false,
                    Err(Error::OutOfMemory(_)) => {}
                    Err(e) => prop_assert!(false, "{e}"),
                },
                Op::Rewrite { pick } if !live.is_empty() => {
                    let i = pick % live.len();
                    if !(live[i].tag && paused) {
                        seed += 1;
                        live[i].seed = seed;
                        live[i].known = true;
                        fill(live[i].ptr, live[i].size, seed);
                    }
                }
                _ => {}
            }
            check(&a, 0);
            for l in &live {
                if l.known && !(l.tag && paused) {
                    prop_assert!(verify(l.ptr, l.size, l.seed), "a live block lost its bytes");
                }
            }
            let s = a.tag_stats(0, tag).unwrap();
            if paused {
                prop_assert_eq!(s.gauge(G::ReservedBytes).current, 0, "a paused tag holds physical memory");
            } else {
                prop_assert_eq!(s.gauge(G::PausedBytes).current, 0);
                if !keep {
                    prop_assert_eq!(s.gauge(G::BackupBytes).current, 0);
                }
            }
            // Host copies, paused or kept, are what the gauge says.
            prop_assert_eq!(s.gauge(G::BackupBytes).current as u64, backend.live_backups(0).1);
        }
        if paused {
            a.resume(tag).unwrap();
        }
        for l in live.drain(..) {
            a.free(l.ptr, None, 0, None).unwrap();
        }
        a.empty_cache().unwrap();
        check(&a, 0);
        prop_assert_eq!(a.stats(0).unwrap().gauge(G::ReservedBytes).current, 0);
        drop(a);
        prop_assert_eq!(backend.live_backups(0), (0, 0), "kept copies go with the pool");
    }
}

#[test]
fn untagged_requests_take_back_what_a_tag_caches() {
    let (a, _backend) = host(CONF);
    let p = tagged("cache", || a.malloc(40 << 20, 0, 0).unwrap());
    a.free(p, None, 0, None).unwrap(); // cached by the tag's pool
    let q = a.malloc(48 << 20, 0, 0).expect("the tag's cached memory goes back to the driver for it");
    fill(q, 48 << 20, 3);
    assert!(verify(q, 48 << 20, 3));
    assert_eq!(a.tag_stats(0, "cache").unwrap().gauge(G::ReservedBytes).current, 0);
    a.free(q, None, 0, None).unwrap();
    check(&a, 0);
}

#[test]
fn a_tag_pauses_and_resumes_on_every_device() {
    let (a, backend) = host(&format!("{CONF},device_count:2"));
    let blocks: Vec<(i32, u64)> = tagged("both", || (0..4).map(|i| (i % 2, a.malloc(3 << 20, i % 2, 0).unwrap())).collect());
    for (i, &(_, p)) in blocks.iter().enumerate() {
        fill(p, 3 << 20, 90 + i as u64);
    }
    let per_device: Vec<i64> = (0..2).map(|d| a.tag_stats(d, "both").unwrap().gauge(G::ReservedBytes).current).collect();
    assert!(per_device.iter().all(|&n| n > 0));
    let report = a.pause("both", true).unwrap();
    assert_eq!(report.bytes as i64, per_device.iter().sum::<i64>(), "both devices' memory goes back");
    for d in 0..2 {
        assert_eq!(a.tag_stats(d, "both").unwrap().gauge(G::PausedBytes).current, per_device[d as usize]);
        check(&a, d);
    }
    // A free naming the wrong device still finds the paused block.
    let (d0, p0) = blocks[0];
    assert!(a.free(p0, None, 1 - d0, None).is_err(), "the mismatch is reported");
    a.resume("both").unwrap();
    assert_eq!(backend.live_backups(0), (0, 0));
    assert_eq!(backend.live_backups(1), (0, 0));
    for (i, &(d, p)) in blocks.iter().enumerate().skip(1) {
        assert!(verify(p, 3 << 20, 90 + i as u64), "block {i} on device {d} lost its contents");
        a.free(p, None, d, None).unwrap();
    }
    for d in 0..2 {
        check(&a, d);
        assert_eq!(a.stats(d).unwrap().gauge(G::AllocatedBytes).current, 0);
    }
}

#[test]
fn device_statistics_count_the_tags_and_reset_with_them() {
    let (a, _backend) = host(CONF);
    let u = a.malloc(2 << 20, 0, 0).unwrap();
    let t = tagged("stats", || a.malloc(3 << 20, 0, 0).unwrap());
    let all = a.stats(0).unwrap();
    let (small, large) = (a.arena_stats(0, tessera::pool::ArenaKind::Small).unwrap(), a.arena_stats(0, tessera::pool::ArenaKind::Large).unwrap());
    let alloc = |s: &tessera::stats::TesseraStats| s.gauge(G::AllocatedBytes).current;
    assert_eq!(alloc(&all), alloc(&small) + alloc(&large), "the arenas add up to the device, tags included");
    assert_eq!(alloc(&all), (tessera::pool::round_size(2 << 20) + tessera::pool::round_size(3 << 20)) as i64);
    a.free(t, None, 0, None).unwrap();
    a.reset_peak_stats(0).unwrap();
    let s = a.stats(0).unwrap();
    assert_eq!(s.gauge(G::AllocatedBytes).peak, s.gauge(G::AllocatedBytes).current, "the tags' peaks reset too");
    a.free(u, None, 0, None).unwrap();
    check(&a, 0);
}

#[test]
fn the_memory_limit_caps_the_tags_and_untagged_memory_together() {
    let (a, _backend) = host(&format!("{CONF},memory_limit:32M"));
    let weights = tagged("weights", || a.malloc(20 << 20, 0, 0).unwrap());
    fill(weights, 20 << 20, 5);
    // 20 MiB held by the tag: 16 MiB more untagged would pass the 32 MiB
    // limit, though the device has 64.
    let err = a.malloc(16 << 20, 0, 0).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("memory limit") && text.contains("other pools"), "the report names the tags' share: {text}");
    let small = a.malloc(8 << 20, 0, 0).expect("what the limit leaves");
    check(&a, 0);
    // And the other way round: a tag cannot pass what untagged memory leaves.
    let err = tagged("kv", || a.malloc(8 << 20, 0, 0)).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory(_)), "{err}");
    // Paused, the tag's memory is outside the limit; a resume must fit in it again.
    a.pause("weights", true).unwrap();
    let more = a.malloc(16 << 20, 0, 0).expect("the paused tag's share of the limit is free");
    let err = a.resume("weights").unwrap_err();
    assert!(matches!(err, Error::OutOfMemory(_)), "{err}");
    a.free(more, None, 0, None).unwrap();
    a.resume("weights").expect("within the limit again");
    assert!(verify(weights, 20 << 20, 5), "the tag's contents came back");
    check(&a, 0);
    // set_memory_fraction moves the cap of every pool: 3/4 of 64 MiB is 48.
    a.set_memory_fraction(0.75, 0).unwrap();
    let kv = tagged("kv", || a.malloc(16 << 20, 0, 0)).expect("the new fraction leaves room");
    assert!(tagged("kv", || a.malloc(8 << 20, 0, 0)).is_err(), "48 MiB is the cap for all pools");
    check(&a, 0);
    for p in [weights, small, kv] {
        a.free(p, None, 0, None).unwrap();
    }
    check(&a, 0);
}

#[test]
fn kept_backups_serve_the_next_pause_with_the_new_contents() {
    let (a, backend) = host(&format!("{CONF},keep_backups:true"));
    let blocks: Vec<u64> = tagged("engine", || (0..4).map(|_| a.malloc(3 << 20, 0, 0).unwrap()).collect());
    for (i, &p) in blocks.iter().enumerate() {
        fill(p, 3 << 20, 20 + i as u64);
    }
    let bytes = 4 * tessera::pool::round_size(3 << 20);
    a.pause("engine", true).unwrap();
    a.resume("engine").unwrap();
    check(&a, 0);
    assert_eq!(backend.live_backups(0), (4, bytes), "the resume keeps its host copies");
    assert_eq!(a.tag_stats(0, "engine").unwrap().gauge(G::BackupBytes).current as u64, bytes, "and counts them");
    // The engine runs on: new contents, one block freed, one new.
    for (i, &p) in blocks.iter().enumerate() {
        fill(p, 3 << 20, 30 + i as u64);
    }
    a.free(blocks[3], None, 0, None).unwrap();
    let fresh = tagged("engine", || a.malloc(5 << 20, 0, 0).unwrap());
    fill(fresh, 5 << 20, 40);
    a.pause("engine", true).unwrap();
    check(&a, 0);
    let fresh_bytes = tessera::pool::round_size(5 << 20);
    assert_eq!(
        backend.live_backups(0),
        (4, 3 * tessera::pool::round_size(3 << 20) + fresh_bytes),
        "three copies reused, the freed block's gone, one new"
    );
    a.resume("engine").unwrap();
    for (i, &p) in blocks[..3].iter().enumerate() {
        assert!(verify(p, 3 << 20, 30 + i as u64), "block {i} came back with what it held at the second pause");
    }
    assert!(verify(fresh, 5 << 20, 40));
    // A pause without a backup lets the kept copies go.
    a.pause("engine", false).unwrap();
    assert_eq!(backend.live_backups(0), (0, 0));
    assert_eq!(a.tag_stats(0, "engine").unwrap().gauge(G::BackupBytes).current, 0);
    a.resume("engine").unwrap();
    for p in blocks[..3].iter().copied().chain([fresh]) {
        a.free(p, None, 0, None).unwrap();
    }
    check(&a, 0);
}

#[test]
fn a_failed_copy_into_a_kept_backup_changes_nothing() {
    let (a, backend) = faulty_host(&format!("backend:host,va_size:1G,{CONF},keep_backups:true"), 80);
    let blocks: Vec<u64> = tagged("kept", || (0..3).map(|_| a.malloc(2 << 20, 0, 0).unwrap()).collect());
    for (i, &p) in blocks.iter().enumerate() {
        fill(p, 2 << 20, 50 + i as u64);
    }
    a.pause("kept", true).unwrap();
    a.resume("kept").unwrap();
    let kept = a.tag_stats(0, "kept").unwrap().gauge(G::BackupBytes).current;
    for (i, &p) in blocks.iter().enumerate() {
        fill(p, 2 << 20, 60 + i as u64);
    }
    let backups = backend.calls(FaultPoint::Backup);
    backend.fail_at(FaultPoint::Backup, backups + 2); // the second copy fails
    let err = a.pause("kept", true).unwrap_err();
    assert!(matches!(err, Error::Driver { .. }), "a failed copy is a driver error: {err}");
    check(&a, 0);
    let s = a.tag_stats(0, "kept").unwrap();
    assert_eq!((s.gauge(G::PausedBytes).current, s.gauge(G::BackupBytes).current), (0, kept), "not paused, copies still kept");
    assert_eq!(backend.live_backups(0), blocks.len(), "no copy lost, none added");
    for (i, &p) in blocks.iter().enumerate() {
        assert!(verify(p, 2 << 20, 60 + i as u64), "block {i} untouched by the failed pause");
    }
    a.pause("kept", true).expect("the retry succeeds");
    a.resume("kept").unwrap();
    for (i, &p) in blocks.iter().enumerate() {
        assert!(verify(p, 2 << 20, 60 + i as u64), "block {i} lost its contents");
        a.free(p, None, 0, None).unwrap();
    }
    check(&a, 0);
    assert!(backend.violations().is_empty(), "{:?}", backend.violations());
}

#[test]
fn a_pool_that_lost_track_of_a_paused_handle_refuses_to_resume() {
    // Unmapped for the pause, the release fails and so does the map back:
    // the pool cannot know what the driver holds there, and stops (a resume
    // would copy the backups into the unmapped range: a segfault on the
    // host backend, a failed copy on the GPU).
    let (a, backend) = faulty_host(&format!("backend:host,va_size:1G,{CONF}"), 90);
    let p = tagged("lost", || a.malloc(2 << 20, 0, 0).unwrap());
    fill(p, 2 << 20, 9);
    backend.fail_next(FaultPoint::Release, 1);
    backend.fail_next(FaultPoint::Map, 1);
    assert!(a.pause("lost", true).is_err());
    assert!(a.with_tag_pool(0, "lost", |pool| pool.poisoned().is_some()).unwrap().unwrap(), "fail-stop");
    let err = a.resume("lost").unwrap_err();
    assert!(err.to_string().contains("disabled"), "the resume says why it refuses: {err}");
    assert!(tagged("lost", || a.malloc(4096, 0, 0)).is_err(), "and the pool serves nothing");
    let q = a.malloc(1 << 20, 0, 0).expect("untagged memory is not affected");
    a.free(q, None, 0, None).unwrap();
}

#[test]
fn a_resumed_handle_neither_mapped_nor_taken_back_stops_the_pool() {
    let (a, backend, _blocks) = paused_under_faults("stuck", 95);
    backend.fail_next(FaultPoint::Map, 1);
    backend.fail_next(FaultPoint::Release, 1);
    assert!(a.resume("stuck").is_err());
    let poisoned = a.with_tag_pool(0, "stuck", |pool| pool.poisoned().map(str::to_string)).unwrap().unwrap();
    assert!(poisoned.is_some_and(|why| why.contains("neither mapped")), "a handle the pool cannot account for stops it");
    assert!(a.resume("stuck").is_err(), "no retry into an unknown state");
    check(&a, 0);
}

#[test]
fn threads_of_a_tag_and_untagged_ones_never_pass_the_limit_together() {
    // Four threads, two allocating into a tag's pool and two untagged, each
    // pool behind its own lock: what the device holds stays under the limit
    // at every step, and every byte stays each thread's.
    const LIMIT: u64 = 24 << 20;
    let (a, backend) = host(&format!("{CONF},memory_limit:24M"));
    tags::intern("threads").unwrap();
    let ooms = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (a, backend, ooms) = (&a, &backend, &ooms);
            s.spawn(move || {
                if t % 2 == 1 {
                    tags::set_current(tags::find("threads").unwrap());
                }
                let mut rng = tessera::backend::faulty::XorShift64::new(t + 1);
                let mut held: Vec<(u64, u64, u64)> = Vec::new();
                for i in 0..600u64 {
                    let size = 64 * 1024 + rng.below(3 << 20);
                    match a.malloc(size, 0, t) {
                        Ok(p) => {
                            fill(p, size, t * 1000 + i);
                            held.push((p, size, t * 1000 + i));
                        }
                        Err(Error::OutOfMemory(_)) => {
                            ooms.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => panic!("thread {t}: {e}"),
                    }
                    let (free, total) = tessera::backend::Backend::mem_info(&**backend, 0).unwrap();
                    assert!(total - free <= LIMIT, "thread {t}: the device holds {} bytes over a {LIMIT}-byte limit", total - free);
                    if held.len() > 3 || (!held.is_empty() && rng.below(3) == 0) {
                        let (p, n, seed) = held.swap_remove(rng.below(held.len() as u64) as usize);
                        assert!(verify(p, n, seed), "thread {t}: a block changed");
                        a.free(p, None, 0, Some(t)).unwrap();
                    }
                }
                for (p, n, seed) in held {
                    assert!(verify(p, n, seed), "thread {t}: a block changed");
                    a.free(p, None, 0, Some(t)).unwrap();
                }
                tags::set_current(0);
            });
        }
    });
    assert!(ooms.into_inner() > 0, "the limit was reached (else this tests nothing)");
    check(&a, 0);
}
