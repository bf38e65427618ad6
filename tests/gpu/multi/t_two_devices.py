"""Two GPUs in one process with tessera: per-device pools and stats, the device
argument honoured, frees from a thread whose current device is the other one,
copies between devices (peer access is PyTorch's business)."""
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
from gpu_util import MiB, check, install, note, settle  # noqa: E402

torch, tt = install()
check(torch.cuda.device_count() >= 2, f"needs 2 GPUs, found {torch.cuda.device_count()}")
a = torch.full((64 * MiB,), 1, dtype=torch.uint8, device="cuda:0")
b = torch.full((96 * MiB,), 2, dtype=torch.uint8, device="cuda:1")
s0, s1 = tt.stats(0), tt.stats(1)
check(s0["allocated_bytes"]["current"] >= 64 * MiB, "device 0 stats")
check(s1["allocated_bytes"]["current"] >= 96 * MiB, "device 1 stats")
check(s1["allocated_bytes"]["current"] < s0["allocated_bytes"]["current"] + 96 * MiB + 64 * MiB, "stats mixed across devices")
c = b.to("cuda:0")
check(bool(c.eq(2).all()), "copy from device 1 to 0")

# Free device-1 tensors from a thread whose current device is 0, many times.
errors = []
def worker():
    try:
        torch.cuda.set_device(0)
        for i in range(200):
            t = torch.full((MiB + i * 4096,), 3, dtype=torch.uint8, device="cuda:1")
            check(bool(t.eq(3).all()), "device-1 tensor from a device-0 thread")
            del t
    except Exception as e:  # noqa: BLE001
        errors.append(repr(e))
th = threading.Thread(target=worker)
th.start()
th.join()
check(not errors, f"thread errors: {errors}")
del b
settle(torch)
torch.cuda.synchronize(1)
before = tt.stats(1)["allocated_bytes"]["current"]
check(before == 0, f"device 1 allocated {before} after every tensor died")
check(tt.stats(1)["invalid_frees"] == 0 and tt.stats(0)["invalid_frees"] == 0, "invalid frees")
check(tt.stats(1)["mismatched_frees"] == 0, "frees reached the wrong device")
note("two devices: per-device stats, cross-thread frees clean")
