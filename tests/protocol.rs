//! A model check of the stream and event protocol: the allocator runs on a
//! backend whose device is a model of CUDA streams (work queued per stream
//! runs in order, events mark queue positions, `stream_wait_event` orders one
//! stream after another, the device completes work only when the test says
//! so). Every interleaving of host operations and device progress, up to a
//! bound (exhaustive), and long random ones (proptest), are checked for the
//! one property that matters: memory is never handed to a stream, nor
//! unmapped, while queued work of another stream may still touch it.
//!
//! Pausing a tag (tags.rs) unmaps live memory too: while a pause runs, the
//! tag's live blocks count as retired, so that its unmaps and backups are
//! checked like any other (nothing queued may touch them).
//!
//! The device lock makes each allocator call atomic, so interleavings of
//! threads are interleavings of whole calls: what this explores. The driver
//! thread is one more actor: its tidy round (`Op::Tidy`, with
//! `driver_thread:true`) takes the lock step by step, so its steps
//! interleave with the calls like any other call.

mod common;
use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tessera::allocator::Allocator;
use tessera::backend::sim::SimBackend;
use tessera::backend::{Backend, BackupId, EventId, HandleId};
use tessera::config::Config;
use tessera::error::Result;

/// A queue position: (stream, index of a work item on it, from 1).
type Pos = (u64, u64);

/// A freed range and the last work item of each stream that touched it.
#[derive(Debug, Clone)]
struct Retired {
    addr: u64,
    len: u64,
    uses: Vec<Pos>,
}

#[derive(Default)]
struct Model {
    enqueued: HashMap<u64, u64>,
    done: HashMap<u64, u64>,
    /// Per stream: per other stream, the position its later work waits for.
    after: HashMap<u64, HashMap<u64, u64>>,
    /// What each work item waited for when it was queued.
    prereqs: HashMap<Pos, Vec<Pos>>,
    events: HashMap<EventId, Pos>,
    next_event: EventId,
    retired: Vec<Retired>,
    /// The live blocks of a tag being paused (during the pause call only).
    pausing: Vec<Retired>,
    violations: Vec<String>,
}

impl Model {
    fn done(&self, (s, p): Pos) -> bool {
        self.done.get(&s).copied().unwrap_or(0) >= p
    }

    /// Queues one work item on `s`; returns its position.
    fn kernel(&mut self, s: u64) -> Pos {
        let pos = (s, *self.enqueued.entry(s).and_modify(|n| *n += 1).or_insert(1));
        let waits = self.after.get(&s).map(|m| m.iter().map(|(&u, &p)| (u, p)).collect()).unwrap_or_default();
        self.prereqs.insert(pos, waits);
        pos
    }

    /// Completes `s` up to item `upto` (and first whatever those items wait for).
    fn complete(&mut self, s: u64, upto: u64) {
        while self.done.get(&s).copied().unwrap_or(0) < upto {
            let next = (s, self.done.get(&s).copied().unwrap_or(0) + 1);
            for (u, p) in self.prereqs.get(&next).cloned().unwrap_or_default() {
                self.complete(u, p);
            }
            self.done.insert(s, next.1);
        }
    }

    /// The device runs the next item of `s`, if what it waits for is done.
    fn progress(&mut self, s: u64) {
        let next = (s, self.done.get(&s).copied().unwrap_or(0) + 1);
        if next.1 > self.enqueued.get(&s).copied().unwrap_or(0) {
            return;
        }
        if self.prereqs.get(&next).is_some_and(|w| w.iter().all(|&p| self.done(p))) {
            self.done.insert(s, next.1);
        }
    }

    fn synchronize(&mut self) {
        let streams: Vec<(u64, u64)> = self.enqueued.iter().map(|(&s, &n)| (s, n)).collect();
        for (s, n) in streams {
            self.complete(s, n);
        }
    }

