//! Many threads at once on the host backend (real memory): each thread
//! allocates, writes, checks and frees on its stream (its own, or one it
//! shares with other threads), and hands some
//! blocks to other threads to free (as autograd's backward thread does);
//! some blocks are recorded on other streams, statistics read and the cache
//! emptied meanwhile.
//! Every live block keeps its pattern; at the end no two blocks overlapped,
//! the invariants hold and the statistics equal a recount.
//! `TESSERA_STRESS_OPS` sets the operations per thread (default 40,000).

mod common;
use common::*;
use std::sync::{Arc, Mutex};
use tessera::stats::TesseraGauge as G;

struct Block {
    ptr: u64,
    size: u64,
    stream: u64,
    seed: u64,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn eight_threads_on_eight_streams_keep_every_byte() {
    stress(8, 8, 40_000);
}

/// Threads sharing streams share front shards: their locks contend, and a
/// block one thread freed is handed out to the other.
#[test]
fn four_threads_on_two_streams_keep_every_byte() {
    stress(4, 2, 20_000);
}

/// `threads` threads on `streams` streams (thread t on stream t % streams),
/// `default_ops` operations each unless TESSERA_STRESS_OPS says otherwise.
fn stress(threads: u64, streams: u64, default_ops: u64) {
    let ops: u64 = std::env::var("TESSERA_STRESS_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(default_ops);
    let (a, backend) = host("page_size:64K,max_handle_size:256K,device_capacity:256M,small_size:64K,growth_size:1M");
    let a = Arc::new(a);
    // Blocks handed between threads: freed by another thread than the one
    // that allocated them, on the stream they were allocated on.
    let handoff: Arc<Mutex<Vec<Block>>> = Arc::new(Mutex::new(Vec::new()));
    let start = std::time::Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (a, handoff) = (a.clone(), handoff.clone());
            std::thread::spawn(move || {
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1).wrapping_mul(0x1234_5678_9ABC_DEF1);
                let mut live: Vec<Block> = Vec::new();
                let (mut ooms, mut checked) = (0u64, 0u64);
                for i in 0..ops {
                    let r = xorshift(&mut rng);
                    match r % 16 {
                        0..=6 => {
                            let size = match r >> 8 & 7 {
                                0 => 1 + (r >> 16) % 512,
                                1 => 512 + (r >> 16) % 8192,
                                2 => 8192 + (r >> 16) % 65536,
                                3 => 65536 + (r >> 16) % 1_000_000,
                                // Repeated sizes: the front caches' exact reuse.
                                _ => [512, 4096, 100_000, 300_000][(r >> 16) as usize % 4],
                            };
                            match a.malloc(size, 0, t % streams) {
                                Ok(ptr) => {
                                    let seed = t << 40 | i;
                                    fill(ptr, size, seed);
                                    live.push(Block { ptr, size, stream: t % streams, seed });
                                }
                                Err(tessera::error::Error::OutOfMemory(_)) => ooms += 1,
                                Err(e) => panic!("thread {t}: {e}"),
                            }
                        }
                        7..=12 if !live.is_empty() => {
                            let b = live.swap_remove((r >> 8) as usize % live.len());
                            assert!(verify(b.ptr, b.size, b.seed), "thread {t}: a live block changed");
                            checked += 1;
                            a.free(b.ptr, Some(b.size), 0, Some(b.stream)).unwrap();
                        }
                        13 if !live.is_empty() => {
                            let b = live.swap_remove((r >> 8) as usize % live.len());
                            handoff.lock().unwrap().push(b);
                        }
                        14 => {
                            let b = handoff.lock().unwrap().pop();
                            if let Some(b) = b {
                                assert!(verify(b.ptr, b.size, b.seed), "thread {t}: a handed-off block changed");
                                checked += 1;
                                a.free(b.ptr, Some(b.size), 0, Some(b.stream)).unwrap();
                            }
                        }
                        _ if !live.is_empty() => {
                            let b = &live[(r >> 8) as usize % live.len()];
                            assert!(verify(b.ptr, b.size, b.seed), "thread {t}: a live block changed");
                            checked += 1;
                            // Calls that take blocks back from the fronts
                            // while other threads serve from them.
                            match (r >> 20) % 64 {
                                0..=3 => a.record_stream(b.ptr, (t + 1) % threads).unwrap(),
                                4..=5 => {
                                    a.stats(0).unwrap();
                                }
                                6 => a.empty_cache().unwrap(),
                                _ => {}
                            }
                        }
                        _ => {}
                    }
                }
                (live, ooms, checked)
            })
        })
        .collect();
    let mut all: Vec<Block> = Vec::new();
    let (mut ooms, mut checked) = (0, 0);
    for w in workers {
        let (live, o, c) = w.join().expect("a worker panicked");
        all.extend(live);
        ooms += o;
        checked += c;
    }
    all.extend(handoff.lock().unwrap().drain(..));
    let elapsed = start.elapsed().as_secs_f64();
    // No overlap, every byte intact, stats equal a recount.
    let mut spans: Vec<(u64, u64)> = all.iter().map(|b| (b.ptr, b.ptr + b.size)).collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "live blocks overlap");
    }
    for b in &all {
        assert!(verify(b.ptr, b.size, b.seed), "a live block changed");
    }
    check(&a, 0);
    let requested: u64 = all.iter().map(|b| b.size).sum();
    assert_eq!(a.stats(0).unwrap().gauge(G::RequestedBytes).current, requested as i64);
    for b in all.drain(..) {
        a.free(b.ptr, Some(b.size), 0, Some(b.stream)).unwrap();
    }
    a.empty_cache().unwrap();
    check(&a, 0);
    assert_eq!(backend.live_handles(0), 0, "handles leaked");
    eprintln!(
        "stress: {threads} threads on {streams} streams x {ops} operations in {elapsed:.1} s ({:.0} ns/op), {checked} blocks checked, {ooms} OOMs",
        elapsed * 1e9 / (threads * ops) as f64
    );
}
