//! Fault harness shared by tests/faults.rs and fuzz/fuzz_targets/ops.rs: bytes
//! decode (totally, deterministically) into a setup and operations, run on the
//! host backend under FaultyBackend. After every step the pool's invariants,
//! the live bytes and the backend's ledger agree and errors are OOM or injected
//! Driver errors only; at the end, with faults off, nothing has leaked.
//! Allocations may be tagged ("fault"), and the tag paused and resumed, with
//! or without backups (and with keep_backups, from the setup).
#![allow(dead_code)]
#![forbid(unsafe_code)]

use super::common::{fill, verify};
use std::sync::Arc;
use tessera::allocator::Allocator;
use tessera::backend::faulty::{CreateFault, FaultPoint, FaultyBackend, INJECTED_CODE};
use tessera::backend::host::HostBackend;
use tessera::backend::Backend;
use tessera::config::Config;
use tessera::error::Error;
use tessera::stats::TesseraGauge as G;
use tessera::tags;

/// The tag that random runs pause and resume.
pub const TAG: &str = "fault";

/// The points that random runs fail: all but Reserve (first in the list),
/// which has a targeted test.
pub const RANDOM_POINTS: &[FaultPoint] = FaultPoint::ALL.split_at(1).1;

pub const STREAMS: u64 = 3;

#[derive(Debug, Clone)]
pub struct Setup {
    /// Configuration string (the host backend, sizes in granules).
    pub conf: String,
    pub granule: u64,
    pub capacity: u64,
    pub seed: u64,
    /// Chance of failure of each call to one of `points`.
    pub probability: f64,
    pub points: Vec<FaultPoint>,
    pub create_fault: CreateFault,
    /// At most one injected fault per operation (the model the allocator is
    /// meant to survive in full); false lets faults strike recovery too.
    pub single_fault: bool,
    /// The driver thread's work: a tidy round after every operation, its
    /// driver calls under the same faults.
    pub tidied: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// On the current stream.
    Alloc { size: u64 },
    Free { pick: usize },
    RecordStream { pick: usize, stream: u64 },
    EmptyCache,
    SetStream { stream: u64 },
    /// Fails the `after`th next call to `point`.
    Arm { point: FaultPoint, after: u64 },
    /// Pauses or resumes every injection.
    Faults { on: bool },
    /// Later allocations are of `TAG` or untagged.
    Tagged { on: bool },
    Pause { backup: bool },
    Resume,
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Option<u8> {
        let b = self.data.get(self.at).copied();
        self.at += 1;
        b
    }
    fn u8_or0(&mut self) -> u8 {
        self.u8().unwrap_or(0)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
}

/// Bytes to a setup (the first 6 bytes) and operations (the rest, 1 to 4
/// bytes each; a truncated last operation is dropped). Every input decodes.
pub fn decode(data: &[u8]) -> (Setup, Vec<Op>) {
    let mut r = Reader { data, at: 0 };
    let (b0, b1, b2, b3, b4, b5) = (r.u8_or0(), r.u8_or0(), r.u8_or0(), r.u8_or0(), r.u8_or0(), r.u8_or0());
    let granule: u64 = if b0 & 1 == 0 { 4 << 10 } else { 16 << 10 };
    let handle = granule * [1, 2, 4, 16][((b0 >> 1) & 3) as usize];
    let expandable = (b0 >> 3) & 3 != 0;
    let growth = [0, 4 * granule, 20 << 20, 2 * granule][((b0 >> 5) & 3) as usize];
    let limit = if b0 >> 7 == 1 { "0.75" } else { "none" };
    let cached_fraction = ["0.1", "1", "0.5", "0"][(b1 >> 5 & 3) as usize];
    let tidied = b1 >> 7 == 1;
    let keep_backups = b5 >> 7 == 1;
    let capacity = 96 * granule;
    let conf = format!(
        "backend:host,page_size:{granule},max_handle_size:{handle},expandable_segments:{expandable},\
         growth_size:{growth},small_size:{},memory_limit:{limit},device_capacity:{capacity},va_size:{},\
         max_cached_fraction:{cached_fraction},driver_thread:{tidied},ready_fraction:0.25,keep_backups:{keep_backups}",
        2 * granule,
        1024 * granule
    );
    let mask = u16::from_le_bytes([b2, b3]);
    let mut points: Vec<FaultPoint> =
        RANDOM_POINTS.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, &p)| p).collect();
    if points.is_empty() {
        points = RANDOM_POINTS.to_vec();
    }
    let setup = Setup {
        conf,
        granule,
        capacity,
        seed: u64::from(b4) | u64::from(b5) << 8,
        probability: f64::from(b1 % 32) / 200.0,
        points,
        create_fault: [CreateFault::OutOfMemory, CreateFault::Driver, CreateFault::Either][(b4 % 3) as usize],
        single_fault: true,
        tidied,
    };
    let mut ops = Vec::new();
    let size_classes = [2 * granule, 2 * granule, 2 * granule, 8 * granule, 8 * granule, 8 * granule, capacity / 2, capacity * 5 / 4];
    while let Some(code) = r.u8() {
        let op = match code % 19 {
            0..=5 => {
                let (Some(class), Some(v)) = (r.u8(), r.u16()) else { break };
                let max = size_classes[(class % 8) as usize];
                Op::Alloc { size: 1 + u64::from(v) * max / 65536 }
            }
            6..=10 => match r.u8() {
                Some(b) => Op::Free { pick: b as usize },
                None => break,
            },
            11 => match (r.u8(), r.u8()) {
                (Some(p), Some(s)) => Op::RecordStream { pick: p as usize, stream: u64::from(s) % STREAMS },
                _ => break,
            },
            12 => Op::EmptyCache,
            13 => match r.u8() {
                Some(s) => Op::SetStream { stream: u64::from(s) % STREAMS },
                None => break,
            },
            14 => match r.u8() {
                Some(b) => Op::Arm { point: RANDOM_POINTS[b as usize % RANDOM_POINTS.len()], after: 1 + u64::from(b >> 6) },
                None => break,
            },
            15 => match r.u8() {
                Some(b) => Op::Faults { on: b & 3 != 0 },
                None => break,
            },
            16 => match r.u8() {
                Some(b) => Op::Tagged { on: b & 1 != 0 },
                None => break,
            },
            17 => match r.u8() {
                Some(b) => Op::Pause { backup: b & 1 != 0 },
                None => break,
            },
            _ => Op::Resume,
        };
        ops.push(op);
    }
    (setup, ops)
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub ops: u64,
    pub allocs: u64,
    pub ooms: u64,
    pub driver_errors: u64,
    pub injected: u64,
    /// Runs that ended with the pool disabled (fail-stop).
    pub poisoned: u64,
    /// Pauses and resumes of the tag that succeeded.
    pub pauses: u64,
    pub resumes: u64,
}

