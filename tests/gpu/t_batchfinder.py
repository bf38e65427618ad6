"""Batch-size finder: accelerate's find_executable_batch_size on a training loop that memory
limits (tessera with memory_limit:4G), from batch 4096 down by halving (accelerate 1.x
multiplies by 0.9 by default; the test passes reduce_batch_size_fn to halve).

Two child processes with the same tessera config:
  finder  accelerate's decorator finds the largest batch that runs; afterwards a matmul
          proves that the OOMs on the way left the CUDA context usable;
  hand    the same halving sequence by hand, catching RuntimeError (what the finder must do).
Both must find the same batch size. Without accelerate installed, the finder child uses a
stand-in with accelerate's contract (its OOM test: a RuntimeError with one argument that
contains "CUDA out of memory."; gc + empty_cache; halve) and says so in the note.
"""

import gc
import inspect
import json
import subprocess
import sys

from gpu_util import REPO, check, install, note

CONF = "memory_limit:4G"
START = 4096
SEQ, D, HIDDEN, BLOCKS = 64, 1024, 4096, 4  # ~9 MiB of activations per sample: 256 fits, 512 not


def train_step(torch, batch_size):
    """Two optimizer steps of an MLP on a (batch_size, SEQ, D) batch; everything made inside, so
    that a failure leaves nothing behind once the exception is gone."""
    nn = torch.nn
    model = nn.Sequential(*[nn.Sequential(nn.Linear(D, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D))
                            for _ in range(BLOCKS)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, SEQ, D, device="cuda")
    for _ in range(2):
        loss = model(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return batch_size


def is_oom(e):
    """accelerate's test (accelerate.utils.memory.should_reduce_batch_size), for CUDA."""
    return isinstance(e, RuntimeError) and len(e.args) == 1 and "CUDA out of memory." in e.args[0]


def stand_in_finder(function, starting_batch_size):
    """accelerate's find_executable_batch_size loop, for machines without accelerate."""
    import torch

    def run():
        batch_size = starting_batch_size
        while batch_size > 0:
            try:
                return function(batch_size)
            except Exception as e:
                if not is_oom(e):
                    raise
                gc.collect()
                torch.cuda.empty_cache()
                batch_size //= 2
        raise RuntimeError("No executable batch size found, reached zero.")
    return run


def child(mode):
    torch, tt = install(conf=CONF)
    tried, found, used = [], None, None
    if mode == "finder":
        try:
            from accelerate.utils import find_executable_batch_size
            import accelerate
            used = f"accelerate {accelerate.__version__}"
        except ImportError:
            find_executable_batch_size, used = None, "stand-in (accelerate not installed)"

        def attempt(batch_size):
            tried.append(batch_size)
            return train_step(torch, batch_size)

        if find_executable_batch_size is not None:
            kwargs = {}
            if "reduce_batch_size_fn" in inspect.signature(find_executable_batch_size).parameters:
                # accelerate >= 1.x multiplies by 0.9 unless told otherwise: halve, as documented before.
                kwargs["reduce_batch_size_fn"] = lambda: tried[-1] // 2
            found = find_executable_batch_size(attempt, starting_batch_size=START, **kwargs)()
        else:
            found = stand_in_finder(attempt, START)()
        # The context is not poisoned: compute and check.
        a = torch.ones(1024, 1024, device="cuda")
        check(bool((a @ a).eq(1024.0).all()), "matmul after the finder gave wrong values")
        del a
    else:
        used, batch_size = "by hand", START
        while batch_size > 0:
            tried.append(batch_size)
            try:
                found = train_step(torch, batch_size)
                break
            except RuntimeError as e:
                check(is_oom(e), f"not an OOM: {str(e)[:300]}")
                print(f"batch {batch_size}: {str(e).splitlines()[0][:160]}", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                batch_size //= 2
    s = tt.stats()
    print(json.dumps({"mode": mode, "found": found, "tried": tried, "how": used, "ooms": s["ooms"],
                      "peak_reserved": s["reserved_bytes"]["peak"]}), flush=True)


def run(mode):
    proc = subprocess.run([sys.executable, __file__, mode], cwd=REPO, capture_output=True,
                          text=True, timeout=200)
    sys.stdout.write(proc.stdout[-4000:])
    sys.stderr.write(proc.stderr[-4000:])
    check(proc.returncode == 0, f"{mode} child exited {proc.returncode}")
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])


def main():
    hand = run("hand")
    finder = run("finder")
    print(f"hand:   found {hand['found']} after {hand['tried']}")
    print(f"finder: found {finder['found']} after {finder['tried']} ({finder['how']}), ooms {finder['ooms']}")
    check(finder["tried"] == [START >> i for i in range(len(finder["tried"]))],
          f"the finder did not halve from {START}: {finder['tried']}")
    check(hand["found"] is not None and 0 < hand["found"] < START,
          f"the hand search found {hand['found']}: memory is not the limit of this loop")
    check(finder["found"] == hand["found"], f"finder found {finder['found']}, by hand {hand['found']}")
    check(finder["ooms"] >= len(finder["tried"]) - 1, f"{finder['ooms']} OOMs for {finder['tried']}")
    check(finder["peak_reserved"] <= 4 << 30, "reserved above memory_limit")
    note(f"batch {finder['found']} found by {finder['how']} = by hand, after {finder['ooms']} clean OOMs; "
         f"matmul fine afterwards")
    print("BATCHFINDER OK")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1])
    else:
        main()
