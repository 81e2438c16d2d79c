"""The benchmark summary: speedups, memory ratios, and on a GPU achieved rates.

Works on pytest-benchmark's records (``Metadata.as_dict()`` in a run, or the
``benchmarks`` list of a ``--benchmark-json`` file), so a saved run can be summarised
again: ``python -m benchmarks.summary RUN.json [--out DIR]``.

Each op record carries in ``extra_info``: op, mode, shape, dtype, backend, device,
peak_extra_bytes, flops, min_bytes, and (GPU) the device's measured ``rates``.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

BASELINE, COMPILED = "reference", "reference-compile"
# records of a fused loss timed against eager, interleaved, and the form each one measures
FUSED_VS_EAGER_KINDS = {"rows-vs-eager": "rows", "map-vs-eager": "map"}


def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def summarise(records: list[dict]) -> dict:
    """Rows of {case, backend, median_s, speedup_vs_eager, speedup_vs_compile, memory_ratio, ...}.

    "eager" is each group's baseline: reference eager for the ops, fp32 + reference for
    the train step (``extra_info["baseline"]``)."""
    groups = defaultdict(dict)
    env = {}
    device_name = None
    for rec in records:
        info = rec.get("extra_info", {})
        # an op case's own "device" ("cpu", "cuda") overwrites the environment's device name
        if info.get("device") not in (None, "cpu", "cuda"):
            device_name = device_name or info["device"]
        if info.get("kind") in FUSED_VS_EAGER_KINDS and not env:
            env = {k: info.get(k) for k in ("device", "torch", "triton", "commit", "date")}
        if info.get("kind") not in ("op", "train"):
            continue
        env = {k: info.get(k) for k in ("device", "torch", "triton", "commit", "date")}
        # A train step's precisions are compared with each other (baseline fp32+reference).
        key = (info["op"], info["mode"], info["shape"], "-" if info["kind"] == "train" else info["dtype"])
        groups[key][info["backend"]] = (rec["stats"]["median"], info)
    if device_name:
        env["device"] = device_name
    rows = []
    for key, by_backend in groups.items():
        baseline = next(iter(by_backend.values()))[1].get("baseline", BASELINE)
        eager = by_backend.get(baseline)
        compiled = by_backend.get(COMPILED)
        for backend, (median, info) in by_backend.items():
            row = dict(zip(("op", "mode", "shape", "dtype"), key), backend=backend, median_s=median,
                       peak_extra_bytes=info.get("peak_extra_bytes"))
            if info.get("images"):
                row["images_per_s"] = info["images"] / median
            row["speedup_vs_eager"] = eager[0] / median if eager else None
            row["speedup_vs_compile"] = compiled[0] / median if compiled else None
            if eager and info.get("peak_extra_bytes") and eager[1].get("peak_extra_bytes"):
                row["memory_ratio_vs_eager"] = info["peak_extra_bytes"] / eager[1]["peak_extra_bytes"]
            else:
                row["memory_ratio_vs_eager"] = None
            rates = info.get("rates") or {}
            if rates and "flops" in info:
                row["tflops"] = info["flops"] / median / 1e12
                matmul = rates.get("matmul_flops_bf16" if info["dtype"] != "fp32" else "matmul_flops_fp32")
                row["fraction_of_matmul"] = info["flops"] / median / matmul if matmul else None
                row["fraction_of_copy"] = info["min_bytes"] / median / rates["copy_bytes"]
            rows.append(row)
    rows.sort(key=lambda r: (r["op"], r["mode"], r["shape"], r["dtype"], r["backend"]))
    return {"environment": env, "rows": rows, "train_breakdown": _train_breakdown(records),
            "fused_vs_eager": _fused_vs_eager(records)}


def _train_breakdown(records: list[dict]) -> list[dict]:
    """Per train-step case: × the baseline step, the share of each profiler range, the
    patch part's (heads + loss, fwd+bwd) share and, on a GPU, its kernel launches."""
    train = [(rec["stats"]["median"], rec["extra_info"]) for rec in records
             if rec.get("extra_info", {}).get("kind") == "train"]
    base = next((m for m, info in train if info["backend"] == info.get("baseline")), None)
    out = []
    for median, info in train:
        out.append({"case": info["backend"], "median_s": median,
                    "speedup_vs_baseline": base / median if base else None,
                    "range_share": info.get("range_share"), "patch_share": info.get("patch_share"),
                    "patch_part_s": info.get("patch_part_s"), "patch_launches": info.get("patch_launches")})
    out.sort(key=lambda r: r["median_s"], reverse=True)
    return out