    /// Whether new work on `t` is ordered after `(u, p)`: done already, or
    /// reachable through stream order and waits (transitively).
    fn ordered_after(&self, t: u64, target: Pos) -> bool {
        if self.done(target) {
            return true;
        }
        // New work on t comes after t's last item and after what t waits for.
        let mut stack: Vec<Pos> = vec![(t, self.enqueued.get(&t).copied().unwrap_or(0))];
        stack.extend(self.after.get(&t).map(|m| m.iter().map(|(&u, &p)| (u, p)).collect::<Vec<_>>()).unwrap_or_default());
        let mut seen = std::collections::HashSet::new();
        while let Some((v, q)) = stack.pop() {
            if v == target.0 && q >= target.1 {
                return true;
            }
            if q == 0 || !seen.insert((v, q)) {
                continue;
            }
            // Item (v, q) runs after (v, q - 1) and after what it waited for.
            stack.push((v, q - 1));
            stack.extend(self.prereqs.get(&(v, q)).cloned().unwrap_or_default());
        }
        false
    }

    /// Memory `[addr, addr+len)` is handed to stream `t`.
    fn check_handout(&mut self, addr: u64, len: u64, t: u64) {
        for r in &self.retired {
            if r.addr < addr + len && addr < r.addr + r.len {
                for &u in &r.uses {
                    if !self.ordered_after(t, u) {
                        self.violations.push(format!(
                            "{addr:#x}+{len} handed to stream {t} while stream {} may still run item {} on {:#x}+{}",
                            u.0, u.1, r.addr, r.len
                        ));
                    }
                }
            }
        }
        self.prune();
    }

    /// `[va, va+len)` is unmapped: nothing queued may touch it.
    fn check_unmap(&mut self, va: u64, len: u64) {
        for r in self.retired.iter().chain(&self.pausing) {
            if r.addr < va + len && va < r.addr + r.len {
                for &u in &r.uses {
                    if !self.done(u) {
                        self.violations.push(format!(
                            "{va:#x}+{len} unmapped while stream {} may still run item {} on {:#x}+{}",
                            u.0, u.1, r.addr, r.len
                        ));
                    }
                }
            }
        }
    }

    fn prune(&mut self) {
        let done = |m: &Model, r: &Retired| r.uses.iter().all(|&u| m.done(u));
        let keep: Vec<Retired> = self.retired.iter().filter(|r| !done(self, r)).cloned().collect();
        self.retired = keep;
    }
}

/// The sim backend for memory, the model for streams and events.
struct ModelBackend {
    sim: SimBackend,
    model: Arc<Mutex<Model>>,
    /// A broken device for the checker's own test: every event is done at
    /// once and synchronizing waits for nothing.
    lie: bool,
    /// event_done calls, for the cost test.
    queries: std::sync::atomic::AtomicU64,
}

