// LibTorch + tessera: install tessera as the CUDA allocator, through the torch adaptor
// (argument "adaptor") or as a plain plug-in ("plain"), train a small MLP, check tessera's
// stats, PyTorch's own (adaptor) and the out-of-memory error. Prints "LIBTORCH OK" and
// exits 0 on success.
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>

#include "tessera.h"
#include "tessera_torch.h"

namespace {

// Parameter types of tessera's C functions as the header declares them (the stream may be
// cudaStream_t or void*, the size ssize_t or intptr_t): casts below follow the header.
template <typename F> struct Params;
template <typename R, typename... A> struct Params<R (*)(A...)> {
  template <std::size_t I> using at = std::tuple_element_t<I, std::tuple<A...>>;
};
template <typename R, typename... A> struct Params<R (*)(A...) noexcept> : Params<R (*)(A...)> {};
using MallocP = Params<decltype(&tessera_malloc)>;
using FreeP = Params<decltype(&tessera_free)>;
using RecordP = Params<decltype(&tessera_record_stream)>;

int failures = 0;
void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// Index of a gauge or counter by name: never rely on the order.
int index_of(int32_t n, const char* (*name)(int32_t), const char* want) {
  for (int32_t i = 0; i < n; ++i) {
    const char* s = name(i);
    if (s && std::strcmp(s, want) == 0) return i;
  }
  std::printf("FAIL: tessera has no stat named %s\n", want);
  ++failures;
  return -1;
}

struct Stats {
  int64_t allocated_current = 0, requested_current = 0, reserved_peak = 0;
  uint64_t hits = 0, misses = 0;
};

Stats read_stats() {
  static const int alloc = index_of(tessera_gauge_count(), tessera_gauge_name, "allocated_bytes");
  static const int requested = index_of(tessera_gauge_count(), tessera_gauge_name, "requested_bytes");
  static const int reserved = index_of(tessera_gauge_count(), tessera_gauge_name, "reserved_bytes");
  static const int hits = index_of(tessera_counter_count(), tessera_counter_name, "cache_hits");
  static const int misses = index_of(tessera_counter_count(), tessera_counter_name, "cache_misses");
  TesseraStats st;
  std::memset(&st, 0, sizeof st);
  Stats s;
  if (tessera_get_stats(0, &st) != 0) {
    check(false, std::string("tessera_get_stats: ") + tessera_last_error());
    return s;
  }
  if (alloc >= 0) s.allocated_current = st.gauges[alloc].current;
  if (requested >= 0) s.requested_current = st.gauges[requested].current;
  if (reserved >= 0) s.reserved_peak = st.gauges[reserved].peak;
  if (hits >= 0) s.hits = st.counters[hits];
  if (misses >= 0) s.misses = st.counters[misses];
  return s;
}

void install_tessera() {
  namespace pa = torch::cuda::CUDAPluggableAllocator;
  auto alloc = pa::createCustomAllocator(
      [](size_t n, int dev, cudaStream_t s) -> void* {
        // tessera_malloc throws std::runtime_error("CUDA out of memory. ...") on failure.
        return tessera_malloc(static_cast<MallocP::at<0>>(n), dev, reinterpret_cast<MallocP::at<2>>(s));
      },
      [](void* p, size_t n, int dev, cudaStream_t s) {
        tessera_free(p, static_cast<FreeP::at<1>>(n), dev, reinterpret_cast<FreeP::at<3>>(s));
      });
  // createCustomAllocator builds a CUDAPluggableAllocator; its extra hooks live there.
  auto plug = std::static_pointer_cast<pa::CUDAPluggableAllocator>(alloc);
  plug->set_reset_fn([] { tessera_empty_cache(); });
  plug->set_record_stream_fn(
      [](void* p, cudaStream_t s) { tessera_record_stream(p, reinterpret_cast<RecordP::at<1>>(s)); });
  plug->set_init_fn([](int n) { tessera_init(n); });
  plug->set_memory_fraction_fn([](double f, int dev) { tessera_set_memory_fraction(f, dev); });
  pa::changeCurrentAllocator(alloc);  // before any CUDA use
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "adaptor";
  if (mode != "adaptor" && mode != "plain") {
    std::printf("usage: %s [adaptor|plain]\n", argv[0]);
    return 2;
  }
  const bool adaptor = mode == "adaptor";
  if (tessera_check_config() != 0) {
    std::printf("FAIL: bad TESSERA_CONF: %s\n", tessera_last_error());
    return 2;
  }
  if (adaptor) {
    tessera::torch_adaptor::install();
    check(tessera::torch_adaptor::installed(), "the adaptor is installed");
  } else {
    install_tessera();
  }
  if (!torch::cuda::is_available()) {
    std::printf("FAIL: no CUDA device\n");
    return 2;
  }
  std::printf("tessera %s, %s\n", tessera_version(), adaptor ? "through the torch adaptor" : "as a plain plug-in");
  torch::manual_seed(0);
  const torch::Device dev(torch::kCUDA, 0);

  // A small MLP learning which of the first 10 inputs is largest.
  torch::nn::Sequential model(torch::nn::Linear(64, 256), torch::nn::ReLU(), torch::nn::Linear(256, 256),
                              torch::nn::ReLU(), torch::nn::Linear(256, 10));
  model->to(dev);
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-3));
  float first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    auto x = torch::randn({512, 64}, dev);
    auto y = x.narrow(1, 0, 10).argmax(1);
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    last = loss.item<float>();
    if (step == 0) first = last;
  }
  std::printf("loss %.4f -> %.4f\n", first, last);
  check(std::isfinite(last) && last < first, "loss falls");

  Stats s = read_stats();  // parameters and Adam state are live
  std::printf("allocated %lld B, peak reserved %lld B, hits %llu, misses %llu\n",
              (long long)s.allocated_current, (long long)s.reserved_peak,
              (unsigned long long)s.hits, (unsigned long long)s.misses);
  check(s.allocated_current > 0, "allocated_bytes current > 0 while tensors live");
  check(s.hits > 0, "cache_hits > 0 after 20 steps");
  check(s.misses > 0, "cache_misses > 0");
  namespace cca = c10::cuda::CUDACachingAllocator;
  if (adaptor) {  // PyTorch's own statistics are tessera's
    const auto agg = static_cast<size_t>(c10::CachingDeviceAllocator::StatType::AGGREGATE);
    const auto torch_stats = cca::getDeviceStats(0);
    check(torch_stats.allocated_bytes[agg].current == s.allocated_current,
          "getDeviceStats allocated_bytes " + std::to_string(torch_stats.allocated_bytes[agg].current) +
              " = tessera's " + std::to_string(s.allocated_current));
    check(torch_stats.requested_bytes[agg].current == s.requested_current,
          "getDeviceStats requested_bytes = tessera's " + std::to_string(s.requested_current));
    check(torch_stats.reserved_bytes[agg].peak == s.reserved_peak, "getDeviceStats reserved_bytes peak = tessera's");
    size_t largest = 0;
    cca::cacheInfo(0, &largest);
    check(largest > 0, "cacheInfo: the largest block without growing is " + std::to_string(largest) + " B");
  }

  // Out of memory surfaces as a C++ exception with PyTorch's wording; CUDA still works after.
  try {
    auto huge = torch::empty({int64_t(1) << 40}, torch::TensorOptions().dtype(torch::kUInt8).device(dev));
    check(false, "1 TiB allocation raised");
  } catch (const c10::OutOfMemoryError& e) {
    check(adaptor, "1 TiB raised c10::OutOfMemoryError (the adaptor's): " + std::string(e.what_without_backtrace()).substr(0, 120));
  } catch (const std::exception& e) {
    std::string msg = e.what();
    check(!adaptor && msg.rfind("CUDA out of memory. Tried to allocate", 0) == 0,
          "1 TiB raised " + std::string(adaptor ? "a plain exception, not OutOfMemoryError: " : "") + msg.substr(0, 120));
  }
  auto a = torch::ones({1024, 1024}, dev);
  check((a.matmul(a) == 1024).all().item<bool>(), "matmul after OOM");
  cca::emptyCache();  // through the reset hook or the adaptor

  if (failures) {
    std::printf("LIBTORCH FAILED (%d)\n", failures);
    return 1;
  }
  std::printf("NOTE: %s: loss %.3f -> %.3f, hits %llu misses %llu\n", mode.c_str(), first, last, (unsigned long long)s.hits,
              (unsigned long long)s.misses);
  std::printf("LIBTORCH OK\n");
  return 0;
}
