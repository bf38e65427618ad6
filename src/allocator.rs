//! The process-wide allocator: the configuration, the backend and one pool
//! per device, each pool behind its own lock (devices never contend). The
//! global instance is built once, at the first call that needs it, from
//! `TESSERA_CONF` or from a string given to [`configure`] before that.
//! Invariant: a device's pool exists iff a call for that device succeeded
//! in reserving its arenas; a memory fraction set earlier is kept and
//! applied when the pool is made.

use crate::backend::{self, Backend};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::pool::{DevicePool, PoolSettings};
use crate::stats::{TesseraCounter, TesseraStats};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

#[derive(Default)]
struct Slot {
    pool: Option<DevicePool>,
    /// Set by set_memory_fraction; overrides the configured limit.
    fraction: Option<f64>,
}

pub struct Allocator {
    config: Config,
    backend: Arc<dyn Backend>,
    slots: Vec<Mutex<Slot>>,
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    // A panic while holding the lock is a bug that the C boundary already
    // reported; keep serving rather than poison every later call.
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

impl Allocator {
    pub fn new(config: Config) -> Result<Allocator> {
        let backend: Arc<dyn Backend> = Arc::from(backend::create(&config)?);
        Self::with_backend(config, backend)
    }

    /// An allocator over a given backend (tests keep a handle on a sim or
    /// host backend to inspect it).
    pub fn with_backend(config: Config, backend: Arc<dyn Backend>) -> Result<Allocator> {
        let count = backend.device_count()?;
        tracing::info!(backend = backend.name(), devices = count, "tessera initialised");
        Ok(Allocator { config, backend, slots: (0..count).map(|_| Mutex::new(Slot::default())).collect() })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device_count(&self) -> i32 {
        self.slots.len() as i32
    }

    fn slot(&self, device: i32) -> Result<&Mutex<Slot>> {
        usize::try_from(device).ok().and_then(|d| self.slots.get(d)).ok_or_else(|| {
            Error::InvalidArgument(format!("device {device} does not exist ({} devices)", self.slots.len()))
        })
    }

    /// Runs `f` on the device's pool, making the pool on first use.
    pub fn with_pool<T>(&self, device: i32, f: impl FnOnce(&mut DevicePool) -> Result<T>) -> Result<T> {
        let mut slot = lock(self.slot(device)?);
        if slot.pool.is_none() {
            let limit = self.limit_for(device, slot.fraction)?;
            let settings = PoolSettings {
                granule_bytes: self.config.page_size.0,
                max_handle_bytes: self.config.max_handle_size.0,
                small_size_bytes: self.config.small_size.0,
                growth_bytes: self.config.growth_size.0,
                va_size_bytes: self.config.va_size.0,
                expandable: self.config.expandable_segments,
                limit_bytes: limit,
            };
            slot.pool = Some(DevicePool::new(device, self.backend.clone(), settings)?);
        }
        f(slot.pool.as_mut().expect("made above"))
    }

    fn limit_for(&self, device: i32, fraction: Option<f64>) -> Result<Option<u64>> {
        let (_, total) = self.backend.mem_info(device)?;
        Ok(match fraction {
            Some(f) => Some((total as f64 * f) as u64),
            None => self.config.memory_limit.resolve(total),
        })
    }

    pub fn malloc(&self, size: u64, device: i32, stream: u64) -> Result<u64> {
        self.with_pool(device, |p| p.malloc(size, stream))
    }

    /// Frees `ptr`. The pointer is authoritative: if it belongs to another
    /// device than the one named, it is freed there and the mismatch counted.
    pub fn free(&self, ptr: u64, size: Option<u64>, device: i32, stream: Option<u64>) -> Result<()> {
        let named = self.slot(device).ok();
        if let Some(slot) = named {
            if let Some(pool) = lock(slot).pool.as_mut().filter(|p| p.owns(ptr)) {
                return pool.free(ptr, size, stream);
            }
        }
        for (d, slot) in self.slots.iter().enumerate() {
            if let Some(pool) = lock(slot).pool.as_mut().filter(|p| p.owns(ptr)) {
                pool.stats_mut().bump(TesseraCounter::MismatchedFrees, 1);
                pool.free(ptr, size, None)?;
                return Err(Error::InvalidArgument(format!(
                    "free of {ptr:#x} named device {device}, but it was allocated on device {d}; freed it there"
                )));
            }
        }
        match named.and_then(|slot| lock(slot).pool.as_mut().map(|p| p.free(ptr, size, stream))) {
            Some(result) => result, // counts and reports the invalid free
            None => Err(Error::InvalidArgument(format!(
                "free of {ptr:#x} on device {device}: not a live tessera allocation"
            ))),
        }
    }

    /// Finds the device that owns `ptr` and records the extra stream there.
    pub fn record_stream(&self, ptr: u64, stream: u64) -> Result<()> {
        for slot in &self.slots {
            let mut slot = lock(slot);
            if let Some(pool) = slot.pool.as_mut().filter(|p| p.owns(ptr)) {
                return pool.record_stream(ptr, stream);
            }
        }
        Err(Error::InvalidArgument(format!("record_stream on {ptr:#x}, which is not a live tessera allocation")))
    }

    /// Releases cached memory of every device to the driver.
    pub fn empty_cache(&self) -> Result<()> {
        let mut first_error = None;
        for slot in &self.slots {
            if let Some(pool) = lock(slot).pool.as_mut() {
                if let Err(e) = pool.empty_cache() {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub fn set_memory_fraction(&self, fraction: f64, device: i32) -> Result<()> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::InvalidArgument(format!("memory fraction {fraction} is not in (0, 1]")));
        }
        let mut slot = lock(self.slot(device)?);
        slot.fraction = Some(fraction);
        let limit = self.limit_for(device, Some(fraction))?;
        if let Some(pool) = slot.pool.as_mut() {
            pool.set_limit(limit);
        }
        Ok(())
    }

    /// Statistics of a device (zeros for a device not used yet).
    pub fn stats(&self, device: i32) -> Result<TesseraStats> {
        let slot = lock(self.slot(device)?);
        Ok(slot.pool.as_ref().map(|p| p.stats()).unwrap_or_default())
    }

    pub fn reset_peak_stats(&self, device: i32) -> Result<()> {
        if let Some(pool) = lock(self.slot(device)?).pool.as_mut() {
            pool.stats_mut().reset_peaks();
        }
        Ok(())
    }

    /// Counts a rejected request on a device, where the device is valid.
    pub fn count_invalid_request(&self, device: i32) {
        if let Ok(slot) = self.slot(device) {
            if let Some(pool) = lock(slot).pool.as_mut() {
                pool.stats_mut().bump(TesseraCounter::InvalidRequests, 1);
            }
        }
    }
}

static PENDING_CONF: Mutex<Option<String>> = Mutex::new(None);
static GLOBAL: OnceLock<std::result::Result<Allocator, Error>> = OnceLock::new();

/// Sets the configuration string before the first allocation; it takes the
/// place of `TESSERA_CONF`. An invalid string is an error at once.
pub fn configure(text: &str) -> Result<()> {
    Config::parse(text)?;
    if GLOBAL.get().is_some() {
        return Err(Error::Config(
            "tessera is already initialised; configure it before the first allocation".into(),
        ));
    }
    *PENDING_CONF.lock().unwrap_or_else(|p| p.into_inner()) = Some(text.to_string());
    Ok(())
}

/// The configuration that the global allocator will use (or uses).
pub fn active_config() -> Result<Config> {
    if let Some(Ok(a)) = GLOBAL.get() {
        return Ok(a.config().clone());
    }
    match PENDING_CONF.lock().unwrap_or_else(|p| p.into_inner()).as_deref() {
        Some(text) => Config::parse(text),
        None => Config::from_env(),
    }
}

/// The global allocator, built on first use. A bad configuration or a
/// missing driver is an error for every call, with the same message.
pub fn global() -> Result<&'static Allocator> {
    GLOBAL
        .get_or_init(|| {
            crate::log::init();
            Allocator::new(active_config()?)
        })
        .as_ref()
        .map_err(Clone::clone)
}