impl std::ops::AddAssign for Summary {
    fn add_assign(&mut self, o: Summary) {
        self.ops += o.ops;
        self.allocs += o.allocs;
        self.ooms += o.ooms;
        self.poisoned += o.poisoned;
        self.driver_errors += o.driver_errors;
        self.injected += o.injected;
        self.pauses += o.pauses;
        self.resumes += o.resumes;
    }
}

struct Live {
    ptr: u64,
    size: u64,
    stream: u64,
    seed: u64,
    /// Of `TAG`.
    tagged: bool,
    /// The contents are known: untagged, or tagged and kept through every
    /// pause since it was written (a backup).
    known: bool,
}

pub type Faulty = FaultyBackend<HostBackend>;

/// An allocator over a fault-injecting host backend that the caller keeps.
pub fn faulty_host(conf: &str, seed: u64) -> (Allocator, Arc<Faulty>) {
    let config = Config::parse(conf).unwrap();
    let backend = Arc::new(FaultyBackend::new(
        HostBackend::new(config.device_count as i32, config.device_capacity.0),
        seed,
    ));
    (Allocator::with_backend(config, backend.clone()).unwrap(), backend)
}

fn merge_runs(mut spans: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    spans.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (lo, hi) in spans {
        match out.last_mut() {
            Some(run) if run.1 == lo => run.1 = hi,
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// Every check of a step, with injection paused. Panics with `what` on the
/// first one broken.
pub fn check_consistent(a: &Allocator, f: &Faulty, what: &str) {
    if poisoned(a) {
        return; // fail-stop after unrecoverable driver failures: nothing to compare
    }
    a.check_invariants(0).unwrap_or_else(|e| panic!("{what}: check_invariants failed: {e}"));
    let blocks = a.with_pool(0, |p| Ok(p.blocks())).unwrap_or_else(|e| panic!("{what}: with_pool failed: {e}"));
    let mut used: Vec<(u64, u64)> = blocks.iter().map(|b| (b.addr, b.addr + b.size)).collect();
    // The tag's blocks are mapped unless it is paused; paused, what it still
    // maps (a resume's rollback that could not unmap) is its handles'.
    let tag_used = a
        .with_tag_pool(0, TAG, |p| match p.is_paused() {
            true => p.mapped_ranges(),
            false => p.blocks().iter().map(|b| (b.addr, b.addr + b.size)).collect(),
        })
        .unwrap();
    used.extend(tag_used.unwrap_or_default());
    // Every pool of the device: the untagged one and the tag's.
    let stats = a.stats(0).unwrap();
    let violations = f.violations();
    assert!(violations.is_empty(), "{what}: backend contract broken: {violations:?}");
    assert_eq!(stats.gauge(G::Handles).current, f.live_handles(0) as i64, "{what}: handles gauge vs backend");
    assert_eq!(stats.gauge(G::MappedBytes).current, f.mapped_bytes(0) as i64, "{what}: mapped gauge vs backend");
    let (free, total) = f.inner().mem_info(0).unwrap();
    assert_eq!(stats.gauge(G::ReservedBytes).current, (total - free) as i64, "{what}: reserved gauge vs backend");
    let used = merge_runs(used);
    let mapped = merge_runs(f.mapped_ranges(0).into_iter().map(|(va, n)| (va, va + n)).collect());
    assert_eq!(used, mapped, "{what}: what the backend has mapped is not what the pool's blocks cover");
    assert_eq!(stats.gauge(G::BackupBytes).current as u64, f.inner().live_backups(0).1, "{what}: backup gauge vs backend");
    // Events: those of pending frees (one per other stream), plus at most
    // one epoch event per stream.
    let pending = stats.gauge(G::PendingFreeBlocks).current as u64;
    // Plus the events whose destroy failed, kept by the pool for a retry.
    let stale = a.with_pool(0, |p| Ok(p.stale_events() as u64)).unwrap()
        + a.with_tag_pool(0, TAG, |p| p.stale_events() as u64).unwrap().unwrap_or(0);
    // The tag's pool keeps epoch events of its own.
    assert!(
        f.live_events(0) <= STREAMS * (pending + 2) + stale,
        "{what}: {} events live for {pending} pending blocks and {stale} kept",
        f.live_events(0)
    );
}

fn check_live(live: &[Live], paused: bool, what: &str) {
    let mut spans: Vec<(u64, u64)> = live.iter().map(|l| (l.ptr, l.ptr + l.size)).collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "{what}: live blocks overlap");
    }
    for l in live.iter().filter(|l| l.known && !(l.tagged && paused)) {
        assert!(verify(l.ptr, l.size, l.seed), "{what}: a live block changed");
    }
}

/// A pause without a backup: the tag's blocks' contents are gone.
fn forget_unless(live: &mut [Live], backup: bool) {
    for l in live.iter_mut().filter(|l| l.tagged) {
        l.known &= backup;
    }
}

/// The tag runs again: blocks whose contents were lost are written anew (as
/// an engine fills its KV cache again).
fn rewrite_unknown(live: &mut [Live], step: usize) {
    for l in live.iter_mut().filter(|l| !l.known) {
        l.seed = step as u64 + (1 << 32);
        fill(l.ptr, l.size, l.seed);
        l.known = true;
    }
}

/// Whether `e` is an error injected during the operation (and so allowed).
fn allowed_driver_error(e: &Error, injected_during: bool) -> bool {
    matches!(e, Error::Driver { code, .. } if *code == INJECTED_CODE) && injected_during
}

/// Runs `ops` under `setup`; panics on the first broken check.
pub fn run(setup: &Setup, ops: &[Op]) -> Summary {
    let (a, f) = faulty_host(&setup.conf, setup.seed);
    if setup.tidied {
        a.set_tidied(None);
    }
    f.set_create_fault(setup.create_fault);
    // Make the pool with nothing failing (reserve has its own test).
    f.set_enabled(false);
    check_consistent(&a, &f, "start");
    for &p in &setup.points {
        f.set_probability(p, setup.probability);
    }
    let mut faults_on = true;
    f.set_enabled(faults_on);
    let mut live: Vec<Live> = Vec::new();
    let mut stream = 0;
    let mut sum = Summary::default();
    let tag = tags::intern(TAG).unwrap();
    tags::set_current(0);
    let mut paused = false;
    for (step, &op) in ops.iter().enumerate() {
        let what = format!("step {step} ({op:?})");
        if setup.single_fault {
            f.set_fault_budget(Some(1));
        }
        let before = f.injected_total();
        let injected = |f: &Faulty| f.injected_total() > before;
        match op {
            Op::Alloc { size } => {
                sum.allocs += 1;
                let tagged = tags::current() == tag;
                match a.malloc(size, 0, stream) {
                    Ok(ptr) => {
                        assert!(!(tagged && paused), "{what}: an allocation into the paused tag succeeded");
                        fill(ptr, size, step as u64);
                        live.push(Live { ptr, size, stream, seed: step as u64, tagged, known: true });
                    }
                    Err(Error::OutOfMemory(_)) => sum.ooms += 1,
                    Err(Error::InvalidArgument(m)) if tagged && paused => assert!(m.contains("paused"), "{what}: {m}"),
                    Err(e) if allowed_driver_error(&e, injected(&f)) => sum.driver_errors += 1,
                    Err(e) => panic!("{what}: allocation failed with {e:?}"),
                }
            }
            Op::Free { pick } if !live.is_empty() => {
                let l = live.swap_remove(pick % live.len());
                let readable = !(l.tagged && paused);
                assert!(!readable || !l.known || verify(l.ptr, l.size, l.seed), "{what}: block corrupted before its free");
                // As PyTorch does, the caller forgets the pointer whatever
                // the outcome.
                match a.free(l.ptr, Some(l.size), 0, Some(l.stream)) {
                    Ok(()) => {}
                    Err(e) if allowed_driver_error(&e, injected(&f)) => sum.driver_errors += 1,
                    Err(e) => panic!("{what}: free failed with {e:?}"),
                }
            }
            Op::RecordStream { pick, stream: s } if !live.is_empty() && (!live[pick % live.len()].tagged || !paused) => {
                let l = &live[pick % live.len()];
                a.record_stream(l.ptr, s).unwrap_or_else(|e| panic!("{what}: record_stream failed with {e:?}"));
            }
            Op::EmptyCache => match a.empty_cache() {
                Ok(()) => {}
                Err(e) if allowed_driver_error(&e, injected(&f)) => sum.driver_errors += 1,
                Err(e) => panic!("{what}: empty_cache failed with {e:?}"),
            },
            Op::SetStream { stream: s } => stream = s,
            Op::Arm { point, after } => f.fail_at(point, f.calls(point) + after),
            Op::Faults { on } => faults_on = on,
            Op::Tagged { on } => {
                tags::set_current(if on { tag } else { 0 });
            }
            Op::Pause { backup } if !paused => match a.pause(TAG, backup) {
                Ok(_) => {
                    paused = true;
                    sum.pauses += 1;
                    forget_unless(&mut live, backup);
                }
                Err(e) => {
                    let allowed = matches!(e, Error::OutOfMemory(_))
                        || allowed_driver_error(&e, injected(&f))
                        || tag_poisoned(&a);
                    assert!(allowed, "{what}: pause failed with {e:?}");
                    // A pause that failed half-way is paused with what it
                    // released; a resume (faults off) maps it again, and the
                    // contents survive only with a backup.
                    f.set_enabled(false);
                    if tag_poisoned(&a) {
                        // Fail-stop: its mapping state unknown, the tag's pool
                        // refuses a resume rather than copy into it.
                        assert!(a.resume(TAG).is_err(), "{what}: a poisoned pool resumed");
                        assert!(tagged_malloc(&a, tag).is_err(), "{what}: a poisoned pool served an allocation");
                        sum.poisoned += 1;
                        tags::set_current(0);
                        return sum;
                    }
                    a.resume(TAG).unwrap_or_else(|e| panic!("{what}: the resume after a failed pause failed: {e:?}"));
                    forget_unless(&mut live, backup);
                    rewrite_unknown(&mut live, step);
                }
            },
            Op::Resume if paused => match a.resume(TAG) {
                Ok(_) => {
                    paused = false;
                    sum.resumes += 1;
                    rewrite_unknown(&mut live, step);
                }
                Err(e) => {
                    // A resume that stopped the pool (fail-stop) says so.
                    let allowed = matches!(e, Error::OutOfMemory(_)) || allowed_driver_error(&e, injected(&f)) || tag_poisoned(&a);
                    assert!(allowed, "{what}: resume failed with {e:?}");
                    paused = a.with_tag_pool(0, TAG, |p| p.is_paused()).unwrap().unwrap_or(false);
                    if !paused {
                        // Mapped, but a restore failed: contents unknown.
                        forget_unless(&mut live, false);
                        rewrite_unknown(&mut live, step);
                    }
                }
            },
            _ => {}
        }
        if setup.tidied {
            // Failures in it are counted and leave the pool as it was.
            a.tidy();
        }
        sum.ops += 1;
        f.set_enabled(false);
        if tag_poisoned(&a) {
            assert!(tagged_malloc(&a, tag).is_err(), "{what}: a poisoned pool served an allocation");
            sum.poisoned += 1;
            tags::set_current(0);
            return sum;
        }
        if poisoned(&a) {
            // Fail-stop: every later allocation is refused, nothing is reused.
            assert!(a.malloc(512, 0, 0).is_err(), "{what}: a poisoned pool served an allocation");
            sum.poisoned += 1;
            return sum;
        }
        check_consistent(&a, &f, &what);
        check_live(&live, paused, &what);
        f.set_enabled(faults_on);
    }
    sum.injected = f.injected_total();
    // Faults off: resume, free everything, give the cache back, and nothing is left.
    f.set_enabled(false);
    f.disarm();
    tags::set_current(0);
    // Untagged memory first, so that the tag's resume finds room.
    live.sort_by_key(|l| l.tagged);
    let untagged = live.iter().take_while(|l| !l.tagged).count();
    for l in live.drain(..untagged) {
        assert!(verify(l.ptr, l.size, l.seed), "end: block corrupted before its free");
        a.free(l.ptr, Some(l.size), 0, Some(l.stream)).unwrap_or_else(|e| panic!("end: free failed: {e:?}"));
    }
    a.empty_cache().unwrap_or_else(|e| panic!("end: empty_cache failed: {e:?}"));
    if paused {
        a.resume(TAG).unwrap_or_else(|e| panic!("end: resume failed: {e:?}"));
    }
    for l in live.drain(..) {
        assert!(!l.known || verify(l.ptr, l.size, l.seed), "end: block corrupted before its free");
        a.free(l.ptr, Some(l.size), 0, Some(l.stream)).unwrap_or_else(|e| panic!("end: free failed: {e:?}"));
    }
    a.empty_cache().unwrap_or_else(|e| panic!("end: empty_cache failed: {e:?}"));
    check_consistent(&a, &f, "end");
    let stats = a.stats(0).unwrap();
    assert_eq!(stats.gauge(G::ActiveBlocks).current, 0, "end: a freed block is still allocated (leak)");
    assert_eq!(stats.gauge(G::PendingFreeBlocks).current, 0, "end: a block is still pending (leak)");
    assert_eq!(f.live_handles(0), 0, "end: handles leaked");
    assert_eq!(f.inner().live_handles(0), 0, "end: handles leaked in the host backend");
    assert_eq!(f.mapped_bytes(0), 0, "end: bytes left mapped");
    // The pool may keep one epoch event per stream outstanding (polled, not
    // waited for); anything beyond that is a leak.
    assert!(f.live_events(0) <= 2 * STREAMS, "end: {} events live (leak)", f.live_events(0));
    drop(a);
    assert_eq!(f.inner().live_backups(0), (0, 0), "end: host copies leaked");
    // The pool never unreserves its arenas; do it so that runs do not pile
    // up address space and mappings.
    f.unreserve_all(0).unwrap();
    sum
}

/// Whether the tag's pool on device 0 stopped serving (fail-stop).
fn tag_poisoned(a: &Allocator) -> bool {
    a.with_tag_pool(0, TAG, |p| p.poisoned().is_some()).unwrap().unwrap_or(false)
}

/// A small allocation of tag `tag` (the caller's current tag kept).
fn tagged_malloc(a: &Allocator, tag: u32) -> tessera::error::Result<u64> {
    let previous = tags::set_current(tag);
    let r = a.malloc(512, 0, 0);
    tags::set_current(previous);
    r
}

/// Whether device 0's pool stopped serving after unrecoverable faults.
pub fn poisoned(a: &Allocator) -> bool {
    a.poisoned(0)
}

/// Hex of an input, for failure messages and TESSERA_FAULT_INPUT.
pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Vec<u8> {
    let t: Vec<u8> = text.trim().bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    t.chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
        .collect()
}
