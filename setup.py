"""Builds lrkern and its C++ CPU extension ``lrkern._C`` against the torch already installed.

Install with ``pip install -e . --no-build-isolation`` after torch, so the build never pulls a second torch.
``LRKERN_SKIP_EXT=1`` skips the extension (the package then runs its reference path on CPU).
``LRKERN_CPU_ARCH`` sets ``-march`` (default ``native``: the extension is built on the machine that runs it).
"""
import os
import sys
from glob import glob

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# The Triton kernels live in lrkern/kernels, never in a top-level ``kernels`` folder: that import name belongs to
# another PyPI project which transformers imports, and a repo-root folder would shadow it for any script run there.
# find_packages installs every subpackage (lrkern.lance, lrkern.spiking, lrkern.data, ...), so a new one is never
# left out of a non-editable install.
packages = find_packages(include=["lrkern", "lrkern.*"])



class BuildPyWithCudaSources(build_py):
    """Ships the CUDA C kernels (``csrc/cuda/*.cu``, self-contained: no includes) inside the package as
    ``lrkern/_cuda/`` for non-editable installs; their launchers compile them at run time with CuPy (NVRTC) and look
    there when the source tree is absent (``lrkern.kernels.cuda_lif.source_path``)."""

    def run(self):
        super().run()
        if self.dry_run:
            return
        dest = os.path.join(self.build_lib, "lrkern", "_cuda")
        self.mkpath(dest)
        for src in sorted(glob("csrc/cuda/*.cu")):
            self.copy_file(src, os.path.join(dest, os.path.basename(src)))


ext_modules, cmdclass = [], {"build_py": BuildPyWithCudaSources}
if os.environ.get("LRKERN_SKIP_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        sys.exit("lrkern: install torch first (e.g. pip install torch==2.13.0), then "
                 "`pip install -e . --no-build-isolation`")
    arch = os.environ.get("LRKERN_CPU_ARCH", "native")
    ext_modules.append(CppExtension(
        "lrkern._C",
        sorted(glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"],
        include_dirs=[os.path.abspath("csrc")],
        # -ffp-contract=off: the codes of quant_pack must be bit-identical across backends, so no FMA contraction.
        extra_compile_args=["-O3", "-fopenmp", f"-march={arch}", "-ffp-contract=off", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    ))
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    name="lrkern",
    version="0.1.0",
    description="Fused kernels (Triton, C++, CUDA C) for low-rank, low-bit and spiking efficiency methods",
    packages=packages,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "triton": ["triton"],
                    "kvlinc": ["transformers>=5.17,<5.26", "safetensors", "tqdm", "gguf", "accelerate"]},
    entry_points={"console_scripts": ["lrkern = lrkern.cli:main"]},
    package_data={"lrkern.kvlinc": ["assets/*.safetensors", "assets/*.md"]},
)
