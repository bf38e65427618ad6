//! CUDA backend: the driver's virtual-memory API through cudarc, with libcuda
//! loaded at run time (the crate builds and its tests run with no CUDA).
//! Every call runs in the device's primary context, the one PyTorch uses,
//! pushed only when the calling thread has another one current (free may come
//! from any thread). A missing or too-old libcuda is a clear error, never
//! cudarc's panic: loading is probed once, behind `catch_unwind`.

use super::{Backend, BackupId, EventId, HandleId};
use crate::error::{Error, OomInfo, Result};
use cudarc::driver::sys::{self, CUresult};
use std::sync::OnceLock;

type CaptureInfoFn = unsafe extern "C" fn(
    sys::CUstream,
    *mut sys::CUstreamCaptureStatus,
    *mut u64,
    *mut sys::CUgraph,
    *mut *const sys::CUgraphNode,
    *mut *const sys::CUgraphEdgeData,
    *mut usize,
) -> CUresult;

/// cuStreamGetCaptureInfo_v3, looked up without cudarc's panic when the
/// driver lacks it (then captures are told apart by cuStreamIsCapturing
/// only).
fn capture_info_fn() -> Option<CaptureInfoFn> {
    static F: OnceLock<Option<CaptureInfoFn>> = OnceLock::new();
    *F.get_or_init(|| {
        // SAFETY: the driver was loaded by load_driver; the symbol, when
        // present, has the v3 signature of CUDA 12.3 and later.
        unsafe { sys::culib().get::<CaptureInfoFn>(b"cuStreamGetCaptureInfo_v3\0").ok().map(|s| *s) }
    })
}

/// Oldest driver API with everything used here (VMM, events): CUDA 12.0.
const MIN_DRIVER_VERSION: i32 = 12000;

pub struct CudaBackend {
    /// Primary context of each device, retained once on first use.
    contexts: Vec<OnceLock<usize>>,
    /// Per device: the devices that may map its memory (itself first, then
    /// every peer the driver says can access it), found once.
    accessors: Vec<OnceLock<Vec<i32>>>,
    device_count: i32,
}

fn check(call: &'static str, r: CUresult) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string or leaves it null.
    unsafe { sys::cuGetErrorString(r, &mut text) };
    let message = if text.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: the driver returned a NUL-terminated static string.
        unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy().into_owned()
    };
    if r == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        return Err(Error::OutOfMemory(Box::default()));
    }
    Err(Error::Driver { call, code: r as i64, message })
}

/// Loads libcuda and checks its version, turning cudarc's panics (no library,
/// missing symbol) into errors.
fn load_driver() -> Result<i32> {
    static LOADED: OnceLock<std::result::Result<i32, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            std::panic::catch_unwind(|| {
                // SAFETY: probing for the library has no preconditions.
                if !unsafe { sys::is_culib_present() } {
                    return Err("libcuda.so was not found: is the NVIDIA driver installed? \
                                (use TESSERA_CONF=backend:host or backend:sim without a GPU)"
                        .to_string());
                }
                let mut version = 0;
                // SAFETY: plain driver calls writing to a local.
                unsafe {
                    check("cuInit", sys::cuInit(0)).map_err(|e| e.to_string())?;
                    check("cuDriverGetVersion", sys::cuDriverGetVersion(&mut version)).map_err(|e| e.to_string())?;
                }
                if version < MIN_DRIVER_VERSION {
                    return Err(format!(
                        "the CUDA driver supports CUDA {}.{}; tessera needs at least {}.{}",
                        version / 1000,
                        version % 1000 / 10,
                        MIN_DRIVER_VERSION / 1000,
                        MIN_DRIVER_VERSION % 1000 / 10
                    ));
                }
                Ok(version)
            })
            .unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(format!("loading the CUDA driver failed (too old a libcuda?): {what}"))
            })
        })
        .clone()
        .map_err(|message| Error::Driver { call: "cuInit", code: -1, message })
}

