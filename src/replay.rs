//! Replays allocation traces on the sim backend and measures what a policy
//! does with them: peak live and reserved bytes, speed, and the OOM frontier
//! (the least device capacity with which the trace completes). The engine
//! behind `tessera-replay`; tests use it too.
#![forbid(unsafe_code)]

use crate::allocator::Allocator;
use crate::backend::sim::SimBackend;
use crate::config::{Bytes, Config};
use crate::error::Error;
use crate::hash::AddrHash;
use crate::pool::BlockState;
use crate::stats::{TesseraCounter as C, TesseraGauge as G, TesseraStats};
use crate::trace::{Action, Event};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct ReplayResult {
    pub events: usize,
    pub peak_live_bytes: u64,
    /// Index of the event that ran out of memory, if one did.
    pub oom_at: Option<usize>,
    pub oom_message: Option<String>,
    pub stats: TesseraStats,
    pub elapsed_ns: u128,
    /// What the replay's driver calls would have taken on an H200
    /// (`SimBackend::modelled_driver_ns`).
    pub modelled_driver_ns: u64,
    /// The part of it that fell on the driver thread (with `driver_thread`,
    /// the replay runs its tidy rounds after each event that left work:
    /// a thread that keeps up).
    pub modelled_background_ns: u64,
    /// The pool's segments (maximal runs of mapped blocks, with their
    /// blocks) when the replay stopped (at the OOM, or after the last
    /// event), in address order.
    pub final_segments: Vec<(crate::pool::ArenaKind, Vec<crate::pool::BlockView>)>,
}

impl ReplayResult {
    pub fn peak_reserved_bytes(&self) -> u64 {
        self.stats.gauge(G::ReservedBytes).peak as u64
    }
}

/// The live-block slot of each event, numbered densely (a freed slot is
/// taken again first), so that the timed loop keeps tessera's addresses in
/// a vector and not in a map of the trace's: the replay times the
/// allocator, not its own bookkeeping. Stops at the first event that
/// allocates a live address or frees one never allocated, returned with
/// its index and error. Returns (slots, slot count, first bad event).
fn slots_of(events: &[Event]) -> (Vec<u32>, usize, Option<(usize, String)>) {
    let mut live: HashMap<u64, u32, AddrHash> = HashMap::with_hasher(AddrHash);
    let (mut slots, mut free, mut count) = (Vec::with_capacity(events.len()), Vec::new(), 0u32);
    for (i, e) in events.iter().enumerate() {
        let slot = match e.action {
            Action::Alloc if live.contains_key(&e.addr) => {
                return (slots, count as usize, Some((i, format!("event {i}: address {} allocated again while live (no free between)", e.addr))));
            }
            Action::Alloc => {
                let slot = free.pop().unwrap_or_else(|| {
                    count += 1;
                    count - 1
                });
                live.insert(e.addr, slot);
                slot
            }
            Action::Free => match live.remove(&e.addr) {
                Some(slot) => {
                    free.push(slot);
                    slot
                }
                None => return (slots, count as usize, Some((i, format!("event {i}: free of {} never allocated", e.addr)))),
            },
        };
        slots.push(slot);
    }
    (slots, count as usize, None)
}

/// Peak of the sum of live sizes in the trace itself.
pub fn peak_live_bytes(events: &[Event]) -> u64 {
    let (mut live, mut peak) = (0u64, 0u64);
    let mut sizes: HashMap<u64, u64> = HashMap::new();
    for e in events {
        match e.action {
            Action::Alloc => {
                sizes.insert(e.addr, e.size);
                live = live.saturating_add(e.size);
                peak = peak.max(live);
            }
            Action::Free => live = live.saturating_sub(sizes.remove(&e.addr).unwrap_or(0)),
        }
    }
    peak
}

/// Replays `events` under `config` (its backend is forced to sim, and
/// `capacity_bytes`, when given, replaces `device_capacity`). Stops at the
/// first out-of-memory. A free of an address the trace never allocated is
/// an error naming the event.
pub fn replay(events: &[Event], config: &Config, capacity_bytes: Option<u64>) -> Result<ReplayResult, String> {
    replay_with_timeline(events, config, capacity_bytes, 0, &mut |_| {})
}

/// One sample of the pool's state during a replay.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub event: usize,
    pub live_bytes: u64,
    pub reserved_bytes: u64,
    pub cached_bytes: u64,
    pub largest_cached_bytes: u64,
    pub small_mapped_bytes: u64,
    pub large_mapped_bytes: u64,
}

impl Sample {
    /// The sample as one JSON line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a sample serializes")
    }
}

