"""CUDA graphs with tessera in its default configuration (tessera_torch switches graph_pools
on at the first capture_begin): capture a small model step with
torch.cuda.graph, replay it 1000 times while other work allocates and frees
around it, and check that every replay gives bit-identical outputs; then
torch.cuda.make_graphed_callables on an MLP, forward and backward."""

from gpu_util import check, install, note, settle

torch, tt = install()
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
released = tt.release_graph_memory()
note(f"1000 replays bit-identical with churn around; make_graphed_callables ok; {released >> 20} MiB released after")
