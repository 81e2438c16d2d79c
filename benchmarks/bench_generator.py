"""The generators against their convolution floor, and against the concatenating dense
blocks they replaced (``tests/generator_baseline.py``), in one run, on this machine.

Run: ``python -m benchmarks.bench_generator [--rounds 3] [--out DIR]`` (a script, not a
pytest-benchmark case: its cases take seconds each and are timed interleaved).

Cases (each timed once per round, all cases in every round, so that a load change on a
shared machine affects baseline and new alike; medians over the rounds):

- ``denoise``: ``generator(x)`` on ``[4, 1, 512, 512]`` (no grad), each architecture in
  fp32 and bf16 (the baseline: autocast over the whole network; the new blocks: bf16 in
  the dense blocks only, as ``denoise_hu`` runs them): the baseline on whole slices, the one-buffer blocks on
  whole slices, and for the paper's network (``dmlct``) in tiles
  of :data:`TILE` pixels (:func:`pdml.inference.forward_tiled`, ``pdml-denoise --tile``).
- ``train fwd+bwd``: forward with the loss layers' maps and backward of the generator
  alone on ``[8, 1, 128, 128]`` (training mode: spectral norm's power iteration included).
- ``train step``: pdml-train's whole step (G + heads + loss, then D) at the paper's
  shapes (``benchmarks/bench_train.py``'s config: batch 8, 128² crops, 128 patches,
  default loss backend, fp32), with its peak resident memory over the resting process
  (a fresh process each, VmHWM after a warm-up step); beside it, ``convs alone``: every
  ``Conv2d`` call of that step (shapes recorded from a baseline step) as one channels-last
  ``conv2d`` forward and backward to input and weight, nothing else: what the step would
  take if everything but oneDNN's convolutions were free.
- ``train step --compile`` (``--only step,compile``): the same step with pdml-train's
  ``--compile`` (inductor), its first step's seconds (compilation included) recorded.
- ``pdml-denoise``: the console script on a generated 512² DICOM series, each call in a
  fresh process: today's (fp32, baseline blocks, whole slices, glibc's default allocator)
  against its defaults; and (``--only rss``) its peak resident memory on series of
  ``--rss-slices`` slices.

The floor: the case's convolution FLOPs (counted by hooks on every ``Conv2d`` call of a
baseline pass; a backward counts twice its forward) at the matmul rate of the same round
(2048² fp32 / bf16 ``@``, best of 3). ``× floor`` is time / floor time, a median over the
rounds; 1 would be convolutions at the matmul rate with nothing else. Every case in this
process runs with the allocator setting pdml-denoise makes
(:func:`pdml.training.distributed.keep_freed_memory`), the baselines too (their ratios
show what the code changes gain, not the allocator's share); the pdml-denoise cases run in
fresh processes, today's without it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from pdml.inference import forward_tiled  # noqa: E402
from pdml.models import DmlCtGenerator, RRDNGenerator  # noqa: E402
from tests.generator_baseline import baseline_blocks  # noqa: E402

DENOISE_SHAPE = (4, 1, 512, 512)
TRAIN_SHAPE = (8, 1, 128, 128)
MATMUL_N = 2048
TILE = 256
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def generator(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return DmlCtGenerator(init_std=0.05) if arch == "dmlct" else RRDNGenerator()


# ------------------------------------------------------------------------------ FLOPs

@contextlib.contextmanager
def counting_conv_flops():
    """Inside: ``counter[0]`` grows by the FLOPs of every ``Conv2d`` forward call
    (2 · output elements · in-channels / groups · kernel area)."""
    counter = [0]

    def hook(module, inputs, output):
        kh, kw = module.kernel_size
        counter[0] += 2 * output.numel() * module.in_channels // module.groups * kh * kw

    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: hook(m, i, o) if isinstance(m, nn.Conv2d) else None)
    try:
        yield counter
    finally:
        handle.remove()


def generator_flops(net: nn.Module, shape) -> int:
    """Forward conv FLOPs of ``net`` on ``shape`` (a baseline pass: every dense conv is a
    module call)."""
    with torch.no_grad(), baseline_blocks(net), counting_conv_flops() as counter:
        net(torch.zeros(shape))
    return counter[0]


# ------------------------------------------------------------------------------ timing

def matmul_seconds(dtype: torch.dtype) -> float:
    a = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
    b = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
    a @ b
    return min(harness.seconds(lambda: a @ b) for _ in range(3))


class Case:
    def __init__(self, group: str, name: str, precision: str, fn, flops: int, baseline: str | None,
                 timed_inside: bool = False):
        """``fn()`` runs the case; with ``timed_inside`` it returns its own seconds."""
        self.group, self.name, self.precision, self.fn = group, name, precision, fn
        self.timed_inside = timed_inside
        self.flops, self.baseline = flops, baseline
        self.times: list[float] = []
        self.floor_ratios: list[float] = []

    def row(self, by_name: dict) -> dict:
        median = statistics.median(self.times)
        row = {"group": self.group, "case": self.name, "precision": self.precision,
               "median_s": median, "times_s": self.times, "conv_gflop": self.flops / 1e9,
               "gflop_per_s": self.flops / median / 1e9,
               "x_floor": statistics.median(self.floor_ratios) if self.floor_ratios else None}
        base = by_name.get(self.baseline)
        if base is not None and base is not self:
            row["speedup_vs_baseline"] = statistics.median(
                b / t for b, t in zip(base.times, self.times))
        return row


def _autocast(precision: str):
    dtype = AUTOCAST[precision]
    return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()


def denoise_cases(archs, precisions) -> list[Case]:
    cases = []
    x = torch.randn(DENOISE_SHAPE)
    for arch in archs:
        net = generator(arch).eval()
        flops = generator_flops(net, DENOISE_SHAPE)
        for precision in precisions:
            group = f"denoise {arch} {DENOISE_SHAPE[0]}x{DENOISE_SHAPE[2]}²"
            base = f"{group} baseline {precision}"

            def run(tile=None, old=False, net=net, precision=precision):
                # the baseline's bf16: autocast over the whole network (what denoise_hu
                # did); the new one: the dense blocks only (what denoise_hu does now)
                if old:
                    with torch.no_grad(), _autocast(precision), baseline_blocks(net):
                        net(x)
                    return
                with torch.no_grad():
                    forward_tiled(net, x, tile, block_dtype=AUTOCAST[precision])

            cases.append(Case(group, base, precision, lambda run=run: run(old=True), flops, base))
            cases.append(Case(group, f"{group} one-buffer {precision}", precision, run, flops, base))
            if net.receptive_radius() is not None:
                cases.append(Case(group, f"{group} one-buffer tiles {TILE} {precision}",
                                  precision, lambda run=run: run(tile=TILE), flops, base))
    return cases


def train_cases(archs, precisions) -> list[Case]:
    cases = []
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TRAIN_SHAPE, generator=g)
    for arch in archs:
        net = generator(arch).train()
        flops = 3 * generator_flops(net, TRAIN_SHAPE)
        for precision in precisions:
            group = f"train fwd+bwd {arch} {TRAIN_SHAPE[0]}x{TRAIN_SHAPE[2]}²"
            base = f"{group} baseline {precision}"

            def run(old, net=net, precision=precision):
                with _autocast(precision), (baseline_blocks(net) if old else contextlib.nullcontext()):
                    out, maps = net.forward_with_features(x.clone().requires_grad_())
                    loss = out.float().square().mean() + sum(m.float().square().mean() for m in maps)
                loss.backward()
                net.zero_grad(set_to_none=True)

            cases.append(Case(group, base, precision, lambda run=run: run(True), flops, base))
            cases.append(Case(group, f"{group} one-buffer {precision}", precision,
                              lambda run=run: run(False), flops, base))
    return cases


# ------------------------------------------------------------------------------ train step

def _step_run(arch: str, tmp: str, compile: bool = False):
    """bench_train.py's paper-shape TrainingRun (arch as given; ``compile``: pdml-train
    --compile) and a batch pool."""
    from pdml.training import TrainingRun, make_config

    os.environ["PDML_CACHE_DIR"] = os.path.join(tmp, "cache")
    cfg = make_config("tiny", arch=arch, batch_size=TRAIN_SHAPE[0], num_patches=128,
                      precision="fp32", loss_backend="auto", device="cpu", compile=compile,
                      out=os.path.join(tmp, f"run-{arch}{'-compiled' if compile else ''}"),
                      threads=torch.get_num_threads(), progress=False)
    run = TrainingRun(cfg, stream=open(os.devnull, "w"))
    scale = cfg.resolved_net_scale
    g = torch.Generator().manual_seed(0)
    batch = tuple(torch.rand(TRAIN_SHAPE, generator=g) * scale for _ in range(2))
    return run, batch


def step_flops(run, batch) -> int:
    with baseline_blocks(run.generator), counting_conv_flops() as counter:
        run.train_step(*batch)
    return 3 * counter[0]


def step_conv_calls(run, batch) -> list[tuple]:
    """Every ``Conv2d`` call of one baseline step: ``(input shape, weight shape, stride,
    padding, dilation, groups)``, in call order."""
    calls = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            pad = module.padding if module.padding_mode == "zeros" else (0, 0)
            calls.append((tuple(inputs[0].shape), tuple(module.weight.shape), module.stride,
                          pad, module.dilation, module.groups))

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        with baseline_blocks(run.generator):
            run.train_step(*batch)
    finally:
        handle.remove()
    return calls


def convs_alone(calls: list[tuple]):
    """A callable running each call of ``calls`` as one ``conv2d`` forward and its backward
    to input and weight, channels-last fp32 (what oneDNN makes of these shapes with nothing
    else in the step): the floor a step built on library convolutions can reach."""
    g = torch.Generator().manual_seed(2)
    tensors = []
    for shape, wshape, stride, pad, dil, groups in calls:
        x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        w = torch.randn(wshape, generator=g).contiguous(memory_format=torch.channels_last)
        tensors.append((x.requires_grad_(), w.requires_grad_(), stride, pad, dil, groups))

    def run():
        for x, w, stride, pad, dil, groups in tensors:
            out = torch.nn.functional.conv2d(x, w, None, stride, pad, dil, groups)
            torch.autograd.grad(out, (x, w), torch.ones_like(out))
    return run


def step_cases(archs, tmp) -> list[Case]:
    cases = []
    for arch in archs:
        run, batch = _step_run(arch, tmp)
        flops = step_flops(run, batch)
        group = f"train step {arch} paper shape"
        base = f"{group} baseline fp32"

        def step(old, run=run, batch=batch):
            with baseline_blocks(run.generator) if old else contextlib.nullcontext():
                run.train_step(*batch)

        cases.append(Case(group, base, "fp32", lambda step=step: step(True), flops, base))
        cases.append(Case(group, f"{group} one-buffer fp32", "fp32", lambda step=step: step(False),
                          flops, base))
        cases.append(Case(group, f"{group} convs alone fp32", "fp32",
                          convs_alone(step_conv_calls(run, batch)), flops, base))
    return cases


def compiled_step_cases(archs, tmp, compile_s: dict, eager: list[Case]) -> list[Case]:
    """``train step <arch> --compile``: the same step with pdml-train's ``--compile``
    (torch.compile of the networks, inductor), against the eager one-buffer step (in
    ``eager``, :func:`step_cases`) as its baseline; the first step's seconds (compilation
    included) go to ``compile_s[arch]``."""
    flops = {c.group: c.flops for c in eager}
    cases = []
    for arch in archs:
        run, batch = _step_run(arch, tmp, compile=True)
        started = time.perf_counter()
        run.train_step(*batch)
        compile_s[arch] = time.perf_counter() - started
        group = f"train step {arch} paper shape"
        cases.append(Case(group, f"{group} --compile fp32", "fp32",
                          lambda run=run, batch=batch: run.train_step(*batch), flops[group],
                          f"{group} one-buffer fp32"))
    return cases


_STEP_PROBE = r"""
import contextlib, ctypes, gc, json, sys, tempfile, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads({threads})
from benchmarks.bench_generator import _step_run
from tests.generator_baseline import baseline_blocks

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

