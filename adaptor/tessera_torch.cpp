// The torch adaptor (see tessera_torch.h): PyTorch's CUDAAllocator over
// tessera's C ABI. It derives from torch's CUDAPluggableAllocator, which
// keeps each allocation's size and stream for its free, and overrides what
// that class leaves unsupported:
// - statistics (getDeviceStats, resets) from tessera's counters;
// - out of memory as c10::OutOfMemoryError, with PyTorch's OOM observers;
// - cacheInfo (cudnn.benchmark), emptyCache, recordStream;
// - PyTorch's memory pools (CUDA graph captures, MemPool, cudagraph trees'
//   checkpoints) as tessera's named private pools;
// - memory history and snapshots, with the stack contexts PyTorch gathers;
// - IPC refused with a clear message.
// Invariants: a MempoolId maps to one tessera pool number while its use
// count is positive; a live block's context is kept only while recording.
#include "tessera_torch.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#include <torch/version.h>

// The CUDAAllocator interface this adaptor implements is PyTorch 2.11's (tested); older
// versions differ in its methods and namespaces. Newer ones are tried: where the interface
// changed, compiling fails, and tessera.install() falls back to the plain plug-in.
#if TORCH_VERSION_MAJOR < 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 11)
#error "tessera's torch adaptor needs PyTorch 2.11 or newer (its CUDAAllocator interface); use the plain plug-in"
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tessera.h"

namespace tessera::torch_adaptor {
namespace {

namespace cca = c10::cuda::CUDACachingAllocator;
namespace cda = c10::CachingDeviceAllocator;
using c10::MempoolId_t;
using Pluggable = torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator;

std::string last_error() {
  const char* e = tessera_last_error();
  return e ? e : "";
}

bool is_oom(const std::string& message) {
  return message.rfind("CUDA out of memory", 0) == 0;
}

time_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The live blocks of a named pool, in address order.
std::vector<TesseraBlock> pool_blocks(int device, uint64_t pool) {
  int64_t n = tessera_pool_blocks(device, pool, nullptr, 0);
  TORCH_CHECK(n >= 0, "tessera: ", last_error());
  std::vector<TesseraBlock> blocks(static_cast<size_t>(n));
  n = tessera_pool_blocks(device, pool, blocks.data(), blocks.size());
  TORCH_CHECK(n >= 0, "tessera: ", last_error());
  blocks.resize(std::min(blocks.size(), static_cast<size_t>(n)));
  return blocks;
}

// Every mapped block of a device, in address order (none before its first use).
std::vector<TesseraBlock> device_blocks(int device) {
  for (;;) {
    int64_t n = tessera_blocks(device, nullptr, 0);
    if (n < 0) return {};
    std::vector<TesseraBlock> blocks(static_cast<size_t>(n));
    int64_t m = tessera_blocks(device, blocks.data(), blocks.size());
    if (m <= n) {
      blocks.resize(static_cast<size_t>(std::max<int64_t>(m, 0)));
      return blocks;
    }
  }
}

void copy_stat(c10::CachingAllocator::Stat& to, const TesseraStat& from) {
  to.current = from.current;
  to.peak = from.peak;
  to.allocated = from.allocated;
  to.freed = from.freed;
}

// A gauge plus blocks waiting for other streams: PyTorch's "active".
void copy_active(c10::CachingAllocator::Stat& to, const TesseraStat& base, int64_t pending) {
  to.current = base.current + pending;
  to.peak = std::max(base.peak, to.current);
  to.allocated = base.allocated;
  to.freed = base.allocated - to.current;
}

struct PoolInfo {
  uint64_t number;
  int use_count;
};

struct Capture {
  c10::DeviceIndex device;
  MempoolId_t id;
  std::function<bool(cudaStream_t)> filter;
};

// What getCheckpointState keeps: the pool's live blocks.
struct CheckpointState : cca::AllocatorState {
  c10::DeviceIndex device = 0;
  MempoolId_t id;
  std::vector<TesseraBlock> blocks;
};

class Adaptor final : public Pluggable {
 public:
  Adaptor()
      : Pluggable(
            [this](size_t size, int device, cudaStream_t stream) { return alloc(size, device, stream); },
            [this](void* ptr, size_t size, int device, cudaStream_t stream) { release(ptr, size, device, stream); }) {
    set_init_fn([](int device_count) { tessera_init(device_count); });
  }

