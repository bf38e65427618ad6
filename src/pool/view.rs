//! Read-only views of the pool for snapshots, tools and tests: its blocks
//! in address order, its segments (maximal mapped runs), the largest cached
//! block. Building a view changes nothing.
#![forbid(unsafe_code)]

use super::graphs::named_pool_of;
use super::{ArenaKind, DevicePool, State, NIL};
use std::collections::HashMap;

/// What a block is, as a user of the allocator sees it (holes are never
/// shown; a block lent to a front cache is allocated while the front has
/// it handed out, cached otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Handed out to a caller.
    Allocated,
    /// Free and mapped, ready for reuse.
    Cached,
    /// Freed, waiting for other streams (record_stream).
    PendingFree,
}

impl BlockState {
    /// PyTorch's name of the state, as in `torch.cuda.memory._snapshot()`.
    pub fn torch_name(self) -> &'static str {
        match self {
            BlockState::Allocated => "active_allocated",
            BlockState::Cached => "inactive",
            BlockState::PendingFree => "active_pending_free",
        }
    }
}

/// A read-only picture of one block, for snapshots and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockView {
    pub addr: u64,
    pub size: u64,
    pub arena: ArenaKind,
    pub state: BlockState,
    pub stream: u64,
    pub requested: u64,
    /// The named private pool it belongs to (0: none; see graphs.rs).
    pub pool: u64,
}

impl DevicePool {
    /// Every block of every arena in address order, holes excluded; lent
    /// blocks show as cached.
    pub fn blocks(&self) -> Vec<BlockView> {
        self.blocks_with(&HashMap::new())
    }

    /// The address ranges that hold physical memory now, as (start, end):
    /// the mapped handles, paused ones excluded.
    pub fn mapped_ranges(&self) -> Vec<(u64, u64)> {
        let g = self.conf.page_size.0;
        self.mapped
            .iter()
            .filter_map(|(&va, &h)| self.handles[h as usize].as_ref().filter(|h| !h.paused).map(|h| (va, va + h.granules * g)))
            .collect()
    }

    /// As `blocks`, with the lent blocks that front caches have handed out
    /// (block → bytes requested) shown as allocated.
    pub fn blocks_with(&self, handed_out: &HashMap<u32, u64>) -> Vec<BlockView> {
        let mut out = Vec::new();
        for arena in &self.arenas {
            let mut id = arena.head;
            while id != NIL {
                let b = self.b(id);
                let (state, requested) = match b.state {
                    State::Allocated => (Some(BlockState::Allocated), b.requested),
                    State::Cached => (Some(BlockState::Cached), b.requested),
                    State::Lent => match handed_out.get(&id) {
                        Some(&requested) => (Some(BlockState::Allocated), requested),
                        None => (Some(BlockState::Cached), b.requested),
                    },
                    State::Pending => (Some(BlockState::PendingFree), b.requested),
                    State::Hole => (None, 0),
                };
                if let Some(state) = state {
                    let pool = named_pool_of(b.graph);
                    out.push(BlockView { addr: b.addr, size: b.size, arena: b.arena, state, stream: b.stream, requested, pool });
                }
                id = b.next;
            }
        }
        out
    }

    /// Segments in PyTorch's sense: the maximal runs of mapped (non-hole)
    /// blocks of each arena, with their blocks (lent blocks as cached).
    pub fn segments(&self) -> Vec<(ArenaKind, Vec<BlockView>)> {
        self.segments_with(&HashMap::new())
    }

    /// As `segments`, with the handed-out lent blocks shown as allocated
    /// (see `blocks_with`).
    pub fn segments_with(&self, handed_out: &HashMap<u32, u64>) -> Vec<(ArenaKind, Vec<BlockView>)> {
        let mut out: Vec<(ArenaKind, Vec<BlockView>)> = Vec::new();
        let mut last_end = None;
        for v in self.blocks_with(handed_out) {
            let end = v.addr + v.size;
            match out.last_mut() {
                Some((arena, blocks)) if last_end == Some(v.addr) && *arena == v.arena => blocks.push(v),
                _ => out.push((v.arena, vec![v])),
            }
            last_end = Some(end);
        }
        out
    }

    /// Size of the largest cached block, in bytes.
    pub fn largest_cached_bytes(&self) -> u64 {
        self.cached_by_stream.keys().map(|k| super::block::sized_bytes(k.1)).max().unwrap_or(0)
    }
}
