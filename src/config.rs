//! Configuration: every option declared once in the table below (name, type,
//! default, doc), parsed from `TESSERA_CONF="key:value,key:value"` in
//! PyTorch's `PYTORCH_CUDA_ALLOC_CONF` syntax. The environment is read in one
//! place ([`Config::from_env`]). Unknown keys, duplicate keys, empty or bad
//! values are errors that name the key and the accepted values; never a
//! silent default.
#![forbid(unsafe_code)]

use crate::error::{quoted, Error, Result};

/// Environment variable holding the configuration string.
pub const CONF_ENV: &str = "TESSERA_CONF";

/// Which primitive layer runs under the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The CUDA driver's virtual-memory API (libcuda loaded at run time).
    Cuda,
    /// Host memory: mmap reservations, memfd handles. Real bytes, for tests.
    Host,
    /// Simulated: granules counted, no memory behind addresses. For replay.
    Sim,
}

/// A cap on the physical bytes tessera may hold on one device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryLimit {
    None,
    Bytes(u64),
    /// A fraction of the device's total memory, in (0, 1].
    Fraction(f64),
}

impl MemoryLimit {
    pub fn resolve(self, total_bytes: u64) -> Option<u64> {
        match self {
            MemoryLimit::None => None,
            MemoryLimit::Bytes(b) => Some(b),
            MemoryLimit::Fraction(f) => Some((total_bytes as f64 * f) as u64),
        }
    }
}

/// A value type that an option can have: how it parses and what it accepts.
pub trait OptionValue: Sized {
    /// Human description of the accepted values, used in error messages.
    const ACCEPTS: &'static str;
    fn parse(text: &str) -> Option<Self>;
}

impl OptionValue for bool {
    const ACCEPTS: &'static str = "true or false";
    fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(true),
            "false" | "0" | "no" | "off" => Some(false),
            _ => None,
        }
    }
}

impl OptionValue for BackendKind {
    const ACCEPTS: &'static str = "cuda, host or sim";
    fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "cuda" => Some(BackendKind::Cuda),
            "host" => Some(BackendKind::Host),
            "sim" => Some(BackendKind::Sim),
            _ => None,
        }
    }
}

/// A byte count: a plain integer or one with a K, M, G or T suffix (binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl OptionValue for Bytes {
    const ACCEPTS: &'static str = "a byte count such as 2097152, 64K, 2M, 8G or 1T";
    fn parse(text: &str) -> Option<Self> {
        let t = text.trim();
        let (digits, shift) = match t.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
            s if s.ends_with('K') => (t[..s.len() - 1].to_string(), 10),
            s if s.ends_with('M') => (t[..s.len() - 1].to_string(), 20),
            s if s.ends_with('G') => (t[..s.len() - 1].to_string(), 30),
            s if s.ends_with('T') => (t[..s.len() - 1].to_string(), 40),
            s => (s.to_string(), 0),
        };
        let n: u64 = digits.trim().parse().ok()?;
        n.checked_mul(1u64 << shift).map(Bytes)
    }
}

impl OptionValue for MemoryLimit {
    const ACCEPTS: &'static str =
        "none, a fraction of device memory in (0, 1] such as 0.8, or a byte count such as 40G";
    fn parse(text: &str) -> Option<Self> {
        if text.eq_ignore_ascii_case("none") {
            return Some(MemoryLimit::None);
        }
        if text.contains('.') {
            let f: f64 = text.parse().ok()?;
            return (f > 0.0 && f <= 1.0).then_some(MemoryLimit::Fraction(f));
        }
        Bytes::parse(text).filter(|b| b.0 > 0).map(|b| MemoryLimit::Bytes(b.0))
    }
}

impl OptionValue for u32 {
    const ACCEPTS: &'static str = "a non-negative integer";
    fn parse(text: &str) -> Option<Self> {
        text.trim().parse().ok()
    }
}

/// A number in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fraction(pub f64);

impl OptionValue for Fraction {
    const ACCEPTS: &'static str = "a number from 0 to 1, such as 0.8";
    fn parse(text: &str) -> Option<Self> {
        let f: f64 = text.trim().parse().ok()?;
        (0.0..=1.0).contains(&f).then_some(Fraction(f))
    }
}

