// tessera as PyTorch's own CUDA allocator (the torch adaptor): a
// c10::cuda::CUDACachingAllocator::CUDAAllocator over tessera's C ABI, so
// that torch.cuda.memory_stats(), memory snapshots and history, OutOfMemoryError,
// cudnn.benchmark, CUDA graph pools, MemPool and torch.compile's cudagraph
// trees work unchanged. Compiled against the torch it runs with: by the
// Python package (tessera_torch.install()) or with a LibTorch application.
//
// LibTorch:
//   #include "tessera_torch.h"
//   tessera::torch_adaptor::install();   // before any CUDA use
#pragma once

#include <string>

namespace tessera::torch_adaptor {

// Makes tessera PyTorch's CUDA allocator. Throws c10::Error if CUDA is
// already initialised in the process (PyTorch swaps its allocator only
// before first use) or tessera cannot start.
void install();

// Whether install() ran in this process.
bool installed();

}  // namespace tessera::torch_adaptor
