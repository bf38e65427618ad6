"""`python -m tessera`: the package's text and the configuration options; `build` builds the
torch adaptor ahead of time."""

import sys

from ._install import build_adaptor
from ._library import options


def _usage():
    opts = options()
    width = max(len(name) for name, _, _ in opts)
    dwidth = max(len("default"), *(len(default) for _, default, _ in opts))
    table = "\n".join(f"  {name:<{width}}  {default:<{dwidth}}  {meaning}" for name, default, meaning in opts)
    return (f"{sys.modules[__package__].__doc__.strip()}\n\n"
            "Configuration: TESSERA_CONF=\"key:value,key:value\" (PyTorch's PYTORCH_CUDA_ALLOC_CONF syntax),\n"
            "or install(conf=...), read once at the first allocation. Byte values take K, M, G, T.\n\n"
            f"  {'key':<{width}}  {'default':<{dwidth}}  meaning\n{table}\n")


def _main(argv):
    if argv[:1] == ["build"]:
        module = build_adaptor(verbose="-v" in argv)
        print(f"tessera: the torch adaptor is built: {module.__file__}")
        return 0
    out = _usage()
    if "--status" in argv:
        out = ("tessera: --status cannot attach to another process. In the process itself, call\n"
               "tessera.monitor(interval_s) or print(tessera.memory_summary()); from outside,\n"
               "start it with TESSERA_CONF=status_interval:N (a status line every N s on stderr).\n\n" + out)
    sys.stdout.write(out)
    return 0
