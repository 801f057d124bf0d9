"""Builds the optional CUDA extension ``opd_kernels._C``; the Python packages install either way.

Environment:
  OPD_SKIP_CUDA_BUILD=1   never build the extension (pure-Python install)
  OPD_FORCE_BUILD=1       build even without a visible GPU (needs a CUDA torch and nvcc); fail loudly
  OPD_CUDA_ARCHS="80;90"  compute capabilities to compile for (default 8.0 and 9.0)
"""
import glob
import os
import warnings

from setuptools import setup

ext_modules, cmdclass = [], {}
force = os.environ.get("OPD_FORCE_BUILD", "0") == "1"
if os.environ.get("OPD_SKIP_CUDA_BUILD", "0") != "1" and glob.glob("csrc/*.cu"):
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError(f"torch CUDA build: {torch.version.cuda}, CUDA_HOME: {CUDA_HOME}")
        if not (force or torch.cuda.is_available()):
            raise RuntimeError("no CUDA device visible (set OPD_FORCE_BUILD=1 to compile anyway)")
        archs = [a.replace(".", "") for a in
                 os.environ.get("OPD_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
        # SASS for each listed arch, plus PTX of the newest so later GPUs can JIT it.
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        # No -std flag: torch's cpp_extension picks the standard its headers need (C++20 for 2.14).
        ext_modules.append(
            CUDAExtension(
                "opd_kernels._C",
                sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")),
                extra_compile_args={"cxx": ["-O3", f'-DOPD_CUDA_ARCHS_STR="{";".join(archs)}"'],
                                    "nvcc": ["-O3", "--use_fast_math", *gencode]},
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "no extension", unless forced
        if force:
            raise
        warnings.warn(f"opd-kernels: skipping the CUDA extension ({exc}); impl='cuda' will be unavailable")

setup(ext_modules=ext_modules, cmdclass=cmdclass)
