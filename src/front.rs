//! Front caches: the hot path of one device, in front of its pool. A block
//! freed on stream s waits whole in the shard of s for a request of exactly
//! its size on s (stream order makes that reuse safe without an event). Each
//! shard has its own lock, so threads on distinct streams do not contend,
//! and the pool is needed only on a miss. A block stays in its list while
//! handed out, so the hot pair is one list lookup each way. What a miss or
//! an unusual free does, and in which order, is the device's (device.rs):
//! every method here that touches the pool is given it, locked by the
//! caller; the fronts know nothing of that lock.
//!
//! Invariants (checked by [`Front::check`], with the pool's):
//! - A block in a shard's list, free or handed out, is `State::Lent` in the
//!   pool, in exactly one list: the list of its (stream, size) in the shard
//!   of its stream. Every lent block is in a list.
//! - A list holds at most `LIST_MAX` blocks, a shard at most `KEYS_MAX`
//!   lists; `cached_blocks` and `out_blocks` count the free and handed-out
//!   blocks of all its lists.
//! - The pool's statistics plus every shard's `delta` equal a recount.
//!   Bit i of `touched` is set if shard i holds free blocks or a delta.
//!
//! Shards are spin locks (spin.rs): the uncontended pair is cheaper than a
//! Mutex's, and distinct streams rarely share one.
//! Lock order: the pool, then a shard. The hot path (`malloc`, `free`) takes
//! a shard only; nothing takes two shards but `check`, all in index order.
//! Lists change membership (a block comes or goes) only with the pool held,
//! so whoever holds the pool finds every lent block in its list.
#![forbid(unsafe_code)]

use crate::hash::AddrHash;
use crate::pool::{round_size, ArenaKind, DevicePool, FrontDelta, LentBlock};
use crate::spin::{SpinGuard, SpinLock};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const SHARD_BITS: u32 = 6;
/// Shards per device; a stream's shard is a hash of it.
const SHARDS: usize = 1 << SHARD_BITS;
/// The most blocks (free or handed out) a list holds; a block lent beyond
/// it goes back to the pool.
const LIST_MAX: usize = 16;
/// The most (stream, size) lists a shard keeps between two drains.
const KEYS_MAX: usize = 64;


/// The shard of a stream: Fibonacci hashing (stream handles are pointers,
/// or small integers in tests; both spread).
pub fn shard_of(stream: u64) -> usize {
    (stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARD_BITS)) as usize
}

/// One lent block of a list.
#[derive(Debug, Clone, Copy, Default)]
struct Item {
    id: u32,
    addr: u64,
    /// Bytes asked for, while handed out.
    requested: u64,
}

/// Up to `LIST_MAX` lent blocks of one (stream, size), inline: pushing
/// allocates nothing. Items `0..len` are in use; bit i of `free` is set iff
/// item i is free (the others are handed out).
#[derive(Debug, Clone, Copy)]
struct List {
    arena: ArenaKind,
    len: usize,
    free: u32,
    items: [Item; LIST_MAX],
}

impl List {
    fn new(arena: ArenaKind) -> List {
        List { arena, len: 0, free: 0, items: [Item::default(); LIST_MAX] }
    }

    /// The index of the item at `addr`.
    fn find(&self, addr: u64) -> Option<usize> {
        self.items[..self.len].iter().position(|it| it.addr == addr)
    }

    fn is_free(&self, i: usize) -> bool {
        self.free & (1 << i) != 0
    }

    /// Removes item i (the last one takes its place).
    fn remove(&mut self, i: usize) {
        let last = self.len - 1;
        let last_free = self.is_free(last);
        self.items[i] = self.items[last];
        self.free &= !(1 << i) & !(1 << last);
        if last_free && i != last {
            self.free |= 1 << i;
        }
        self.len = last;
    }
}

#[derive(Default)]
struct ShardState {
    /// Lent blocks by (stream, size).
    lists: HashMap<(u64, u64), List, AddrHash>,
    /// Free blocks in all lists.
    cached_blocks: usize,
    /// Handed-out blocks in all lists.
    out_blocks: usize,
    /// Counted since the last merge into the pool.
    delta: FrontDelta,
    /// This shard's bit is set in `Front::touched`.
    marked: bool,
}