impl Backend for ModelBackend {
    fn name(&self) -> &'static str {
        "model"
    }
    fn granularity(&self, device: i32) -> Result<u64> {
        self.sim.granularity(device)
    }
    fn device_count(&self) -> Result<i32> {
        self.sim.device_count()
    }
    fn mem_info(&self, device: i32) -> Result<(u64, u64)> {
        self.sim.mem_info(device)
    }
    fn reserve(&self, device: i32, size_bytes: u64, alignment: u64) -> Result<u64> {
        self.sim.reserve(device, size_bytes, alignment)
    }
    fn unreserve(&self, device: i32, base: u64, size_bytes: u64) -> Result<()> {
        self.sim.unreserve(device, base, size_bytes)
    }
    fn create(&self, device: i32, size_bytes: u64) -> Result<HandleId> {
        self.sim.create(device, size_bytes)
    }
    fn release(&self, device: i32, handle: HandleId) -> Result<()> {
        self.sim.release(device, handle)
    }
    fn map(&self, device: i32, va: u64, size_bytes: u64, handle: HandleId) -> Result<()> {
        self.sim.map(device, va, size_bytes, handle)
    }
    fn set_access(&self, device: i32, va: u64, size_bytes: u64) -> Result<()> {
        self.sim.set_access(device, va, size_bytes)
    }
    fn unmap(&self, device: i32, va: u64, size_bytes: u64) -> Result<()> {
        self.model.lock().unwrap().check_unmap(va, size_bytes);
        self.sim.unmap(device, va, size_bytes)
    }
    fn synchronize(&self, _device: i32) -> Result<()> {
        if !self.lie {
            self.model.lock().unwrap().synchronize();
        }
        Ok(())
    }
    fn record_event(&self, _device: i32, stream: u64) -> Result<EventId> {
        let mut m = self.model.lock().unwrap();
        m.next_event += 1;
        let id = m.next_event;
        let pos = (stream, m.enqueued.get(&stream).copied().unwrap_or(0));
        m.events.insert(id, pos);
        Ok(id)
    }
    fn event_done(&self, _device: i32, event: EventId) -> Result<bool> {
        self.queries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let m = self.model.lock().unwrap();
        Ok(self.lie || m.done(m.events[&event]))
    }
    fn capture_id(&self, _device: i32, _stream: u64) -> Result<Option<u64>> {
        Ok(None)
    }
    fn event_synchronize(&self, _device: i32, event: EventId) -> Result<()> {
        let mut m = self.model.lock().unwrap();
        let (s, p) = m.events[&event];
        if !self.lie {
            m.complete(s, p);
        }
        Ok(())
    }
    fn destroy_event(&self, _device: i32, event: EventId) -> Result<()> {
        self.model.lock().unwrap().events.remove(&event).map(|_| ()).ok_or_else(|| {
            tessera::error::Error::Driver { call: "model_destroy_event", code: 1, message: format!("unknown event {event}") }
        })
    }
    fn stream_wait_event(&self, _device: i32, stream: u64, event: EventId) -> Result<()> {
        let mut m = self.model.lock().unwrap();
        let (u, p) = m.events[&event];
        if self.lie {
            return Ok(());
        }
        let w = m.after.entry(stream).or_default().entry(u).or_insert(0);
        *w = (*w).max(p);
        Ok(())
    }
    fn backup(&self, device: i32, va: u64, size_bytes: u64, reuse: Option<BackupId>) -> Result<BackupId> {
        self.model.lock().unwrap().check_unmap(va, size_bytes);
        self.sim.backup(device, va, size_bytes, reuse)
    }
    fn restore(&self, device: i32, backup: BackupId, va: u64, size_bytes: u64) -> Result<()> {
        self.sim.restore(device, backup, va, size_bytes)
    }
    fn drop_backup(&self, device: i32, backup: BackupId, size_bytes: u64) {
        self.sim.drop_backup(device, backup, size_bytes)
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// Allocate a size class on a stream; a kernel on that stream uses it.
    Alloc(u8, u8),
    /// Free the live block at this index (modulo the live count).
    Free(u8),
    /// record_stream on another stream, and a kernel there uses the block.
    RecordStream(u8, u8),
    /// A kernel on the block's own stream uses it again.
    Use(u8),
    /// The device runs the next work item of a stream.
    Progress(u8),
    /// torch.cuda.synchronize().
    Sync,
    EmptyCache,
    /// The driver thread runs a tidy round (maps the ready reserve,
    /// recycling cached memory the device is done with).
    Tidy,
    /// Allocate a size class on a stream under the tag (see `TAG`).
    AllocTagged(u8, u8),
    /// Pause the tag, with a backup or not.
    Pause(bool),
    Resume,
}

/// The tag of `Op::AllocTagged`.
const TAG: &str = "model";

const STREAMS: [u64; 3] = [0, 1, 2];
const CAPACITY: u64 = 1 << 20;
const HANDLE: u64 = 128 << 10;
const SIZES: [u64; 3] = [4 << 10, 192 << 10, 448 << 10];

