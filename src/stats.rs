//! Statistics: every statistic declared once, as a variant of [`TesseraGauge`] or
//! [`TesseraCounter`] with its doc; names, printing, export and reset all iterate
//! those enums. The C view is [`TesseraStats`], two arrays indexed by them.
//! Invariant: for every gauge, `current == allocated - freed` and
//! `peak >= current`.

/// A quantity that goes up and down (bytes or counts held now).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TesseraGauge {
    /// Bytes in allocated blocks (block sizes, after rounding).
    AllocatedBytes = 0,
    /// Bytes the callers asked for, before rounding.
    RequestedBytes,
    /// Physical bytes held from the driver (all live handles): what
    /// nvidia-smi shows for tessera.
    ReservedBytes,
    /// Bytes of granules mapped into arenas.
    MappedBytes,
    /// Allocated blocks.
    ActiveBlocks,
    /// Bytes in cached blocks: free, mapped, ready for reuse.
    CachedBytes,
    /// Physical handles held.
    Handles,
    /// Blocks waiting for other streams (record_stream) before reuse.
    PendingFreeBlocks,
    /// Segments in PyTorch's sense: maximal runs of mapped granules of an
    /// arena (`segment` in torch.cuda.memory_stats()).
    Segments,
    /// Free, mapped blocks, the ones waiting whole in front caches
    /// included (`inactive_split` in torch.cuda.memory_stats()).
    CachedBlocks,
    /// Bytes of the blocks waiting for other streams (record_stream).
    PendingFreeBytes,
    /// Bytes of paused tags (`tessera_pause`): their address ranges are
    /// kept, their physical memory given back to the driver.
    PausedBytes,
    /// Host memory holding copies of tagged blocks: a paused tag's, to be
    /// restored at resume, and those a resume kept (keep_backups).
    BackupBytes,
}

/// A count of events that only grows (until reset).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TesseraCounter {
    /// Allocations served from a cached block with no driver call.
    CacheHits = 0,
    /// Allocations that had to map granules.
    CacheMisses,
    /// Allocations served by a block cached on another stream, after making
    /// the allocating stream wait on the freeing stream.
    CrossStreamReuses,
    /// Calls that created physical handles.
    DriverCreateCalls,
    /// Calls that released physical handles.
    DriverReleaseCalls,
    /// Calls that mapped granule runs.
    DriverMapCalls,
    /// Calls that unmapped granule runs.
    DriverUnmapCalls,
    /// Granules unmapped from cached blocks to serve another request.
    ReclaimedGranules,
    /// Allocations that retried after reclaiming cached memory.
    AllocRetries,
    /// Allocations that failed for lack of memory.
    Ooms,
    /// Calls to empty_cache.
    EmptyCacheCalls,
    /// Frees of pointers tessera does not own (never given, or double free).
    InvalidFrees,
    /// Frees whose size, device or stream did not match the allocation.
    MismatchedFrees,
    /// Requests rejected for a bad argument (negative size, bad device...).
    InvalidRequests,
    /// Driver or OS calls that failed other than for lack of memory.
    DriverErrors,
    /// Allocations under pressure served across a gap: the cached
    /// fragments on either side of a hole (of any stream, the device idle)
    /// joined with granules mapped into the hole, so that fragments too
    /// small alone still serve a request that needs more granules than
    /// are free.
    GapPlacements,
    /// Nanoseconds of wall time spent on the callers' threads (the
    /// allocating ones) in slow-path driver calls: creating, releasing,
    /// mapping, unmapping and granting access to handles, asking for free
    /// memory, and waiting for the device. What growth and reclamation cost
    /// the caller.
    DriverNs,
    /// Allocations that missed the cache and took memory from the ready
    /// reserve (mapped ahead by the driver thread), with no driver call.
    ReadyHits,
    /// Slow-path driver calls (those `driver_ns` times) made on the
    /// callers' threads.
    DriverCalls,
    /// Slow-path driver calls made on tessera's driver thread, off the
    /// callers' threads (see the `driver_thread` option).
    BackgroundDriverCalls,
    /// Nanoseconds of wall time those calls took on the driver thread.
    BackgroundDriverNs,
}

/// Number of gauges (entries of `TesseraStats.gauges`).
pub const TESSERA_GAUGE_COUNT: usize = 13;
/// Number of counters (entries of `TesseraStats.counters`).
pub const TESSERA_COUNTER_COUNT: usize = 21;
// The counts are literal for the C header; they must follow the enums.
const _: () = assert!(TESSERA_GAUGE_COUNT == TesseraGauge::BackupBytes as usize + 1);
const _: () = assert!(TESSERA_COUNTER_COUNT == TesseraCounter::BackgroundDriverNs as usize + 1);
pub(crate) const GAUGE_COUNT: usize = TESSERA_GAUGE_COUNT;
pub(crate) const COUNTER_COUNT: usize = TESSERA_COUNTER_COUNT;

/// One gauge: current value, peak since the last reset, and the cumulative
/// increments and decrements.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TesseraStat {
    pub current: i64,
    pub peak: i64,
    pub allocated: i64,
    pub freed: i64,
}

