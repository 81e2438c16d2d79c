"""``python -m pdml.info``: what this install of pdml contains and which backend runs where.

Prints the build of the extension ``pdml._C`` (CPU kernels, CUDA kernels and their
architectures), the torch / CUDA / Triton versions, and the backend ``"auto"`` picks for
CPU tensors and for CUDA tensors (with the reason each backend is skipped).
"""
from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Optional

import torch

import pdml
from pdml import ops
from pdml.backends import ext


def _triton_version() -> Optional[str]:
    try:
        import triton  # a dependency on Linux only: elsewhere info says "not installed"
    except ImportError:
        return None
    return triton.__version__


def _describe_build() -> list[str]:
    info = ext.build_info()
    if info is None:
        return [f"pdml._C: not loaded ({ext.LOAD_ERROR})"]
    archs = ext.cuda_archs()
    cuda = ("CUDA kernels for " + ", ".join(f"sm_{a // 10}" for a in archs)) if archs else "no CUDA kernels"
    return [f"pdml._C: {info} (CPU kernels; {cuda})"]


def _auto_choice(t: torch.Tensor) -> list[str]:
    reasons = ops.available_backends(t, "patch_nce")
    lines = []
    for name in ops.auto_order(t):
        why = reasons[name]
        lines.append(f"    {name}: {'runs' if why is None else 'skipped: ' + why}")
    return lines


def report() -> str:
    lines = [f"pdml {pdml.__version__}"]
    lines += _describe_build()
    lines.append(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}), "
                 f"triton {_triton_version() or 'not installed'}, python {sys.version.split()[0]}")
    lines.append(f"CUDA GPU visible: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    cpu = torch.zeros(1)
    lines.append(f"auto -> {ops.resolve_backend('auto', cpu, 'patch_nce').name} for CPU tensors")
    lines += _auto_choice(cpu)
    if torch.cuda.is_available():
        gpu = torch.zeros(1, device="cuda")
        lines.append(f"auto -> {ops.resolve_backend('auto', gpu, 'patch_nce').name} for CUDA tensors")
        lines += _auto_choice(gpu)
    else:
        order = ops.auto_order(SimpleNamespace(device=torch.device("cuda")))
        ext_cuda = "has CUDA kernels" if ext.cuda_archs() else "has no CUDA kernels"
        lines.append(f"auto for CUDA tensors: no GPU visible here; it would try {' > '.join(order)} "
                     f"(pdml._C {ext_cuda})")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
