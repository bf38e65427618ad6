//! Seeing the memory: per-arena statistics, snapshots, the history ring and
//! its trace, the OOM report and OOM callbacks (sim backend).

mod common;
use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tessera::error::Error;
use tessera::pool::ArenaKind;
use tessera::stats::{TesseraCounter as C, TesseraGauge as G};

#[test]
fn arena_stats_split_small_and_large() {
    let (a, _) = sim("growth_size:0");
    let _s = a.malloc(1000, 0, 0).unwrap();
    let _l = a.malloc(3 * MIB, 0, 0).unwrap();
    let small = a.arena_stats(0, ArenaKind::Small).unwrap();
    let large = a.arena_stats(0, ArenaKind::Large).unwrap();
    assert_eq!(small.gauge(G::AllocatedBytes).current, 1024);
    assert_eq!(large.gauge(G::AllocatedBytes).current, (3 * MIB) as i64);
    assert_eq!(small.gauge(G::MappedBytes).current, (2 * MIB) as i64);
    assert_eq!(large.gauge(G::MappedBytes).current, (4 * MIB) as i64);
    assert_eq!(small.gauge(G::CachedBytes).current, (2 * MIB - 1024) as i64);
    a.reset_peak_stats(0).unwrap();
    check(&a, 0);
}

#[test]
fn snapshot_lists_segments_and_blocks_in_torch_shape() {
    let (a, _) = sim("growth_size:0");
    let x = a.malloc(3 * MIB, 0, 5).unwrap();
    let y = a.malloc(100, 0, 5).unwrap();
    a.free(y, None, 0, None).unwrap();
    let json = a.snapshot_json();
    assert!(json.starts_with("{\"segments\":[{"), "{json}");
    assert!(json.contains(&format!("\"address\":{x},\"size\":{},\"requested_size\":{},\"state\":\"active_allocated\"", 3 * MIB, 3 * MIB)));
    assert!(json.contains("\"state\":\"inactive\""));
    assert!(json.contains("\"segment_type\":\"small\"") && json.contains("\"segment_type\":\"large\""));
    assert!(json.contains("\"total_size\":4194304"), "the large segment is the 4 MiB mapped: {json}");
    assert!(json.ends_with("\"device_traces\":[[]]}"), "no trace when not recording, no tags list without tags: {json}");
}

#[test]
fn history_ring_records_and_replays() {
    let (a, _) = sim("");
    let warm = a.malloc(160 * MIB, 0, 0).unwrap(); // cached below: the requests map nothing
    a.free(warm, None, 0, None).unwrap();
    a.record_history(true, 4);
    for i in 0..3u64 {
        let p = a.malloc((i + 1) * MIB, 0, 0).unwrap();
        a.free(p, None, 0, None).unwrap();
    }
    let trace = a.history_trace(0).unwrap();
    let events = tessera::trace::parse(trace.as_bytes()).unwrap();
    assert_eq!(events.len(), 4, "the ring keeps the newest 4 of the alloc/free/map events: {trace}");
    assert!(a.snapshot_json().contains("\"action\":\"free_requested\""));
    a.record_history(false, 0);
    assert_eq!(a.history_trace(0).unwrap().lines().count(), 1, "stopping drops the ring");

    // A whole recorded run replays to the same peak of live bytes.
    let (b, _) = sim("");
    b.record_history(true, 1 << 20);
    let mut live = Vec::new();
    for i in 0..200u64 {
        live.push(b.malloc(4096 * (1 + i % 7), 0, i % 2).unwrap());
        if i % 3 == 0 {
            let p = live.swap_remove((i as usize * 7) % live.len());
            b.free(p, None, 0, None).unwrap();
        }
    }
    let events = tessera::trace::parse(b.history_trace(0).unwrap().as_bytes()).unwrap();
    let peak = tessera::replay::peak_live_bytes(&events);
    assert_eq!(peak as i64, b.stats(0).unwrap().gauge(G::AllocatedBytes).peak);
    let r = tessera::replay::replay(&events, &tessera::config::Config::default(), None).unwrap();
    assert!(r.oom_at.is_none());
}