struct Live {
    ptr: u64,
    len: u64,
    stream: u64,
    uses: Vec<Pos>,
    tagged: bool,
}

/// Runs `ops` on a 1 MiB device of 64 KiB granules (so pressure, recycling
/// and remapping happen within a few operations); returns the violations:
/// early reuse, and out of memory while the memory was there.
fn run(ops: &[Op], conf: &str) -> Vec<String> {
    run_on(ops, conf, false).0
}

/// `run`, on a lying device if `lie`; also returns the ready reserve's hits.
fn run_on(ops: &[Op], conf: &str, lie: bool) -> (Vec<String>, u64) {
    let config = Config::parse(&format!(
        "backend:sim,device_capacity:1M,page_size:64K,max_handle_size:128K,small_size:16K,growth_size:0,{conf}"
    ))
    .unwrap();
    let model = Arc::new(Mutex::new(Model::default()));
    let backend = Arc::new(ModelBackend { sim: SimBackend::new(1, config.device_capacity.0), model: model.clone(), lie, queries: Default::default() });
    let tidied = config.driver_thread;
    let a = Allocator::with_backend(config, backend).unwrap();
    if tidied {
        a.set_tidied(None);
    }
    let mut live: Vec<Live> = Vec::new();
    let tag = tessera::tags::intern(TAG).unwrap();
    let (mut paused, mut tag_used) = (false, false);
    for &op in ops {
        match op {
            Op::Alloc(size, s) | Op::AllocTagged(size, s) => {
                let tagged = matches!(op, Op::AllocTagged(..));
                let (len, t) = (SIZES[size as usize % SIZES.len()], STREAMS[s as usize % STREAMS.len()]);
                let previous = tessera::tags::set_current(if tagged { tag } else { 0 });
                let result = a.malloc(len, 0, t);
                tessera::tags::set_current(previous);
                let ptr = match result {
                    Ok(ptr) => {
                        assert!(!(tagged && paused), "an allocation into a paused tag succeeded");
                        tag_used |= tagged;
                        ptr
                    }
                    Err(tessera::error::Error::InvalidArgument(m)) if tagged && paused => {
                        assert!(m.contains("paused"), "{m}");
                        continue;
                    }
                    Err(e) => {
                        // Out of memory is fine only when the memory is not
                        // there: live blocks rounded to whole handles (what
                        // they can pin; a paused tag's pin nothing), the
                        // request, and a small-arena handle per pool.
                        let holding = |b: &&Live| !(b.tagged && paused);
                        let pinned: u64 = live.iter().filter(holding).map(|b| b.len.div_ceil(HANDLE) * HANDLE).sum();
                        let slack = HANDLE * (1 + tag_used as u64);
                        if pinned + len.div_ceil(HANDLE) * HANDLE + slack <= CAPACITY {
                            model.lock().unwrap().violations.push(format!(
                                "{len} bytes on stream {t} failed with {pinned} bytes pinned of {CAPACITY}: {e}"
                            ));
                        }
                        continue;
                    }
                };
                let mut m = model.lock().unwrap();
                m.check_handout(ptr, len, t);
                let pos = m.kernel(t);
                live.push(Live { ptr, len, stream: t, uses: vec![pos], tagged });
            }
            Op::Free(i) if !live.is_empty() => {
                let b = live.remove(i as usize % live.len());
                // Retired before the call: the allocator may unmap it at once.
                model.lock().unwrap().retired.push(Retired { addr: b.ptr, len: b.len, uses: b.uses });
                a.free(b.ptr, Some(b.len), 0, Some(b.stream)).unwrap();
            }
            Op::RecordStream(i, s) if !live.is_empty() && (!live[i as usize % live.len()].tagged || !paused) => {
                let n = live.len();
                let b = &mut live[i as usize % n];
                let t = STREAMS[s as usize % STREAMS.len()];
                a.record_stream(b.ptr, t).unwrap();
                let pos = model.lock().unwrap().kernel(t);
                b.uses.retain(|&(u, _)| u != t);
                b.uses.push(pos);
            }
            Op::Use(i) if !live.is_empty() && (!live[i as usize % live.len()].tagged || !paused) => {
                let n = live.len();
                let b = &mut live[i as usize % n];
                let pos = model.lock().unwrap().kernel(b.stream);
                b.uses.retain(|&(u, _)| u != b.stream);
                b.uses.push(pos);
            }
            Op::Progress(s) => model.lock().unwrap().progress(STREAMS[s as usize % STREAMS.len()]),
            Op::Sync => model.lock().unwrap().synchronize(),
            Op::EmptyCache => a.empty_cache().unwrap(),
            Op::Tidy => {
                a.tidy();
            }
            Op::Pause(backup) if tag_used && !paused => {
                // A kernel touching paused memory is the program's bug: the
                // harness never queues one (see Use and RecordStream).
                model.lock().unwrap().pausing =
                    live.iter().filter(|b| b.tagged).map(|b| Retired { addr: b.ptr, len: b.len, uses: b.uses.clone() }).collect();
                a.pause(TAG, backup).unwrap();
                model.lock().unwrap().pausing.clear();
                paused = true;
            }
            Op::Resume if paused => match a.resume(TAG) {
                Ok(_) => paused = false,
                Err(tessera::error::Error::OutOfMemory(_)) => {}
                Err(e) => panic!("resume: {e}"),
            },
            _ => {}
        }
        check(&a, 0);
    }
    let violations = std::mem::take(&mut model.lock().unwrap().violations);
    (violations, a.stats(0).unwrap().counter(tessera::stats::TesseraCounter::ReadyHits))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u8..3).prop_map(|(z, s)| Op::Alloc(z, s)),
        3 => any::<u8>().prop_map(Op::Free),
        2 => (any::<u8>(), 0u8..3).prop_map(|(i, s)| Op::RecordStream(i, s)),
        1 => any::<u8>().prop_map(Op::Use),
        3 => (0u8..3).prop_map(Op::Progress),
        1 => Just(Op::Sync),
        1 => Just(Op::EmptyCache),
        2 => Just(Op::Tidy),
        2 => (0u8..3, 0u8..3).prop_map(|(z, s)| Op::AllocTagged(z, s)),
        1 => any::<bool>().prop_map(Op::Pause),
        1 => Just(Op::Resume),
    ]
}

