"""Packaging glue that pyproject.toml cannot express.

* ``kernels/`` (Triton device code) installs as ``peftops.kernels``.
* ``csrc/`` holds optional CUDA C++ ops. It is built only when it contains a real op
  (a ``*.cu`` file) and a CUDA toolkit is present; the package works without it.
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
if any(s.endswith(".cu") for s in sources) and os.environ.get("PEFTOPS_NO_CUDA_EXT") != "1":
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

        if CUDA_HOME is not None:
            ext_modules = [CUDAExtension("peftops._C", sources)]
            cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    except ImportError:  # torch missing at build time: pure-Python install
        pass

setup(
    packages=[
        "peftops",
        "peftops.ops",
        "peftops.nn",
        "peftops.integrations",
        "peftops.benchmarks",
        "peftops.kernels",
    ],
    package_dir={"peftops.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
