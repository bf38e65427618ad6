"""What one cuMemGetInfo costs, against a trivial driver call (a tool, not a test): tessera asks it
when memory may be near its end, on the growth path only."""
import ctypes, time, torch
torch.cuda.init(); torch.empty(1, device="cuda")
lib = ctypes.CDLL("libcuda.so.1")
free, total = ctypes.c_size_t(), ctypes.c_size_t()
n = 2000
t = time.perf_counter()
for _ in range(n):
    lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
dt = (time.perf_counter() - t) / n
t = time.perf_counter()
for _ in range(n):
    lib.cuCtxGetDevice(ctypes.byref(ctypes.c_int()))
base = (time.perf_counter() - t) / n
print(f"cuMemGetInfo {dt*1e6:.1f} us per call (a trivial driver call through ctypes: {base*1e6:.1f} us)")
