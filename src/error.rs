//! Errors of the allocator. Out of memory is its own variant, distinct from
//! driver failures and from bad input, so that callers (the C ABI, PyTorch's
//! batch-size finders) can tell "no memory" from "something is broken".
#![forbid(unsafe_code)]

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The request cannot be served: the physical memory (or the configured
    /// limit) is not there even after reclaiming every cached granule.
    OutOfMemory(Box<OomInfo>),
    /// The backend (CUDA driver, OS) failed for another reason.
    Driver { call: &'static str, code: i64, message: String },
    /// The caller passed something invalid (bad pointer, size, device...).
    InvalidArgument(String),
    /// The configuration (`TESSERA_CONF`) is invalid.
    Config(String),
    /// Internal to the pool: a map failed and its rollback too, but the first
    /// `mapped_bytes` are mapped and accessible; `cause` is the first error.
    PartialMap { mapped_bytes: u64, cause: Box<Error> },
}

/// What the allocator knew when it ran out of memory: enough for PyTorch's
/// wording plus tessera's own diagnosis.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OomInfo {
    pub device: i32,
    pub requested_bytes: u64,
    pub total_capacity_bytes: u64,
    pub driver_free_bytes: u64,
    pub allocated_bytes: u64,
    pub reserved_bytes: u64,
    pub limit_bytes: Option<u64>,
    /// Physical bytes the device's other pools hold (the tags' pools, or the
    /// untagged pool when the request was a tag's): they count against the
    /// memory limit too.
    pub other_pools_bytes: u64,
    pub live_blocks: u64,
    /// Free bytes still mapped when the request failed (in partly used handles).
    pub cached_bytes: u64,
    pub largest_cached_bytes: u64,
    /// Physical memory held in handles that are not mapped (free, reusable
    /// anywhere), but too little for the request.
    pub free_handle_bytes: u64,
    /// Bytes freed but waiting for other streams (record_stream).
    pub pending_bytes: u64,
    /// The largest live allocations: (bytes, stream).
    pub largest_allocations: Vec<(u64, u64)>,
    /// What failed when it was a resume: the tag and what it could not get.
    pub resuming: Option<String>,
}

impl OomInfo {
    /// One concrete next step, from what was there when memory ran out.
    pub fn advice(&self) -> String {
        let live = self.allocated_bytes + self.requested_bytes;
        if self.requested_bytes > self.total_capacity_bytes {
            return "Next step: the request alone is larger than the GPU; split the tensor or the batch.".into();
        }
        if let Some(limit) = self.limit_bytes
            && self.reserved_bytes + self.other_pools_bytes + self.requested_bytes > limit
            && live <= self.total_capacity_bytes
        {
            let tags = if self.other_pools_bytes > 0 {
                format!(" ({} of it held by the device's other pools: tags, which tessera.pause gives back)", format_bytes(self.other_pools_bytes))
            } else {
                String::new()
            };
            return format!(
                "Next step: tessera's memory limit ({}){tags} is what stopped it; raise memory_limit in TESSERA_CONF \
                 or the fraction given to torch.cuda.set_per_process_memory_fraction.",
                format_bytes(limit)
            );
        }
        if self.pending_bytes >= self.requested_bytes {
            return "Next step: memory freed with record_stream waits for other streams; synchronize them, or free \
                    on the stream that uses the tensor."
                .into();
        }
        let held_elsewhere =
            self.total_capacity_bytes.saturating_sub(self.reserved_bytes + self.other_pools_bytes + self.driver_free_bytes);
        if held_elsewhere > self.total_capacity_bytes / 4 {
            return format!(
                "Next step: {} of the GPU is held outside tessera (other processes, cudaMalloc users, CUDA \
                 contexts); check nvidia-smi.",
                format_bytes(held_elsewhere)
            );
        }
        "Next step: the live tensors need more than the GPU has; reduce the batch size or sequence length, \
         use activation checkpointing, or free tensors no longer needed."
            .into()
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// At most 60 characters of `text` for an error message, with its length
/// when it is cut.
pub fn quoted(text: &str) -> String {
    match text.char_indices().nth(60) {
        None => format!("'{text}'"),
        Some((cut, _)) => format!("'{}...' ({} bytes)", &text[..cut], text.len()),
    }
}

/// Bytes in PyTorch's human format ("20.00 MiB").
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::OutOfMemory(o) => {
                // PyTorch's wording first: batch-size finders match on it.
                write!(
                    f,
                    "CUDA out of memory. Tried to allocate {}. GPU {} has a total capacity of {} of which {} is free. \
                     Of the allocated memory {} is allocated by tessera, and {} is reserved by tessera but unallocated.",
                    format_bytes(o.requested_bytes),
                    o.device,
                    format_bytes(o.total_capacity_bytes),
                    format_bytes(o.driver_free_bytes),
                    format_bytes(o.allocated_bytes),
                    format_bytes(o.reserved_bytes.saturating_sub(o.allocated_bytes)),
                )?;
                write!(
                    f,
                    " tessera: {} live in {} blocks; {} cached in partly used handles (largest free block {}); \
                     {} in unmapped handles, ready for any request; {} waiting for other streams",
                    format_bytes(o.allocated_bytes),
                    o.live_blocks,
                    format_bytes(o.cached_bytes),
                    format_bytes(o.largest_cached_bytes),
                    format_bytes(o.free_handle_bytes),
                    format_bytes(o.pending_bytes),
                )?;
                if o.other_pools_bytes > 0 {
                    write!(f, "; {} reserved in the device's other pools (tags)", format_bytes(o.other_pools_bytes))?;
                }
                if let Some(limit) = o.limit_bytes {
                    write!(f, "; memory limit {}", format_bytes(limit))?;
                }
                if let Some(what) = &o.resuming {
                    write!(f, "; {what}")?;
                }
                if !o.largest_allocations.is_empty() {
                    let list: Vec<String> = o
                        .largest_allocations
                        .iter()
                        .map(|(size, stream)| format!("{} (stream {stream:#x})", format_bytes(*size)))
                        .collect();
                    write!(f, ". Largest allocations: {}", list.join(", "))?;
                }
                write!(f, ". {}", o.advice())
            }
            Error::Driver { call, code, message } => {
                write!(f, "tessera: {call} failed with code {code}: {message}")
            }
            Error::InvalidArgument(m) => write!(f, "tessera: invalid argument: {m}"),
            Error::Config(m) => write!(f, "tessera: bad TESSERA_CONF: {m}"),
            Error::PartialMap { cause, .. } => cause.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_message_uses_pytorch_wording() {
        let e = Error::OutOfMemory(Box::new(OomInfo {
            device: 0,
            requested_bytes: 20 << 20,
            total_capacity_bytes: 80 << 30,
            ..Default::default()
        }));
        let s = e.to_string();
        assert!(s.starts_with("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 80.00 GiB"), "{s}");
    }

    #[test]
    fn bytes_format() {
        assert_eq!(format_bytes(512), "512 bytes");
        assert_eq!(format_bytes(1536), "1.50 KiB");
    }
}