impl ShardState {
    /// Adds a free lent block to its list; false if the list or the shard
    /// is full.
    fn push(&mut self, b: &LentBlock) -> bool {
        if self.lists.len() >= KEYS_MAX && !self.lists.contains_key(&(b.stream, b.size)) {
            return false;
        }
        let list = self.lists.entry((b.stream, b.size)).or_insert_with(|| List::new(b.arena));
        if list.len == LIST_MAX {
            return false;
        }
        list.items[list.len] = Item { id: b.id, addr: b.addr, requested: 0 };
        list.free |= 1 << list.len;
        list.len += 1;
        self.cached_blocks += 1;
        true
    }

    /// Adds this shard's counts to the pool's and starts counting afresh.
    fn merge_into(&mut self, pool: &mut DevicePool) {
        pool.merge_front(&self.delta);
        self.delta = FrontDelta::default();
    }

    /// Takes handed-out block `b` out of its list (it goes back to the pool
    /// as an allocation): its item, or None if it is not handed out here.
    fn take_out(&mut self, b: &LentBlock) -> Option<Item> {
        let list = self.lists.get_mut(&(b.stream, b.size))?;
        let i = list.find(b.addr).filter(|&i| !list.is_free(i))?;
        let item = list.items[i];
        list.remove(i);
        self.out_blocks -= 1;
        self.delta.take_back(b.arena, b.size, item.requested);
        Some(item)
    }
}

