// The torch adaptor as a Python extension module (built by
// tessera_torch.install() with torch.utils.cpp_extension).
#include <torch/extension.h>

#include "tessera_torch.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tessera as PyTorch's CUDA allocator (the torch adaptor)";
  m.def("install", &tessera::torch_adaptor::install, "Make tessera PyTorch's CUDA allocator (before any CUDA use)");
  m.def("installed", &tessera::torch_adaptor::installed, "Whether install() ran in this process");
}
