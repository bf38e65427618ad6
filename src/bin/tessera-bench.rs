//! tessera-bench: hot-path timings (cached malloc+free pairs through the Rust
//! API and the C ABI, 1..8 threads each on its own stream) and bookkeeping
//! memory (counting global allocator: bytes per live and cached block, heap
//! over many trace replays through one allocator), on the sim backend. Prints
//! a table, then one JSON line; a measurement, not a test (see USAGE).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::time::Instant;
use tessera::allocator::Allocator;
use tessera::backend::sim::SimBackend;
use tessera::config::Config;
use tessera::stats::TesseraGauge as G;
use tessera::trace::{Action, Event};

// ----- counting global allocator ---------------------------------------------

/// System's allocator, counting live heap bytes and allocation calls.
struct Counting;

static HEAP_BYTES: AtomicI64 = AtomicI64::new(0);
static HEAP_ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees hold; the counters are side effects.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on to System.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HEAP_BYTES.fetch_add(layout.size() as i64, Relaxed);
            HEAP_ALLOCS.fetch_add(1, Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            HEAP_BYTES.fetch_add(layout.size() as i64, Relaxed);
            HEAP_ALLOCS.fetch_add(1, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (so from System) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        HEAP_BYTES.fetch_sub(layout.size() as i64, Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from System with `layout`; the caller's contract holds.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Relaxed);
            HEAP_ALLOCS.fetch_add(1, Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn heap_bytes() -> i64 {
    HEAP_BYTES.load(Relaxed)
}

fn heap_allocs() -> u64 {
    HEAP_ALLOCS.load(Relaxed)
}

// ----- options ----------------------------------------------------------------

struct Options {
    pairs: u64,
    loops: u64,
    trace: String,
    threads: Vec<usize>,
    /// Pin thread t to CPU t * pin_stride (0: no pinning).
    pin_stride: usize,
}

const USAGE: &str = "usage: tessera-bench [--pairs N] [--loops N] [--trace PATH] [--threads LIST] [--pin S] [--quick]
  --pairs N      malloc+free pairs per thread per measurement (default 300000)
  --loops N      replays of the trace through one allocator (default 1000)
  --trace PATH   the trace to replay (default tests/data/kv_grow.trace.gz)
  --threads L    thread counts, comma separated (default 1,2,4,8)
  --pin S        pin bench thread t to CPU t*S (S=2 skips SMT siblings numbered
                 next to each other; see lscpu -e); default: no pinning
  --quick        --pairs 20000 --loops 100";

fn options() -> Result<Options, String> {
    let mut o = Options {
        pairs: 300_000,
        loops: 1000,
        trace: concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/kv_grow.trace.gz").into(),
        threads: vec![1, 2, 4, 8],
        pin_stride: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--pairs" => o.pairs = value("--pairs")?.parse().map_err(|_| "bad --pairs")?,
            "--loops" => o.loops = value("--loops")?.parse().map_err(|_| "bad --loops")?,
            "--trace" => o.trace = value("--trace")?,
            "--threads" => {
                o.threads = value("--threads")?
                    .split(',')
                    .map(|t| t.trim().parse::<usize>().ok().filter(|&n| n > 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("bad --threads")?
            }
            "--pin" => o.pin_stride = value("--pin")?.parse().map_err(|_| "bad --pin")?,
            "--quick" => {
                o.pairs = 20_000;
                o.loops = 100;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        }
    }
    Ok(o)
}

// ----- 1. the hot path ----------------------------------------------------------

const SIZES: [(u64, &str); 5] =
    [(512, "512B"), (64 << 10, "64KiB"), (1 << 20, "1MiB"), (64 << 20, "64MiB"), (1 << 30, "1GiB")];

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Rust,
    CAbi,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Rust => "rust",
            Api::CAbi => "c_abi",
        }
    }
}

fn sim_allocator(conf: &str) -> Allocator {
    let config = Config::parse(&format!("backend:sim,{conf}")).expect("bench configuration");
    let backend = Arc::new(SimBackend::new(config.device_count as i32, config.device_capacity.0));
    Allocator::with_backend(config, backend).expect("sim allocator")
}

/// `pairs` cached malloc+free pairs of `size` on `stream`, after a warm-up
/// that maps the memory. Returns when the timed loop started and ended, and
/// its heap allocations.
fn pairs_loop(api: Api, alloc: &Allocator, size: u64, stream: u64, pairs: u64) -> (Instant, Instant, u64) {
    let one = |n: u64| {
        for _ in 0..n {
            match api {
                Api::Rust => {
                    let p = alloc.malloc(size, 0, stream).expect("malloc");
                    alloc.free(std::hint::black_box(p), Some(size), 0, Some(stream)).expect("free");
                }
                Api::CAbi => {
                    let s = stream as usize as *mut c_void;
                    let p = tessera::ffi::tessera_try_malloc(size as libc::ssize_t, 0, s);
                    assert!(!p.is_null(), "tessera_try_malloc failed");
                    tessera::ffi::tessera_free(std::hint::black_box(p), size as libc::ssize_t, 0, s);
                }
            }
        }
    };
    one(64.min(pairs)); // warm: the first pair maps, the rest hit
    let a0 = heap_allocs();
    let t = Instant::now();
    one(pairs);
    (t, Instant::now(), heap_allocs() - a0)
}

#[derive(Clone)]
struct HotRow {
    api: Api,
    size: &'static str,
    threads: usize,
    /// Wall time divided by the pairs of one thread.
    ns_per_pair: f64,
    /// Pairs per second, all threads together.
    pairs_per_s: f64,
    allocs_per_pair: f64,
}

/// Runs `threads` threads, each on its own stream, `pairs` pairs each.
/// Best of `reps` repetitions (least wall time).
/// Pins the calling thread to one CPU (best effort: a failure leaves it free).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, zeroed is its empty set; CPU_SET and
    // sched_setaffinity get a valid pointer to it and its exact size; pid 0
    // is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[allow(clippy::too_many_arguments)]
fn hot(api: Api, alloc: &Arc<Allocator>, size: u64, label: &'static str, threads: usize, pairs: u64, reps: usize, pin_stride: usize) -> HotRow {
    let mut best: Option<HotRow> = None;
    for _ in 0..reps {
        let barrier = Arc::new(Barrier::new(threads + 1));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (alloc, barrier) = (alloc.clone(), barrier.clone());
                std::thread::spawn(move || {
                    if pin_stride > 0 {
                        pin_to_cpu(t * pin_stride);
                    }
                    let stream = 0x100 + t as u64;
                    pairs_loop(api, &alloc, size, stream, 1); // map this stream's block
                    barrier.wait();
                    pairs_loop(api, &alloc, size, stream, pairs)
                })
            })
            .collect();
        barrier.wait();
        // Wall time: from the first thread's start to the last one's end
        // (each thread stamps its own: the main thread may start late).
        let (mut first, mut last, mut allocs) = (None::<Instant>, None::<Instant>, 0);
        for h in handles {
            let (t0, t1, n) = h.join().expect("bench thread");
            first = Some(first.map_or(t0, |f| f.min(t0)));
            last = Some(last.map_or(t1, |l| l.max(t1)));
            allocs += n;
        }
        let wall = (last.expect("a thread") - first.expect("a thread")).as_nanos() as f64;
        let row = HotRow {
            api,
            size: label,
            threads,
            ns_per_pair: wall / pairs as f64,
            pairs_per_s: (threads as u64 * pairs) as f64 / (wall / 1e9),
            allocs_per_pair: allocs as f64 / (threads as u64 * pairs) as f64,
        };
        if best.as_ref().is_none_or(|b| row.ns_per_pair < b.ns_per_pair) {
            best = Some(row);
        }
    }
    best.expect("at least one repetition")
}

// ----- 2. metadata per block ------------------------------------------------------

struct MetaRow {
    size: u64,
    blocks: u64,
    live_bytes_per_block: f64,
    cached_marginal_bytes_per_block: f64,
}

/// Heap bytes per block: 2N live blocks (one stream, contiguous), then every
/// other one freed (N cached blocks kept apart by live ones).
fn metadata(size: u64, n: u64) -> MetaRow {
    let alloc = sim_allocator("device_capacity:4T");
    let p = alloc.malloc(size, 0, 0).unwrap();
    alloc.free(p, None, 0, None).unwrap();
    let mut ptrs: Vec<u64> = Vec::with_capacity(2 * n as usize);
    let m0 = heap_bytes();
    for _ in 0..2 * n {
        ptrs.push(alloc.malloc(size, 0, 0).unwrap());
    }
    let m1 = heap_bytes();
    for &p in ptrs.iter().skip(1).step_by(2) {
        alloc.free(p, None, 0, None).unwrap();
    }
    let m2 = heap_bytes();
    let stats = alloc.stats(0).unwrap();
    assert_eq!(stats.gauge(G::ActiveBlocks).current as u64, n);
    MetaRow {
        size,
        blocks: n,
        live_bytes_per_block: (m1 - m0) as f64 / (2 * n) as f64,
        cached_marginal_bytes_per_block: (m2 - m1) as f64 / n as f64,
    }
}

// ----- 3. the trace, many times over one allocator ----------------------------------

struct Flat {
    loops: u64,
    samples: Vec<(u64, i64)>,
    ns_per_event: f64,
}

fn replay_loops(events: &[Event], loops: u64) -> Flat {
    let alloc = sim_allocator("");
    let mut addrs: HashMap<u64, (u64, u64, u64)> = HashMap::with_capacity(16_384);
    let mut samples = Vec::with_capacity(loops as usize / 100 + 2);
    let start = Instant::now();
    for i in 1..=loops {
        for e in events {
            match e.action {
                Action::Alloc => {
                    let p = alloc.malloc(e.size, 0, e.stream).expect("the trace fits the sim device");
                    addrs.insert(e.addr, (p, e.size, e.stream));
                }
                Action::Free => {
                    if let Some((p, size, stream)) = addrs.remove(&e.addr) {
                        alloc.free(p, Some(size), 0, Some(stream)).expect("free");
                    }
                }
            }
        }
        // What the trace left live goes, so that every loop starts alike.
        for (_, (p, size, stream)) in addrs.drain() {
            alloc.free(p, Some(size), 0, Some(stream)).expect("free");
        }
        if i == 1 || i % 100 == 0 || i == loops {
            let s = alloc.stats(0).unwrap();
            let heap = heap_bytes();
            println!(
                "  loop {i:>5}: heap {heap:>10} B   reserved {:>6.1} MiB   cached {:>6.1} MiB   active blocks {}",
                s.gauge(G::ReservedBytes).current as f64 / (1 << 20) as f64,
                s.gauge(G::CachedBytes).current as f64 / (1 << 20) as f64,
                s.gauge(G::ActiveBlocks).current
            );
            samples.push((i, heap));
        }
    }
    let ns_per_event = start.elapsed().as_nanos() as f64 / (loops as f64 * events.len() as f64);
    Flat { loops, samples, ns_per_event }
}

// ----- main ----------------------------------------------------------------------

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tessera-bench: {e}");
            std::process::exit(2);
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("tessera-bench: sim backend, {cores} cores, {} pairs per thread per measurement (best of 3)", o.pairs);
    if o.threads.iter().any(|&t| t > cores) {
        println!("  note: {cores} cores: thread counts above {cores} share cores, so they cannot scale here");
    }

    // 1. Hot path.
    tessera::allocator::configure("backend:sim").expect("configure the global allocator");
    // The C ABI rows go through the global allocator; `alloc` is unused there.
    let alloc = Arc::new(sim_allocator(""));
    let mut rows: Vec<HotRow> = Vec::new();
    println!("\ncached malloc+free pairs: ns per pair (wall / pairs of one thread); scaling = throughput / 1-thread throughput");
    println!("{:<6} {:>6} {}", "api", "size", o.threads.iter().map(|t| format!("{:>18}", format!("{t} thr"))).collect::<String>());
    for api in [Api::Rust, Api::CAbi] {
        for &(size, label) in &SIZES {
            let mut line = format!("{:<6} {:>6}", api.name(), label);
            let mut base = None;
            for &t in &o.threads {
                let row = hot(api, &alloc, size, label, t, o.pairs, 3, o.pin_stride);
                let b = *base.get_or_insert(row.pairs_per_s);
                line += &format!("{:>10.1} ns x{:<5.2}", row.ns_per_pair, row.pairs_per_s / b);
                rows.push(row);
            }
            println!("{line}");
        }
    }
    let worst = |one: bool| rows.iter().filter(|r| (r.threads == 1) == one).map(|r| r.allocs_per_pair).fold(0.0, f64::max);
    println!(
        "heap allocations per pair, worst row: {:.4} on 1 thread; {:.4} on several (the counter is global: \
         it also counts the other threads' start and exit)",
        worst(true),
        worst(false)
    );

    // 2. Metadata per block.
    println!("\nheap bytes of tessera metadata per block (counting global allocator; includes container slack)");
    let metas: Vec<MetaRow> = [(512u64, 100_000u64), (4 << 20, 20_000)].iter().map(|&(s, n)| metadata(s, n)).collect();
    for m in &metas {
        println!(
            "  {:>8} B blocks, {} live + {} cached: {:.1} B per live block, +{:.1} B when one becomes cached (≈ {:.1} B per cached block)",
            m.size,
            m.blocks,
            m.blocks,
            m.live_bytes_per_block,
            m.cached_marginal_bytes_per_block,
            m.live_bytes_per_block + m.cached_marginal_bytes_per_block
        );
    }

    // 3. Flatness over many replays.
    let events = match tessera::trace::read_file(std::path::Path::new(&o.trace)) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("tessera-bench: {e}");
            std::process::exit(2);
        }
    };
    println!("\n{} replayed {} times through one allocator ({} events a loop); heap bytes of the whole process:", o.trace, o.loops, events.len());
    let flat = replay_loops(&events, o.loops);
    let after_first = flat.samples.first().map_or(0, |s| s.1);
    let (lo, hi) = flat.samples.iter().skip(1).fold((i64::MAX, i64::MIN), |(lo, hi), s| (lo.min(s.1), hi.max(s.1)));
    let drift = if flat.samples.len() > 1 { hi - after_first } else { 0 };
    println!("  after loop 1: {after_first} B; later samples {lo}..{hi} B; growth after loop 1: {drift} B; {:.1} ns per event", flat.ns_per_event);

    // JSON: the figures above, one line.
    let hot: Vec<_> = rows
        .iter()
        .map(|r| {
            serde_json::json!({"api": r.api.name(), "size": r.size, "threads": r.threads,
                "ns_per_pair": round1(r.ns_per_pair), "pairs_per_s": r.pairs_per_s.round() as u64,
                "allocs_per_pair": (r.allocs_per_pair * 1e3).round() / 1e3})
        })
        .collect();
    let metadata: Vec<_> = metas
        .iter()
        .map(|m| {
            serde_json::json!({"block_bytes": m.size, "blocks": m.blocks,
                "live_bytes_per_block": round1(m.live_bytes_per_block),
                "cached_marginal_bytes_per_block": round1(m.cached_marginal_bytes_per_block)})
        })
        .collect();
    let report = serde_json::json!({"cores": cores, "pairs": o.pairs, "hot": hot, "metadata": metadata,
        "replay": {"loops": flat.loops, "events_per_loop": events.len(), "ns_per_event": round1(flat.ns_per_event),
            "heap_bytes": flat.samples, "growth_after_first_loop": drift}});
    println!("{report}");
}

/// `x` to one decimal, for the JSON line.
fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
