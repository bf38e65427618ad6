//! The block chain and its slab: each arena is covered, in address order,
//! by a doubly linked chain of blocks kept in a slab indexed by integers;
//! split, coalesce, and the index sets of free blocks (cached by cache key,
//! holes by size).
//! Invariants: the chain covers its arena exactly; no two holes, and no two
//! cached blocks of one cache key and stream, are neighbours; a free block is in its
//! index set iff it is cached or a hole.
#![forbid(unsafe_code)]

use super::{ArenaKind, CrossIndex, DevicePool};
use crate::stats::TesseraGauge as G;
use std::collections::BTreeMap;

const _: () = assert!(std::mem::size_of::<Block>() == 64, "a block is one cache line");

/// Index of a block in the slab (`DevicePool::blocks`).
pub(super) type BlockId = u32;

/// No block: the end of a chain.
pub(super) const NIL: BlockId = u32::MAX;

/// A block's size with its arena in the top bit (sizes stay under 2^62):
/// the by-size indexes order by arena, then size, in one word.
pub(super) fn sized(arena: ArenaKind, size: u64) -> u64 {
    ((arena as u64) << 63) | size
}

/// The keys (`sized`, addr) of `arena`'s blocks of at least `min_bytes`.
fn sized_range(arena: ArenaKind, min_bytes: u64) -> std::ops::Range<SizedKey> {
    (sized(arena, min_bytes), 0)..(sized(arena, (1 << 63) - 1), 0)
}

/// The size in a `sized` key.
pub(super) fn sized_bytes(key: u64) -> u64 {
    key & !(1 << 63)
}

/// Where a cached block sits in `cached_by_stream`: (cache key, `sized`,
/// addr), its id the value. Keys are 24 bytes, so that a B-tree node's
/// search touches few cache lines.
pub(super) type CachedKey = (u64, u64, u64);

/// Where a free block sits in a by-size index (`holes`, `cached_by_size`):
/// (`sized`, addr), its id the value.
pub(super) type SizedKey = (u64, u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Handed out to a caller.
    Allocated,
    /// Free and mapped; reusable at once on `stream`.
    Cached,
    /// Free, waiting for events on other streams (record_stream).
    Pending,
    /// Free and unmapped: address space only.
    Hole,
    /// Lent to a front cache (front.rs), which serves it whole, on `stream`,
    /// for requests of exactly its size and takes its frees, without the
    /// pool's lock. The pool counts it as cached and keeps it in `live`
    /// (free routing finds it), in no index; it comes back by `return_lent`
    /// (free) or `lent_to_live` (allocated).
    Lent,
}

/// One cache line a block: the chain's walks and the index sets' lookups
/// touch one line per block (see the size check above).
#[derive(Debug, Clone, Copy)]
#[repr(align(64))]
pub(super) struct Block {
    pub(super) addr: u64,
    pub(super) size: u64,
    pub(super) arena: ArenaKind,
    pub(super) state: State,
    /// Allocated: the stream it was allocated on. Cached/Pending: the stream
    /// that may reuse it at once. Holes: 0.
    pub(super) stream: u64,
    /// Bytes the caller asked for (Allocated only).
    pub(super) requested: u64,
    /// Address neighbours in the arena's chain, or NIL at the arena's ends.
    pub(super) prev: BlockId,
    pub(super) next: BlockId,
    /// Streams other than `stream` used the block (record_stream): they are
    /// listed in `DevicePool::stream_uses` (Allocated only).
    pub(super) has_uses: bool,
    /// The CUDA graph capture that owns the block (0: none). Memory a
    /// capture allocated, or freed while it captured, may be touched by every
    /// replay of the graph: it is cached only for that capture, never reused
    /// outside it nor unmapped, until `release_graph_pools`.
    pub(super) graph: u64,
    /// Cached blocks: the free sequence number when `stream` last freed it
    /// (0: never used by the device). The device is done with the block once
    /// its stream's epoch event recorded at a later number has completed.
    pub(super) freed_seq: u64,
    /// In its index set (cached or hole blocks only).
    pub(super) indexed: bool,
    /// Listed in `DevicePool::unchecked`. It stays with the slot when the
    /// slot is reused (the list names each slot once, whatever block holds
    /// it now).
    pub(super) queued: bool,
    /// (size, id) is in `DevicePool::recyclable`.
    pub(super) candidate: bool,
}