/// The driver thread's configuration in the model: a reserve of up to a
/// quarter of what is reserved (the 1 MiB device makes the default share
/// smaller than a granule), recycled while over half cached.
const TIDIED: &str = "driver_thread:true,ready_fraction:0.5,max_cached_fraction:0.5";

proptest! {
    // 4096 cases each, or PROPTEST_CASES (an explicit `cases` would ignore it).
    #![proptest_config(ProptestConfig { cases: proptest_cases(4096), ..ProptestConfig::default() })]
    #[test]
    fn random_interleavings_never_reuse_memory_early(ops in prop::collection::vec(op(), 1..80)) {
        let v = run(&ops, "");
        prop_assert!(v.is_empty(), "{:?}\nops: {:?}", v, ops);
    }

    #[test]
    fn random_interleavings_never_reuse_memory_early_without_recycling(ops in prop::collection::vec(op(), 1..80)) {
        let v = run(&ops, "max_cached_fraction:1");
        prop_assert!(v.is_empty(), "{:?}\nops: {:?}", v, ops);
    }

    #[test]
    fn random_interleavings_with_the_driver_thread_never_reuse_memory_early(ops in prop::collection::vec(op(), 1..80)) {
        let v = run(&ops, TIDIED);
        prop_assert!(v.is_empty(), "{:?}\nops: {:?}", v, ops);
    }
}