def _fused_vs_eager(records: list[dict]) -> list[dict]:
    """The fused losses against eager, timed interleaved: the rows form (bench_rows_cpu.py,
    all layers in one call) and the map form (bench_ext_cpu.py, one call per layer)."""
    out = []
    for rec in records:
        info = rec.get("extra_info", {})
        if info.get("kind") in FUSED_VS_EAGER_KINDS:
            row = {k: info.get(k) for k in ("op", "shape", "groups", "threads", "eager_median_s",
                                            "fused_median_s", "speedup", "target")}
            row["form"] = FUSED_VS_EAGER_KINDS[info["kind"]]
            out.append(row)
    return sorted(out, key=lambda r: (r["form"], r["op"], r["threads"]))


def to_markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [f"Device: {env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · "
             f"commit {env.get('commit')} · {env.get('date')}", ""]
    gpu = any("tflops" in r for r in summary["rows"])
    head = ["op", "mode", "shape", "dtype", "backend", "median", "× eager", "× compile",
            "peak extra mem", "mem / eager", "img/s"]
    if gpu:
        head += ["TFLOP/s", "of matmul", "of copy"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ratio(v, digits=2):
        return "-" if v is None else f"{v:.{digits}f}"

    for r in summary["rows"]:
        cells = [r["op"], r["mode"], r["shape"], r["dtype"], r["backend"], f"{r['median_s'] * 1e3:.2f} ms",
                 ratio(r["speedup_vs_eager"]), ratio(r["speedup_vs_compile"]),
                 _fmt_bytes(r["peak_extra_bytes"]), ratio(r["memory_ratio_vs_eager"], 3),
                 ratio(r.get("images_per_s"), 1)]
        if gpu:
            cells += [ratio(r.get("tflops")), ratio(r.get("fraction_of_matmul"), 3),
                      ratio(r.get("fraction_of_copy"), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    breakdown = summary.get("train_breakdown") or []
    if breakdown:
        names = list(next((r["range_share"] for r in breakdown if r["range_share"]), {}) or {})
        head = ["train step case", "median", "× baseline", *[f"{n} %" for n in names],
                "patch part fwd+bwd", "patch part %", "patch launches"]
        lines += ["", "Train step breakdown (ranges: share of a profiled step; the heads' and the "
                  "loss's backward run inside G backward; patch part = heads + loss, fwd+bwd, "
                  "timed alone on maps of the step's shape):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in breakdown:
            shares = r["range_share"] or {}
            lines.append("| " + " | ".join([
                r["case"], f"{r['median_s'] * 1e3:.0f} ms", ratio(r["speedup_vs_baseline"]),
                *[ratio(100 * shares[n], 1) if n in shares else "-" for n in names],
                "-" if r["patch_part_s"] is None else f"{r['patch_part_s'] * 1e3:.1f} ms",
                ratio(None if r["patch_share"] is None else 100 * r["patch_share"], 1),
                "-" if r["patch_launches"] is None else str(r["patch_launches"])]) + " |")
    vs_eager = summary.get("fused_vs_eager") or []
    if vs_eager:
        head = ["form", "op", "shape", "groups", "threads", "eager", "fused", "× eager", "target"]
        lines += ["", "Fused loss vs eager, fwd+bwd, interleaved medians (rows form: all layers in one "
                  "call; map form: one call per layer):",
                  "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in vs_eager:
            lines.append("| " + " | ".join([
                str(r["form"]), str(r["op"]), str(r["shape"]), str(r["groups"]), str(r["threads"]),
                f"{r['eager_median_s'] * 1e3:.2f} ms", f"{r['fused_median_s'] * 1e3:.2f} ms",
                ratio(r["speedup"]), f"≥ {r['target']:g}"]) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    """Bar chart of every backend's speedup over reference eager, one bar group per case."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["speedup_vs_eager"] is not None]
    cases = sorted({(r["op"], r["mode"], r["shape"], r["dtype"]) for r in rows})
    backends = sorted({r["backend"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.6), 4.5))
    width = 0.8 / max(1, len(backends))
    for j, backend in enumerate(backends):
        values = {(r["op"], r["mode"], r["shape"], r["dtype"]): r["speedup_vs_eager"]
                  for r in rows if r["backend"] == backend}
        ax.bar([i + j * width for i in range(len(cases))], [values.get(c, 0) for c in cases], width, label=backend)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{op.replace('patch_', '')} {mode}\n{shape} {dtype}" for op, mode, shape, dtype in cases],
                       rotation=60, ha="right", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speedup over reference eager (×)")
    ax.set_title(summary["environment"].get("device") or "")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(summary: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("summary.json", "summary.md", "speedups.png")]
    with open(paths[0], "w") as f:
        json.dump(summary, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(to_markdown(summary))
    if summary["rows"]:
        plot(summary, paths[2])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Summarise a pytest-benchmark JSON of pdml's benchmarks.")
    parser.add_argument("json", help="file written by pytest benchmarks/ --benchmark-json=FILE")
    parser.add_argument("--out", help="also write summary.json/.md and speedups.png here")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        summary = summarise(json.load(f)["benchmarks"])
    print(to_markdown(summary))
    if args.out:
        write(summary, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