run, batch = _step_run({arch!r}, tempfile.mkdtemp())
ctx = baseline_blocks(run.generator) if {old!r} else contextlib.nullcontext()
with ctx:
    run.train_step(*batch)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    run.train_step(*batch)
print(json.dumps({{"extra_bytes": status("VmHWM") - before}}))
"""


def step_peak_extra_bytes(arch: str, old: bool) -> int:
    """Peak resident growth of one training step over the resting process (fresh process)."""
    code = _STEP_PROBE.format(repo=harness.REPO, threads=torch.get_num_threads(), arch=arch, old=old)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"])


# ------------------------------------------------------------------------------ pdml-denoise

def write_series(folder: Path, slices: int, size: int) -> None:
    """A CT series of ``slices`` phantom slices ``size``² with noise (the test trees' files,
    :func:`tests.ct_trees.write_slice`: uint16 HU + 1024 stored)."""
    import numpy as np
    from pydicom.uid import generate_uid

    from pdml.data.builtin import phantom
    from tests.ct_trees import write_slice

    rng = np.random.default_rng(0)
    uids = dict(study="1.2.3.4", series=generate_uid(), frame_of_reference=generate_uid())
    base = phantom(size, rng)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(slices):
        hu = np.clip(base + rng.normal(0, 20, base.shape), -1024, 3000)
        write_slice(folder / f"{k:04d}.dcm", hu, patient="BENCH", z=float(k),
                    description="bench series", instance=k + 1, **uids)


def write_checkpoint(path: Path, arch: str) -> None:
    """An untrained generator of ``arch`` in a pdml-train checkpoint (speed does not depend
    on the weights)."""
    from pdml.training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
    from pdml.training.config import make_config
    from pdml.training.networks import build_generator

    cfg = make_config("paper", arch=arch)
    torch.manual_seed(0)
    state = build_generator(cfg).state_dict()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": 0,
                "config": cfg.to_dict(), "model": {"generator": state, "discriminator": {},
                                                   "heads": {}}}, path)


_CLI_PROBE = r"""
import contextlib, json, os, sys, time
sys.path.insert(0, {repo!r})
from pdml.cli import denoise_main
from pdml.training import distributed
from tests.generator_baseline import baseline_block_classes
if {old!r}:   # today's pdml-denoise: no allocator setting, concatenating blocks
    distributed.keep_freed_memory = lambda: False