/// Every sequence of `depth` operations over a small alphabet (two streams,
/// two sizes). TESSERA_MODEL_DEPTH raises the bound (5: ~0.2 M sequences).
#[test]
fn every_short_interleaving_never_reuses_memory_early() {
    let depth: u32 = std::env::var("TESSERA_MODEL_DEPTH").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let alphabet = [
        Op::Alloc(1, 1),
        Op::Alloc(2, 1),
        Op::Alloc(1, 2),
        Op::Alloc(0, 2),
        Op::Free(0),
        Op::Free(1),
        Op::RecordStream(0, 2),
        Op::RecordStream(0, 1),
        Op::Progress(1),
        Op::Progress(2),
        Op::Sync,
        Op::EmptyCache,
        Op::Tidy,
        Op::AllocTagged(1, 2),
        Op::Pause(false),
        Op::Resume,
    ];
    let n = alphabet.len() as u64;
    let total = n.pow(depth);
    let mut ops = vec![Op::Sync; depth as usize];
    for code in 0..total {
        let mut c = code;
        for slot in ops.iter_mut() {
            *slot = alphabet[(c % n) as usize];
            c /= n;
        }
        // A prefix that fills the device makes the pressure paths reachable
        // within the bound.
        let mut seq = vec![Op::Alloc(2, 1), Op::Alloc(2, 2)];
        seq.extend_from_slice(&ops);
        for conf in ["", TIDIED] {
            let v = run(&seq, conf);
            assert!(v.is_empty(), "{v:?}\nconf {conf:?}, ops: {seq:?}");
        }
    }
    eprintln!("model check: {total} sequences of {depth} operations (after a 2-operation prefix), no early reuse");
}

/// The checker itself: a backend that ignores events (reports every event
/// done at once) must be caught.
#[test]
fn the_checker_catches_reuse_before_the_device_is_done() {
    let model = Arc::new(Mutex::new(Model::default()));
    let p = model.lock().unwrap().kernel(1);
    model.lock().unwrap().retired.push(Retired { addr: 0x1000, len: 0x1000, uses: vec![p] });
    model.lock().unwrap().check_handout(0x1000, 0x1000, 2);
    assert_eq!(model.lock().unwrap().violations.len(), 1, "stream 2 got memory stream 1 still uses");
    model.lock().unwrap().check_unmap(0x1800, 0x1000);
    assert_eq!(model.lock().unwrap().violations.len(), 2, "unmapped under queued work");
    // Once stream 2 waits for stream 1's event, or the work is done, it is fine.
    let mut m = model.lock().unwrap();
    m.violations.clear();
    m.after.entry(2).or_default().insert(1, p.1);
    m.check_handout(0x1000, 0x1000, 2);
    m.complete(1, p.1);
    m.check_unmap(0x1000, 0x1000);
    assert!(m.violations.is_empty(), "{:?}", m.violations);
}

/// The harness itself: on a device that lies about events (all done at once,
/// waits that order nothing), the allocator reuses memory early, and the
/// random sequences must show it.
#[test]
fn a_device_that_lies_about_events_is_caught() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = prop::collection::vec(op(), 1..80);
    let mut caught = 0;
    for _ in 0..300 {
        let ops = strategy.new_tree(&mut runner).unwrap().current();
        if !run_on(&ops, "", true).0.is_empty() {
            caught += 1;
        }
    }
    assert!(caught > 0, "300 sequences on a lying device and no early reuse seen: the harness checks nothing");
    eprintln!("lying device: early reuse caught in {caught} of 300 sequences");
}