#[test]
fn oom_report_says_what_was_there_and_what_to_do() {
    let (a, _) = sim("device_capacity:64M");
    let _big = a.malloc(40 * MIB, 0, 3).unwrap();
    let _small = a.malloc(8 * MIB, 0, 0).unwrap();
    let msg = a.malloc(32 * MIB, 0, 0).unwrap_err().to_string();
    assert!(msg.starts_with("CUDA out of memory. Tried to allocate 32.00 MiB. GPU 0 has a total capacity of 64.00 MiB"), "{msg}");
    assert!(msg.contains("48.00 MiB live in 2 blocks"), "{msg}");
    assert!(msg.contains("Largest allocations: 40.00 MiB (stream 0x3), 8.00 MiB (stream 0x0)"), "{msg}");
    assert!(msg.contains("Next step: the live tensors need more than the GPU has"), "{msg}");
    let msg = a.malloc(1 << 40, 0, 0).unwrap_err().to_string();
    assert!(msg.contains("Next step: the request alone is larger than the GPU"), "{msg}");
    let (a, _) = sim("device_capacity:1G,memory_limit:64M");
    let _ = a.malloc(60 * MIB, 0, 0).unwrap();
    let msg = a.malloc(16 * MIB, 0, 0).unwrap_err().to_string();
    assert!(msg.contains("memory limit 64.00 MiB") && msg.contains("Next step: tessera's memory limit"), "{msg}");
}

#[test]
fn oom_callbacks_run_then_the_request_is_retried_once() {
    let (a, _) = sim("device_capacity:64M");
    let a = Arc::new(a);
    let hog = Arc::new(AtomicU64::new(a.malloc(48 * MIB, 0, 0).unwrap()));
    let calls = Arc::new(AtomicU64::new(0));
    {
        let (a2, hog, calls) = (Arc::downgrade(&a), hog.clone(), calls.clone());
        a.on_oom(Box::new(move |device, size| {
            calls.fetch_add(1, Ordering::SeqCst);
            assert!(device == 0 && (size == 32 * MIB || size == 48 * MIB));
            // A callback frees memory, like gc.collect() dropping tensors.
            let p = hog.swap(0, Ordering::SeqCst);
            if p != 0 {
                a2.upgrade().unwrap().free(p, None, 0, None).unwrap();
            }
        }));
    }
    assert!(a.malloc(32 * MIB, 0, 0).is_ok(), "the retry after the callback succeeds");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(a.stats(0).unwrap().counter(C::Ooms), 0, "a request served after the callback is no OOM");
    assert!(matches!(a.malloc(48 * MIB, 0, 0), Err(Error::OutOfMemory(_))));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(a.stats(0).unwrap().counter(C::Ooms), 1);
    check(&a, 0);
}

#[test]
fn oom_snapshot_is_written_where_configured() {
    let path = std::env::temp_dir().join(format!("tessera_oom_{}.json", std::process::id()));
    let (a, _) = sim(&format!("device_capacity:16M,oom_snapshot:{}", path.display()));
    let _p = a.malloc(12 * MIB, 0, 0).unwrap();
    assert!(a.malloc(8 * MIB, 0, 0).is_err());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"segments\":[{") && text.contains("active_allocated"), "{text}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn status_line_summarises_each_device_in_use() {
    let (a, _) = sim("device_count:2");
    assert_eq!(tessera::allocator::status_line(&a), "tessera: no device used yet");
    let _p = a.malloc(3 * MIB, 1, 0).unwrap();
    let line = tessera::allocator::status_line(&a);
    assert!(line.starts_with("tessera: dev1 allocated 3.00 MiB (peak 3.00 MiB) reserved "), "{line}");
    assert!(!line.contains("dev0"));
}

