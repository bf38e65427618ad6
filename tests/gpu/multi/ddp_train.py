"""DDP training of GPT-2 small (from its config: no download) under torchrun, with
tessera in every rank (or --native). Rank 0 prints the losses as a JSON line.
    torchrun --nproc_per_node 2 tests/gpu/multi/ddp_train.py [--native] [--steps 20]"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, os.pardir, "python"))
p = argparse.ArgumentParser()
p.add_argument("--native", action="store_true")
p.add_argument("--steps", type=int, default=20)
args = p.parse_args()
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
if not args.native:
    import tessera_torch
    tessera_torch.install()
import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

rank = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl")
torch.manual_seed(0)
torch.use_deterministic_algorithms(True, warn_only=True)
cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024,
                 attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = GPT2LMHeadModel(cfg).cuda()
model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
gen = torch.Generator().manual_seed(1234 + rank)
losses = []
for step in range(args.steps):
    b = int(torch.randint(2, 9, (1,), generator=gen))
    t = int(torch.randint(64, 513, (1,), generator=gen))
    x = torch.randint(0, cfg.vocab_size, (b, t), generator=gen).cuda()
    out = model(input_ids=x, labels=x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    loss = out.loss.detach()
    dist.all_reduce(loss)
    losses.append(loss.item() / dist.get_world_size())
extra = {}
if not args.native:
    s = tessera_torch.stats(rank)
    extra = {"peak_reserved_mib": s["reserved_bytes"]["peak"] / 2**20, "hits": s["cache_hits"], "misses": s["cache_misses"],
             "invalid_frees": s["invalid_frees"]}
else:
    extra = {"peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
if rank == 0:
    print(json.dumps({"allocator": "native" if args.native else "tessera", "losses": losses, **extra}), flush=True)
dist.destroy_process_group()
