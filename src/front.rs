//! Front caches: the hot path of one device, in front of its pool. A block
//! freed on stream s waits whole in the shard of s for a request of exactly
//! its size on s (stream order makes that reuse safe without an event). Each
//! shard has its own lock, so threads on distinct streams do not contend, and
//! the pool's lock (best fit, growth, driver calls, reclamation) is taken
//! only on a miss; the miss first drains every shard's free blocks back, so
//! best fit and reclamation always see coalesced memory.
//!
//! Invariants (checked by [`Front::check`], with the pool's):
//! - A block that a shard holds, free in a list or handed out in `live`, is
//!   `State::Lent` in the pool, held by exactly one shard: the shard of its
//!   stream. Every lent block is held by a shard.
//! - A list holds at most `LIST_MAX` blocks of one (stream, size), a shard at
//!   most `KEYS_MAX` lists; `cached_blocks` is the sum of the list lengths.
//! - The pool's statistics plus every shard's `delta` equal a recount.
//!   Bit i of `touched` is set if shard i holds free blocks or a delta.
//!
//! Shards are spin locks (spin.rs): the uncontended pair is cheaper than a
//! Mutex's, and distinct streams rarely share one.
//! Lock order: a shard, then the pool. Never a shard while holding the pool;
//! never two shards, except `check`, which takes all in index order.
#![forbid(unsafe_code)]

use crate::pool::{round_size, AddrHash, ArenaKind, DevicePool, Freed, FrontDelta, LentBlock};
use crate::stats::TesseraCounter as C;
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::spin::{SpinGuard, SpinLock};
use std::sync::{Mutex, MutexGuard};

const SHARD_BITS: u32 = 6;
/// Shards per device; a stream's shard is a hash of it.
pub const SHARDS: usize = 1 << SHARD_BITS;
/// The most free blocks a list keeps; a free beyond it goes to the pool.
const LIST_MAX: usize = 16;
/// The most (stream, size) lists a shard keeps between two drains.
const KEYS_MAX: usize = 64;

/// Locks, ignoring poison: a panic while a lock was held is a bug that the
/// C boundary already reported; keep serving rather than fail every call.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a front finds its device's pool (the allocator's per-device slot).
pub trait PoolSlot {
    fn pool_mut(&mut self) -> Option<&mut DevicePool>;
}

/// The shard of a stream: Fibonacci hashing (stream handles are pointers,
/// or small integers in tests; both spread).
pub fn shard_of(stream: u64) -> usize {
    (stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARD_BITS)) as usize
}

/// A bounded stack of free blocks (id, address) of one (stream, size),
/// inline: pushing allocates nothing.
#[derive(Debug, Clone, Copy)]
struct List {
    arena: ArenaKind,
    len: usize,
    items: [(u32, u64); LIST_MAX],
}

/// A block a shard handed out.
#[derive(Debug, Clone, Copy)]
struct Out {
    id: u32,
    size: u64,
    requested: u64,
    stream: u64,
    arena: ArenaKind,
}

#[derive(Default)]
struct ShardState {
    /// Free lent blocks by (stream, size), most recently freed last.
    lists: HashMap<(u64, u64), List, AddrHash>,
    /// Sum of the lists' lengths.
    cached_blocks: usize,
    /// Lent blocks handed out by this shard, by address.
    live: HashMap<u64, Out, AddrHash>,
    /// Counted since the last merge into the pool.
    delta: FrontDelta,
    /// This shard's bit is set in `Front::touched`.
    marked: bool,
}

/// One lock per shard, each on its own cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Shard(SpinLock<ShardState>);

/// What `Front::free` did.
pub enum FrontFree {
    /// The pool of this device holds the block: freed (or an error).
    Handled(Result<()>),
    /// Not a live block of this device.
    NotFound,
}

/// The front caches of one device.
pub struct Front {
    shards: Box<[Shard]>,
    /// Bit i: shard i may hold free blocks or an unmerged delta (set under
    /// the shard's lock when it gets either, cleared by a drain).
    touched: AtomicU64,
    /// Serving (off while history is recorded or the pool is poisoned).
    enabled: AtomicBool,
    /// Graph captures are watched: blocks of capturing streams go to the pool.
    graphs: AtomicBool,
}