/// An optional file path (no ',' or ':' in it: the syntax uses them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptPath(pub Option<String>);

impl OptionValue for OptPath {
    const ACCEPTS: &'static str = "a file path, or none";
    fn parse(text: &str) -> Option<Self> {
        Some(OptPath((!text.eq_ignore_ascii_case("none")).then(|| text.to_string())))
    }
}

/// A duration in whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub u64);

impl OptionValue for Seconds {
    const ACCEPTS: &'static str = "a whole number of seconds";
    fn parse(text: &str) -> Option<Self> {
        text.trim().parse().ok().map(Seconds)
    }
}

/// One row of the options table, for documentation and `--help` output.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct OptionInfo {
    pub name: &'static str,
    pub default: &'static str,
    pub accepts: &'static str,
    pub doc: &'static str,
}

macro_rules! options {
    ($( $(#[doc = $doc:literal])+ $name:ident : $ty:ty = $default:literal ;)*) => {
        /// The allocator's configuration. See [`OPTIONS`] for the table.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Config { $( $(#[doc = $doc])+ pub $name: $ty, )* }

        /// Every default is written in TESSERA_CONF's own syntax, and parsed.
        impl Default for Config {
            fn default() -> Self {
                Config { $( $name: <$ty as OptionValue>::parse($default).expect(concat!("default of ", stringify!($name))), )* }
            }
        }

        /// Every option: name, default, accepted values, doc.
        pub const OPTIONS: &[OptionInfo] = &[ $( OptionInfo {
            name: stringify!($name),
            default: $default,
            accepts: <$ty as OptionValue>::ACCEPTS,
            doc: concat!($($doc),+),
        }, )* ];

        impl Config {
            fn set(&mut self, key: &str, value: &str) -> Result<()> {
                match key {
                    $( stringify!($name) => {
                        self.$name = <$ty as OptionValue>::parse(value).ok_or_else(|| Error::Config(format!(
                            "bad value {} for key '{key}': expected {}", quoted(value), <$ty as OptionValue>::ACCEPTS)))?;
                    } )*
                    _ => {
                        let known: Vec<&str> = OPTIONS.iter().map(|o| o.name).collect();
                        return Err(Error::Config(format!(
                            "unknown key {}; accepted keys: {}", quoted(key), known.join(", "))));
                    }
                }
                Ok(())
            }
        }
    };
}

options! {
    /// Which backend runs under the allocator: `cuda` (the driver, loaded at
    /// run time), `host` (real host memory: mmap and memfd, for tests) or
    /// `sim` (counted, no memory: trace replay at any size).
    backend: BackendKind = "cuda";
    /// Grow arenas on demand and remap free granules under pressure (PyTorch's
    /// name). When false, cached granules are reused only where they are
    /// mapped and are given back only by empty_cache.
    expandable_segments: bool = "true";
    /// The granule: the unit of physical mapping. A multiple of the backend's
    /// granularity (2 MiB on CUDA, 4 KiB on host and sim).
    page_size: Bytes = "2M";
    /// The largest physical handle. Handles map whole, so larger handles
    /// make growth cheaper (one create, map and set-access per handle, each
    /// ~40 us on an H100) while smaller ones let reclamation and empty_cache
    /// work at a finer grain. Rounded down to a multiple of page_size. 8 MiB:
    /// 3x fewer map calls than 2 MiB on the GPT-2 trace for a frontier
    /// 0.006 higher (docs/measurements.md).
    max_handle_size: Bytes = "8M";
    /// Once reserved memory passes this fraction of what tessera may hold
    /// (memory_limit, else what the device has), new handles are one granule
    /// each: near the limit, reclamation must be able to take back any single
    /// granule. 1: never.
    fine_handles_above: Fraction = "0.9";
    /// Least bytes mapped when a large-arena request under half this size
    /// misses the cache (PyTorch's 20 MiB segments): fewer, larger growths.
    /// The extra stays cached for the same stream. At most an eighth of
    /// what is reserved, so small pools grow in smaller steps (an empty
    /// pool maps exact sizes). 0 maps exact sizes.
    growth_size: Bytes = "20M";
    /// While cached (free but mapped) bytes exceed this fraction of the
    /// reserved bytes, growth first unmaps cached memory that the device is
    /// done with and maps it where it is needed, instead of taking more from
    /// the driver. Keeps what nvidia-smi shows near what is live. 1 turns
    /// this off (cache everything until memory is short). Under a
    /// memory_limit, growth within the limit caches up to it instead. When
    /// recycling cannot bring the cache under the fraction (what is cached
    /// shares handles with live blocks), growth maps just what the request
    /// needs, in one-granule handles.
    max_cached_fraction: Fraction = "0.08";
    /// Do the driver work that can wait on a thread of tessera's own, off
    /// the allocating threads: keeping a ready reserve mapped for the next
    /// miss (ready_fraction), made of cached memory the device is done with
    /// (recycled) while the cache is over max_cached_fraction. Growth on an
    /// allocating thread then recycles only when the cache passes twice
    /// max_cached_fraction (the thread is behind) or memory is short. The
    /// thread holds the device's lock for one handle's driver calls at a
    /// time; it is stopped and joined at exit and at unload. Off by default:
    /// it buys time with reserved memory, about as caching more does
    /// (docs/measurements.md, "The driver thread").
    driver_thread: bool = "false";
    /// The ready reserve that the driver thread keeps: memory mapped ahead
    /// of demand in the large arena, used by no stream yet, which a miss
    /// takes with no driver call. At most this share (and half of
    /// max_cached_fraction) of the other reserved bytes (it counts as
    /// cached), and twice the largest recent miss; none near the memory
    /// limit or fine_handles_above of the device. 0: none.
    ready_fraction: Fraction = "0.04";
    /// PyTorch's name: while reserved memory exceeds this fraction of the
    /// allowed memory (memory_limit, else the device), growth recycles
    /// cached memory first, whatever max_cached_fraction says. 0: off.
    garbage_collection_threshold: Fraction = "0";
    /// Requests of at most this size go to the small pool, packed into their
    /// own granules so that they do not pin granules of large blocks.
    small_size: Bytes = "1M";
    /// A cap on the physical memory held per device (every pool of it: the
    /// untagged one and each tag's): bytes or a fraction of the device's
    /// total. torch.cuda.set_per_process_memory_fraction overrides it per
    /// device.
    memory_limit: MemoryLimit = "none";
    /// Total memory of each simulated or host device.
    device_capacity: Bytes = "80G";
    /// Number of devices of the host and sim backends.
    device_count: u32 = "1";
    /// Keep memory used by CUDA graph captures private to each capture
    /// (asks the driver whether the stream captures on every allocation and
    /// free), for the plain plug-in: `tessera.install(adaptor=False)`
    /// switches it on at the first `CUDAGraph.capture_begin`; C++ code that
    /// captures sets it or calls `tessera_watch_graphs()` first. Through the
    /// torch adaptor, PyTorch's own pool calls keep captures private.
    graph_pools: bool = "false";
    /// Serve each stream's freed blocks again, for requests of exactly their
    /// size, from per-stream front caches with their own locks (the hot path:
    /// threads on distinct streams do not contend, and a cached pair takes
    /// no device-wide lock). Off: every call takes the device's lock.
    front_caches: bool = "true";
    /// Sleep and wake: a resume keeps a tag's page-locked host copies for
    /// the tag's next pause with a backup, which copies into them instead of
    /// page-locking new host memory (most of such a pause's time: about
    /// 2 GB/s). The host memory stays held while the tag runs (counted in
    /// backup_bytes); a pause without a backup, or a block freed by then,
    /// lets its copy go.
    keep_backups: bool = "false";
    /// A file where the snapshot (JSON, in the shape of
    /// torch.cuda.memory._snapshot()) is written when an allocation fails.
    oom_snapshot: OptPath = "none";
    /// Every this many seconds, one line of memory status per device on
    /// stderr (0: never). For the logs of long runs.
    status_interval: Seconds = "0";
    /// Virtual address space reserved for the large arena of each device
    /// (the small one gets a quarter). Far larger than the device:
    /// addresses are cheap.
    va_size: Bytes = "1T";
}

/// The `key:value` items of a configuration string: split at commas outside
/// brackets (PyTorch writes lists as `[256:1,512:2]`), trimmed, empty ones
/// skipped.
fn items(text: &str) -> impl Iterator<Item = &str> {
    let mut depth = 0i32;
    text.split(move |c| {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            _ => {}
        }
        c == ',' && depth <= 0
    })
    .map(str::trim)
    .filter(|s| !s.is_empty())
}

/// PyTorch's own keys (`PYTORCH_CUDA_ALLOC_CONF`, PyTorch 2.11) that mean
/// nothing to tessera, and why: a pasted PyTorch configuration works, each of
/// these a warning. (`expandable_segments` and `garbage_collection_threshold`
/// are tessera options too; `per_process_memory_fraction` and `backend` are
/// translated in `Config::parse_with_warnings`.)
pub const PYTORCH_KEYS: &[(&str, &str)] = &[
    ("max_split_size_mb", "tessera splits every block and remaps cached memory where a request needs it, so large cached blocks do not strand memory"),
    ("max_non_split_rounding_mb", "tessera hands out no larger unsplit block: every request is rounded to 512 bytes"),
    ("roundup_power2_divisions", "tessera rounds requests to 512 bytes; cached memory is remapped rather than matched by size class"),
    ("pinned_use_cuda_host_register", "it configures pinned host memory, which PyTorch's host allocator serves, not tessera"),
    ("pinned_use_host_register", "it configures pinned host memory, which PyTorch's host allocator serves, not tessera"),
    ("pinned_num_register_threads", "it configures pinned host memory, which PyTorch's host allocator serves, not tessera"),
    ("pinned_reserve_segment_size_mb", "it configures pinned host memory, which PyTorch's host allocator serves, not tessera"),
    ("pinned_use_background_threads", "it configures pinned host memory, which PyTorch's host allocator serves, not tessera"),
    ("release_lock_on_cudamalloc", "tessera has no such switch: growth maps memory under the device's lock, which its hot path never takes"),
    ("release_lock_on_device_malloc", "tessera has no such switch: growth maps memory under the device's lock, which its hot path never takes"),
    ("graph_capture_record_stream_reuse", "tessera keeps a capture's memory private to it (graph_pools) and reuses none during the capture"),
];

impl Config {
    /// Parses a configuration string. Empty string: all defaults.
    pub fn parse(text: &str) -> Result<Config> {
        Config::parse_with_warnings(text).map(|(config, _)| config)
    }

    /// As `parse`, with a warning for each of PyTorch's keys that it
    /// accepted without their meaning (see `PYTORCH_KEYS`): a configuration
    /// pasted from `PYTORCH_CUDA_ALLOC_CONF` works. PyTorch's
    /// `per_process_memory_fraction` sets `memory_limit` (unless that is
    /// given), `backend:native` and `backend:cudaMallocAsync` name PyTorch's
    /// allocators, whose place tessera takes: `backend:cuda`. Unknown keys
    /// that are not PyTorch's stay errors.
    pub fn parse_with_warnings(text: &str) -> Result<(Config, Vec<String>)> {
        let mut config = Config::default();
        let mut warnings = Vec::new();
        let mut fraction = None;
        let mut seen: Vec<&str> = Vec::new();
        for item in items(text) {
            let (key, value) = item.split_once(':').ok_or_else(|| {
                Error::Config(format!("{} is not of the form key:value", quoted(item)))
            })?;
            let (key, value) = (key.trim(), value.trim());
            if value.is_empty() {
                return Err(Error::Config(format!("empty value for key {}", quoted(key))));
            }
            if seen.contains(&key) {
                return Err(Error::Config(format!("duplicate key {}", quoted(key))));
            }
            seen.push(key);
            if let Some((_, why)) = PYTORCH_KEYS.iter().find(|(k, _)| *k == key) {
                warnings.push(format!("tessera: PyTorch's {key} does not apply: {why}; ignored"));
            } else if key == "per_process_memory_fraction" {
                fraction = Some(value);
            } else if key == "backend" && (value == "native" || value.eq_ignore_ascii_case("cudaMallocAsync")) {
                warnings.push(format!(
                    "tessera: backend:{value} names one of PyTorch's allocators, whose place tessera takes; running as backend:cuda"
                ));
                config.backend = BackendKind::Cuda;
            } else {
                config.set(key, value)?;
            }
        }
        if let Some(value) = fraction {
            let limit = MemoryLimit::parse(value).filter(|l| matches!(l, MemoryLimit::Fraction(_))).ok_or_else(|| {
                Error::Config(format!("bad value {} for key 'per_process_memory_fraction': expected a fraction in (0, 1]", quoted(value)))
            })?;
            if seen.contains(&"memory_limit") {
                warnings.push("tessera: per_process_memory_fraction is ignored: memory_limit is given".into());
            } else {
                config.memory_limit = limit;
            }
        }
        config.validate()?;
        Ok((config, warnings))
    }

    /// Reads `TESSERA_CONF` (the one place the environment is read for it).
    pub fn from_env() -> Result<Config> {
        Config::env_text()?.map_or_else(|| Ok(Config::default()), |text| Config::parse(&text))
    }

    /// The text of `TESSERA_CONF`, if it is set.
    pub fn env_text() -> Result<Option<String>> {
        match std::env::var(CONF_ENV) {
            Ok(text) => Ok(Some(text)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::Config(format!("{CONF_ENV} is not valid UTF-8"))),
        }
    }

    fn validate(&self) -> Result<()> {
        let g = self.page_size.0;
        if g < 4096 || !g.is_power_of_two() {
            return Err(Error::Config(format!(
                "bad value '{g}' for key 'page_size': expected a power of two of at least 4K"
            )));
        }
        if self.max_handle_size.0 < g {
            return Err(Error::Config("'max_handle_size' must be at least 'page_size'".into()));
        }
        if self.va_size.0 < 4 * g || self.va_size.0 > 1 << 46 {
            return Err(Error::Config("'va_size' must be between 4 granules and 64T".into()));
        }
        if self.device_count == 0 || self.device_count > 64 {
            return Err(Error::Config("'device_count' must be between 1 and 64".into()));
        }
        Ok(())
    }

    /// The configuration as a device runs it: `page_size` checked against
    /// the backend's granularity, `max_handle_size` rounded down and
    /// `va_size` up to whole pages. (Every check that needs no backend runs
    /// at parse time, in `validate`.)
    pub fn for_backend(&self, backend: &str, granularity_bytes: u64) -> Result<Config> {
        let g = self.page_size.0;
        if !g.is_multiple_of(granularity_bytes) {
            return Err(Error::Config(format!(
                "page_size {g} is not a multiple of the {backend} backend's granularity {granularity_bytes}"
            )));
        }
        let mut conf = self.clone();
        conf.max_handle_size = Bytes((self.max_handle_size.0 / g * g).max(g));
        conf.va_size = Bytes(self.va_size.0.div_ceil(g) * g);
        Ok(conf)
    }

    /// The options table as JSON: `[{"name","default","accepts","doc"}, ...]`.
    pub fn options_json() -> String {
        let rows: Vec<OptionInfo> = OPTIONS.iter().map(|o| OptionInfo { doc: o.doc.trim(), ..*o }).collect();
        serde_json::to_string(&rows).expect("the options serialize")
    }

    /// The options table in Markdown (the README's configuration table is
    /// this text, checked by a test).
    pub fn markdown_table() -> String {
        let mut out = String::from("| key | default | meaning |\n|---|---|---|\n");
        for o in OPTIONS {
            out.push_str(&format!("| `{}` | `{}` | {} Accepts {}. |\n", o.name, o.default, o.doc.trim(), o.accepts));
        }
        out
    }

    /// The options table as text, one option a line (for `--help` and docs).
    pub fn describe() -> String {
        OPTIONS
            .iter()
            .map(|o| format!("{:<22} default {:<28} {}\n{:<22} accepts {}\n", o.name, o.default, o.doc, "", o.accepts))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_values() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        let c = Config::parse(" backend:sim , page_size:64K,memory_limit:0.5,expandable_segments:False").unwrap();
        assert_eq!(c.backend, BackendKind::Sim);
        assert_eq!(c.page_size, Bytes(64 << 10));
        assert_eq!(c.memory_limit, MemoryLimit::Fraction(0.5));
        assert!(!c.expandable_segments);
        let c = Config::parse("memory_limit:40G,device_capacity:2TiB").unwrap();
        assert_eq!(c.memory_limit, MemoryLimit::Bytes(40 << 30));
        assert_eq!(c.device_capacity, Bytes(2 << 40));
    }

    #[test]
    fn a_pasted_pytorch_configuration_works_with_a_warning_per_key_that_does_not_apply() {
        let text = "backend:native,max_split_size_mb:128,roundup_power2_divisions:[256:1,>:4],expandable_segments:True,\
                    garbage_collection_threshold:0.6,pinned_use_cuda_host_register:True,release_lock_on_cudamalloc:True,\
                    per_process_memory_fraction:0.5";
        let (c, warnings) = Config::parse_with_warnings(text).unwrap();
        assert_eq!(c.backend, BackendKind::Cuda);
        assert!(c.expandable_segments && c.garbage_collection_threshold == Fraction(0.6));
        assert_eq!(c.memory_limit, MemoryLimit::Fraction(0.5));
        assert_eq!(warnings.len(), 5, "{warnings:#?}");
        for key in ["backend:native", "max_split_size_mb", "roundup_power2_divisions", "pinned_use_cuda_host_register", "release_lock_on_cudamalloc"] {
            assert!(warnings.iter().any(|w| w.contains(key)), "no warning for {key}: {warnings:#?}");
        }
        // Keys of neither are errors still; so are bad values of PyTorch's translated keys.
        assert!(Config::parse("max_split_size:128").unwrap_err().to_string().contains("unknown key"));
        assert!(Config::parse("per_process_memory_fraction:2").is_err());
        let (c, w) = Config::parse_with_warnings("memory_limit:40G,per_process_memory_fraction:0.5").unwrap();
        assert_eq!((c.memory_limit, w.len()), (MemoryLimit::Bytes(40 << 30), 1));
    }

    #[test]
    fn errors_name_the_key_and_accepted_values() {
        let e = Config::parse("nonsense:1").unwrap_err().to_string();
        assert!(e.contains("unknown key 'nonsense'") && e.contains("page_size"), "{e}");
        let e = Config::parse("backend:tpu").unwrap_err().to_string();
        assert!(e.contains("'backend'") && e.contains("cuda, host or sim"), "{e}");
        let e = Config::parse("page_size:12x").unwrap_err().to_string();
        assert!(e.contains("'page_size'"), "{e}");
        let e = Config::parse("page_size:3000").unwrap_err().to_string();
        assert!(e.contains("power of two"), "{e}");
        let e = Config::parse("backend:sim,backend:host").unwrap_err().to_string();
        assert!(e.contains("duplicate key 'backend'"), "{e}");
        let e = Config::parse("backend:").unwrap_err().to_string();
        assert!(e.contains("empty value"), "{e}");
        let e = Config::parse("backend").unwrap_err().to_string();
        assert!(e.contains("key:value"), "{e}");
        let e = Config::parse("memory_limit:1.5").unwrap_err().to_string();
        assert!(e.contains("fraction"), "{e}");
        assert!(Config::parse("page_size:99999999999999999999T").is_err());
        // A hostile value is quoted, not echoed whole.
        let e = Config::parse(&format!("page_size:{}", "9x".repeat(5 << 20))).unwrap_err().to_string();
        assert!(e.contains("(10485760 bytes)") && e.len() < 300, "{}", &e[..200.min(e.len())]);
    }

    /// Where the README's configuration table stands.
    const TABLE_START: &str = "<!-- options: generated from src/config.rs; TESSERA_WRITE_README=1 cargo test --lib config rewrites it -->\n";
    const TABLE_END: &str = "<!-- end of options -->";

    #[test]
    fn readme_configuration_table_is_the_declared_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let start = readme.find(TABLE_START).expect("the README marks its options table") + TABLE_START.len();
        let end = start + readme[start..].find(TABLE_END).expect("the table's end marker");
        let table = Config::markdown_table();
        if std::env::var_os("TESSERA_WRITE_README").is_some() {
            std::fs::write(&path, format!("{}{table}{}", &readme[..start], &readme[end..])).unwrap();
            return;
        }
        assert_eq!(&readme[start..end], table, "the README's options table is stale: TESSERA_WRITE_README=1 cargo test --lib config");
    }

    #[test]
    fn options_table_lists_every_field() {
        let text = Config::describe();
        for name in ["backend", "expandable_segments", "page_size", "memory_limit", "va_size"] {
            assert!(text.contains(name), "{name} missing from describe()");
        }
    }
}
