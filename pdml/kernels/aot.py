"""Ahead-of-time check of the Triton kernels for a GPU architecture, without a GPU.

Every kernel × dtype (fp32, fp16, bf16) × feature form (map: gathered and normalised in
the kernel; rows) × every launch configuration :mod:`pdml.kernels.launch` can pick for the
shapes in :data:`SHAPES` is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and described by a
:class:`Record`: register spills, shared memory, whether the dots use tensor cores.

    python -m pdml.kernels.aot --arch 90 --strict [--jobs 2]

prints the table and, with ``--strict``, exits 1 on any compile error, spill, shared
memory over the architecture's limit, fp16/bf16 dots without tensor cores or fp32 dots
with them. Uses only APIs present in triton 3.6 and 3.8.

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
from typing import NamedTuple, Optional

KERNELS = ("nce_forward_kernel", "nce_backward_kernel", "metric_forward_kernel",
           "metric_backward_kernel", "similarity_forward_kernel", "similarity_backward_kernel",
           "normaliser_backward_kernel")
WITHOUT_DOTS = ("normaliser_backward_kernel",)
DTYPES = ("fp32", "fp16", "bf16")

SHAPES = {
    "paper": [(128, 128), (128, 256), (1024, 128), (1024, 256)],  # n = 128 per image; 128·B for "batch" (B = 8)
    "cut": [(256, 256)],
    "large": [(4096, 128), (4096, 256), (4096, 1000)],
}
"""Named shapes ``(rows per group, channels)`` the configurations are taken from."""

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
"""Largest shared memory per block (bytes, opt-in) of each architecture."""

_FEATURE_POINTERS = ("q_ptr", "k_ptr", "x_ptr", "dx_ptr")
_NORMALISED_GRAD_POINTERS = ("dqhat_ptr", "dkhat_ptr")  # fp32 scratch (map form) or the gradient (rows)
_FLOAT_SCALARS = ("inv_tau", "pos_scale", "pair_scale")


class Job(NamedTuple):
    """One compilation: a kernel specialised for one dtype, form and launch configuration."""
    kernel: str
    dtype: str
    gather: bool
    block_m: int
    block_n: int
    block_c: int
    num_warps: int
    num_stages: int

    @property
    def config(self) -> str:
        form = "map" if self.gather else "rows"
        return (f"{form} {self.block_m}x{self.block_n}x{self.block_c} w{self.num_warps} s{self.num_stages}")


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


def jobs_for(shapes: dict = SHAPES, kernels=KERNELS, dtypes=DTYPES) -> dict[Job, list[str]]:
    """Every distinct compilation the launcher can need for ``shapes`` -> the shape names
    (``name:n:C``) that need it."""
    import torch
    from pdml.kernels import launch
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    jobs: dict[Job, list[str]] = {}
    for kernel in kernels:
        forms = (True,) if kernel.startswith(("similarity", "normaliser")) else (True, False)
        for dtype in dtypes:
            for name, sizes in shapes.items():
                for rows, channels in sizes:
                    for gather in forms:
                        for tiles in launch.launch_configs(torch_dtype[dtype], rows, channels, kernel, gather):
                            if kernel in WITHOUT_DOTS:  # no column tiles (see launch._normaliser_backward)
                                tiles = tiles._replace(block_n=16)
                            job = Job(kernel, dtype, gather, *tiles)
                            jobs.setdefault(job, []).append(f"{name}:{rows}:{channels}")
    return jobs


def _source(job: Job):
    """ASTSource of ``job.kernel`` with the argument types the launch helpers pass."""
    from triton.compiler import ASTSource
    from pdml.kernels import kernel_module
    fn = getattr(kernel_module(False), job.kernel)
    constexprs = {"GATHER": job.gather, "NORMALIZE": job.gather, "IEEE": job.dtype == "fp32",
                  "BLOCK_M": job.block_m, "BLOCK_N": job.block_n, "BLOCK_C": job.block_c}
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _FEATURE_POINTERS or (name in _NORMALISED_GRAD_POINTERS and not job.gather):
            signature[name] = "*" + job.dtype
        elif name == "ids_ptr":
            signature[name] = "*i64" if job.gather else "*" + job.dtype
        elif name.endswith("_ptr"):  # losses, logsumexp, similarity, upstream gradients
            signature[name] = "*fp32"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
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
        compiled = triton.compile(_source(job), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": job.num_warps, "num_stages": job.num_stages})
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
    lines = [f"{'kernel':28} {'dtype':5} {'config':22} {'spills':>6} {'regs':>4} {'smem B':>7} "
             f"{'mma':8} {'s':>6}  problems"]
    for r in records:
        lines.append(f"{r.kernel:28} {r.dtype:5} {r.config:22} {r.n_spills:6d} {r.registers:4d} "
                     f"{r.shared:7d} {r.mma:8} {r.seconds:6.1f}  {'; '.join(problems(r, arch))}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdml.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 on any compile error, spill, shared memory over the limit or wrong dot unit")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes")
    parser.add_argument("--kernel", action="append", choices=KERNELS, help="only these kernels")
    parser.add_argument("--dtype", action="append", choices=DTYPES, help="only these dtypes")
    args = parser.parse_args(argv)
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