/// `replay`, calling `sample` every `every` events (0: never) with the
/// pool's state: fragmentation over time.
pub fn replay_with_timeline(
    events: &[Event],
    config: &Config,
    capacity_bytes: Option<u64>,
    every: usize,
    sample: &mut dyn FnMut(Sample),
) -> Result<ReplayResult, String> {
    let mut config = config.clone();
    config.backend = crate::config::BackendKind::Sim;
    if let Some(c) = capacity_bytes {
        config.device_capacity = Bytes(c);
    }
    let backend = Arc::new(SimBackend::new(1, config.device_capacity.0));
    let tidied = config.driver_thread;
    let alloc = Allocator::with_backend(config, backend.clone()).map_err(|e| e.to_string())?;
    if tidied {
        alloc.set_tidied(None);
    }
    // Live-block slot -> tessera's address, numbered before the clock starts.
    let (slots, slot_count, bad) = slots_of(events);
    let mut addrs = vec![0u64; slot_count];
    let mut result = ReplayResult { events: events.len(), peak_live_bytes: peak_live_bytes(events), ..Default::default() };
    let start = std::time::Instant::now();
    let mut live = 0u64;
    for (i, e) in events.iter().enumerate() {
        if every > 0 && i % every == 0 {
            let s = take_sample(&alloc, i, live).map_err(|e| e.to_string())?;
            sample(s);
        }
        match e.action {
            Action::Alloc => live = live.saturating_add(e.size),
            Action::Free => live = live.saturating_sub(e.size),
        }
        if let Some((_, err)) = bad.as_ref().filter(|&&(at, _)| at == i) {
            return Err(err.clone());
        }
        match e.action {
            Action::Alloc => match alloc.malloc(e.size, 0, e.stream) {
                Ok(p) => {
                    addrs[slots[i] as usize] = p;
                }
                Err(err @ Error::OutOfMemory(_)) => {
                    result.oom_at = Some(i);
                    result.oom_message = Some(err.to_string());
                    break;
                }
                Err(err) => return Err(format!("event {i}: {err}")),
            },
            Action::Free => {
                let p = addrs[slots[i] as usize];
                alloc.free(p, Some(e.size), 0, Some(e.stream)).map_err(|err| format!("event {i}: {err}"))?;
            }
        }
        if tidied && alloc.wants_tidy() {
            let before = backend.modelled_driver_ns(0);
            alloc.tidy();
            result.modelled_background_ns += backend.modelled_driver_ns(0) - before;
        }
    }
    result.elapsed_ns = start.elapsed().as_nanos();
    result.modelled_driver_ns = backend.modelled_driver_ns(0);
    result.stats = alloc.stats(0).map_err(|e| e.to_string())?;
    alloc.drain_fronts(0).map_err(|e| e.to_string())?;
    result.final_segments = alloc.with_pool(0, |p| Ok(p.segments())).map_err(|e| e.to_string())?;
    Ok(result)
}

fn take_sample(alloc: &Allocator, event: usize, live_bytes: u64) -> crate::error::Result<Sample> {
    use crate::pool::ArenaKind;
    alloc.with_pool(0, |p| {
        let s = p.stats();
        Ok(Sample {
            event,
            live_bytes,
            reserved_bytes: s.gauge(G::ReservedBytes).current as u64,
            cached_bytes: s.gauge(G::CachedBytes).current as u64,
            largest_cached_bytes: p.largest_cached_bytes(),
            small_mapped_bytes: p.arena_stats(ArenaKind::Small).gauge(G::MappedBytes).current as u64,
            large_mapped_bytes: p.arena_stats(ArenaKind::Large).gauge(G::MappedBytes).current as u64,
        })
    })
}

/// The block map of `r` as text, one line per segment (maximal run of
/// mapped blocks): where every mapped byte went when the replay stopped.
/// Each line gives the arena, the segment's first granule (counted from the
/// arena's lowest mapped granule), its length in granules, and its blocks as
/// `STATE:SIZE@STREAM`, STATE one of A (allocated), c (cached), p (pending).
pub fn block_map(r: &ReplayResult, granule_bytes: u64) -> String {
    let mut out = String::new();
    let mut base: HashMap<crate::pool::ArenaKind, u64> = HashMap::new();
    for (arena, blocks) in &r.final_segments {
        let (start, end) = (blocks[0].addr, blocks.last().map_or(0, |b| b.addr + b.size));
        let base = *base.entry(*arena).or_insert(start);
        let texts: Vec<String> = blocks
            .iter()
            .map(|v| {
                let state = match v.state {
                    BlockState::Allocated => "A",
                    BlockState::PendingFree => "p",
                    BlockState::Cached => "c",
                };
                format!("{state}:{}@{}", crate::error::format_bytes(v.size), v.stream)
            })
            .collect();
        out.push_str(&format!(
            "{arena:?} granule {} x{}: {}\n",
            (start - base) / granule_bytes,
            (end - start).div_ceil(granule_bytes),
            texts.join(" ")
        ));
    }
    out
}

