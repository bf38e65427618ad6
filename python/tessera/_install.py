"""Installing tessera as PyTorch's CUDA allocator: through the torch adaptor (compiled with
torch.utils.cpp_extension against the torch in the process, cached), or as a plain
CUDAPluggableAllocator where the adaptor cannot be built. install() runs once per process,
before CUDA is initialised; it is the only place that imports torch on its own."""

import os
import sys

from . import _library
from ._library import check_config, config_warnings, configure, last_error, load


_allocator = None    # what install() installed: "adaptor" or "plug-in"


# What only the torch adaptor gives, for the plain plug-in's one line.
_PLAIN_LACKS = ("torch.cuda.memory_stats() and what is built on it, memory snapshots and history, "
                "torch.cuda.OutOfMemoryError, cudnn.benchmark, torch.compile(mode='reduce-overhead'), "
                "MemPool (tessera.memory_stats() and its peers work)")


def _adaptor_sources():
    """The torch adaptor's sources and include folders: beside this module in a package,
    else in the repository."""
    for root in (os.path.join(_library._HERE, "adaptor"), os.path.join(_library._HERE, os.pardir, os.pardir, "adaptor")):
        if os.path.isfile(os.path.join(root, "tessera_torch.cpp")):
            root = os.path.abspath(root)
            header = os.path.join(root, "tessera.h")
            include = root if os.path.isfile(header) else os.path.join(root, os.pardir, "include")
            return root, os.path.abspath(include)
    return None, None


# The oldest PyTorch whose CUDAAllocator interface the adaptor implements (2.11 is tested;
# newer ones are compiled and, where the interface changed, fail and fall back).
MIN_TORCH = (2, 11)


def _torch_version(text):
    """(major, minor) of a torch version string such as "2.11.0+cu130" or "2.12.0a0+git..."."""
    import re

    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _adaptor_name(torch, root, include):
    """The adaptor's module name: torch's version and a hash of what it is built from (its
    sources, tessera.h, and the libtessera.so it links, by path: a module linked with another
    copy of the library would load that copy beside this one)."""
    import hashlib

    digest = hashlib.sha1(os.path.realpath(_library._lib_path).encode())
    sources, headers = _adaptor_files(root, include)
    for path in sources + headers:
        with open(path, "rb") as f:
            digest.update(f.read())
    tag = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    return f"tessera_adaptor_{tag}_{digest.hexdigest()[:10]}"


def _adaptor_files(root, include):
    """The adaptor's (sources, headers) as paths."""
    sources = [os.path.join(root, "tessera_torch.cpp"), os.path.join(root, "python_module.cpp")]
    return sources, [os.path.join(include, "tessera.h"), os.path.join(root, "tessera_torch.h")]


def _cached_adaptor(cpp_extension, name):
    """The adaptor built before under this name, imported without asking ninja (whose check
    costs a second or more at every start), or None (never built, or built only in part)."""
    import importlib.util

    try:
        build_dir = cpp_extension._get_build_directory(name, verbose=False)
    except Exception:  # a torch without this private helper: let load() decide
        return None
    path = os.path.join(build_dir, name + ".so")
    if not os.path.isfile(path):
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:  # a build cut short: let load() build it again
        return None
    sys.modules[name] = module
    return module


def _missing_tools():
    """Why the adaptor cannot be compiled here ("" if the tools are on PATH): cpp_extension
    needs a C++ compiler ($CXX, else c++) and ninja."""
    import shutil

    cxx = os.environ.get("CXX", "c++")
    missing = []
    if shutil.which(cxx) is None:
        missing.append(f"no C++ compiler ({cxx})")
    if shutil.which("ninja") is None:
        missing.append("no ninja")
    return " and ".join(missing) + (" on PATH" if missing else "")


def build_adaptor(verbose=False):
    """Compile the torch adaptor (adaptor/*.cpp: PyTorch's CUDAAllocator over tessera) against the
    torch in this process with torch.utils.cpp_extension, cached per torch version, sources and
    library (TORCH_EXTENSIONS_DIR), and import it. Returns the module. `python -m tessera build`
    does this ahead of time; a cached build is imported with no compiler needed."""
    import torch
    from torch.utils import cpp_extension

    root, include = _adaptor_sources()
    if root is None:
        raise FileNotFoundError("the torch adaptor's sources (adaptor/tessera_torch.cpp) are not here")
    load()
    if _torch_version(torch.__version__) < MIN_TORCH:
        raise RuntimeError(f"the torch adaptor needs PyTorch {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer "
                           f"(its CUDAAllocator interface); this is {torch.__version__}")
    name = _adaptor_name(torch, root, include)
    module = _cached_adaptor(cpp_extension, name)
    if module is not None:
        return module
    missing = _missing_tools()
    if missing:
        raise RuntimeError(missing)
    return cpp_extension.load(
        name=name, sources=_adaptor_files(root, include)[0], extra_include_paths=[include, root],
        extra_cflags=["-O2"], extra_ldflags=[_library._lib_path, "-Wl,-rpath," + os.path.dirname(_library._lib_path)],
        with_cuda=True, verbose=verbose)  # CUDA's headers (the adaptor asks the runtime for free memory)