#[derive(Debug)]
pub(super) struct Arena {
    pub(super) base: u64,
    pub(super) size: u64,
    /// First block of the chain (lowest address).
    pub(super) head: BlockId,
}

/// Cache keys with this bit set name a graph capture's private cache.
pub(super) const GRAPH_KEY: u64 = 1 << 63;

/// The stream value of the ready reserve's blocks (see ready.rs): mapped
/// memory no stream has used, which any stream's miss may take. No CUDA
/// stream has this value (streams are pointers, aligned).
pub(super) const READY_KEY: u64 = GRAPH_KEY - 1;

/// The key under which a cached block waits: its stream, or its capture's
/// private cache.
pub(super) fn cache_key(b: &Block) -> u64 {
    if b.graph != 0 { GRAPH_KEY | b.graph } else { b.stream }
}

impl DevicePool {
    /// The arena that holds address `addr`.
    pub(super) fn arena_at(&self, addr: u64) -> ArenaKind {
        let a = &self.arenas[ArenaKind::Small as usize];
        if addr >= a.base && addr < a.base + a.size { ArenaKind::Small } else { ArenaKind::Large }
    }

    /// The arena a request of `size` (rounded) bytes goes to.
    pub(super) fn arena_of(&self, size: u64) -> ArenaKind {
        if size <= self.conf.small_size.0 { ArenaKind::Small } else { ArenaKind::Large }
    }

    /// Puts `b` in a slab slot (a freed one first).
    pub(super) fn new_block(&mut self, mut b: Block) -> BlockId {
        if let Some(id) = self.free_slots.pop() {
            b.queued = self.blocks[id as usize].queued;
            self.blocks[id as usize] = b;
            id
        } else {
            self.blocks.push(b);
            (self.blocks.len() - 1) as BlockId
        }
    }

    /// Frees the slot of block `id`, which is in no chain any more.
    pub(super) fn drop_block(&mut self, id: BlockId) {
        debug_assert!(!self.b(id).indexed && !self.b(id).candidate && !self.b(id).has_uses, "block {id} dropped while indexed or used");
        self.free_slots.push(id);
    }

    /// Block `id`.
    pub(super) fn b(&self, id: BlockId) -> &Block {
        &self.blocks[id as usize]
    }

    /// Block `id`, to change.
    pub(super) fn bm(&mut self, id: BlockId) -> &mut Block {
        &mut self.blocks[id as usize]
    }

    /// Removes a free block (cached or hole) from its index sets.
    pub(super) fn unindex(&mut self, id: BlockId) {
        let b = &self.blocks[id as usize];
        match b.state {
            State::Cached => {
                self.cached_by_stream.remove(&(cache_key(b), sized(b.arena, b.size), b.addr));
                if b.graph == 0 {
                    if self.cross_index == CrossIndex::Built {
                        self.cached_by_size.remove(&(sized(b.arena, b.size), b.addr));
                    }
                    if b.candidate {
                        self.recyclable.remove(&(b.size, id));
                    }
                    self.cached_outside_graphs -= 1;
                    if self.cached_outside_graphs == 0 {
                        self.cross_index = CrossIndex::Sole(None); // and cached_by_size is empty
                    }
                }
                let (arena, size) = (b.arena, b.size as i64);
                self.gauge(arena, G::CachedBytes, -size);
                self.gauge(arena, G::CachedBlocks, -1);
                let b = self.bm(id);
                b.indexed = false;
                b.candidate = false;
            }
            State::Hole => {
                self.holes.remove(&(sized(b.arena, b.size), b.addr));
                self.bm(id).indexed = false;
            }
            State::Allocated | State::Pending | State::Lent => {}
        }
    }