/// The least capacity, to `step_bytes`, with which the replay completes,
/// found by bisection between the peak live bytes and the least capacity
/// from the uncapped run's peak reserved bytes up that is seen to complete
/// (a capacity changes the policy near it: the uncapped peak alone proves
/// nothing). Returns `(frontier_bytes, replays run)`.
pub fn frontier(events: &[Event], config: &Config, step_bytes: u64) -> Result<(u64, usize), String> {
    let uncapped = replay(events, config, None)?;
    if uncapped.oom_at.is_some() {
        return Err(format!("the trace does not complete even uncapped: {}", uncapped.oom_message.unwrap_or_default()));
    }
    let mut lo = peak_live_bytes(events) / step_bytes; // in steps; lo - 1 fails for sure
    let mut hi = uncapped.peak_reserved_bytes().div_ceil(step_bytes).max(lo);
    lo = lo.saturating_sub(1);
    let mut runs = 1;
    // Up from the uncapped peak, one step, then two, four...: the first
    // capacity that completes bounds the bisection (the failures below it).
    let (mut up, last) = (1, 2 * hi + 64);
    loop {
        runs += 1;
        if replay(events, config, Some(hi * step_bytes))?.oom_at.is_none() {
            break;
        }
        if hi >= last {
            return Err(format!("no capacity up to {} bytes completes the trace, though it completes uncapped", hi * step_bytes));
        }
        lo = hi;
        hi = (hi + up).min(last);
        up *= 2;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        runs += 1;
        if replay(events, config, Some(mid * step_bytes))?.oom_at.is_none() {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok((hi * step_bytes, runs))
}

/// `x` to `places` decimals, for the report (JSON prints the shortest
/// form that reads back the same).
fn rounded(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

/// The report's fields, in their order.
#[derive(Serialize)]
struct Report<'a> {
    events: usize,
    peak_live_bytes: u64,
    peak_reserved_bytes: u64,
    reserved_ratio: f64,
    ns_per_event: f64,
    cache_hits: u64,
    cache_misses: u64,
    ready_hits: u64,
    driver_map_calls: u64,
    driver_unmap_calls: u64,
    driver_create_calls: u64,
    reclaimed_granules: u64,
    modelled_driver_ms: f64,
    /// The part of modelled_driver_ms on the driver thread.
    modelled_background_driver_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    frontier_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frontier_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    capacity_bytes: Option<u64>,
    /// Also without a capacity: a memory_limit in the configuration can
    /// stop the replay too, and the report must say so.
    oom_at_event: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oom_message: Option<&'a str>,
}

/// The replay report as one JSON line (the stable interface of
/// `tessera-replay`).
pub fn report_json(r: &ReplayResult, frontier_bytes: Option<u64>, capacity_bytes: Option<u64>) -> String {
    let s = &r.stats;
    let live = r.peak_live_bytes.max(1) as f64;
    let report = Report {
        events: r.events,
        peak_live_bytes: r.peak_live_bytes,
        peak_reserved_bytes: r.peak_reserved_bytes(),
        reserved_ratio: rounded(r.peak_reserved_bytes() as f64 / live, 4),
        ns_per_event: rounded(r.elapsed_ns as f64 / r.events.max(1) as f64, 1),
        cache_hits: s.counter(C::CacheHits),
        cache_misses: s.counter(C::CacheMisses),
        ready_hits: s.counter(C::ReadyHits),
        driver_map_calls: s.counter(C::DriverMapCalls),
        driver_unmap_calls: s.counter(C::DriverUnmapCalls),
        driver_create_calls: s.counter(C::DriverCreateCalls),
        reclaimed_granules: s.counter(C::ReclaimedGranules),
        modelled_driver_ms: rounded(r.modelled_driver_ns as f64 / 1e6, 1),
        modelled_background_driver_ms: rounded(r.modelled_background_ns as f64 / 1e6, 1),
        frontier_bytes,
        frontier_ratio: frontier_bytes.map(|f| rounded(f as f64 / live, 4)),
        capacity_bytes,
        oom_at_event: r.oom_at,
        oom_message: r.oom_message.as_deref(),
    };
    serde_json::to_string(&report).expect("a report serializes")
}
