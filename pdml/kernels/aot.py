"""Ahead-of-time check of the Triton kernels for a GPU architecture, without a GPU.

Every kernel × dtype (fp32, fp16, bf16) × every launch configuration its launcher can pick
is compiled: the patch-loss kernels (:mod:`pdml.kernels.patch_loss`) × feature form (map:
gathered and normalised in the kernel; rows) × the tiles :mod:`pdml.kernels.patch_loss_launch` picks
for the shapes in :data:`SHAPES`, and the gather + projection kernels
(:mod:`pdml.kernels.gather_project`) × bias or not × the blocks
:mod:`pdml.kernels.gather_project_launch` picks for :data:`GATHER_PROJECT_SHAPES`. Each is
compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and described by a
:class:`Record`: register spills, shared memory, whether the dots use tensor cores.

    python -m pdml.kernels.aot --arch 90 --strict [--jobs 2]

prints the table and, with ``--strict``, exits 1 on any compile error, spill, shared
memory over the architecture's limit, fp16/bf16 dots without tensor cores or fp32 dots
with them. Uses only APIs present in triton 3.6 and 3.8.

    python -m pdml.kernels.aot --work

prints instead, for the same shapes, the dot FLOPs each loss kernel's GPU launch plan
issues divided by the minimum the math needs (:mod:`pdml.kernels.work`; compiles nothing).

Spills are counted as triton's launcher counts them (``n_spills`` = the kernel's local
memory in bytes / 4, read here from the cubin with the cuobjdump triton ships, since the
count triton reports comes from loading the cubin on a GPU).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional, Union

from pdml.kernels import gather_project_launch, patch_loss_launch, work

LOSS_KERNELS = ("nce_forward_kernel", "nce_backward_kernel", "metric_forward_kernel",
                "metric_backward_kernel", "metric_positive_kernel", "similarity_forward_kernel",
                "similarity_backward_kernel", "normaliser_backward_kernel")
KERNELS = LOSS_KERNELS + gather_project_launch.KERNELS
WITHOUT_DOTS = ("metric_positive_kernel", "normaliser_backward_kernel")
DTYPES = ("fp32", "fp16", "bf16")

SHAPES = {
    "paper": [(128, 128), (128, 256), (1024, 128), (1024, 256)],  # n = 128 per image; 128·B for "batch" (B = 8)
    "cut": [(256, 256)],
    "large": [(4096, 128), (4096, 256), (4096, 1000), (4096, 1024)],
}
"""Named shapes ``(rows per group, channels)`` the patch-loss configurations are taken from."""

GATHER_PROJECT_SHAPES = {
    "paper": [(8 * 128, 32, 128)],  # B = 8 images × N = 128 patches, F = 32 -> D = 128
    "cut": [(256, channels, 256) for channels in (1, 3, 128, 256)],  # CUT's netF: N = 256, F of layers 0-16 -> 256
}
"""Named shapes ``(rows = B·N, feature channels F, hidden D)`` the gather_project
configurations are taken from."""

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
"""Largest shared memory per block (bytes, opt-in) of each architecture."""

_FEATURE_POINTERS = ("q_ptr", "k_ptr", "x_ptr", "dx_ptr")
_GRAD_POINTERS = {  # kernel -> its pointers that are fp32 scratch in the map form and the gradient in the rows form
    "nce_backward_kernel": ("dqhat_ptr",),
    "metric_positive_kernel": ("dq_ptr", "dk_ptr"),
}
_FLOAT_SCALARS = ("inv_tau", "pos_scale", "pair_scale")


class LossJob(NamedTuple):
    """One compilation of a patch-loss kernel for one dtype, form and launch configuration."""
    kernel: str
    dtype: str
    gather: bool
    block_m: int
    block_n: int
    block_c: int
    num_warps: int
    num_stages: int
    grad_c: int = 0  # gradient channels per program (GRAD_C) of the gradient kernels, else 0

    launcher = patch_loss_launch  # the kernels' launcher (a class attribute, not a field)

    @property
    def config(self) -> str:
        form = "map" if self.gather else "rows"
        grad = f" g{self.grad_c}" if self.grad_c else ""
        return f"{form} {self.block_m}x{self.block_n}x{self.block_c}{grad} w{self.num_warps} s{self.num_stages}"

    @property
    def options(self) -> dict:
        """Compile options, as the launcher passes them."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def constexprs(self) -> dict:
        """Every constexpr the launcher may pass (each kernel takes a subset)."""
        return {"GATHER": self.gather, "NORMALISE": self.gather, "SCALE": self.gather and self.dtype != "fp16",
                "IEEE": self.dtype == "fp32",
                "BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_C": self.block_c, "GRAD_C": self.grad_c}

    def argument_type(self, name: str) -> str:
        """Triton type of the non-constexpr argument ``name``, as the launch helpers pass it."""
        if name in _FEATURE_POINTERS or (name in _GRAD_POINTERS.get(self.kernel, ()) and not self.gather):
            return "*" + self.dtype
        if name == "ids_ptr":
            return "*i64" if self.gather else "*" + self.dtype
        if name.endswith("_ptr"):  # losses, logsumexp, similarity, upstream gradients
            return "*fp32"
        return "fp32" if name in _FLOAT_SCALARS else "i32"