    /// Adds a free block (cached or hole) to its index set.
    pub(super) fn index(&mut self, id: BlockId) {
        let b = &self.blocks[id as usize];
        match b.state {
            State::Cached => {
                let key = cache_key(b);
                self.cached_by_stream.insert((key, sized(b.arena, b.size), b.addr), id);
                let (arena, size) = (b.arena, b.size as i64);
                if b.graph == 0 {
                    match self.cross_index {
                        CrossIndex::Built => {
                            self.cached_by_size.insert((sized(b.arena, b.size), b.addr), id);
                        }
                        CrossIndex::Sole(Some(sole)) if sole == key => {}
                        CrossIndex::Sole(None) => self.cross_index = CrossIndex::Sole(Some(key)),
                        CrossIndex::Sole(Some(sole)) => self.build_cross_index(sole, id),
                    }
                    // Whether it may free a handle is asked when recycling
                    // next looks (see `check_unchecked`), not at every free.
                    if !self.b(id).queued {
                        self.bm(id).queued = true;
                        self.unchecked.push(id);
                    }
                    self.cached_outside_graphs += 1;
                }
                self.gauge(arena, G::CachedBytes, size);
                self.gauge(arena, G::CachedBlocks, 1);
                self.bm(id).indexed = true;
            }
            State::Hole => {
                self.holes.insert((sized(b.arena, b.size), b.addr), id);
                self.bm(id).indexed = true;
            }
            State::Allocated | State::Pending | State::Lent => {}
        }
    }

    /// Cached block `id` is the first outside graph pools under another key
    /// than `sole`, which holds all the others: from now on (until no such
    /// block is cached) the cross-stream index is kept, made here once from
    /// `sole`'s ranges of `cached_by_stream` and `id`.
    fn build_cross_index(&mut self, sole: u64, id: BlockId) {
        debug_assert!(self.cached_by_size.is_empty());
        let (b, mut index) = (self.b(id), BTreeMap::new());
        index.insert((sized(b.arena, b.size), b.addr), id);
        for arena in [ArenaKind::Small, ArenaKind::Large] {
            index.extend(self.cached_under(arena, sole, 0).map(|(_, addr, id)| ((sized(arena, self.b(id).size), addr), id)));
        }
        self.cached_by_size = index;
        self.cross_index = CrossIndex::Built;
    }