def install(lib_path=None, conf=None, adaptor=True):
    """Make tessera PyTorch's CUDA allocator. Call before anything initialises CUDA.

    By default tessera is installed through the torch adaptor, compiled on first use against
    this torch (a C++ compiler and ninja are needed once; the build is cached): PyTorch's own
    memory APIs then work unchanged. Where it cannot be built, or with adaptor=False, tessera
    is installed as a plain CUDAPluggableAllocator; falling back, it says in one line on stderr
    why, and which of PyTorch's APIs then do not work. Returns "adaptor" or "plug-in" (calling
    again returns the same)."""
    global _allocator
    lib = load(lib_path)
    if _allocator is not None:
        if conf is not None:
            raise RuntimeError("tessera is already installed; conf can no longer change")
        return _allocator
    if conf is not None:
        configure(conf)
    check_config()
    for warning in config_warnings():  # PyTorch's keys pasted in that do not apply
        print(warning, file=sys.stderr)

    import torch  # lazily: the rest of the module works without torch

    if torch.cuda.is_initialized():
        raise RuntimeError(
            "tessera.install() must run before CUDA is initialised in this process "
            "(no CUDA tensor, torch.cuda.current_device(), set_device, ... before it): "
            "PyTorch can swap its allocator only once, before first use")
    if adaptor:
        try:
            module = build_adaptor()
        except Exception as e:  # no compiler, or a torch whose interface the adaptor does not know
            text = str(e).strip()
            why = text.splitlines()[-1][:200] if text else type(e).__name__
            print(f"tessera: installed as a plain plug-in: the torch adaptor could not be built ({why}); "
                  f"then these need the adaptor: {_PLAIN_LACKS}", file=sys.stderr)
        else:
            module.install()
            _allocator = "adaptor"
            return _allocator
    alloc = torch.cuda.memory.CUDAPluggableAllocator(_library._lib_path, "tessera_malloc", "tessera_free")
    hooks = alloc.allocator()
    hooks.set_reset_fn(_library._fn_ptr(lib, "tessera_empty_cache"))            # torch.cuda.empty_cache()
    hooks.set_record_stream_fn(_library._fn_ptr(lib, "tessera_record_stream"))  # Tensor.record_stream()
    hooks.set_init_fn(_library._fn_ptr(lib, "tessera_init"))                    # CUDA lazy init
    hooks.set_memory_fraction_fn(_library._fn_ptr(lib, "tessera_set_memory_fraction"))  # set_per_process_memory_fraction
    torch.cuda.memory.change_current_allocator(alloc)  # PyTorch holds alloc from here on
    _watch_graph_captures(torch, lib)
    _allocator = "plug-in"
    return _allocator


def _watch_graph_captures(torch, lib):
    """Before the first CUDA graph capture (torch.cuda.graph, make_graphed_callables, or
    CUDAGraph.capture_begin itself), switch tessera's graph_pools on: memory the capture uses
    stays private to it. A pluggable allocator gets no hook of its own for captures."""
    cls = torch.cuda.graphs.CUDAGraph
    original = cls.capture_begin
    if getattr(original, "_tessera_watch", False):
        return

    def capture_begin(self, *args, **kwargs):
        if lib.tessera_watch_graphs() != 0:
            raise RuntimeError(f"tessera could not watch graph captures: {last_error()}")
        return original(self, *args, **kwargs)

    capture_begin._tessera_watch = True
    capture_begin.__doc__ = original.__doc__
    cls.capture_begin = capture_begin


def release_graph_memory():
    """Declare that every CUDA graph captured so far is destroyed (del the torch.cuda.CUDAGraph
    objects first): the memory tessera kept private to them becomes reusable. Returns the bytes."""
    n = load().tessera_release_graph_pools()
    if n < 0:
        raise RuntimeError(last_error())
    return n