class GatherProjectJob(NamedTuple):
    """One compilation of a gather_project kernel for one dtype, bias or not and blocks
    (the launcher's default ``num_stages``)."""
    kernel: str
    dtype: str
    has_bias: bool
    block_r: int
    block_d: int
    block_f: int
    num_warps: int

    launcher = gather_project_launch  # the kernels' launcher (a class attribute, not a field)

    @property
    def config(self) -> str:
        bias = " bias" if self.has_bias else ""
        return f"R{self.block_r} D{self.block_d} F{self.block_f} w{self.num_warps}{bias}"

    @property
    def options(self) -> dict:
        """Compile options, as the launcher passes them."""
        return {"num_warps": self.num_warps}

    def constexprs(self) -> dict:
        """Every constexpr the launcher may pass (each kernel takes a subset)."""
        return {"HAS_BIAS": self.has_bias, "IEEE": self.dtype == "fp32",
                "BLOCK_R": self.block_r, "BLOCK_D": self.block_d, "BLOCK_F": self.block_f}

    def argument_type(self, name: str) -> str:
        """Triton type of the non-constexpr argument ``name``: every tensor but the pixel ids
        is in the map's dtype (weight, bias and gradients are validated to match it)."""
        if name == "ids_ptr":
            return "*i64"
        return "*" + self.dtype if name.endswith("_ptr") else "i32"


Job = Union[LossJob, GatherProjectJob]


class Record(NamedTuple):
    """What one compilation gave (``error`` set and the rest zero when it failed)."""
    kernel: str
    dtype: str
    config: str
    shapes: str
    n_spills: int
    registers: int
    shared: int
    mma: str  # "wgmma", "mma.sync" or "none"
    seconds: float
    error: Optional[str] = None


def library_compiles() -> bool:
    """Whether triton.language was imported for compilation: with ``TRITON_INTERPRET=1`` at
    import, its own @jit functions (tl.sum's combine function, ...) exist only for the
    interpreter, and no kernel that uses them compiles in this process."""
    import triton.language as tl
    from triton.runtime import JITFunction
    return isinstance(tl.sum, JITFunction)


_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _torch_dtype(dtype: str):
    import torch
    return getattr(torch, _TORCH_DTYPES[dtype])


