"""CUDA graphs with tessera in its default configuration, through the torch adaptor (PyTorch's
graph pools are tessera's pools) and as a plain plug-in (tessera switches graph_pools on at
the first capture_begin), each in its own process: capture a small model step with
torch.cuda.graph, replay it 1000 times while other work allocates and frees around it, and
check that every replay gives bit-identical outputs; then torch.cuda.make_graphed_callables on
an MLP, forward and backward."""

import json
import sys

from gpu_util import check, install, note, run_json, settle

if len(sys.argv) == 1:
    notes = []
    for path in ("adaptor", "plug-in"):
        summary, proc = run_json([sys.executable, __file__, path], timeout=300)  # memcheck: 10-50x
        check(proc.returncode == 0, f"{path} run exited {proc.returncode}")
        notes.append(f"{path}: {summary['note']}")
    note("; ".join(notes))
    print("GRAPHS OK")
    sys.exit(0)

torch, tt = install(adaptor=sys.argv[1] == "adaptor")
check(tt.install() == sys.argv[1], f"installed as {tt.install()}, not {sys.argv[1]}")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)).cuda()
static_in = torch.randn(64, 512, device="cuda")

# Warm up on a side stream, as PyTorch's docs ask, then capture.
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3):
        model(static_in)
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    static_out = model(static_in)
g.replay()
torch.cuda.synchronize()
expected = static_out.clone()

churn = []
for i in range(1000):
    # Other work allocates and frees around the graph, in sizes that would
    # reuse the graph's freed intermediates if they were not private.
    churn.append(torch.randn(64, 2048, device="cuda") * i)
    if len(churn) > 8:
        churn.pop(0)
    g.replay()
    if i % 100 == 0:
        torch.cuda.synchronize()
        check(torch.equal(static_out, expected), f"replay {i} differs from the first")
torch.cuda.synchronize()
check(torch.equal(static_out, expected), "the last replay differs")

# make_graphed_callables: forward and backward captured.
mlp = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
x = torch.randn(32, 256, device="cuda", requires_grad=True)
graphed = torch.cuda.make_graphed_callables(mlp, (x,))
ref = mlp(x).sum()
ref.backward()
ref_grad = x.grad.clone()
x.grad = None
out = graphed(x).sum()
out.backward()
check(torch.allclose(out, ref) and torch.allclose(x.grad, ref_grad), "graphed callable differs from eager")

del g, graphed, static_out
settle(torch)
if sys.argv[1] == "plug-in":  # the graphs' memory stays private until released by hand
    released = f"{tt.release_graph_memory() >> 20} MiB released after"
else:  # PyTorch released the pools itself; nothing is left for the plug-in's call
    check(tt.release_graph_memory() == 0, "the adaptor left memory in the plug-in's graph pools")
    released = "pools released by PyTorch"
print(json.dumps({"note": f"1000 replays bit-identical; make_graphed_callables ok; {released}"}))
