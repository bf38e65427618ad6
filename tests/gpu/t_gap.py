"""Gap placement on the real GPU (2 MiB pages, every handle one page, exact growth): under a
cap, a request that needs one page more than is free is served across a gap, starting in the
free tail of a page that a live tensor pins (case 1) or ending in the free head of one, the
back of a hole mapped (case 2). The pinning tensors keep their data; the new ones are fully
writable. The same two cases as tests/host_data.rs's under_pressure_* tests, in pages of 2 MiB."""

from gpu_util import MiB, check, install, note, settle

torch, tt = install(conf="growth_size:0,max_handle_size:2M")
P = 2 * MiB
total = torch.cuda.get_device_properties(0).total_memory


def cap_pages(n):
    """tessera's cap at n pages (half a page above, so that rounding cannot take one away)."""
    torch.cuda.set_per_process_memory_fraction((n * P + P // 2) / total)


def empty(nbytes, stream, value):
    with torch.cuda.stream(stream):
        t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        t.fill_(value)
    return t


def uniform(t, v):
    torch.cuda.synchronize()
    return t.min().item() == v and t.max().item() == v


def gaps():
    return tt.stats()["gap_placements"]


def reserved_pages():
    return tt.stats()["reserved_bytes"]["current"] // P


sA, sB, sC = torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()
keep = torch.zeros(1, device="cuda")  # the small arena's page, for the checks' own temporaries

# Case 1: x pins 2 pages and leaves 1 MiB of the second free.
cap_pages(17)
x = empty(3 * MiB, sA, 7)
z = empty(28 * MiB, sA, 8)
del z
settle(torch)
torch.cuda.empty_cache()
check(reserved_pages() == 3, f"after empty_cache: {reserved_pages()} pages held, expected 3")
g0 = gaps()
r = empty(28 * MiB + MiB // 2, sB, 9)  # 15 fresh pages; 14 free
check(gaps() == g0 + 1, "the request was not served across the gap")
check(r.data_ptr() == x.data_ptr() + 3 * MiB, "the request does not start in x's last page")
check(uniform(x, 7), "x changed")
check(uniform(r, 9), "the new tensor reads back wrong")
del x, r
settle(torch)
torch.cuda.empty_cache()

# Case 2: y's first page has its first 1 MiB free, after a 9-page hole.
cap_pages(40)
l = empty(8 * MiB, sC, 1)
s3 = empty(2 * MiB, sC, 2)
p = empty(19 * MiB, sA, 3)
y = empty(3 * MiB, sA, 4)
base = l.data_ptr()
check((s3.data_ptr(), p.data_ptr(), y.data_ptr()) == (base + 8 * MiB, base + 10 * MiB, base + 29 * MiB),
      "unexpected layout: " + str([t.data_ptr() - base for t in (s3, p, y)]))
del l, p
settle(torch)
torch.cuda.empty_cache()
k = empty(8 * MiB, sC, 5)
check(k.data_ptr() == base, "the 4-page tensor did not take the 4-page hole")
check(reserved_pages() == 8, f"{reserved_pages()} pages held, expected 8")
cap_pages(13)  # 5 pages free
g0 = gaps()
r2 = empty(10 * MiB + MiB // 2, sB, 6)  # 6 fresh pages
check(gaps() == g0 + 1, "the request was not served across the gap")
check(r2.data_ptr() == y.data_ptr() - 11 * MiB, "the request does not end in y's first page")
for t, v, name in ((s3, 2, "s3"), (y, 4, "y"), (k, 5, "k"), (r2, 6, "the new tensor")):
    check(uniform(t, v), f"{name} reads back wrong")
note(f"2 requests served across gaps (the tail and the head of pinned pages); {gaps()} gap placements, data intact")
