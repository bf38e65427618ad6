// tessera_malloc, the entry point PyTorch gets, throws std::runtime_error in
// PyTorch's wording when memory is short, and the process goes on.
#include "tessera.h"
#include <cstdio>
#include <cstring>
#include <stdexcept>

int main() {
    if (tessera_configure("backend:host,page_size:64K,device_capacity:8M,va_size:1G") != 0) return 1;
    void* p = tessera_malloc(4 << 20, 0, nullptr);
    if (!p) return 2;
    try {
        tessera_malloc(16 << 20, 0, nullptr);
        std::puts("FAIL: no exception");
        return 3;
    } catch (const std::runtime_error& e) {
        if (std::strncmp(e.what(), "CUDA out of memory. Tried to allocate 16.00 MiB", 47) != 0) {
            std::printf("FAIL: message %s\n", e.what());
            return 4;
        }
    }
    tessera_free(p, 4 << 20, 0, nullptr);
    void* q = tessera_malloc(8 << 20, 0, nullptr);  // all of it, after the OOM
    if (!q) return 5;
    tessera_free(q, 8 << 20, 0, nullptr);
    std::puts("C++ OOM OK");
    return 0;
}
