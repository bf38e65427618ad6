//! The snapshot: every device's memory as JSON in the shape of
//! `torch.cuda.memory._snapshot()`, so that PyTorch's memory viewer draws
//! it: `segments` (maximal mapped runs of an arena, with their blocks) and
//! `device_traces` (the history ring, when recording), from typed views.
//! Segments of a tag's pool (tags.rs) carry `tessera_tag`; `tessera_tags`,
//! present only when tags are in use, lists each tag's allocated, reserved,
//! paused and backup bytes.
#![forbid(unsafe_code)]

use crate::pool::{ArenaKind, BlockState, BlockView, HistoryEvent};
use crate::stats::{TesseraGauge as G, TesseraStats};
use serde::Serialize;

/// PyTorch's frames (Python stacks): tessera records none.
type Frames = [(); 0];

#[derive(Serialize)]
struct Snapshot {
    segments: Vec<Segment>,
    device_traces: Vec<Vec<TraceEntry>>,
    /// Only when tags are in use: the snapshot keeps PyTorch's keys otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tessera_tags: Vec<TagEntry>,
}

#[derive(Serialize)]
struct TagEntry {
    device: i32,
    tag: String,
    allocated_bytes: i64,
    reserved_bytes: i64,
    paused_bytes: i64,
    backup_bytes: i64,
}

#[derive(Serialize)]
struct Segment {
    device: i32,
    address: u64,
    total_size: u64,
    allocated_size: u64,
    active_size: u64,
    requested_size: u64,
    stream: u64,
    segment_type: &'static str,
    segment_pool_id: [u64; 2],
    is_expandable: bool,
    frames: Frames,
    blocks: Vec<Block>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tessera_tag: Option<String>,
}

#[derive(Serialize)]
struct Block {
    address: u64,
    size: u64,
    requested_size: u64,
    state: &'static str,
    frames: Frames,
}

#[derive(Serialize)]
struct TraceEntry {
    action: &'static str,
    addr: u64,
    size: u64,
    requested_size: u64,
    stream: u64,
    time_us: u64,
    frames: Frames,
}

/// One device's memory: its untagged segments, its recorded events, its
/// tags' segments (with the tag's name) and each tag's statistics.
pub struct DeviceMemory {
    pub segments: Vec<(ArenaKind, Vec<BlockView>)>,
    pub history: Vec<HistoryEvent>,
    pub tag_segments: Vec<(String, ArenaKind, Vec<BlockView>)>,
    pub tags: Vec<(String, TesseraStats)>,
}

/// The snapshot of `devices` (index order) as JSON.
pub fn to_json(devices: &[DeviceMemory]) -> String {
    let mut snapshot = Snapshot { segments: Vec::new(), device_traces: Vec::new(), tessera_tags: Vec::new() };
    for (device, memory) in devices.iter().enumerate() {
        let untagged = memory.segments.iter().map(|(a, b)| (None, a, b));
        let tagged = memory.tag_segments.iter().map(|(t, a, b)| (Some(t.clone()), a, b));
        for (tag, arena, blocks) in untagged.chain(tagged) {
            let sum = |f: &dyn Fn(&BlockView) -> u64| blocks.iter().map(f).sum();
            let stream = blocks.iter().find(|b| b.state != BlockState::Cached).map_or(blocks[0].stream, |b| b.stream);
            snapshot.segments.push(Segment {
                device: device as i32,
                address: blocks[0].addr,
                total_size: sum(&|b| b.size),
                allocated_size: sum(&|b| if b.state == BlockState::Allocated { b.size } else { 0 }),
                active_size: sum(&|b| if b.state != BlockState::Cached { b.size } else { 0 }),
                requested_size: sum(&|b| b.requested),
                stream,
                segment_type: if *arena == ArenaKind::Small { "small" } else { "large" },
                segment_pool_id: [0, 0],
                is_expandable: true,
                frames: [],
                blocks: blocks
                    .iter()
                    .map(|b| Block { address: b.addr, size: b.size, requested_size: b.requested, state: b.state.torch_name(), frames: [] })
                    .collect(),
                tessera_tag: tag,
            });
        }
        for (tag, s) in &memory.tags {
            snapshot.tessera_tags.push(TagEntry {
                device: device as i32,
                tag: tag.clone(),
                allocated_bytes: s.gauge(G::AllocatedBytes).current,
                reserved_bytes: s.gauge(G::ReservedBytes).current,
                paused_bytes: s.gauge(G::PausedBytes).current,
                backup_bytes: s.gauge(G::BackupBytes).current,
            });
        }
        snapshot.device_traces.push(
            memory.history
                .iter()
                .map(|e| TraceEntry {
                    action: e.action.torch_name(),
                    addr: e.addr,
                    size: e.size,
                    requested_size: e.requested,
                    stream: e.stream,
                    time_us: e.time_us,
                    frames: [],
                })
                .collect(),
        );
    }
    serde_json::to_string(&snapshot).expect("a snapshot serializes")
}