/// One lock per shard, each on its own cache lines.
#[repr(align(128))]
#[derive(Default)]
struct Shard(SpinLock<ShardState>);


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
        let mut guard = self.shards[shard_of(stream)].0.lock();
        let sh = &mut *guard;
        // Read under the lock: `disable` drains after clearing it.
        if sh.cached_blocks == 0 || !self.enabled() {
            return None;
        }
        let list = sh.lists.get_mut(&(stream, rounded)).filter(|l| l.free != 0)?;
        let i = (u32::BITS - 1 - list.free.leading_zeros()) as usize; // the latest free slot
        list.free &= !(1 << i);
        let item = &mut list.items[i];
        item.requested = requested;
        let (addr, arena) = (item.addr, list.arena);
        sh.cached_blocks -= 1;
        sh.out_blocks += 1;
        sh.delta.hand_out(arena, rounded, requested);
        sh.delta.cache_hits += 1;
        Some(addr)
    }

    /// The hot free: `addr`, named by the caller with `size` and `stream`
    /// (PyTorch passes the allocation's), is a block this stream's shard
    /// handed out; it becomes free in its list. False for anything else
    /// (another stream's block, a size that fits neither, a capturing
    /// stream, a block of the pool's): the device frees it through the pool.
    /// `capturing(stream)` asks the driver (only when graphs are watched).
    pub fn free(&self, addr: u64, size: u64, stream: u64, capturing: &dyn Fn(u64) -> bool) -> bool {
        let idx = shard_of(stream);
        let mut guard = self.shards[idx].0.lock();
        let sh = &mut *guard;
        let rounded = round_size(size);
        if sh.out_blocks == 0 {
            return false;
        }
        let Some(list) = sh.lists.get_mut(&(stream, rounded)) else { return false };
        let Some(i) = list.find(addr).filter(|&i| !list.is_free(i)) else { return false };
        let requested = list.items[i].requested;
        let plain = (size == requested || size == rounded) && self.enabled() && !(self.graphs() && capturing(stream));
        if !plain {
            return false;
        }
        list.free |= 1 << i;
        let arena = list.arena;
        sh.cached_blocks += 1;
        sh.out_blocks -= 1;
        sh.delta.take_back(arena, rounded, requested);
        self.mark(idx, sh);
        true
    }

    /// Whether a block freed on `stream` that belongs to the shard of its
    /// own stream `block_stream` may be lent there (see `adopt`).
    pub fn lends(&self, stream: u64, block_stream: u64) -> bool {
        self.enabled() && shard_of(block_stream) == shard_of(stream)
    }

    /// Takes lent block `b` (free or handed out) into its list, freshly lent
    /// by the pool; a full list or shard gives it straight back.
    pub fn adopt(&self, pool: &mut DevicePool, b: &LentBlock) {
        let idx = shard_of(b.stream);
        let mut guard = self.shards[idx].0.lock();
        let sh = &mut *guard;
        self.mark(idx, sh);
        if !sh.push(b) {
            pool.return_lent(b.id);
        }
    }

    /// Takes lent block `b` back into the pool as an ordinary allocation, if
    /// its shard has it handed out (before a free the shard cannot take, or
    /// a record_stream), with the shard's counts merged first. False if it
    /// is free in its list (a free of it is a double free).
    pub fn take_back(&self, pool: &mut DevicePool, b: &LentBlock) -> bool {
        let idx = shard_of(b.stream);
        let mut guard = self.shards[idx].0.lock();
        let sh = &mut *guard;
        let Some(item) = sh.take_out(b) else { return false };
        self.mark(idx, sh);
        sh.merge_into(pool);
        pool.lent_to_live(b.id, item.requested);
        true
    }

    /// Gives every shard's free blocks back to the pool and merges every
    /// delta; with `handed_out`, the blocks handed out too (they become
    /// ordinary allocations). Returns the free blocks given back.
    pub fn drain(&self, pool: &mut DevicePool, handed_out: bool) -> usize {
        let mask = if handed_out { u64::MAX } else { self.touched.load(Ordering::Acquire) };
        let mut returned = 0;
        for idx in (0..SHARDS).filter(|i| mask & (1 << i) != 0) {
            let mut guard = self.shards[idx].0.lock();
            let sh = &mut *guard;
            // Nothing to give back: no free block, no delta, nothing out.
            if !(sh.marked || handed_out && sh.out_blocks > 0) {
                continue;
            }
            let mut outs: Vec<(u32, u64)> = Vec::new();
            if handed_out {
                for (&(_, size), list) in &sh.lists {
                    for (i, item) in list.items[..list.len].iter().enumerate() {
                        if !list.is_free(i) {
                            sh.delta.take_back(list.arena, size, item.requested);
                            outs.push((item.id, item.requested));
                        }
                    }
                }
            }
            sh.merge_into(pool);
            for &(id, requested) in &outs {
                pool.lent_to_live(id, requested);
            }
            for list in sh.lists.values_mut() {
                let mut i = 0;
                while i < list.len {
                    if list.is_free(i) {
                        pool.return_lent(list.items[i].id);
                        returned += 1;
                        list.remove(i); // the last item moves to i: look again
                    } else if handed_out {
                        list.remove(i);
                    } else {
                        i += 1;
                    }
                }
            }
            sh.lists.retain(|_, l| l.len > 0);
            sh.cached_blocks = 0;
            if handed_out {
                sh.out_blocks = 0;
            }
            sh.marked = false;
            self.touched.fetch_and(!(1u64 << idx), Ordering::AcqRel);
        }
        returned
    }

    /// Merges every delta into the pool (before statistics are read); the
    /// blocks stay where they are.
    pub fn merge(&self, pool: &mut DevicePool) {
        let mask = self.touched.load(Ordering::Acquire);
        for idx in (0..SHARDS).filter(|i| mask & (1 << i) != 0) {
            self.shards[idx].0.lock().merge_into(pool);
        }
    }

    /// Merges the delta of `stream`'s shard into the pool.
    pub fn merge_shard(&self, pool: &mut DevicePool, stream: u64) {
        self.shards[shard_of(stream)].0.lock().merge_into(pool);
    }

    /// The lent blocks handed out now: block → bytes requested (the pool
    /// counts every lent block as cached; these are allocated).
    pub fn handed_out(&self) -> HashMap<u32, u64> {
        let mut out = HashMap::new();
        for shard in self.shards.iter() {
            let sh = shard.0.lock();
            if sh.out_blocks == 0 {
                continue;
            }
            for list in sh.lists.values() {
                for (i, item) in list.items[..list.len].iter().enumerate() {
                    if !list.is_free(i) {
                        out.insert(item.id, item.requested);
                    }
                }
            }
        }
        out
    }

    /// Stops serving and gives everything back (history recording; a
    /// poisoned pool).
    pub fn disable(&self, pool: Option<&mut DevicePool>) {
        self.enabled.store(false, Ordering::SeqCst);
        if let Some(pool) = pool {
            self.drain(pool, true);
        }
    }

    /// Stops serving at once; the blocks come back at the next drain.
    pub fn stop(&self) {
        self.enabled.store(false, Ordering::SeqCst);
    }

    pub fn enable(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Checks the module's invariants and then the pool's, with the deltas
    /// merged. Panics on the first broken one. For tests and fuzzers.
    pub fn check(&self, pool: Option<&mut DevicePool>) {
        let mut guards: Vec<SpinGuard<'_, ShardState>> = self.shards.iter().map(|s| s.0.lock()).collect();
        let Some(pool) = pool else {
            assert!(guards.iter().all(|g| g.lists.is_empty()), "a front holds blocks of no pool");
            return;
        };
        let touched = self.touched.load(Ordering::Acquire);
        let mut seen = HashSet::new();
        let mut lent_live: HashMap<u32, u64> = HashMap::new();
        for (idx, sh) in guards.iter_mut().enumerate() {
            sh.merge_into(pool);
            assert!(sh.lists.len() <= KEYS_MAX, "shard {idx}: {} lists", sh.lists.len());
            let (mut free, mut out) = (0, 0);
            for (&(stream, size), list) in &sh.lists {
                assert!(list.len <= LIST_MAX, "shard {idx}: a list of {}", list.len);
                assert_eq!(list.free >> list.len, 0, "shard {idx}: free bits past the list's end");
                assert_eq!(shard_of(stream), idx, "a list of stream {stream:#x} in the wrong shard");
                for (i, item) in list.items[..list.len].iter().enumerate() {
                    let id = item.id;
                    let b: LentBlock = pool.lent_block(id).unwrap_or_else(|| panic!("listed block {id} is not lent"));
                    assert_eq!((b.addr, b.size, b.stream, b.arena), (item.addr, size, stream, list.arena), "block {id} is not what its list says");
                    assert!(seen.insert(id), "block {id} listed twice");
                    if list.is_free(i) {
                        free += 1;
                    } else {
                        out += 1;
                        assert!(round_size(item.requested) == size, "block {id}: requested {}", item.requested);
                        lent_live.insert(id, item.requested);
                    }
                }
            }
            assert_eq!((free, out), (sh.cached_blocks, sh.out_blocks), "shard {idx}: counts");
            if free > 0 {
                assert!(sh.marked && touched & (1 << idx) != 0, "shard {idx} holds free blocks unmarked");
            }
        }
        assert_eq!(pool.lent_count(), seen.len(), "lent blocks in no list");
        pool.check_invariants_lent(&lent_live);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list_of(free: &[bool]) -> List {
        let mut l = List::new(ArenaKind::Small);
        for (i, &f) in free.iter().enumerate() {
            l.items[i] = Item { id: i as u32, addr: 0x1000 * (i as u64 + 1), requested: 0 };
            if f {
                l.free |= 1 << i;
            }
        }
        l.len = free.len();
        l
    }

    #[test]
    fn removing_an_item_keeps_every_other_item_and_its_state() {
        // Found by the fault soak: removing the last item, when free, left
        // its bit set past the end.
        for len in 1..=4 {
            for mask in 0u32..(1 << len) {
                for i in 0..len {
                    let free: Vec<bool> = (0..len).map(|k| mask & (1 << k) != 0).collect();
                    let mut l = list_of(&free);
                    l.remove(i);
                    assert_eq!(l.len, len - 1);
                    assert_eq!(l.free >> l.len, 0, "a bit past the end (len {len}, mask {mask:b}, removed {i})");
                    let mut left: Vec<(u32, bool)> = (0..l.len).map(|k| (l.items[k].id, l.is_free(k))).collect();
                    left.sort_unstable();
                    let want: Vec<(u32, bool)> = (0..len).filter(|&k| k != i).map(|k| (k as u32, free[k])).collect();
                    assert_eq!(left, want);
                }
            }
        }
    }

    #[test]
    fn streams_spread_over_the_shards() {
        // Small integers (tests, the sim) and pointers 16 or 64 bytes apart
        // (CUDA streams) land in distinct shards in runs of eight.
        for (base, step) in [(0x100u64, 1u64), (0x5555_0000_1000, 16), (0x7f00_0000_0000, 64)] {
            let mut shards: Vec<usize> = (0..8).map(|k| shard_of(base + k * step)).collect();
            shards.sort_unstable();
            shards.dedup();
            assert_eq!(shards.len(), 8, "base {base:#x} step {step}");
        }
    }
}