impl CudaBackend {
    pub fn new() -> Result<Self> {
        load_driver()?;
        let mut count = 0;
        // SAFETY: the driver is loaded and initialised.
        check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) })?;
        Ok(CudaBackend {
            contexts: (0..count).map(|_| OnceLock::new()).collect(),
            accessors: (0..count).map(|_| OnceLock::new()).collect(),
            device_count: count,
        })
    }

    fn context(&self, device: i32) -> Result<sys::CUcontext> {
        let slot = usize::try_from(device)
            .ok()
            .and_then(|i| self.contexts.get(i))
            .ok_or_else(|| Error::InvalidArgument(format!("device {device} does not exist ({} devices)", self.device_count)))?;
        if let Some(&ctx) = slot.get() {
            return Ok(ctx as sys::CUcontext);
        }
        let mut dev: sys::CUdevice = 0;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: device is a valid ordinal; the retained context is kept for the process lifetime.
        unsafe {
            check("cuDeviceGet", sys::cuDeviceGet(&mut dev, device))?;
            check("cuDevicePrimaryCtxRetain", sys::cuDevicePrimaryCtxRetain(&mut ctx, dev))?;
        }
        // Two threads may retain at once; the loser's extra retain is harmless
        // (primary contexts are reference counted and never released here).
        Ok(*slot.get_or_init(|| ctx as usize) as sys::CUcontext)
    }

    fn accessors(&self, device: i32) -> Result<&[i32]> {
        let slot = usize::try_from(device)
            .ok()
            .and_then(|i| self.accessors.get(i))
            .ok_or_else(|| Error::InvalidArgument(format!("device {device} does not exist")))?;
        if let Some(list) = slot.get() {
            return Ok(list);
        }
        let handle = |ordinal: i32| -> Result<sys::CUdevice> {
            let mut dev: sys::CUdevice = 0;
            // SAFETY: a valid ordinal; writes a local.
            check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, ordinal) })?;
            Ok(dev)
        };
        let owner = handle(device)?;
        let mut list = vec![device];
        for peer in (0..self.device_count).filter(|&p| p != device) {
            let mut can = 0;
            // SAFETY: both are device handles from cuDeviceGet; writes a local.
            check("cuDeviceCanAccessPeer", unsafe { sys::cuDeviceCanAccessPeer(&mut can, handle(peer)?, owner) })?;
            if can != 0 {
                list.push(peer);
            }
        }
        Ok(slot.get_or_init(|| list))
    }

    /// Runs `f` with the device's primary context current on this thread.
    fn in_context<T>(&self, device: i32, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let ctx = self.context(device)?;
        let mut current: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: cuCtxGetCurrent writes the current context (or null).
        check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut current) })?;
        if current == ctx {
            return f();
        }
        // SAFETY: ctx is a retained primary context; it is popped below.
        check("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(ctx) })?;
        let result = f();
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context pushed above.
        unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
        result
    }

    /// Runs `f` with this thread's stream-capture mode relaxed, so that a
    /// wait or an event query made while another thread captures a graph
    /// (PyTorch captures in global mode) neither fails nor breaks that
    /// capture; the mode is restored after.
    fn relaxed<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        // SAFETY: exchanges this thread's capture mode through a local.
        check("cuThreadExchangeStreamCaptureMode", unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) })?;
        let result = f();
        // SAFETY: puts the previous mode back.
        unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) };
        result
    }

    fn location(device: i32) -> sys::CUmemLocation {
        sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: device }
    }

    fn prop(device: i32) -> sys::CUmemAllocationProp {
        // SAFETY: an all-zero CUmemAllocationProp is valid (no handle types,
        // no flags); the fields that matter are set below.
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location = Self::location(device);
        prop
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn granularity(&self, device: i32) -> Result<u64> {
        let prop = Self::prop(device);
        let mut g = 0usize;
        self.in_context(device, || {
            // SAFETY: prop is valid, g is a local.
            check("cuMemGetAllocationGranularity", unsafe {
                sys::cuMemGetAllocationGranularity(
                    &mut g,
                    &prop,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
                )
            })
        })?;
        Ok(g as u64)
    }
    fn device_count(&self) -> Result<i32> {
        Ok(self.device_count)
    }
    fn mem_info(&self, device: i32) -> Result<(u64, u64)> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: writes two locals, in the device's context.
        self.in_context(device, || check("cuMemGetInfo", unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }))?;
        Ok((free as u64, total as u64))
    }
    fn reserve(&self, device: i32, size_bytes: u64, alignment: u64) -> Result<u64> {
        let mut ptr: sys::CUdeviceptr = 0;
        self.in_context(device, || {
            // SAFETY: asks the driver for a fresh range; writes a local.
            check("cuMemAddressReserve", unsafe {
                sys::cuMemAddressReserve(&mut ptr, size_bytes as usize, alignment as usize, 0, 0)
            })
        })?;
        Ok(ptr)
    }
    fn unreserve(&self, device: i32, base: u64, size_bytes: u64) -> Result<()> {
        // SAFETY: the range came from `reserve` and nothing in it is mapped (contract).
        self.in_context(device, || check("cuMemAddressFree", unsafe { sys::cuMemAddressFree(base, size_bytes as usize) }))
    }
    fn create(&self, device: i32, size_bytes: u64) -> Result<HandleId> {
        let prop = Self::prop(device);
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        self.in_context(device, || {
            // SAFETY: prop is valid and size is a multiple of the granularity (contract).
            check("cuMemCreate", unsafe { sys::cuMemCreate(&mut handle, size_bytes as usize, &prop, 0) })
        })
        .map_err(|e| match e {
            Error::OutOfMemory(_) => Error::OutOfMemory(Box::new(OomInfo { device, requested_bytes: size_bytes, ..Default::default() })),
            e => e,
        })?;
        Ok(handle)
    }
    fn release(&self, device: i32, handle: HandleId) -> Result<()> {
        // SAFETY: the handle is live and no piece of it is mapped (contract).
        self.in_context(device, || check("cuMemRelease", unsafe { sys::cuMemRelease(handle) }))
    }
    fn map(&self, device: i32, va: u64, size_bytes: u64, handle: HandleId) -> Result<()> {
        self.in_context(device, || {
            // SAFETY: the range is reserved and unmapped, the handle is that size (contract).
            check("cuMemMap", unsafe { sys::cuMemMap(va, size_bytes as usize, 0, handle, 0) })
        })
    }
    /// Grants access to the owning device and to every device that can
    /// reach it as a peer: memory from cuMemCreate is not covered by
    /// cudaDeviceEnablePeerAccess, so without this a copy or kernel from
    /// another GPU (DDP, model parallel, `tensor.to("cuda:1")`) fails.
    fn set_access(&self, device: i32, va: u64, size_bytes: u64) -> Result<()> {
        let descs: Vec<sys::CUmemAccessDesc> = self
            .accessors(device)?
            .iter()
            .map(|&d| sys::CUmemAccessDesc {
                location: Self::location(d),
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            })
            .collect();
        self.in_context(device, || {
            // SAFETY: the range is fully mapped (contract); descs lives across the call.
            check("cuMemSetAccess", unsafe { sys::cuMemSetAccess(va, size_bytes as usize, descs.as_ptr(), descs.len()) })
        })
    }
    fn unmap(&self, device: i32, va: u64, size_bytes: u64) -> Result<()> {
        // SAFETY: the range is mapped and no queued work uses it (contract).
        self.in_context(device, || check("cuMemUnmap", unsafe { sys::cuMemUnmap(va, size_bytes as usize) }))
    }
    fn synchronize(&self, device: i32) -> Result<()> {
        // SAFETY: waits for the current (primary) context.
        self.in_context(device, || Self::relaxed(|| check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })))
    }
    fn record_event(&self, device: i32, stream: u64) -> Result<EventId> {
        let mut event: sys::CUevent = std::ptr::null_mut();
        self.in_context(device, || {
            // SAFETY: creates an event and records it on the caller's stream.
            unsafe {
                check("cuEventCreate", sys::cuEventCreate(&mut event, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32))?;
                if let Err(e) = check("cuEventRecord", sys::cuEventRecord(event, stream as sys::CUstream)) {
                    sys::cuEventDestroy_v2(event);
                    return Err(e);
                }
            }
            Ok(())
        })?;
        Ok(event as EventId)
    }
    fn event_done(&self, device: i32, event: EventId) -> Result<bool> {
        self.in_context(device, || {
            Self::relaxed(|| {
                // SAFETY: event is a live event made by record_event.
                match unsafe { sys::cuEventQuery(event as sys::CUevent) } {
                    CUresult::CUDA_SUCCESS => Ok(true),
                    CUresult::CUDA_ERROR_NOT_READY => Ok(false),
                    r => check("cuEventQuery", r).map(|_| false),
                }
            })
        })
    }
    fn capture_id(&self, device: i32, stream: u64) -> Result<Option<u64>> {
        // The common case (no capture) asks cuStreamIsCapturing only; the
        // capture's id is asked for only while the stream captures.
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let mut id: u64 = 0;
        self.in_context(device, || {
            // SAFETY: writes a local; the stream is the caller's live stream.
            check("cuStreamIsCapturing", unsafe { sys::cuStreamIsCapturing(stream as sys::CUstream, &mut status) })?;
            if status == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
                return Ok(());
            }
            if let Some(f) = capture_info_fn() {
                // SAFETY: the symbol has the v3 signature; outputs are locals or null.
                check("cuStreamGetCaptureInfo_v3", unsafe {
                    f(
                        stream as sys::CUstream,
                        &mut status,
                        &mut id,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    )
                })?;
            }
            Ok(())
        })?;
        if status == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Ok(None);
        }
        // Without the capture id (an older driver), all captures share one
        // private pool: still never mixed with memory used outside graphs.
        Ok(Some(id.max(1)))
    }
    fn event_synchronize(&self, device: i32, event: EventId) -> Result<()> {
        // SAFETY: event is a live event made by record_event.
        self.in_context(device, || {
            Self::relaxed(|| check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(event as sys::CUevent) }))
        })
    }
    fn destroy_event(&self, device: i32, event: EventId) -> Result<()> {
        // SAFETY: event is live and destroyed once.
        self.in_context(device, || check("cuEventDestroy", unsafe { sys::cuEventDestroy_v2(event as sys::CUevent) }))
    }
    fn stream_wait_event(&self, device: i32, stream: u64, event: EventId) -> Result<()> {
        self.in_context(device, || {
            // SAFETY: both are live driver objects of this device.
            check("cuStreamWaitEvent", unsafe { sys::cuStreamWaitEvent(stream as sys::CUstream, event as sys::CUevent, 0) })
        })
    }
    /// Page-locked host memory, copied into on the null stream, which is
    /// then waited for (the copy is done when this returns).
    fn backup(&self, device: i32, va: u64, size_bytes: u64, reuse: Option<BackupId>) -> Result<BackupId> {
        self.in_context(device, || {
            let mut host: *mut std::ffi::c_void = std::ptr::null_mut();
            match reuse {
                // An earlier backup of size_bytes (contract): page-locked already.
                Some(id) => host = id as *mut std::ffi::c_void,
                // SAFETY: cuMemAllocHost writes a pointer to size_bytes of page-locked memory.
                None => check("cuMemAllocHost", unsafe { sys::cuMemAllocHost_v2(&mut host, size_bytes as usize) })?,
            }
            // SAFETY: the range is mapped and readable (contract); host holds size_bytes.
            let copied = Self::relaxed(|| unsafe {
                check("cuMemcpyDtoHAsync", sys::cuMemcpyDtoHAsync_v2(host, va, size_bytes as usize, std::ptr::null_mut()))?;
                check("cuStreamSynchronize", sys::cuStreamSynchronize(std::ptr::null_mut()))
            });
            if let Err(e) = copied {
                if reuse.is_none() {
                    // SAFETY: host came from cuMemAllocHost and no copy uses it now.
                    unsafe { sys::cuMemFreeHost(host) };
                }
                return Err(e);
            }
            Ok(host as BackupId)
        })
    }
    fn restore(&self, device: i32, backup: BackupId, va: u64, size_bytes: u64) -> Result<()> {
        self.in_context(device, || {
            // SAFETY: backup is page-locked memory of size_bytes from `backup`; the
            // range is mapped and writable (contract).
            Self::relaxed(|| unsafe {
                check("cuMemcpyHtoDAsync", sys::cuMemcpyHtoDAsync_v2(va, backup as *const std::ffi::c_void, size_bytes as usize, std::ptr::null_mut()))?;
                check("cuStreamSynchronize", sys::cuStreamSynchronize(std::ptr::null_mut()))
            })
        })
    }
    fn drop_backup(&self, device: i32, backup: BackupId, _size_bytes: u64) {
        let _ = self.in_context(device, || {
            // SAFETY: backup came from cuMemAllocHost in `backup`; no copy uses it.
            check("cuMemFreeHost", unsafe { sys::cuMemFreeHost(backup as *mut std::ffi::c_void) })
        });
    }
}