/// All statistics of one device, as the C ABI hands them out. Index
/// `gauges` with `TesseraGauge` and `counters` with `TesseraCounter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TesseraStats {
    pub gauges: [TesseraStat; TESSERA_GAUGE_COUNT],
    pub counters: [u64; TESSERA_COUNTER_COUNT],
}

impl Default for TesseraStats {
    fn default() -> Self {
        TesseraStats { gauges: [TesseraStat::default(); GAUGE_COUNT], counters: [0; COUNTER_COUNT] }
    }
}

fn snake_case(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Names of gauges and counters in snake_case, derived from the enums, NUL
/// terminated for the C ABI.
pub fn gauge_names() -> &'static [String] {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| (0..GAUGE_COUNT).map(|i| snake_case(&format!("{:?}", gauge_from_index(i)))).collect())
}

pub fn counter_names() -> &'static [String] {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    NAMES.get_or_init(|| (0..COUNTER_COUNT).map(|i| snake_case(&format!("{:?}", counter_from_index(i)))).collect())
}

fn gauge_from_index(i: usize) -> TesseraGauge {
    assert!(i < GAUGE_COUNT);
    // SAFETY: TesseraGauge is repr(u32) with dense discriminants 0..GAUGE_COUNT
    // (GAUGE_COUNT is its last variant plus one), and i is in that range.
    unsafe { std::mem::transmute::<u32, TesseraGauge>(i as u32) }
}

fn counter_from_index(i: usize) -> TesseraCounter {
    assert!(i < COUNTER_COUNT);
    // SAFETY: as above, TesseraCounter is repr(u32), dense from 0.
    unsafe { std::mem::transmute::<u32, TesseraCounter>(i as u32) }
}

impl TesseraStat {
    pub fn add(&mut self, amount: i64) {
        self.current += amount;
        self.allocated += amount;
        self.peak = self.peak.max(self.current);
    }

    pub fn sub(&mut self, amount: i64) {
        self.current -= amount;
        self.freed += amount;
    }
}

impl TesseraStats {
    pub fn gauge(&self, g: TesseraGauge) -> &TesseraStat {
        &self.gauges[g as usize]
    }

    pub fn gauge_mut(&mut self, g: TesseraGauge) -> &mut TesseraStat {
        &mut self.gauges[g as usize]
    }

    pub fn counter(&self, c: TesseraCounter) -> u64 {
        self.counters[c as usize]
    }

    pub fn bump(&mut self, c: TesseraCounter, n: u64) {
        self.counters[c as usize] += n;
    }

    /// Peaks back to current values (torch.cuda.reset_peak_memory_stats).
    pub fn reset_peaks(&mut self) {
        for g in self.gauges.iter_mut() {
            g.peak = g.current;
        }
    }

    /// Adds `other`'s values to these (the statistics of a device's pools
    /// together). Each peak becomes the sum of the peaks: at least the
    /// peak of the sum.
    pub fn add_all(&mut self, other: &TesseraStats) {
        for (g, o) in self.gauges.iter_mut().zip(other.gauges.iter()) {
            g.current += o.current;
            g.peak += o.peak;
            g.allocated += o.allocated;
            g.freed += o.freed;
        }
        for (c, o) in self.counters.iter_mut().zip(other.counters.iter()) {
            *c += o;
        }
    }

    /// Cumulative values back to zero, keeping current values and peaks
    /// (PyTorch's reset_accumulated_memory_stats): `allocated` becomes the
    /// current value, so that `current == allocated - freed` still holds.
    pub fn reset_accumulated(&mut self) {
        for g in self.gauges.iter_mut() {
            *g = TesseraStat { current: g.current, peak: g.peak, allocated: g.current, freed: 0 };
        }
        self.counters = [0; COUNTER_COUNT];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_snake_case_and_unique() {
        assert_eq!(gauge_names()[0], "allocated_bytes");
        assert_eq!(gauge_names()[GAUGE_COUNT - 1], "backup_bytes");
        assert_eq!(counter_names()[0], "cache_hits");
        assert_eq!(counter_names()[COUNTER_COUNT - 1], "background_driver_ns");
        let mut all: Vec<&String> = gauge_names().iter().chain(counter_names()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), GAUGE_COUNT + COUNTER_COUNT);
    }

    #[test]
    fn readme_names_every_statistic() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let section = readme.split("## Statistics").nth(1).and_then(|s| s.split("\n## ").next()).expect("a Statistics section");
        for name in gauge_names().iter().chain(counter_names()) {
            assert!(section.contains(&format!("`{name}`")), "the README's Statistics section does not name {name}");
        }
    }

    #[test]
    fn gauge_arithmetic_and_reset() {
        let mut s = TesseraStats::default();
        s.gauge_mut(TesseraGauge::AllocatedBytes).add(100);
        s.gauge_mut(TesseraGauge::AllocatedBytes).sub(60);
        let g = *s.gauge(TesseraGauge::AllocatedBytes);
        assert_eq!((g.current, g.peak, g.allocated, g.freed), (40, 100, 100, 60));
        s.reset_peaks();
        assert_eq!(s.gauge(TesseraGauge::AllocatedBytes).peak, 40);
        s.bump(TesseraCounter::Ooms, 2);
        assert_eq!(s.counter(TesseraCounter::Ooms), 2);
    }
}