    /// The cached blocks outside graph pools in `arena`, of at least
    /// `min_bytes`, cached for other streams than `stream`, by (size, addr),
    /// smallest first: from the cross-stream index when it is kept, else
    /// from the sole key's range of `cached_by_stream` (none when the sole
    /// key is `stream`'s).
    pub(super) fn cached_across(&self, arena: ArenaKind, min_bytes: u64, stream: u64) -> impl Iterator<Item = BlockId> + '_ {
        let (sole, built) = match self.cross_index {
            CrossIndex::Built => (None, Some(self.cached_by_size.range(sized_range(arena, min_bytes)))),
            CrossIndex::Sole(Some(key)) if key != stream => (Some(self.cached_under(arena, key, min_bytes)), None),
            CrossIndex::Sole(_) => (None, None),
        };
        let sole = sole.into_iter().flatten().map(|(_, _, id)| id);
        let built = built.into_iter().flatten().map(|(_, &id)| id).filter(move |&id| self.b(id).stream != stream);
        sole.chain(built)
    }

    /// The blocks cached under `key` (a stream or a capture) in `arena`, of
    /// at least `min_bytes`, smallest first, as (size, addr, id).
    pub(super) fn cached_under(&self, arena: ArenaKind, key: u64, min_bytes: u64) -> impl Iterator<Item = (u64, u64, BlockId)> + '_ {
        let sizes = sized_range(arena, min_bytes);
        self.cached_by_stream
            .range((key, sizes.start.0, 0)..(key, sizes.end.0, 0))
            .map(|(&(_, size, addr), &id)| (sized_bytes(size), addr, id))
    }

    /// The holes of `arena` of at least `min_bytes`, smallest first, as
    /// (size, id).
    pub(super) fn holes_in(&self, arena: ArenaKind, min_bytes: u64) -> impl Iterator<Item = (u64, BlockId)> + '_ {
        self.holes.range(sized_range(arena, min_bytes)).map(|(&(size, _), &id)| (sized_bytes(size), id))
    }

    /// Whether `id` is a cached block in the index (not merged away).
    pub(super) fn is_indexed_cached(&self, id: BlockId) -> bool {
        let b = self.b(id);
        b.state == State::Cached && b.indexed
    }

    /// Whether `x` is a cached block outside every graph pool: free, mapped,
    /// and (the device done with it, or after a synchronize) reusable by
    /// any stream, so it may be unmapped or joined with its neighbours.
    pub(super) fn cached_no_graph(&self, x: BlockId) -> bool {
        x != NIL && self.b(x).state == State::Cached && self.b(x).graph == 0
    }

    /// Splits `size` bytes off the front of unindexed block `id`; returns the
    /// remainder, a new block of the same state, also unindexed.
    pub(super) fn split_front(&mut self, id: BlockId, size: u64) -> BlockId {
        let b = *self.b(id);
        debug_assert!(size < b.size);
        let rest = self.new_block(Block {
            addr: b.addr + size,
            size: b.size - size,
            arena: b.arena,
            state: b.state,
            stream: b.stream,
            requested: 0,
            prev: id,
            next: b.next,
            has_uses: false,
            freed_seq: b.freed_seq,
            graph: b.graph,
            indexed: false,
            queued: false,
            candidate: false,
        });
        if b.next != NIL {
            self.bm(b.next).prev = rest;
        }
        let blk = self.bm(id);
        blk.next = rest;
        blk.size = size;
        rest
    }

    /// Whether neighbours `a` and `b` must be one block: two holes, or two
    /// cached blocks of one cache key and one stream (a pool's cache holds
    /// blocks of several streams, each known done by its own epochs).
    pub(super) fn mergeable(&self, a: BlockId, b: BlockId) -> bool {
        let (x, y) = (self.b(a), self.b(b));
        match (x.state, y.state) {
            (State::Hole, State::Hole) => true,
            (State::Cached, State::Cached) => cache_key(x) == cache_key(y) && x.stream == y.stream,
            _ => false,
        }
    }

    /// Merges unindexed free block `id` with mergeable neighbours, indexes
    /// the result and returns it.
    pub(super) fn coalesce_and_index(&mut self, mut id: BlockId) -> BlockId {
        let prev = self.b(id).prev;
        if prev != NIL && self.mergeable(prev, id) {
            self.unindex(prev);
            self.absorb_next(prev);
            id = prev;
        }
        let next = self.b(id).next;
        if next != NIL && self.mergeable(id, next) {
            self.unindex(next);
            self.absorb_next(id);
        }
        self.index(id);
        id
    }

    /// Block `id` swallows its next neighbour (both unindexed).
    pub(super) fn absorb_next(&mut self, id: BlockId) {
        let next = self.b(id).next;
        let (nsize, nnext, nseq) = (self.b(next).size, self.b(next).next, self.b(next).freed_seq);
        let blk = self.bm(id);
        blk.freed_seq = blk.freed_seq.max(nseq);
        self.bm(id).size += nsize;
        self.bm(id).next = nnext;
        if nnext != NIL {
            self.bm(nnext).prev = id;
        }
        self.drop_block(next);
    }
}
