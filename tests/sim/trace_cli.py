"""What the tests/sim trace generators share: the command line (SEED OUT.trace [N]) and
PyTorch's rounding of request sizes."""

import sys


def rounded(n):
    """A request of n bytes as the allocators see it: a multiple of 512, at least 512."""
    return max(512, (n + 511) // 512 * 512)


def main(doc, trace, default):
    """Writes trace(SEED, N) to OUT, one 'a|f ADDR SIZE STREAM' line per event; N (an int,
    the generator's second argument) defaults to `default`. Wrong arguments print `doc`."""
    if len(sys.argv) not in (3, 4):
        sys.exit(doc)
    n = int(sys.argv[3]) if len(sys.argv) == 4 else default
    with open(sys.argv[2], "w") as f:
        f.write("\n".join(trace(int(sys.argv[1]), n)) + "\n")
