//! Read-only views of the pool for snapshots, tools and tests: its blocks
//! in address order, its segments (maximal mapped runs), the largest cached
//! block.
#![forbid(unsafe_code)]

use super::{ArenaKind, DevicePool, State, NIL};

/// A read-only picture of one block, for snapshots and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockView {
    pub addr: u64,
    pub size: u64,
    pub arena: ArenaKind,
    pub state: &'static str,
    pub stream: u64,
    pub requested: u64,
}

impl DevicePool {
    /// Every block of every arena in address order, holes excluded.
    pub fn blocks(&self) -> Vec<BlockView> {
        let mut out = Vec::new();
        for arena in &self.arenas {
            let mut id = arena.head;
            while id != NIL {
                let b = self.b(id);
                let state = match b.state {
                    State::Allocated => "active_allocated",
                    State::Cached | State::Lent => "inactive",
                    State::Pending => "active_pending_free",
                    State::Hole => "hole",
                };
                if b.state != State::Hole {
                    out.push(BlockView {
                        addr: b.addr,
                        size: b.size,
                        arena: b.arena,
                        state,
                        stream: b.stream,
                        requested: b.requested,
                    });
                }
                id = b.next;
            }
        }
        out
    }

    /// Segments in PyTorch's sense: the maximal runs of mapped (non-hole)
    /// blocks of each arena, with their blocks.
    pub fn segments(&self) -> Vec<(ArenaKind, Vec<BlockView>)> {
        let mut out: Vec<(ArenaKind, Vec<BlockView>)> = Vec::new();
        let mut last_end = None;
        for v in self.blocks() {
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
        self.cached_by_stream.iter().map(|k| k.2).max().unwrap_or(0)
    }
}
