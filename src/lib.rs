//! tessera: a CUDA caching allocator for PyTorch and LibTorch, built on the
//! driver's virtual-memory API (expandable segments with page reclamation).
//!
//! Layers, top down; a call goes down only (each module's opening doc says
//! what it owns):
//! - [`ffi`]: the C ABI (`include/tessera.h`), where panics stop.
//! - [`allocator`]: the process-wide registry of devices and configuration,
//!   OOM callbacks, the global instance and its unloading; it starts
//!   [`worker`], the driver thread, which tidies the devices through it.
//! - [`device`]: one device, its front caches before its pool, and the
//!   protocol between them, written once.
//! - [`front`]: the hot path. Per-stream shards, each with its own lock,
//!   serve a stream's freed blocks again for requests of exactly their size.
//! - [`pool`]: the policy layer for one device, a folder of one file per
//!   concept: blocks, best fit, split, coalesce, streams, growth, gap
//!   placement, handles, recycling, private pools, statistics. It never asks
//!   which backend it runs on.
//! - [`backend`]: the primitive layer. Reserve address space, create physical
//!   handles, map and unmap whole handles, record and wait on events. Three
//!   implementations (cuda, host, sim) behind one trait, and (feature
//!   `testing`) a fault-injecting wrapper; no policy, no counting.
//! - Beside them: [`config`] (every option, once), [`stats`] (every
//!   statistic, once), [`error`], [`log`], [`hash`], [`spin`], [`thread`]
//!   (the threads tessera starts, and how they stop); presentation
//!   over typed views: [`snapshot`] (PyTorch's snapshot shape), [`status`]
//!   (the status line and its thread), [`trace`] (the trace format); and
//!   [`replay`] (trace replay and the OOM frontier, behind `tessera-replay`).
//!
//! Glossary, used the same way everywhere:
//! - *granule*: the unit of physical mapping (`page_size`, default 2 MiB).
//!   Every mapping covers whole granules. Never called a "page".
//! - *handle*: one physical allocation from the backend (`cuMemCreate`), a
//!   whole number of granules (at most `max_handle_size`), mapped whole at
//!   one address at a time; unmapped, it can be mapped again anywhere.
//! - *arena*: one reserved virtual address range (one per pool kind and device).
//! - *block*: a contiguous byte range of an arena: allocated, cached (free and
//!   mapped), pending (freed, waiting for other streams), or a hole (free and
//!   unmapped).
//! - *stream*: an opaque `u64` (a `cudaStream_t` on the cuda backend).
//! - *front cache*: per device, 64 shards keyed by a hash of the stream, each
//!   holding *lent* blocks (the pool's, lent whole) free or handed out, for
//!   exact-size reuse on their stream without the pool's lock.
//! - *ready reserve*: per device, mapped memory that no stream has used yet,
//!   kept by the driver thread so that a miss takes it with no driver call.

pub mod allocator;
pub mod backend;
pub mod config;
pub mod device;
pub mod error;
pub mod ffi;
pub mod front;
pub mod hash;
pub mod log;
pub mod pool;
pub mod replay;
pub mod snapshot;
pub mod spin;
pub mod stats;
pub mod status;
pub mod tags;
pub mod thread;
pub mod trace;
pub mod worker;