def loss_jobs(shapes: dict = SHAPES, kernels=LOSS_KERNELS, dtypes=DTYPES) -> dict[LossJob, list[str]]:
    """Every distinct patch-loss compilation the launcher can need for ``shapes`` -> the
    shape names (``name:n:C``) that need it."""
    jobs: dict[LossJob, list[str]] = {}
    for kernel in kernels:
        forms = (True,) if kernel.startswith(("similarity", "normaliser")) else (True, False)
        for dtype in dtypes:
            for name, sizes in shapes.items():
                for rows, channels in sizes:
                    for gather in forms:
                        for tiles in patch_loss_launch.launch_configs(_torch_dtype(dtype), rows, channels, kernel, gather):
                            if kernel in WITHOUT_DOTS:  # no column tiles (as patch_loss_launch launches them)
                                tiles = tiles._replace(block_n=16)
                            job = LossJob(kernel, dtype, gather, *tiles)
                            jobs.setdefault(job, []).append(f"{name}:{rows}:{channels}")
    return jobs


def gather_project_jobs(shapes: dict = GATHER_PROJECT_SHAPES, kernels=gather_project_launch.KERNELS,
                        dtypes=DTYPES) -> dict[GatherProjectJob, list[str]]:
    """Every distinct gather_project compilation the launcher can need for ``shapes`` (with
    and without bias where the kernel takes one) -> the shape names (``name:R:F:D``)."""
    jobs: dict[GatherProjectJob, list[str]] = {}
    for kernel in kernels:
        takes_bias = "HAS_BIAS" in getattr(gather_project_launch.kernels(False), kernel).arg_names
        for dtype in dtypes:
            for name, sizes in shapes.items():
                for rows, channels, out_dim in sizes:
                    meta = gather_project_launch.kernel_blocks(kernel, rows, channels, out_dim,
                                                               _torch_dtype(dtype), interpret=False)
                    for has_bias in ((False, True) if takes_bias else (False,)):
                        job = GatherProjectJob(kernel, dtype, has_bias, meta["BLOCK_R"], meta["BLOCK_D"],
                                               meta["BLOCK_F"], meta["num_warps"])
                        jobs.setdefault(job, []).append(f"{name}:{rows}:{channels}:{out_dim}")
    return jobs


def jobs_for(kernels=KERNELS, dtypes=DTYPES) -> dict[Job, list[str]]:
    """Every job of :func:`loss_jobs` and :func:`gather_project_jobs` for ``kernels`` and
    ``dtypes`` -> the shape names that need it."""
    return {**loss_jobs(kernels=[k for k in kernels if k in LOSS_KERNELS], dtypes=dtypes),
            **gather_project_jobs(kernels=[k for k in kernels if k in gather_project_launch.KERNELS],
                                  dtypes=dtypes)}


def _source(job: Job):
    """ASTSource of ``job.kernel`` with the argument types the launch helpers pass."""
    from triton.compiler import ASTSource
    fn = getattr(job.launcher.kernels(False), job.kernel)
    constexprs = {name: value for name, value in job.constexprs().items() if name in fn.arg_names}
    signature = {name: "constexpr" if name in constexprs else job.argument_type(name) for name in fn.arg_names}
    return ASTSource(fn, signature, constexprs)


