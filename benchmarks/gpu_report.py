"""Helpers of ``benchmarks/run_gpu.sh`` that are easier in Python than in bash.

``python -m benchmarks.gpu_report env RESULTS``
    write ``RESULTS/env.txt``: GPU name, driver, compute capability, Python, torch (CUDA
    version), triton, numpy, nvcc, the commit (``PDML_COMMIT``, else git), the date.
``python -m benchmarks.gpu_report arch``
    print the visible GPU's arch as ``TORCH_CUDA_ARCH_LIST`` wants it (``9.0``).
``python -m benchmarks.gpu_report bench RESULTS A.json B.json ...``
    merge the pytest-benchmark JSON files of several ``pytest benchmarks/`` runs into one
    ``summary.{md,json}`` + ``speedups.png`` (benchmarks/summary.py); a missing or
    half-written file (a step stopped at its time budget) is reported and skipped.
``python -m benchmarks.gpu_report train RESULTS RUN_DIR...``
    throughput of ``pdml-train`` runs from their ``metrics.jsonl`` / ``summary.json``:
    img/s (whole run and the median of the logged windows after the first, i.e. after
    warm-up and compilation), NVML GPU memory / utilisation / power;
    writes ``RESULTS/train-probe.{md,json}``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _run(*cmd: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({e})"
    return (out.stdout or out.stderr).strip()


def commit() -> str:
    """``PDML_COMMIT`` (the device machine gets a copy of the tree without .git), else git."""
    if os.environ.get("PDML_COMMIT"):
        return os.environ["PDML_COMMIT"]
    sha = _run("git", "rev-parse", "--short", "HEAD")
    if not sha or sha.startswith("(") or " " in sha:
        return "unknown"
    if _run("git", "status", "--porcelain", "--untracked-files=no"):
        sha += "-dirty"
    return sha


def gpu_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def write_env(results: str) -> str:
    import numpy
    import torch

    lines = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "commit": commit(), "host": platform.node(), "python": platform.python_version(),
             "torch": f"{torch.__version__} (CUDA {torch.version.cuda})", "numpy": numpy.__version__}
    try:
        import triton
        lines["triton"] = triton.__version__
    except ImportError as e:
        lines["triton"] = f"not importable ({e})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines["gpu"] = (f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                        f"{props.total_memory / 2**30:.1f} GiB")
    else:
        lines["gpu"] = "none visible (dry mode)"
    smi = shutil.which("nvidia-smi")
    lines["driver"] = (_run(smi, "--query-gpu=driver_version,name,clocks.max.sm,power.limit",
                            "--format=csv,noheader") if smi else "nvidia-smi not found")
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    nvcc = nvcc if os.path.exists(nvcc) else shutil.which("nvcc")
    lines["nvcc"] = _run(nvcc, "--version").splitlines()[-1] if nvcc else "not found"
    os.makedirs(results, exist_ok=True)
    path = os.path.join(results, "env.txt")
    with open(path, "w") as f:
        f.writelines(f"{k}: {v}\n" for k, v in lines.items())
    return path


def merge_benchmarks(results: str, paths: list[str]) -> int:
    from benchmarks import summary

    records, notes = [], []
    for path in paths:
        try:
            with open(path) as f:
                records += json.load(f)["benchmarks"]
        except (OSError, ValueError, KeyError) as e:
            notes.append(f"{os.path.basename(path)}: not read ({type(e).__name__}: {e})")
    for note in notes:
        print(note)
    result = summary.summarise([r for r in records if r.get("stats")])
    if not result["rows"]:
        print("no benchmark records to summarise")
        return 1
    written = summary.write(result, results)
    print(summary.to_markdown(result))
    print("written:", ", ".join(written))
    return 0


def _train_row(run_dir: str) -> dict:
    row = {"run": os.path.basename(run_dir.rstrip("/"))}
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
        row.update(steps=s.get("steps"), elapsed_s=s.get("elapsed_s"), img_per_s_run=s.get("img_per_s"))
    except (OSError, ValueError) as e:
        row["summary_error"] = f"{type(e).__name__}: {e}"
    records = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [r for r in map(json.loads, f) if r.get("kind") == "train"]
    except (OSError, ValueError) as e:
        row["metrics_error"] = f"{type(e).__name__}: {e}"
    # The first window holds the warm-up (cuDNN autotuning, torch.compile): leave it out.
    steady = records[1:] or records
    rates = [r["img_per_s"] for r in steady if "img_per_s" in r]
    if rates:
        row["img_per_s_steady"] = statistics.median(rates)
    for key, agg in (("gpu_mem_used_mib", max), ("gpu_util_pct", statistics.median),
                     ("gpu_power_w", statistics.median)):
        values = [r[key] for r in steady if key in r]
        if values:
            row[key] = agg(values)
    return row


def train_probe(results: str, run_dirs: list[str]) -> int:
    rows = [_train_row(d) for d in run_dirs]
    with open(os.path.join(results, "train-probe.json"), "w") as f:
        json.dump(rows, f, indent=1)
    cols = ["run", "steps", "elapsed_s", "img_per_s_run", "img_per_s_steady", "gpu_mem_used_mib",
            "gpu_util_pct", "gpu_power_w"]

    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) else ("–" if v is None else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines += ["", "img_per_s_run: steps × batch / training time of the whole run (compilation "
              "included); img_per_s_steady: median of the logged windows after the first. "
              "gpu_*: NVML, max memory / median utilisation and power over those windows. "
              "At the paper's size (batch 8, 128² crops) a step is many small kernels, so it "
              "is likely launch-bound: low GPU utilisation at a modest img/s, and --compile "
              "(fewer, fused kernels) gaining more than the loss kernels can, would say so."]
    for r in rows:
        for key in ("summary_error", "metrics_error"):
            if key in r:
                lines.append(f"- {r['run']}: {key.replace('_', ' ')}: {r[key]}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results, "train-probe.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if any("img_per_s_run" in r for r in rows) else 1


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "env" and len(args) == 1:
        print(open(write_env(args[0])).read(), end="")
        return 0
    if cmd == "arch" and not args:
        print(gpu_arch())
        return 0
    if cmd == "commit" and not args:
        print(commit())
        return 0
    if cmd == "bench" and len(args) >= 2:
        return merge_benchmarks(args[0], args[1:])
    if cmd == "train" and len(args) >= 2:
        return train_probe(args[0], args[1:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    raise SystemExit(main(sys.argv[1:]))
