//! The history ring: the last N alloc, free, map, unmap and OOM events of
//! the device, when recording (PyTorch's `_record_memory_history`). Off, it
//! costs one branch per event.
#![forbid(unsafe_code)]

use super::DevicePool;
use std::collections::VecDeque;

/// What the history ring records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryAction {
    Alloc,
    Free,
    /// Handles mapped into an arena (PyTorch's segment_map).
    Map,
    /// Handles unmapped (segment_unmap).
    Unmap,
    Oom,
}

impl HistoryAction {
    /// PyTorch's name of the action, as in `torch.cuda.memory._snapshot()`.
    pub fn torch_name(self) -> &'static str {
        match self {
            HistoryAction::Alloc => "alloc",
            HistoryAction::Free => "free_requested",
            HistoryAction::Map => "segment_map",
            HistoryAction::Unmap => "segment_unmap",
            HistoryAction::Oom => "oom",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEvent {
    pub action: HistoryAction,
    pub addr: u64,
    /// Block size (bytes mapped, for Map/Unmap).
    pub size: u64,
    /// Bytes the caller asked for.
    pub requested: u64,
    pub stream: u64,
    /// Microseconds since the process first used tessera.
    pub time_us: u64,
}

/// Microseconds since the process first asked.
pub(super) fn now_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_micros() as u64
}

impl DevicePool {
    /// Starts (with room for `max_entries` events) or stops recording.
    /// Stopping drops the recorded events.
    pub fn record_history(&mut self, enabled: bool, max_entries: usize) {
        self.history = (enabled && max_entries > 0).then(|| (VecDeque::with_capacity(max_entries.min(1 << 16)), max_entries));
    }

    /// Adds an event to the ring when recording (the oldest goes when full).
    pub(super) fn record(&mut self, action: HistoryAction, addr: u64, size: u64, requested: u64, stream: u64) {
        if let Some((ring, cap)) = self.history.as_mut() {
            if ring.len() == *cap {
                ring.pop_front();
            }
            ring.push_back(HistoryEvent { action, addr, size, requested, stream, time_us: now_us() });
        }
    }

    /// The recorded events, oldest first.
    pub fn history(&self) -> Vec<HistoryEvent> {
        self.history.as_ref().map(|(r, _)| r.iter().copied().collect()).unwrap_or_default()
    }
}
