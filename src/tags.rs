//! Tags: named groups of allocations that pause and resume together. A
//! thread's current tag (`tessera_set_tag`) applies to the allocations it
//! makes; tag 0 is untagged memory, which is never paused. Each tag has a
//! pool of its own per device ([`TagPools`]), in its own address ranges, so
//! that pausing a tag never pins, moves or unmaps another's memory.
//! The device's memory limit caps its pools together (`DeviceReserved`).
//! Invariants: tag ids are dense from 1 and never reused; a tag's pool on a
//! device exists from its first allocation there until unload.
#![forbid(unsafe_code)]

use crate::backend::Backend;
use crate::config::Config;
use crate::device::lock;
use crate::error::{Error, Result};
use crate::pool::{ArenaKind, BlockView, DevicePool, DeviceReserved, PauseReport};
use crate::stats::TesseraStats;
use std::cell::Cell;
use std::sync::{Arc, Mutex};

/// The longest tag name, in bytes.
pub const TESSERA_MAX_TAG_BYTES: usize = 128;

/// Tag names by id - 1.
static NAMES: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    /// The calling thread's current tag (0: none). No destructor.
    static CURRENT: Cell<u32> = const { Cell::new(0) };
}

/// The id of tag `name`, made on first use. Names are 1 to TESSERA_MAX_TAG_BYTES
/// bytes of printable ASCII.
pub fn intern(name: &str) -> Result<u32> {
    check_name(name)?;
    let mut names = lock(&NAMES);
    if let Some(i) = names.iter().position(|n| n == name) {
        return Ok(i as u32 + 1);
    }
    names.push(name.to_string());
    Ok(names.len() as u32)
}

/// The id of tag `name` if it was ever used.
pub fn find(name: &str) -> Option<u32> {
    lock(&NAMES).iter().position(|n| n == name).map(|i| i as u32 + 1)
}

/// The name of tag `id` ("" for 0 or an unknown id).
pub fn name(id: u32) -> String {
    if id == 0 {
        return String::new();
    }
    lock(&NAMES).get(id as usize - 1).cloned().unwrap_or_default()
}

/// The calling thread's current tag.
pub fn current() -> u32 {
    CURRENT.get()
}

/// Sets the calling thread's current tag; returns the previous one.
pub fn set_current(id: u32) -> u32 {
    CURRENT.replace(id)
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > TESSERA_MAX_TAG_BYTES || !name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(Error::InvalidArgument(format!(
            "bad tag name {name:?}: a tag is 1 to {TESSERA_MAX_TAG_BYTES} bytes of printable ASCII"
        )));
    }
    Ok(())
}

/// The tags' pools of one device, each made on its tag's first allocation
/// there. One lock for all of them: tagged memory (weights, KV caches) is
/// allocated rarely, and never on the untagged hot path.
pub struct TagPools {
    device: i32,
    config: Config,
    backend: Arc<dyn Backend>,
    /// The device's count of reserved bytes, which its memory limit caps:
    /// every tag's pool shares it with the untagged pool.
    reserved: DeviceReserved,
    pools: Mutex<Pools>,
}

#[derive(Default)]
struct Pools {
    /// The memory limit the pools run under (set_memory_fraction's, once
    /// set; until then memory_limit's, resolved when the first pool is made).
    limit_bytes: Option<Option<u64>>,
    list: Vec<(u32, DevicePool)>,
}

impl TagPools {
    pub fn new(device: i32, config: &Config, backend: Arc<dyn Backend>, reserved: &DeviceReserved) -> TagPools {
        TagPools { device, config: config.clone(), backend, reserved: reserved.clone(), pools: Mutex::new(Pools::default()) }
    }

    /// Runs `f` on tag `tag`'s pool, made now if it does not exist.
    pub fn with_pool<T>(&self, tag: u32, f: impl FnOnce(&mut DevicePool) -> Result<T>) -> Result<T> {
        let mut pools = lock(&self.pools);
        let i = match pools.list.iter().position(|(t, _)| *t == tag) {
            Some(i) => i,
            None => {
                let limit = match pools.limit_bytes {
                    Some(limit) => limit,
                    None => *pools.limit_bytes.insert(crate::device::limit_for(&*self.backend, self.device, &self.config, None)?),
                };
                let mut pool = DevicePool::new(self.device, self.backend.clone(), &self.config, limit)?;
                pool.share_reserved(&self.reserved);
                pools.list.push((tag, pool));
                pools.list.len() - 1
            }
        };
        f(&mut pools.list[i].1)
    }

    /// Every pool runs under `limit_bytes` from now on (set_memory_fraction).
    pub fn set_limit(&self, limit_bytes: Option<u64>) {
        let mut pools = lock(&self.pools);
        pools.limit_bytes = Some(limit_bytes);
        for (_, pool) in pools.list.iter_mut() {
            pool.set_limit(limit_bytes);
        }
    }

    /// Runs `f` on the pool whose address space holds `addr`, if any.
    pub fn at<T>(&self, addr: u64, f: impl FnOnce(&mut DevicePool) -> T) -> Option<T> {
        let mut pools = lock(&self.pools);
        pools.list.iter_mut().find(|(_, p)| p.in_arenas(addr)).map(|(_, p)| f(p))
    }

    /// Runs `f` on every pool, with its tag.
    pub fn each(&self, mut f: impl FnMut(u32, &mut DevicePool)) {
        for (tag, pool) in lock(&self.pools).list.iter_mut() {
            f(*tag, pool);
        }
    }

    /// Pauses tag `tag` here; a tag with no pool here gets an empty one,
    /// paused, so that its allocations fail here too until the resume.
    pub fn pause(&self, tag: u32, backup: bool) -> Result<PauseReport> {
        self.with_pool(tag, |p| p.pause(backup))
    }

    /// Resumes tag `tag` here (nothing if it has no pool or is not paused).
    pub fn resume(&self, tag: u32) -> Result<PauseReport> {
        let name = name(tag);
        self.existing(tag, |p| p.resume(&name)).unwrap_or(Ok(PauseReport::default()))
    }


    /// Tag `tag`'s statistics here (zeros if it has no pool).
    pub fn stats(&self, tag: u32) -> TesseraStats {
        self.existing(tag, |p| p.stats()).unwrap_or_default()
    }

    /// Gives every pool's cached memory back to the driver (memory is short
    /// elsewhere on the device); returns the bytes released.
    pub fn release_caches(&self) -> u64 {
        let mut released = 0;
        self.each(|_, p| {
            let before = p.stats().gauge(crate::stats::TesseraGauge::ReservedBytes).current;
            if p.release_cached().is_ok() {
                released += (before - p.stats().gauge(crate::stats::TesseraGauge::ReservedBytes).current).max(0) as u64;
            }
        });
        released
    }

    /// Every pool's statistics, summed.
    pub fn total_stats(&self) -> TesseraStats {
        let mut total = TesseraStats::default();
        self.each(|_, p| total.add_all(&p.stats()));
        total
    }

    /// Every pool's segments, with their tags.
    pub fn segments(&self) -> Vec<(u32, ArenaKind, Vec<BlockView>)> {
        let mut out = Vec::new();
        self.each(|tag, p| out.extend(p.segments_with(&Default::default()).into_iter().map(|(a, s)| (tag, a, s))));
        out
    }

    /// Runs `f` on tag `tag`'s pool, if it has one here.
    pub fn existing<T>(&self, tag: u32, f: impl FnOnce(&mut DevicePool) -> T) -> Option<T> {
        let mut pools = lock(&self.pools);
        pools.list.iter_mut().find(|(t, _)| *t == tag).map(|(_, p)| f(p))
    }
}
