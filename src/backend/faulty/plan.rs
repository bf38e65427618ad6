//! What the fault injector fails: the calls that can fail, how an injected
//! create failure reads, a plan per call (by call number, or by chance) and
//! the seeded generator behind the chances.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;

/// A tiny xorshift64* generator: deterministic, seedable, no dependencies.
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    pub fn new(seed: u64) -> Self {
        // Spread the seed (splitmix64 step) so that nearby seeds diverge; never 0.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift64((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { ((self.next_u64() as u128 * n as u128) >> 64) as u64 }
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// The calls that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultPoint {
    Reserve = 0,
    Create,
    Map,
    SetAccess,
    Unmap,
    Release,
    RecordEvent,
    EventDone,
    EventSynchronize,
    DestroyEvent,
    StreamWaitEvent,
    Synchronize,
    IsCapturing,
    Backup,
    Restore,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 15] = [
        FaultPoint::Reserve,
        FaultPoint::Create,
        FaultPoint::Map,
        FaultPoint::SetAccess,
        FaultPoint::Unmap,
        FaultPoint::Release,
        FaultPoint::RecordEvent,
        FaultPoint::EventDone,
        FaultPoint::EventSynchronize,
        FaultPoint::DestroyEvent,
        FaultPoint::StreamWaitEvent,
        FaultPoint::Synchronize,
        FaultPoint::IsCapturing,
        FaultPoint::Backup,
        FaultPoint::Restore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::Reserve => "reserve",
            FaultPoint::Create => "create",
            FaultPoint::Map => "map",
            FaultPoint::SetAccess => "set_access",
            FaultPoint::Unmap => "unmap",
            FaultPoint::Release => "release",
            FaultPoint::RecordEvent => "record_event",
            FaultPoint::EventDone => "event_done",
            FaultPoint::EventSynchronize => "event_synchronize",
            FaultPoint::DestroyEvent => "destroy_event",
            FaultPoint::StreamWaitEvent => "stream_wait_event",
            FaultPoint::Synchronize => "synchronize",
            FaultPoint::IsCapturing => "is_capturing",
            FaultPoint::Backup => "backup",
            FaultPoint::Restore => "restore",
        }
    }
}

/// How an injected `create` failure reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateFault {
    /// `Error::OutOfMemory`, as a full device answers.
    OutOfMemory,
    /// `Error::Driver`, as any other driver failure.
    Driver,
    /// Either, by a coin of the generator.
    Either,
}

#[derive(Debug, Default, Clone)]
pub(super) struct Plan {
    /// 1-based call numbers (counted per point, over all devices) that fail.
    pub(super) at: BTreeSet<u64>,
    pub(super) probability: f64,
}
