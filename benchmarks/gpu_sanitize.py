"""One small fused call (forward + backward) of every pdml kernel on the GPU, for
``compute-sanitizer --tool memcheck python -m benchmarks.gpu_sanitize`` (run_gpu.sh part2).

Each public op runs once per GPU backend that is available ("triton", "ext"), fp32 and
bf16, odd sizes (B=2, C=40, 9×11 maps, N=70 ids; rows form R=140), so an out-of-bounds
access at a tile edge shows. Prints one line per call and "ok" at the end; a backend that
is not available is named with its reason.
"""
from __future__ import annotations

import torch

from pdml import ops


def _calls(backend: str, dtype: torch.dtype):
    def maps():
        fq = torch.randn(2, 40, 9, 11, device="cuda", dtype=dtype, requires_grad=True)
        fk = torch.randn(2, 40, 9, 11, device="cuda", dtype=dtype, requires_grad=True)
        return fq, fk, torch.randperm(99, device="cuda")[:70]

    def rows():
        q = torch.randn(140, 40, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(140, 40, device="cuda", dtype=dtype, requires_grad=True)
        return q, k

    for negatives in ("image", "batch"):
        yield f"patch_nce {negatives}", lambda n=negatives: ops.patch_nce(*maps(), negatives=n, backend=backend).mean()
        yield f"patch_metric {negatives}", lambda n=negatives: ops.patch_metric(*maps(), negatives=n, backend=backend)
        yield f"patch_nce_rows {negatives}", lambda n=negatives: ops.patch_nce_rows(
            *rows(), batch_size=2, negatives=n, backend=backend).mean()
        yield f"patch_metric_rows {negatives}", lambda n=negatives: ops.patch_metric_rows(
            *rows(), batch_size=2, negatives=n, backend=backend)
    yield "patch_similarity", lambda: ops.patch_similarity(*maps(), backend=backend).float().mean()
    if hasattr(ops, "gather_project"):
        def gather():
            fmap = torch.randn(2, 40, 9, 11, device="cuda", dtype=dtype, requires_grad=True)
            weight = torch.randn(24, 40, device="cuda", dtype=dtype, requires_grad=True)
            bias = torch.randn(24, device="cuda", dtype=dtype, requires_grad=True)
            ids = torch.randperm(99, device="cuda")[:70]
            return ops.gather_project(fmap, ids, weight, bias, backend=backend).float().mean()
        yield "gather_project", gather


def main() -> int:
    torch.manual_seed(0)
    probe = torch.zeros(1, device="cuda")
    failures = 0
    for backend, why_not in ops.available_backends(probe).items():
        if backend == "reference":
            continue
        if why_not is not None:
            print(f"{backend}: not available ({why_not})")
            continue
        for dtype in (torch.float32, torch.bfloat16):
            for name, call in _calls(backend, dtype):
                try:
                    call().float().backward()
                    torch.cuda.synchronize()
                    print(f"{backend} {str(dtype)[6:]} {name}: ran")
                except Exception as e:  # a refused shape is a finding, not a reason to stop
                    failures += 1
                    print(f"{backend} {str(dtype)[6:]} {name}: FAILED {type(e).__name__}: {e}")
    print("ok" if failures == 0 else f"{failures} call(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
