"""Builds pdml and its optional extension ``pdml._C`` (docs/layout.md).

- CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are always built.
- CUDA kernels (``csrc/cuda/*.cu``) are built when torch is a CUDA build and nvcc is
  found (``CUDA_HOME``, else ``/usr/local/cuda``); with no GPU visible the target
  architectures default to sm_80 and sm_90 (``TORCH_CUDA_ARCH_LIST`` overrides).
- ``PDML_SKIP_EXT=1`` builds no extension (pdml then runs on the reference backend);
  ``PDML_SKIP_CUDA=1`` builds the CPU kernels only.

Build against the installed torch: ``pip install --no-build-isolation .``
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_HOME = "/usr/local/cuda"
DEFAULT_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _say(msg: str) -> None:
    print(f"[pdml build] {msg}", file=sys.stderr, flush=True)


def _pip_cuda_includes():
    """CUDA headers shipped by the pip ``nvidia-*`` wheels (cuBLAS, cuSPARSE, ...), which a
    minimal toolkit lacks but torch's headers include."""
    dirs = []
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _extensions():
    if _flag("PDML_SKIP_EXT"):
        _say("PDML_SKIP_EXT=1: building no extension (reference backend only)")
        return [], {}
    if not os.environ.get("CUDA_HOME") and os.path.exists(os.path.join(DEFAULT_CUDA_HOME, "bin", "nvcc")):
        os.environ["CUDA_HOME"] = DEFAULT_CUDA_HOME
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    why_no_cuda = None
    if _flag("PDML_SKIP_CUDA"):
        why_no_cuda = "PDML_SKIP_CUDA=1"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is not a CUDA build"
    elif not cpp_extension.CUDA_HOME or not os.path.exists(nvcc):
        why_no_cuda = "nvcc not found (set CUDA_HOME)"
    with_cuda = why_no_cuda is None

    # -fno-trapping-math (as torch itself is built) lets GCC if-convert and vectorise the
    # CPU kernels' per-tile loops (csrc/cpu/); it changes no result.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    extra = {"cxx": cxx}
    define_macros = [("Py_LIMITED_API", "0x030A0000")]
    include_dirs = [os.path.join(HERE, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch's build helper asks the (absent) GPU for its arch otherwise.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        include_dirs += _pip_cuda_includes()
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        define_macros.append(("PDML_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
        sources += cuda_sources
        _say(f"CUDA kernels ON: CUDA_HOME={cpp_extension.CUDA_HOME}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}), TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')!r}")
    else:
        ext_cls = cpp_extension.CppExtension
        _say(f"CUDA kernels OFF ({why_no_cuda}); CPU kernels only, torch {torch.__version__}")
    _say(f"sources: {' '.join(sources)}")
    ext = ext_cls(
        "pdml._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