  std::string name() override {
    return "tessera";
  }

  // ----- statistics --------------------------------------------------------

  cda::DeviceStats getDeviceStats(c10::DeviceIndex device) override {
    TesseraStats all{}, small{}, large{};
    TORCH_CHECK(tessera_get_stats(device, &all) == 0 && tessera_get_arena_stats(device, 0, &small) == 0 &&
                    tessera_get_arena_stats(device, 1, &large) == 0,
                "tessera: ", last_error());
    cda::DeviceStats s;
    const TesseraStats* scopes[3] = {&all, &small, &large};
    for (size_t i = 0; i < 3; i++) {
      const TesseraStats& t = *scopes[i];
      copy_stat(s.allocation[i], t.gauges[TESSERA_GAUGE_ACTIVE_BLOCKS]);
      copy_stat(s.segment[i], t.gauges[TESSERA_GAUGE_SEGMENTS]);
      copy_stat(s.inactive_split[i], t.gauges[TESSERA_GAUGE_CACHED_BLOCKS]);
      copy_stat(s.allocated_bytes[i], t.gauges[TESSERA_GAUGE_ALLOCATED_BYTES]);
      // The device's physical memory; an arena's, what is mapped in it.
      copy_stat(s.reserved_bytes[i], t.gauges[i == 0 ? TESSERA_GAUGE_RESERVED_BYTES : TESSERA_GAUGE_MAPPED_BYTES]);
      copy_stat(s.inactive_split_bytes[i], t.gauges[TESSERA_GAUGE_CACHED_BYTES]);
      copy_stat(s.requested_bytes[i], t.gauges[TESSERA_GAUGE_REQUESTED_BYTES]);
      copy_active(s.active[i], t.gauges[TESSERA_GAUGE_ACTIVE_BLOCKS],
                  t.gauges[TESSERA_GAUGE_PENDING_FREE_BLOCKS].current);
      copy_active(s.active_bytes[i], t.gauges[TESSERA_GAUGE_ALLOCATED_BYTES],
                  t.gauges[TESSERA_GAUGE_PENDING_FREE_BYTES].current);
    }
    s.num_alloc_retries = static_cast<int64_t>(all.counters[TESSERA_COUNTER_ALLOC_RETRIES]);
    s.num_ooms = static_cast<int64_t>(all.counters[TESSERA_COUNTER_OOMS]);
    s.num_device_alloc = static_cast<int64_t>(all.counters[TESSERA_COUNTER_DRIVER_MAP_CALLS]);
    s.num_device_free = static_cast<int64_t>(all.counters[TESSERA_COUNTER_DRIVER_UNMAP_CALLS]);
    s.max_split_size = -1;  // every block splits, as native's default
    return s;
  }

  void resetPeakStats(c10::DeviceIndex device) override {
    TORCH_CHECK(tessera_reset_peak_stats(device) == 0, "tessera: ", last_error());
  }

  void resetAccumulatedStats(c10::DeviceIndex device) override {
    TORCH_CHECK(tessera_reset_accumulated_stats(device) == 0, "tessera: ", last_error());
  }

  // The largest request served without mapping memory: what is free on the
  // device (the first guess, as native's) or the largest cached block.
  void cacheInfo(c10::DeviceIndex device, size_t* largest) override {
    if (*largest == 0) {
      c10::cuda::CUDAGuard guard(device);
      size_t free = 0, total = 0;
      C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
      *largest = free;
    }
    uint64_t cached = 0;
    if (tessera_cache_info(device, &cached) == 0) *largest = std::max(*largest, static_cast<size_t>(cached));
  }

  void emptyCache(MempoolId_t /*mempool_id*/) override {
    tessera_empty_cache();
  }

  void recordStream(const c10::DataPtr& ptr, c10::cuda::CUDAStream stream) override {
    if (ptr.get() != nullptr) tessera_record_stream(ptr.get(), stream.stream());
  }

  void setMemoryFraction(double fraction, c10::DeviceIndex device) override {
    tessera_set_memory_fraction(fraction, device);
    std::string error = last_error();
    TORCH_CHECK(error.empty(), error);
    std::lock_guard<std::mutex> lock(mutex_);
    fractions_[device] = fraction;
  }