#[test]
fn an_oom_callback_may_allocate_and_register_without_deadlock() {
    let (a, _) = sim("device_capacity:16M");
    let a = Arc::new(a);
    let weak = Arc::downgrade(&a);
    let depth = Arc::new(AtomicU64::new(0));
    let d = depth.clone();
    let inner = Arc::new(std::sync::Mutex::new(None));
    let inner_result = inner.clone();
    a.on_oom(Box::new(move |_, _| {
        let a = weak.upgrade().unwrap();
        d.fetch_add(1, Ordering::SeqCst);
        // An allocation inside the callback that runs out of memory fails
        // with its own error: the callbacks do not run inside themselves.
        // Registering from one must not deadlock either.
        *inner_result.lock().unwrap() = Some(a.malloc(64 * MIB, 0, 0).map_err(|e| e.to_string()));
        a.on_oom(Box::new(|_, _| {}));
    }));
    assert!(a.malloc(64 * MIB, 0, 0).is_err());
    assert_eq!(depth.load(Ordering::SeqCst), 1, "the callback ran inside itself");
    let inner = inner.lock().unwrap().clone().expect("the callback allocated");
    assert!(inner.unwrap_err().starts_with("CUDA out of memory"));
    // Outside a callback they run again, the one registered inside too.
    assert!(a.malloc(64 * MIB, 0, 0).is_err());
    assert_eq!(depth.load(Ordering::SeqCst), 2);
    check(&a, 0);
}

#[test]
fn reading_statistics_snapshots_and_status_moves_no_block() {
    let (a, _) = sim("growth_size:0");
    let held = a.malloc(4096, 0, 1).unwrap();
    let p = a.malloc(8192, 0, 1).unwrap();
    let q = a.malloc(8192, 0, 2).unwrap();
    a.free(q, None, 0, Some(2)).unwrap();
    let q = a.malloc(8192, 0, 2).unwrap(); // handed out by stream 2's front
    a.free(p, None, 0, Some(1)).unwrap(); // waits whole in stream 1's front cache
    let lent = || a.with_pool(0, |pool| Ok(pool.lent_count())).unwrap();
    assert_eq!(lent(), 2);
    let before = a.stats(0).unwrap();
    let json = a.snapshot_json();
    let _ = (a.arena_stats(0, ArenaKind::Small).unwrap(), tessera::allocator::status_line(&a));
    assert_eq!(lent(), 2, "a read gave the fronts' blocks back");
    assert_eq!(a.stats(0).unwrap(), before);
    // The snapshot shows them as they are: one free, one handed out.
    assert!(json.contains(&format!("\"address\":{p},\"size\":8192,\"requested_size\":0,\"state\":\"inactive\"")), "{json}");
    assert!(json.contains(&format!("\"address\":{q},\"size\":8192,\"requested_size\":8192,\"state\":\"active_allocated\"")), "{json}");
    // One segment (the small page); the cached-block gauge is what it was.
    let small = a.arena_stats(0, ArenaKind::Small).unwrap();
    assert_eq!(small.gauge(G::Segments).current, 1);
    assert_eq!(before.gauge(G::CachedBlocks).current, small.gauge(G::CachedBlocks).current);
    check(&a, 0);
    a.free(held, None, 0, Some(1)).unwrap();
    a.free(q, None, 0, Some(2)).unwrap();
    check(&a, 0);
}

#[test]
fn segment_and_pending_gauges_follow_the_mapping() {
    let (a, _) = sim("growth_size:0,max_cached_fraction:1");
    let x = a.malloc(3 * MIB, 0, 0).unwrap();
    let y = a.malloc(100, 0, 0).unwrap();
    let s = a.stats(0).unwrap();
    assert_eq!(s.gauge(G::Segments).current, 2, "one mapped run per arena");
    a.record_stream(x, 7).unwrap();
    a.free(x, None, 0, Some(0)).unwrap(); // waits for stream 7
    let s = a.stats(0).unwrap();
    assert_eq!(s.gauge(G::PendingFreeBytes).current, (3 * MIB) as i64);
    assert_eq!(s.gauge(G::PendingFreeBlocks).current, 1);
    check(&a, 0);
    a.free(y, None, 0, Some(0)).unwrap();
    a.empty_cache().unwrap(); // synchronizes: the pending block is done, everything unmapped
    let s = a.stats(0).unwrap();
    assert_eq!((s.gauge(G::Segments).current, s.gauge(G::PendingFreeBytes).current), (0, 0));
    assert_eq!(s.gauge(G::Segments).peak, 2);
    check(&a, 0);
}