/// Blocks waiting for a busy stream cost one event query per allocation, not
/// one per block: events of a stream complete in order.
#[test]
fn pending_frees_on_a_busy_stream_cost_one_query_per_allocation() {
    let config = Config::parse("backend:sim,device_capacity:1G").unwrap();
    let model = Arc::new(Mutex::new(Model::default()));
    let backend = Arc::new(ModelBackend {
        sim: SimBackend::new(1, config.device_capacity.0),
        model: model.clone(),
        lie: false,
        queries: Default::default(),
    });
    let a = Allocator::with_backend(config, backend.clone()).unwrap();
    for _ in 0..50 {
        let p = a.malloc(4096, 0, 1).unwrap();
        model.lock().unwrap().kernel(1);
        a.record_stream(p, 2).unwrap();
        model.lock().unwrap().kernel(2); // stream 2 uses it; the device runs nothing
        a.free(p, None, 0, Some(1)).unwrap();
    }
    let before = backend.queries.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..10 {
        let p = a.malloc(4096, 0, 1).unwrap();
        a.free(p, None, 0, Some(1)).unwrap();
    }
    let asked = backend.queries.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(asked <= 10, "{asked} event queries for 10 allocations with 50 blocks pending on one stream");
    // Once stream 2 is done, one allocation that the front caches cannot
    // serve (another size: the pool's path) frees them all.
    model.lock().unwrap().synchronize();
    let p = a.malloc(8192, 0, 1).unwrap();
    assert_eq!(a.stats(0).unwrap().gauge(tessera::stats::TesseraGauge::PendingFreeBlocks).current, 0);
    a.free(p, None, 0, Some(1)).unwrap();
    check(&a, 0);
}

/// Found by the random interleavings: a block cached for stream 1 (its last
/// use not yet done) was taken by stream 0 under pressure, and the split-off
/// rest was cached as stream 0's, so stream 0's older epoch event declared it
/// done and recycling unmapped it under stream 1's queued work.
#[test]
fn the_rest_of_a_block_taken_from_another_stream_stays_that_streams() {
    use Op::*;
    let ops = [Alloc(0,0), Alloc(1,1), Alloc(2,1), Alloc(0,0), Free(43), Free(45), Free(50), Alloc(0,2), Alloc(0,0),
        RecordStream(45,0), RecordStream(28,0), Free(99), Free(134), Alloc(1,0), Free(14), Alloc(2,1), RecordStream(30,1),
        Alloc(0,0), Alloc(0,0), RecordStream(61,1), Free(144), Free(0), Alloc(0,0), Alloc(0,0), Alloc(1,2), Alloc(0,0), Alloc(1,0), Alloc(1,1)];
    let v = run(&ops, "");
    assert!(v.is_empty(), "{v:?}");
}

/// The driver thread's runs are no vacuous pass: random sequences take the
/// ready reserve often (and the lying device shows that such runs would be
/// caught).
#[test]
fn random_interleavings_with_the_driver_thread_use_the_ready_reserve() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = prop::collection::vec(op(), 1..80);
    let (mut used, mut caught) = (0, 0);
    for _ in 0..300 {
        let ops = strategy.new_tree(&mut runner).unwrap().current();
        used += (run_on(&ops, TIDIED, false).1 > 0) as u32;
        caught += !run_on(&ops, TIDIED, true).0.is_empty() as u32;
    }
    assert!(used >= 30, "the ready reserve served a miss in {used} of 300 sequences");
    assert!(caught > 0, "no early reuse caught on a lying device with the driver thread");
    eprintln!("driver thread: the reserve served misses in {used} of 300 sequences; a lying device caught in {caught}");
}

/// Pausing a tag waits for every stream that used its live blocks (their
/// own and record_stream's) before it copies or unmaps them: on a device
/// that lies about events the same sequence is caught.
#[test]
fn a_pause_waits_for_every_stream_that_used_the_tag() {
    let ops = [Op::AllocTagged(1, 1), Op::RecordStream(0, 2), Op::Use(0), Op::Pause(true), Op::Resume, Op::Use(0)];
    let honest = run_on(&ops, "", false).0;
    assert!(honest.is_empty(), "{honest:?}");
    let lied = run_on(&ops, "", true).0;
    assert!(lied.iter().any(|v| v.contains("unmapped while")), "a pause that did not wait went unseen: {lied:?}");
}