  double getMemoryFraction(c10::DeviceIndex device) override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = fractions_.find(device);
    return it == fractions_.end() ? 1.0 : it->second;
  }

  // ----- pools: graph captures, MemPool, cudagraph trees --------------------

  void beginAllocateToPool(c10::DeviceIndex device, MempoolId_t id, std::function<bool(cudaStream_t)> filter) override {
    std::lock_guard<std::mutex> lock(mutex_);
    incref(id);
    for (const auto& c : captures_) TORCH_CHECK(c.id != id, "beginAllocateToPool: already recording to this pool");
    captures_.push_back(Capture{device, id, std::move(filter)});
    capturing_.fetch_add(1, std::memory_order_release);
  }

  void endAllocateToPool(c10::DeviceIndex /*device*/, MempoolId_t id) override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = std::find_if(captures_.begin(), captures_.end(), [&](const Capture& c) { return c.id == id; });
    TORCH_CHECK(it != captures_.end(), "endAllocateToPool: not recording to this pool");
    captures_.erase(it);
    capturing_.fetch_sub(1, std::memory_order_release);
  }

  // The pool's last user is gone: its cached memory joins tessera's cache,
  // its live blocks will when freed.
  void releasePool(c10::DeviceIndex device, MempoolId_t id) override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = pools_.find(id);
    TORCH_CHECK(it != pools_.end(), "releasePool: no such pool");
    if (--it->second.use_count == 0) {
      tessera_release_pool(device, it->second.number);
      pools_.erase(it);
    }
  }

  void createOrIncrefPool(c10::DeviceIndex /*device*/, MempoolId_t id, std::shared_ptr<cca::CUDAAllocator> allocator) override {
    TORCH_CHECK(!allocator || allocator.get() == this,
                "tessera: a MemPool with an allocator of its own is not supported while tessera is PyTorch's "
                "allocator; use torch.cuda.MemPool() without one");
    std::lock_guard<std::mutex> lock(mutex_);
    incref(id);
  }

  int getPoolUseCount(c10::DeviceIndex /*device*/, MempoolId_t id) override {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = pools_.find(id);
    return it == pools_.end() ? 0 : it->second.use_count;
  }

  void setUseOnOOM(c10::DeviceIndex /*device*/, MempoolId_t /*id*/, bool /*use_on_oom*/) override {}
  void setNoSplit(c10::DeviceIndex /*device*/, MempoolId_t /*id*/) override {}

  bool checkPoolLiveAllocations(c10::DeviceIndex device, MempoolId_t id,
                                const std::unordered_set<void*>& expected) override {
    auto blocks = pool_blocks(device, number_of(id));
    if (blocks.size() != expected.size()) return false;
    return std::all_of(blocks.begin(), blocks.end(), [&](const TesseraBlock& b) {
      return expected.count(reinterpret_cast<void*>(b.addr)) != 0;
    });
  }

  std::shared_ptr<cca::AllocatorState> getCheckpointState(c10::DeviceIndex device, MempoolId_t id) override {
    auto state = std::make_shared<CheckpointState>();
    state->device = device;
    state->id = id;
    state->blocks = pool_blocks(device, number_of(id));
    return state;
  }

  // Puts the pool back as the checkpoint found it: every live block of the
  // pool is freed, and every block the checkpoint holds is allocated again
  // at its address (tessera's pool keeps a pool's memory to itself, so it
  // is there), as native does.
  cca::CheckpointDelta setCheckpointPoolState(c10::DeviceIndex device, std::shared_ptr<cca::AllocatorState> pps) override {
    auto state = std::dynamic_pointer_cast<CheckpointState>(pps);
    TORCH_CHECK(state, "tessera: a checkpoint that tessera did not make");
    uint64_t pool = number_of(state->id);
    cca::CheckpointDelta delta;
    for (const auto& b : pool_blocks(device, pool)) {
      void* p = reinterpret_cast<void*>(b.addr);
      forget(p);
      tessera_free(p, static_cast<ssize_t>(b.requested), device, reinterpret_cast<cudaStream_t>(b.stream));
      delta.ptrs_freed.push_back(p);
    }
    for (TesseraBlock b : state->blocks) {
      // Through the base class's malloc, which keeps the block's size and
      // stream for its free; `alloc` claims the checkpoint's address.
      b.pool = pool;
      claim_ = &b;
      void* p = nullptr;
      try {
        p = malloc(b.requested, device, reinterpret_cast<cudaStream_t>(b.stream));
      } catch (...) {
        claim_ = nullptr;
        throw;
      }
      claim_ = nullptr;
      delta.dataptrs_allocd.emplace_back(p, p, raw_deleter(), c10::Device(c10::DeviceType::CUDA, device));
    }
    return delta;
  }

  // ----- history and snapshots ---------------------------------------------

  bool isHistoryEnabled() override {
    return recording_.load(std::memory_order_relaxed);
  }

  void recordHistory(bool enabled, cda::CreateContextFn context_recorder, size_t max_entries, cda::RecordContext when,
                     bool clear_history, const std::vector<std::string>& /*skip_actions*/) override {
    std::lock_guard<std::mutex> lock(mutex_);
    recorder_ = context_recorder;
    when_ = when;
    max_entries_ = std::max<size_t>(max_entries, 1);
    if (clear_history || !enabled) {
      traces_.clear();
      contexts_.clear();
    }
    recording_.store(enabled && when != cda::RecordContext::NEVER, std::memory_order_relaxed);
  }

  cca::SnapshotInfo snapshot(MempoolId_t mempool_id, bool include_traces) override {
    cca::SnapshotInfo info;
    int devices = c10::cuda::device_count();
    std::lock_guard<std::mutex> lock(mutex_);
    for (int d = 0; d < devices; d++) {
      auto blocks = device_blocks(d);
      cda::SegmentInfo* seg = nullptr;
      uint64_t end = 0;
      int32_t arena = -1;
      for (const auto& b : blocks) {
        if (seg == nullptr || b.addr != end || b.arena != arena) {
          info.segments.emplace_back();
          seg = &info.segments.back();
          seg->device = static_cast<c10::DeviceIndex>(d);
          seg->address = b.addr;
          seg->is_large = b.arena == 1;
          seg->is_expandable = true;
          seg->stream = reinterpret_cast<void*>(b.stream);
          arena = b.arena;
        }
        // A segment belongs to the pool of its first block that has one.
        if (b.pool != 0 && seg->owner_private_pool_id == MempoolId_t{0, 0}) seg->owner_private_pool_id = id_of(b.pool);
        cda::BlockInfo block;
        block.size = b.size;
        block.requested_size = b.requested;
        block.allocated = b.state == TESSERA_BLOCK_STATE_ALLOCATED;
        block.active = b.state != TESSERA_BLOCK_STATE_CACHED;
        auto ctx = contexts_.find(reinterpret_cast<void*>(b.addr));
        if (block.allocated && ctx != contexts_.end()) block.context_when_allocated = ctx->second;
        if (block.active && seg->blocks.empty()) seg->stream = reinterpret_cast<void*>(b.stream);
        seg->total_size += b.size;
        seg->requested_size += b.requested;
        if (block.allocated) seg->allocated_size += b.size;
        if (block.active) seg->active_size += b.size;
        seg->blocks.push_back(std::move(block));
        end = b.addr + b.size;
      }
    }
    if (mempool_id != MempoolId_t{0, 0}) {
      auto& segs = info.segments;
      segs.erase(std::remove_if(segs.begin(), segs.end(),
                                [&](const cda::SegmentInfo& s) { return s.owner_private_pool_id != mempool_id; }),
                 segs.end());
    }
    info.device_traces.resize(static_cast<size_t>(devices));
    if (include_traces) {
      for (auto& [device, trace] : traces_) {
        if (device >= 0 && device < devices) info.device_traces[device].assign(trace.begin(), trace.end());
      }
    }
    info.config_metadata.garbage_collection_threshold = 0;
    info.config_metadata.max_split_size = SIZE_MAX;
    info.config_metadata.pinned_num_register_threads = 1;
    info.config_metadata.expandable_segments = true;
    info.config_metadata.release_lock_on_malloc = false;
    info.config_metadata.pinned_use_host_register = false;
    info.config_metadata.graph_capture_record_stream_reuse = false;
    info.config_metadata.last_allocator_settings = "tessera";
    return info;
  }

  void attachOutOfMemoryObserver(cca::OutOfMemoryObserver observer) override {
    std::lock_guard<std::mutex> lock(mutex_);
    oom_observers_.push_back(std::move(observer));
  }

  void attachAllocatorTraceTracker(cda::AllocatorTraceTracker tracker) override {
    std::lock_guard<std::mutex> lock(mutex_);
    trackers_.push_back(std::move(tracker));
  }

  // ----- IPC ---------------------------------------------------------------

  cca::ShareableHandle shareIpcHandle(void* /*ptr*/) override {
    refuse_ipc();
  }

  std::shared_ptr<void> getIpcDevPtr(std::string /*handle*/) override {
    refuse_ipc();
  }

 private:
  [[noreturn]] static void refuse_ipc() {
    TORCH_CHECK(false,
                "tessera does not share CUDA memory between processes (CUDA IPC): its memory is physical handles "
                "mapped with cuMemMap, which cudaIpcGetMemHandle cannot export, and handles are shared between "
                "blocks and remapped under pressure, so no handle could be given away safely. Send tensors to "
                "other processes through the CPU, or run that part under PyTorch's own allocator.");
  }

  void* alloc(size_t size, int device, cudaStream_t stream) {
    if (claim_ != nullptr) return claim(*claim_, device);
    uint64_t pool = capturing_.load(std::memory_order_acquire) > 0 ? pool_for(device, stream) : 0;
    void* p = pool != 0 ? tessera_try_malloc_in_pool(static_cast<ssize_t>(size), device, stream, pool)
                        : tessera_try_malloc(static_cast<ssize_t>(size), device, stream);
    if (p == nullptr && size != 0) {
      std::string message = last_error();
      if (is_oom(message)) {
        out_of_memory(device, size);
        TORCH_CHECK_WITH(OutOfMemoryError, false, message);
      }
      TORCH_CHECK(false, message);
    }
    if (p != nullptr && recording_.load(std::memory_order_relaxed)) record_alloc(p, size, device, stream, pool);
    return p;
  }

  // The block of a checkpoint that setCheckpointPoolState puts back.
  void* claim(const TesseraBlock& b, int device) {
    void* p = tessera_claim_in_pool(device, b.pool, reinterpret_cast<void*>(b.addr), static_cast<ssize_t>(b.size),
                                    static_cast<ssize_t>(b.requested), reinterpret_cast<cudaStream_t>(b.stream));
    TORCH_CHECK(p != nullptr, "tessera: restoring a checkpoint of a pool: ", last_error());
    return p;
  }

  void release(void* ptr, size_t size, int device, cudaStream_t stream) {
    if (ptr != nullptr && recording_.load(std::memory_order_relaxed)) record_free(ptr, size, device, stream);
    tessera_free(ptr, static_cast<ssize_t>(size), device, stream);
  }

  // The pool an allocation goes to: that of a capture underway on the
  // device whose filter takes the stream (0: none).
  uint64_t pool_for(int device, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& c : captures_) {
      if (c.device == device && c.filter(stream)) return pools_.at(c.id).number;
    }
    return 0;
  }

  // With mutex_ held.
  void incref(MempoolId_t id) {
    auto [it, made] = pools_.try_emplace(id, PoolInfo{next_pool_, 0});
    if (made) next_pool_++;
    it->second.use_count++;
  }

  uint64_t number_of(MempoolId_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = pools_.find(id);
    TORCH_CHECK(it != pools_.end(), "tessera: no such memory pool");
    return it->second.number;
  }

  // With mutex_ held: the MempoolId of tessera pool `number` ({0, 0}: none).
  MempoolId_t id_of(uint64_t number) const {
    if (number == 0) return {0, 0};
    for (const auto& [id, info] : pools_) {
      if (info.number == number) return id;
    }
    return {0, 0};
  }

  // A block leaves the base class's bookkeeping (a checkpoint frees it;
  // erase constructs no metadata, whose constructors torch does not export).
  void forget(void* p) {
    {
      std::lock_guard<std::mutex> lock(allocator_mutex_);
      allocation_metadata_.erase(p);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    contexts_.erase(p);
  }

  std::shared_ptr<c10::GatheredContext> gather(cda::RecordContext at_least) {
    // Called with no lock held: the recorder takes Python's GIL.
    cda::CreateContextFn recorder;
    cda::RecordContext when;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      recorder = recorder_;
      when = when_;
    }
    return recorder != nullptr && when >= at_least ? recorder() : nullptr;
  }

  // With mutex_ held: adds a trace entry (the oldest goes when full) and
  // tells the trackers.
  void trace(cda::TraceEntry entry) {
    entry.time_.t_ = now_us();
    for (const auto& t : trackers_) t(entry);
    auto& ring = traces_[entry.device_];
    ring.push_back(std::move(entry));
    while (ring.size() > max_entries_) ring.pop_front();
  }

  void record_alloc(void* p, size_t size, int device, cudaStream_t stream, uint64_t pool) {
    auto context = gather(cda::RecordContext::STATE);
    std::lock_guard<std::mutex> lock(mutex_);
    if (context) contexts_[p] = context;
    trace(cda::TraceEntry(cda::TraceEntry::ALLOC, static_cast<c10::DeviceIndex>(device), reinterpret_cast<size_t>(p),
                          size, stream, id_of(pool), 0, when_ >= cda::RecordContext::ALLOC ? context : nullptr));
  }

  void record_free(void* p, size_t size, int device, cudaStream_t stream) {
    auto context = gather(cda::RecordContext::ALL);
    std::lock_guard<std::mutex> lock(mutex_);
    contexts_.erase(p);
    for (auto action : {cda::TraceEntry::FREE_REQUESTED, cda::TraceEntry::FREE_COMPLETED}) {
      trace(cda::TraceEntry(action, static_cast<c10::DeviceIndex>(device), reinterpret_cast<size_t>(p), size, stream,
                            MempoolId_t{0, 0}, 0, context));
    }
  }

  // Before an OutOfMemoryError: the observers (PyTorch's memory-history OOM
  // dump among them), and the trace's OOM entry.
  void out_of_memory(int device, size_t size) {
    size_t free = 0, total = 0;
    {
      c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
      if (cudaMemGetInfo(&free, &total) != cudaSuccess) (void)cudaGetLastError();
    }
    TesseraStats s{};
    tessera_get_stats(device, &s);
    std::vector<cca::OutOfMemoryObserver> observers;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      observers = oom_observers_;
      if (recording_.load(std::memory_order_relaxed)) {
        trace(cda::TraceEntry(cda::TraceEntry::OOM, static_cast<c10::DeviceIndex>(device), free, size, nullptr,
                              MempoolId_t{0, 0}, 0));
      }
    }
    for (const auto& observer : observers) {
      observer(device, static_cast<size_t>(s.gauges[TESSERA_GAUGE_ALLOCATED_BYTES].current), total, free);
    }
  }

  // The checkpoint block being put back on this thread (see claim).
  static thread_local const TesseraBlock* claim_;
  std::mutex mutex_;  // pools, captures, history, observers, fractions
  std::map<MempoolId_t, PoolInfo> pools_;
  uint64_t next_pool_ = 1;
  std::vector<Capture> captures_;
  std::atomic<int> capturing_{0};
  std::map<c10::DeviceIndex, double> fractions_;
  std::atomic<bool> recording_{false};
  cda::CreateContextFn recorder_ = nullptr;
  cda::RecordContext when_ = cda::RecordContext::NEVER;
  size_t max_entries_ = 1;
  std::map<c10::DeviceIndex, std::deque<cda::TraceEntry>> traces_;
  std::unordered_map<void*, std::shared_ptr<c10::GatheredContext>> contexts_;
  std::vector<cca::OutOfMemoryObserver> oom_observers_;
  std::vector<cda::AllocatorTraceTracker> trackers_;
};

thread_local const TesseraBlock* Adaptor::claim_ = nullptr;

std::mutex install_mutex;
std::shared_ptr<Adaptor> the_adaptor;

}  // namespace

void install() {
  std::lock_guard<std::mutex> lock(install_mutex);
  if (the_adaptor) return;
  TORCH_CHECK(tessera_check_config() == 0, "tessera: ", last_error());
  auto adaptor = std::make_shared<Adaptor>();
  torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(adaptor);
  the_adaptor = std::move(adaptor);
}

bool installed() {
  std::lock_guard<std::mutex> lock(install_mutex);
  return the_adaptor != nullptr;
}

}  // namespace tessera::torch_adaptor
