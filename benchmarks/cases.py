"""Op-level benchmark cases: shapes, backends, and the callable each case times.

A case is a plain dict (so a subprocess can rebuild it for the memory probe):
``op`` (patch_metric | patch_nce), ``mode`` (fwd | fwd+bwd), ``shape`` (a key of
SHAPES), ``backend`` (see BACKENDS), ``dtype``, ``device``, ``negatives``.
Each layer has its own ``[B, C, 64, 64]`` maps and ``N`` distinct ids; a call runs
every layer and sums the (mean) losses, as a training step does.
"""
from __future__ import annotations

import os

import torch

import pdml

SHAPES = {
    "paper": dict(B=8, N=128, C=128, layers=2),     # the paper: 2 layers × 128 patches
    "cut-b1": dict(B=1, N=256, C=256, layers=5),    # CUT: 5 layers × 256 patches
    "cut-b4": dict(B=4, N=256, C=256, layers=5),
    "large": dict(B=8, N=4096, C=256, layers=1),    # every position of a 64×64 map
    "large-cpu": dict(B=2, N=4096, C=128, layers=1),  # the large case shrunk for a 2-core CPU
}
MAP_HW = (64, 64)

BACKENDS = {
    # name: (pdml backend, torch.compile mode or None)
    "reference": ("reference", None),
    "reference-compile": ("reference", "default"),
    "reference-compile-ro": ("reference", "reduce-overhead"),
    "triton": ("triton", None),
    "ext": ("ext", None),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shapes_for(device: str) -> list[str]:
    return ["paper", "cut-b1", "cut-b4", "large" if device == "cuda" else "large-cpu"]


def backends_for(device: str) -> list[str]:
    probe = torch.zeros(1, device=device)
    available = pdml.ops.available_backends(probe)
    names = ["reference", "reference-compile"]
    if device == "cuda":
        names.append("reference-compile-ro")
    names += [b for b in ("triton", "ext") if available[b] is None]
    return names


def dtypes_for(device: str) -> list[str]:
    """fp32 (and bf16 on a GPU); ``PDML_BENCH_DTYPES=fp32,bf16,fp16`` chooses others
    (benchmarks/run_gpu.sh runs all three)."""
    chosen = os.environ.get("PDML_BENCH_DTYPES")
    if not chosen:
        return ["fp32", "bf16"] if device == "cuda" else ["fp32"]
    names = [d.strip() for d in chosen.split(",") if d.strip()]
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        raise ValueError(f"PDML_BENCH_DTYPES: unknown dtype(s) {unknown}; known: {sorted(DTYPES)}")
    return names


def all_cases(device: str) -> list[dict]:
    return [dict(op=op, mode=mode, shape=shape, backend=backend, dtype=dtype, device=device,
                 negatives="image")
            for shape in shapes_for(device)
            for op in ("patch_metric", "patch_nce")
            for mode in ("fwd", "fwd+bwd")
            for dtype in dtypes_for(device)
            for backend in backends_for(device)]


def case_id(case: dict) -> str:
    return f"{case['op']}-{case['mode']}-{case['shape']}-{case['dtype']}-{case['backend']}"


def flops(case: dict) -> float:
    """Multiply-add FLOPs of the N×N products (what a fused kernel must do at least).

    Forward: metric computes S_qq and S_kk, NCE S_qk (2·n²·C each per group). Backward
    recomputes them and multiplies the weights back into q (and k): 2× more for each.
    """
    s = SHAPES[case["shape"]]
    groups, n = (s["B"], s["N"]) if case["negatives"] == "image" else (1, s["B"] * s["N"])
    products = 2 if case["op"] == "patch_metric" else 1
    per_product = 2.0 * groups * n * n * s["C"]
    factor = 1 if case["mode"] == "fwd" else 3
    return s["layers"] * products * per_product * factor


def min_bytes(case: dict) -> float:
    """Bytes a fused implementation must move at least: read the gathered rows of both
    maps; for the backward read them again and write the (dense) map gradients."""
    s = SHAPES[case["shape"]]
    elt = torch.finfo(DTYPES[case["dtype"]]).bits // 8
    rows = 2 * s["B"] * s["N"] * s["C"] * elt
    if case["mode"] == "fwd":
        return s["layers"] * rows
    grad_maps = (2 if case["op"] == "patch_metric" else 1) * s["B"] * s["C"] * MAP_HW[0] * MAP_HW[1] * elt
    return s["layers"] * (2 * rows + grad_maps)


def _layer_loss(op_name: str, backend: str, negatives: str):
    """``(fq, fk, ids) -> scalar`` of one layer (compiled once, called for every layer)."""
    op = getattr(pdml.ops, op_name)

    def layer_loss(fq, fk, ids):
        return op(fq, fk, ids, negatives=negatives, backend=backend).mean()

    return layer_loss


def build_case(case: dict, pool: int = 2):
    """A zero-argument callable that runs ``case`` once on the next of ``pool`` input sets."""
    s = SHAPES[case["shape"]]
    device, dtype = case["device"], DTYPES[case["dtype"]]
    backend, compile_mode = BACKENDS[case["backend"]]
    backward = case["mode"] == "fwd+bwd"
    g = torch.Generator().manual_seed(0)
    h, w = MAP_HW

    def make_layer():
        fq = torch.randn(s["B"], s["C"], h, w, generator=g).to(device=device, dtype=dtype)
        fk = (fq.float() + torch.randn(s["B"], s["C"], h, w, generator=g).to(device)).to(dtype)
        ids = torch.randperm(h * w, generator=g)[: s["N"]].to(device)
        fq.requires_grad_(backward)
        fk.requires_grad_(backward and case["op"] == "patch_metric")
        return fq, fk, ids

    inputs = [[make_layer() for _ in range(s["layers"])] for _ in range(pool)]
    layer_loss = _layer_loss(case["op"], backend, case["negatives"])
    if compile_mode is not None:
        # A fresh compile per case (static shapes): the baseline a user compiling their
        # loss gets, and no case runs into dynamo's recompile limit through the others.
        torch._dynamo.reset()
        layer_loss = torch.compile(layer_loss, fullgraph=True, mode=compile_mode)

    def step(layers):
        value = sum(layer_loss(*layer) for layer in layers)
        if backward:
            wrt = [t for layer in layers for t in layer[:2] if t.requires_grad]
            torch.autograd.grad(value, wrt)
        return value

    state = {"i": 0}

    def call():
        layers = inputs[state["i"] % pool]
        state["i"] += 1
        out = step(layers)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def rounds(case: dict) -> int:
    if case["device"] == "cuda":
        return 20
    return 3 if case["shape"].startswith("large") else 5