/// Accounting of taking back `out`, handed out earlier.
fn count_back(delta: &mut FrontDelta, out: &Out) {
    delta.take_back(out.arena, out.size, out.requested);
}

impl ShardState {
    /// Puts a free lent block in its list; false if the list or the shard
    /// is full.
    fn push(&mut self, stream: u64, size: u64, arena: ArenaKind, id: u32, addr: u64) -> bool {
        if self.lists.len() >= KEYS_MAX && !self.lists.contains_key(&(stream, size)) {
            return false;
        }
        let list = self.lists.entry((stream, size)).or_insert_with(|| List { arena, len: 0, items: [(0, 0); LIST_MAX] });
        if list.len == LIST_MAX {
            return false;
        }
        list.items[list.len] = (id, addr);
        list.len += 1;
        self.cached_blocks += 1;
        true
    }
}

impl Front {
    pub fn new(enabled: bool, graphs: bool) -> Front {
        Front {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            touched: AtomicU64::new(0),
            enabled: AtomicBool::new(enabled),
            graphs: AtomicBool::new(graphs),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Whether graph captures are watched (the caller asks the driver
    /// whether the stream captures before `malloc`).
    pub fn graphs(&self) -> bool {
        self.graphs.load(Ordering::Relaxed)
    }

    pub fn watch_graphs(&self) {
        self.graphs.store(true, Ordering::SeqCst);
    }

    fn mark(&self, idx: usize, sh: &mut ShardState) {
        if !sh.marked {
            sh.marked = true;
            self.touched.fetch_or(1 << idx, Ordering::AcqRel);
        }
    }

    /// The hot path: a free block of exactly `rounded` bytes that `stream`
    /// freed, handed out again; None on a miss.
    pub fn malloc(&self, rounded: u64, requested: u64, stream: u64) -> Option<u64> {
        let idx = shard_of(stream);
        let mut guard = self.shards[idx].0.lock();
        let sh = &mut *guard;
        // Read under the lock: `disable` drains after clearing it.
        if sh.cached_blocks == 0 || !self.enabled() {
            return None;
        }
        let list = sh.lists.get_mut(&(stream, rounded)).filter(|l| l.len > 0)?;
        list.len -= 1;
        let (id, addr) = list.items[list.len];
        let out = Out { id, size: rounded, requested, stream, arena: list.arena };
        sh.cached_blocks -= 1;
        sh.live.insert(addr, out);
        sh.delta.hand_out(out.arena, out.size, out.requested);
        sh.delta.cache_hits += 1;
        Some(addr)
    }

    /// Frees `addr`, named by the caller with `stream` (PyTorch passes the
    /// allocation's). A block this front handed out is cached in its list at
    /// once; any other goes to the pool, which lends it to this shard when
    /// it belongs here. `capturing(stream)` asks the driver (only called
    /// when graphs are watched).
    pub fn free<S: PoolSlot>(
        &self,
        slot: &Mutex<S>,
        addr: u64,
        size: Option<u64>,
        stream: u64,
        capturing: &dyn Fn(u64) -> bool,
    ) -> FrontFree {
        let mut idx = shard_of(stream);
        for attempt in 0..2 {
            let mut guard = self.shards[idx].0.lock();
            let sh = &mut *guard;
            if let Some(out) = sh.live.remove(&addr) {
                let mismatch = size.is_some_and(|s| s != out.requested && s != out.size) || stream != out.stream;
                if mismatch || !self.enabled() || (self.graphs() && capturing(out.stream)) {
                    // The pool frees it: it reports a mismatch, keeps a
                    // capture's memory private, or serves nothing.
                    count_back(&mut sh.delta, &out);
                    self.mark(idx, sh);
                    let mut pool_guard = lock(slot);
                    let Some(pool) = pool_guard.pool_mut() else { return FrontFree::NotFound };
                    pool.merge_front(&sh.delta);
                    sh.delta = FrontDelta::default();
                    pool.lent_to_live(out.id, out.requested);
                    return FrontFree::Handled(pool.free(addr, size, Some(stream)));
                }
                count_back(&mut sh.delta, &out);
                self.mark(idx, sh);
                if !sh.push(out.stream, out.size, out.arena, out.id, addr) {
                    let mut pool_guard = lock(slot);
                    if let Some(pool) = pool_guard.pool_mut() {
                        pool.merge_front(&sh.delta);
                        sh.delta = FrontDelta::default();
                        pool.return_lent(out.id);
                    }
                }
                return FrontFree::Handled(Ok(()));
            }
            // Not handed out here: the pool knows the block.
            let mut pool_guard = lock(slot);
            let Some(pool) = pool_guard.pool_mut() else { return FrontFree::NotFound };
            let held = pool.lent_stream(addr);
            if held.is_none() && !pool.owns(addr) {
                return FrontFree::NotFound;
            }
            if let Some(s) = held {
                if shard_of(s) != idx && attempt == 0 {
                    idx = shard_of(s); // handed out by another shard
                    continue;
                }
                // Lent, in this shard's lists: already free.
                pool.stats_mut().bump(C::InvalidFrees, 1);
                return FrontFree::Handled(Err(Error::InvalidArgument(format!(
                    "free of {addr:#x}, which is not a live tessera allocation on device {} (freed twice)",
                    pool.device()
                ))));
            }
            pool.merge_front(&sh.delta);
            sh.delta = FrontDelta::default();
            let enabled = self.enabled();
            let result = pool.free_or_lend(addr, size, Some(stream), |s| enabled && shard_of(s) == idx);
            return FrontFree::Handled(match result {
                Ok(Freed::Lent(b)) => {
                    self.mark(idx, sh);
                    if !sh.push(b.stream, b.size, b.arena, b.id, b.addr) {
                        pool.return_lent(b.id);
                    }
                    Ok(())
                }
                Ok(Freed::Done) => Ok(()),
                Ok(Freed::HeldByFront(_)) => Err(Error::InvalidArgument(format!("free of {addr:#x}: lent while locked"))),
                Err(e) => Err(e),
            });
        }
        unreachable!("the second attempt returns")
    }

    /// Takes a block this front handed out back into the pool as an
    /// ordinary allocation (before a record_stream). False if no shard has
    /// it out (then it is free: lent and listed).
    pub fn take_back<S: PoolSlot>(&self, slot: &Mutex<S>, addr: u64, stream: u64) -> bool {
        let idx = shard_of(stream);
        let mut guard = self.shards[idx].0.lock();
        let sh = &mut *guard;
        let Some(out) = sh.live.remove(&addr) else { return false };
        count_back(&mut sh.delta, &out);
        self.mark(idx, sh);
        let mut pool_guard = lock(slot);
        let Some(pool) = pool_guard.pool_mut() else { return false };
        pool.merge_front(&sh.delta);
        sh.delta = FrontDelta::default();
        pool.lent_to_live(out.id, out.requested);
        true
    }

    /// Gives every shard's free blocks back to the pool and merges every
    /// delta; with `handed_out`, the blocks handed out too (they become
    /// ordinary allocations). Returns the free blocks given back.
    pub fn drain<S: PoolSlot>(&self, slot: &Mutex<S>, handed_out: bool) -> usize {
        let mask = if handed_out { u64::MAX } else { self.touched.load(Ordering::Acquire) };
        let mut returned = 0;
        for idx in (0..SHARDS).filter(|i| mask & (1 << i) != 0) {
            let mut guard = self.shards[idx].0.lock();
            let sh = &mut *guard;
            if !sh.marked && !(handed_out && !sh.live.is_empty()) {
                continue;
            }
            let mut pool_guard = lock(slot);
            let Some(pool) = pool_guard.pool_mut() else { return returned };
            let outs: Vec<Out> = if handed_out { sh.live.drain().map(|(_, o)| o).collect() } else { Vec::new() };
            for out in &outs {
                count_back(&mut sh.delta, out);
            }
            pool.merge_front(&sh.delta);
            sh.delta = FrontDelta::default();
            for out in &outs {
                pool.lent_to_live(out.id, out.requested);
            }
            for list in sh.lists.values() {
                for &(id, _) in &list.items[..list.len] {
                    pool.return_lent(id);
                    returned += 1;
                }
            }
            sh.lists.clear();
            sh.cached_blocks = 0;
            sh.marked = false;
            self.touched.fetch_and(!(1u64 << idx), Ordering::AcqRel);
        }
        returned
    }

    /// Merges every delta into the pool (before statistics are read); the
    /// free blocks stay.
    pub fn merge<S: PoolSlot>(&self, slot: &Mutex<S>) {
        let mask = self.touched.load(Ordering::Acquire);
        for idx in (0..SHARDS).filter(|i| mask & (1 << i) != 0) {
            let mut guard = self.shards[idx].0.lock();
            let sh = &mut *guard;
            if sh.delta.is_zero() {
                continue;
            }
            let mut pool_guard = lock(slot);
            let Some(pool) = pool_guard.pool_mut() else { return };
            pool.merge_front(&sh.delta);
            sh.delta = FrontDelta::default();
        }
    }

    /// Stops serving and gives everything back (history recording; a
    /// poisoned pool).
    pub fn disable<S: PoolSlot>(&self, slot: &Mutex<S>) {
        self.enabled.store(false, Ordering::SeqCst);
        self.drain(slot, true);
    }

    /// Stops serving at once; the blocks come back at the next drain. For
    /// callers that hold the pool's lock (and so may not drain).
    pub fn stop(&self) {
        self.enabled.store(false, Ordering::SeqCst);
    }

    pub fn enable(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Checks the module's invariants and then the pool's, with the deltas
    /// merged. Panics on the first broken one. For tests and fuzzers.
    pub fn check<S: PoolSlot>(&self, slot: &Mutex<S>) {
        let mut guards: Vec<SpinGuard<'_, ShardState>> = self.shards.iter().map(|s| s.0.lock()).collect();
        let mut pool_guard = lock(slot);
        let Some(pool) = pool_guard.pool_mut() else {
            assert!(guards.iter().all(|g| g.live.is_empty() && g.cached_blocks == 0), "a front holds blocks of no pool");
            return;
        };
        let touched = self.touched.load(Ordering::Acquire);
        let mut seen = HashSet::new();
        let mut lent_live: HashMap<u32, u64> = HashMap::new();
        for (idx, sh) in guards.iter_mut().enumerate() {
            pool.merge_front(&sh.delta);
            sh.delta = FrontDelta::default();
            assert!(sh.lists.len() <= KEYS_MAX, "shard {idx}: {} lists", sh.lists.len());
            let mut listed = 0;
            for (&(stream, size), list) in &sh.lists {
                assert!(list.len <= LIST_MAX, "shard {idx}: a list of {}", list.len);
                for &(id, addr) in &list.items[..list.len] {
                    let b: LentBlock = pool.lent_block(id).unwrap_or_else(|| panic!("listed block {id} is not lent"));
                    assert_eq!((b.addr, b.size, b.stream), (addr, size, stream), "listed block {id} is not what its list says");
                    assert_eq!(b.arena, list.arena, "listed block {id}: arena");
                    assert_eq!(shard_of(stream), idx, "block {id} listed in the wrong shard");
                    assert!(seen.insert(id), "block {id} held twice");
                    listed += 1;
                }
            }
            assert_eq!(listed, sh.cached_blocks, "shard {idx}: cached_blocks");
            if listed > 0 {
                assert!(sh.marked && touched & (1 << idx) != 0, "shard {idx} holds free blocks unmarked");
            }
            for (&addr, out) in &sh.live {
                let b = pool.lent_block(out.id).unwrap_or_else(|| panic!("handed-out block {} is not lent", out.id));
                assert_eq!((b.addr, b.size, b.stream, b.arena), (addr, out.size, out.stream, out.arena), "handed-out block {}", out.id);
                assert_eq!(shard_of(out.stream), idx, "block {} handed out by the wrong shard", out.id);
                assert!(seen.insert(out.id), "block {} held twice", out.id);
                assert!(out.requested <= out.size && round_size(out.requested.max(1)) == out.size, "block {}: requested {}", out.id, out.requested);
                lent_live.insert(out.id, out.requested);
            }
        }
        assert_eq!(pool.lent_count(), seen.len(), "lent blocks no shard holds");
        pool.check_invariants_lent(&lent_live);
    }
}
