"""Builds libtessera.so with cargo into the `tessera` package (setuptools-rust, NoBinding: a
plain shared library that the package loads with ctypes; tagged abi3, so one wheel serves every
CPython from 3.9), and places the torch adaptor's sources and the C header beside it."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools_rust import Binding, RustExtension, Strip

HERE = os.path.dirname(os.path.abspath(__file__))
ADAPTOR = ["adaptor/tessera_torch.cpp", "adaptor/tessera_torch.h", "adaptor/python_module.cpp", "include/tessera.h"]


class BuildPy(build_py):
    """build_py that also copies the adaptor's sources into tessera/adaptor/."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "tessera", "adaptor")
        os.makedirs(dest, exist_ok=True)
        for path in ADAPTOR:
            shutil.copy(os.path.join(HERE, path), dest)


setup(
    rust_extensions=[RustExtension("tessera.libtessera", path="Cargo.toml", binding=Binding.NoBinding,
                                   py_limited_api=True, strip=Strip.Debug)],
    cmdclass={"build_py": BuildPy},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    zip_safe=False,
)
