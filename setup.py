"""Build maskedssl, with the CUDA extension ``maskedssl._C`` from ``csrc/`` when it can be built.

MASKEDSSL_BUILD_CUDA: unset -> build when torch is a CUDA build and nvcc is found;
                      0 -> pure Python; 1 -> a missing toolchain is an error.
TORCH_CUDA_ARCH_LIST: defaults to "8.0;9.0" (A100, H100/H200).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

PACKAGES = ["maskedssl", "maskedssl.ops", "maskedssl.models", "maskedssl.kernels"]
PACKAGE_DIR = {"maskedssl": "maskedssl", "maskedssl.kernels": "kernels"}


def _want_cuda():
    flag = os.environ.get("MASKEDSSL_BUILD_CUDA", "").strip()
    if flag == "0":
        return False
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if flag == "1":
            sys.exit("MASKEDSSL_BUILD_CUDA=1 but torch is not importable at build time "
                     "(install with --no-build-isolation)")
        return False
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    reason = None
    if torch.version.cuda is None:
        reason = "torch is not a CUDA build"
    elif not nvcc and shutil.which("nvcc") is None:
        reason = "nvcc not found (set CUDA_HOME)"
    if reason is None:
        return True
    if flag == "1":
        sys.exit(f"MASKEDSSL_BUILD_CUDA=1 but {reason}")
    print(f"maskedssl: skipping the CUDA extension: {reason}", file=sys.stderr)
    return False


def _cuda_extension():
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    include_dirs = []
    # pip's CUDA wheels keep headers (cusparse.h, ...) that ATen's CUDA headers include.
    import nvidia  # noqa: F401  (present in every CUDA build of torch from pip)

    for root in getattr(nvidia, "__path__", []):
        include_dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")))
    # Some toolkits keep their libraries in lib/ rather than lib64/.
    library_dirs = [d for d in (os.path.join(CUDA_HOME, "lib"), os.path.join(CUDA_HOME, "lib64"))
                    if os.path.isdir(d)]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        name="maskedssl._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension() if _want_cuda() else ([], {})

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
