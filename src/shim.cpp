// Throws the C++ exception that PyTorch turns into a Python RuntimeError.
// Called only from tessera_malloc (src/ffi.rs, declared "C-unwind" so the
// exception may pass its single frame, which holds nothing to drop).
#include <stdexcept>

extern "C" [[noreturn]] void tessera_throw_runtime_error(const char* message) {
    throw std::runtime_error(message);
}