def _resources(cubin: bytes) -> tuple[int, int]:
    """``(registers, local memory bytes)`` of the kernel in ``cubin`` (cuobjdump's STACK + LOCAL)."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return int(fields.get("REG", 0)), int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))


def compile_job(job: Job, arch: int, shapes: str = "") -> Record:
    """Compile ``job`` for ``sm_<arch>`` and describe the result."""
    import triton
    from triton.backends.compiler import GPUTarget
    start = time.perf_counter()
    try:
        compiled = triton.compile(_source(job), target=GPUTarget("cuda", arch, 32), options=job.options)
        registers, local_bytes = _resources(compiled.asm["cubin"])
    except Exception as exc:  # reported per job; --strict turns it into exit status 1
        return Record(job.kernel, job.dtype, job.config, shapes, 0, 0, 0, "none",
                      time.perf_counter() - start, f"{type(exc).__name__}: {str(exc)[:300]}")
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    return Record(job.kernel, job.dtype, job.config, shapes, local_bytes // 4, registers,
                  int(compiled.metadata.shared), mma, time.perf_counter() - start)


def _compile_star(args) -> Record:
    return compile_job(*args)


def compile_all(arch: int, jobs: dict[Job, list[str]], workers: int = 1) -> list[Record]:
    """Compile every job (``workers`` processes); records in the order of ``jobs``."""
    tasks = [(job, arch, " ".join(shapes)) for job, shapes in jobs.items()]
    if workers <= 1:
        return [compile_job(*task) for task in tasks]
    context = multiprocessing.get_context("spawn")  # no state inherited from the caller
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_compile_star, tasks))


def problems(record: Record, arch: int) -> list[str]:
    """What is wrong with a record (empty when it passes)."""
    if record.error:
        return [f"compile error: {record.error}"]
    found = []
    if record.n_spills:
        found.append(f"{record.n_spills} spills")
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and record.shared > limit:
        found.append(f"shared memory {record.shared} B > {limit} B")
    if record.kernel in WITHOUT_DOTS:
        pass
    elif record.dtype == "fp32" and record.mma != "none":
        found.append("fp32 dots on tensor cores (tf32), not 'ieee'")
    elif record.dtype != "fp32" and record.mma == "none":
        found.append("fp16/bf16 dots without tensor cores")
    return found


def format_table(records: list[Record], arch: int) -> str:
    lines = [f"{'kernel':33} {'dtype':5} {'config':22} {'spills':>6} {'regs':>4} {'smem B':>7} "
             f"{'mma':8} {'s':>6}  problems"]
    for r in records:
        lines.append(f"{r.kernel:33} {r.dtype:5} {r.config:22} {r.n_spills:6d} {r.registers:4d} "
                     f"{r.shared:7d} {r.mma:8} {r.seconds:6.1f}  {'; '.join(problems(r, arch))}")
    return "\n".join(lines)


def work_table(shapes: dict = SHAPES, dtypes=DTYPES) -> str:
    """Issued / minimum dot FLOPs (:mod:`pdml.kernels.work`) of the forward and backward
    kernel of each op, with the GPU's tiles, for every shape, dtype and feature form (the
    similarity op has the map form only)."""
    columns = [(op, kernel) for op, kernels in work.OP_KERNELS.items() for kernel in kernels]
    lines = [f"{'shape':6} {'n':>5} {'C':>5} {'dtype':5} {'form':4} "
             + " ".join(f"{op + (' fwd' if 'forward' in kernel else ' bwd'):>14}" for op, kernel in columns)]
    for name, sizes in shapes.items():
        for rows, channels in sizes:
            for dtype in dtypes:
                for gather in (True, False):
                    cells = []
                    for op, kernel in columns:
                        if op == "similarity" and not gather:
                            cells.append(f"{'-':>14}")
                            continue
                        ratio = work.gpu_work(kernel, _torch_dtype(dtype), rows, channels, gather).ratio
                        cells.append(f"{ratio:14.2f}")
                    lines.append(f"{name:6} {rows:5d} {channels:5d} {dtype:5} {'map' if gather else 'rows':4} "
                                 + " ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdml.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 on any compile error, spill, shared memory over the limit or wrong dot unit")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes")
    parser.add_argument("--kernel", action="append", choices=KERNELS, help="only these kernels")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="only these dtypes")
    parser.add_argument("--work", action="store_true",
                        help="print issued / minimum dot FLOPs of the loss kernels for the shapes instead of compiling")
    args = parser.parse_args(argv)
    if args.work:
        print("dot FLOPs issued by the GPU's launch plan / the minimum the math needs (docs/ops.md, \"Work\")")
        print(work_table(dtypes=args.dtype or DTYPES))
        return 0
    if not library_compiles():
        print("triton was imported with TRITON_INTERPRET=1: unset it to compile", file=sys.stderr)
        return 2
    jobs = jobs_for(kernels=args.kernel or KERNELS, dtypes=args.dtype or DTYPES)
    start = time.perf_counter()
    records = compile_all(args.arch, jobs, args.jobs)
    print(format_table(records, args.arch))
    bad = [r for r in records if problems(r, args.arch)]
    print(f"sm_{args.arch}: {len(records)} compilations, {len(bad)} with problems, "
          f"{time.perf_counter() - start:.0f} s")
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