ctx = baseline_block_classes() if {old!r} else contextlib.nullcontext()
with ctx, contextlib.redirect_stdout(open(os.devnull, "w")):
    start = time.perf_counter()
    rc = denoise_main({argv!r})
    wall = time.perf_counter() - start
print(json.dumps({{"rc": rc, "wall_s": wall}}))
"""


def cli_cases(arch: str, slices: int, tmp: str) -> list[Case]:
    """pdml-denoise, each call in a fresh process (timed around ``denoise_main``: the
    checkpoint, reading, denoising, writing; not the interpreter's start): today's
    (fp32, concatenating blocks, whole slices, no allocator setting) and the defaults."""
    root = Path(tmp) / "cli"
    write_series(root / "in", slices, 512)
    write_checkpoint(root / "ckpt.pt", arch)
    counter = [0]

    def run(old: bool) -> float:
        counter[0] += 1
        argv = ["--checkpoint", str(root / "ckpt.pt"), "--input", str(root / "in"), "--output",
                str(root / f"out{counter[0]}"), "--no-progress", "--threads",
                str(torch.get_num_threads())]
        if old:
            argv += ["--precision", "fp32", "--tile", "0", "--batch-size", "4"]
        code = _CLI_PROBE.format(repo=harness.REPO, old=old, argv=argv)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=3600)
        result = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
        if result.get("rc") != 0:
            raise RuntimeError(f"pdml-denoise failed: {out.stderr[-2000:]}")
        return result["wall_s"]

    group = f"pdml-denoise {arch} {slices}x512²"
    base = f"{group} today (fp32, baseline blocks, whole slices, batch 4, default allocator)"
    return [Case(group, base, "fp32", lambda: run(True), 0, base, timed_inside=True),
            Case(group, f"{group} defaults", "auto", lambda: run(False), 0, base,
                 timed_inside=True)]


# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child of this (large)
# process would report the parent's resident size at the fork
_RSS_PROBE = r"""
import json, sys
sys.path.insert(0, {repo!r})
from pdml.cli import denoise_main
rc = denoise_main({argv!r})
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps({{"rc": rc, "peak_rss_bytes": peak}}))
"""


def denoise_peak_rss(slices: int, tmp: str, arch: str = "dmlct") -> dict:
    """Peak resident memory of one ``pdml-denoise`` process (defaults) on a generated
    ``slices``-slice 512² series, and its wall time."""
    root = Path(tmp) / f"rss{slices}"
    write_series(root / "in", slices, 512)
    write_checkpoint(root / "ckpt.pt", arch)
    argv = ["--checkpoint", str(root / "ckpt.pt"), "--input", str(root / "in"), "--output",
            str(root / "out"), "--no-progress", "--threads", str(torch.get_num_threads())]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE.format(repo=harness.REPO, argv=argv)],
                         capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"pdml-denoise failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"slices": slices, "peak_rss_bytes": result["peak_rss_bytes"], "wall_s": wall}


# ------------------------------------------------------------------------------ main

def run_rounds(cases: list[Case], rounds: int, log) -> dict:
    rates = {"fp32": [], "bf16": []}
    for case in cases:  # warm-up: thread pools, allocator, first touch
        if not case.timed_inside:
            case.fn()
    for r in range(rounds):
        mm = {name: 2 * MATMUL_N ** 3 / matmul_seconds(dtype)
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        for name, rate in mm.items():
            rates[name].append(rate)
        for case in cases:
            t = case.fn() if case.timed_inside else harness.seconds(case.fn)
            case.times.append(t)
            if case.flops:
                rate = mm["bf16" if case.precision == "bf16" else "fp32"]
                case.floor_ratios.append(t / (case.flops / rate))
            log(f"round {r + 1}/{rounds}  {case.name}: {t:.3f} s")
    return {k: statistics.median(v) for k, v in rates.items()}


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"Device: {env['device']} · torch {env['torch']} · commit {env['commit']} · "
             f"{env['date']} · load before: {result['load_before']}",
             f"matmul (median of rounds): fp32 {result['matmul_gflop_per_s']['fp32']:.0f} GFLOP/s, "
             f"bf16 {result['matmul_gflop_per_s']['bf16']:.0f} GFLOP/s; {result['rounds']} rounds, "
             f"{result['threads']} thread(s)", "",
             "| case | median | conv GFLOP | GFLOP/s | × floor | × baseline |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {r['case']} | {r['median_s']:.3f} s | {fmt(r['conv_gflop'] or None, 1)} | "
                     f"{fmt(r['gflop_per_s'] or None, 1)} | {fmt(r['x_floor'])} | "
                     f"{fmt(r.get('speedup_vs_baseline'))} |")
    by_case = {r["case"]: r for r in result["rows"]}
    for r in result["rows"]:
        if r["case"].endswith("convs alone fp32"):
            group = r["case"][:-len(" convs alone fp32")]
            new = by_case.get(f"{group} one-buffer fp32")
            if new:
                lines.append(f"\n{group}: one-buffer step / its convolutions alone (median of "
                             f"rounds) = {statistics.median(a / b for a, b in zip(new['times_s'], r['times_s'])):.2f}")
    for arch, m in result.get("step_memory", {}).items():
        lines.append(f"\ntrain step {arch}: peak memory over the resting process: baseline "
                     f"{m['baseline'] / 2**20:.0f} MiB, one-buffer {m['new'] / 2**20:.0f} MiB "
                     f"(× {m['new'] / m['baseline']:.2f})")
    for arch, sec in result.get("compile_first_step_s", {}).items():
        lines.append(f"\ntrain step {arch} --compile: first step (compilation included) {sec:.0f} s")
    for r in result.get("denoise_rss", []):
        lines.append(f"\npdml-denoise (defaults) on {r['slices']} slices 512²: peak resident "
                     f"memory {r['peak_rss_bytes'] / 2**30:.2f} GiB, {r['wall_s']:.0f} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--archs", default="dmlct,pdml")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--only", default="denoise,train,step,memory,cli,rss",
                   help="comma-separated parts to run (also: compile, the step with "
                        "pdml-train's --compile beside the eager step; minutes of compilation)")
    p.add_argument("--cli-slices", type=int, default=8)
    p.add_argument("--rss-slices", default="40,200")
    p.add_argument("--out", default=os.path.join(harness.REPO, ".benchmarks", "generator"))
    args = p.parse_args(argv)
    archs, precisions = args.archs.split(","), args.precisions.split(",")
    # what pdml-denoise does at start (pdml.training.distributed.keep_freed_memory), here
    # for every case, the baselines included: their ratios are conservative
    from pdml.training.distributed import keep_freed_memory
    allocator = keep_freed_memory()
    parts = set(args.only.split(","))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        if "denoise" in parts:
            cases += denoise_cases(archs, precisions)
        if "train" in parts:
            cases += train_cases(archs, precisions)
        if "step" in parts:
            cases += step_cases(archs, tmp)
        compile_s: dict = {}
        if "compile" in parts:
            if "step" not in parts:
                p.error("--only compile needs step too (its eager baseline)")
            cases += compiled_step_cases(archs, tmp, compile_s, cases)
        if "cli" in parts:
            cases += cli_cases("dmlct", args.cli_slices, tmp)
        rates = run_rounds(cases, args.rounds, log)
    by_name = {c.name: c for c in cases}
    result = {"environment": harness.environment("cpu"), "load_before": load_before,
              "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
              "threads": torch.get_num_threads(), "rounds": args.rounds,
              "glibc_heap_kept": allocator,
              "python": platform.python_version(),
              "matmul_gflop_per_s": {k: v / 1e9 for k, v in rates.items()},
              "rows": [c.row(by_name) for c in cases]}
    if compile_s:
        result["compile_first_step_s"] = compile_s
    for row in result["rows"]:
        if row["group"].startswith("pdml-denoise"):
            slices = int(row["group"].split()[2].split("x")[0])
            row["slices_per_s"] = slices / row["median_s"]
    if "rss" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            result["denoise_rss"] = [denoise_peak_rss(int(n), tmp) for n in args.rss_slices.split(",")]
    if "memory" in parts:
        result["step_memory"] = {arch: {"baseline": step_peak_extra_bytes(arch, True),
                                        "new": step_peak_extra_bytes(arch, False)}
                                 for arch in archs}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generator.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = to_markdown(result)
    with open(os.path.join(args.out, "generator.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
