"""Benchmark of the decoded-slice store: pdml-train on a large generated DICOM tree.

    python -m benchmarks.data_cache --root DATA --slices 4000 --out RESULTS

1. writes (once) a patient-layout tree (tests/ct_trees.py's format, AAPM/Mayo names) of
   ``--slices`` 512² slices per dose over ``--patients`` patients;
2. runs a 2-step training (the ``tiny`` preset with 128² crops, ``--patients DATA
   --val-patients P000``, as ``pdml-train`` sets it up: :class:`pdml.training.TrainingRun`)
   three times in a fresh cache folder: the first run decodes every file into the store,
   the second and third reuse it. For each run: the seconds from the process start to
   the end of the run's set-up, just before its first step (the child prints a line
   then), the whole run's wall time and its peak resident memory (``ru_maxrss`` of the
   child from ``os.wait4``, which counts the mapped store pages it touched).

Writes ``data_cache.json`` and ``data_cache.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def generate(root: Path, slices: int, patients: int, size: int = 512) -> None:
    """The tree (module doc); skipped when ``root/done.json`` records the same request."""
    from pdml.data import phantom
    from pydicom.uid import generate_uid

    sys.path.insert(0, str(REPO))
    from tests.ct_trees import write_slice

    request = {"slices": slices, "patients": patients, "size": size}
    done = root / "done.json"
    if done.exists() and json.loads(done.read_text()) == request:
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    per = [slices // patients + (p < slices % patients) for p in range(patients)]
    t0 = time.time()
    for p, count in enumerate(per):
        name = f"P{p:03d}"
        base = phantom(size, np.random.default_rng([0, p]))
        study, frame = generate_uid(), generate_uid()
        for dose, folder, noise in (("nd", "full_1mm", 10.0), ("ld", "quarter_1mm", 60.0)):
            series = generate_uid()
            for k in range(count):
                hu = np.roll(base, k % 37, axis=1) + rng.normal(0, noise, base.shape)
                write_slice(root / name / folder / f"{name}_{k:05d}.IMA", hu, patient=name,
                            study=study, series=series, frame_of_reference=frame,
                            z=-500.0 + k, description=folder, instance=k + 1)
        print(f"generated {name}: {count} slices per dose ({time.time() - t0:.0f} s)", flush=True)
    done.write_text(json.dumps(request))


_CHILD = """
import sys
from pdml.training import TrainingRun, make_config
root, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = make_config("tiny", patients=(root,), val_patients=("P000",), crop=128, steps=2,
                  decay_steps=1, out=out, threads=threads, progress=False, eval_figures=False)
run = TrainingRun(cfg)
print("SETUP_DONE", flush=True)
run.run()
"""


def one_run(root: Path, cache: Path, out: Path, threads: int) -> dict:
    """One pdml-train run (module doc): the child prints a line when the run is set up
    (data, store, networks), just before its first step; -> timings and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PDML_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(out), str(threads)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first_step, lines = None, []
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        if first_step is None and line.startswith("SETUP_DONE"):
            first_step = time.perf_counter() - t0
        lines.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    output = "".join(lines)
    if os.waitstatus_to_exitcode(status) != 0 or first_step is None:
        raise SystemExit(f"pdml-train failed:\n{output[-3000:]}")
    return {"first_step_s": first_step, "wall_s": wall,
            "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30, "output_tail": output[-600:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--slices", type=int, default=4000, help="512² slices per dose")
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    t0 = time.time()
    generate(args.root / "tree", args.slices, args.patients)
    generated_s = time.time() - t0
    files = sum(1 for _ in (args.root / "tree").rglob("*.IMA"))
    cache = args.root / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    runs = []
    args.out.mkdir(parents=True, exist_ok=True)
    for k in range(3):   # each run's numbers are kept as they come (a long first build)
        runs.append(one_run(args.root / "tree", cache, args.root / f"run{k}", args.threads))
        (args.out / "data_cache.partial.json").write_text(json.dumps(
            {"slices_per_dose": args.slices, "files": files, "generation_s": generated_s,
             "runs": runs}, indent=1) + "\n")
        print(f"run {k}: {runs[-1]['first_step_s']:.1f} s to the first step, peak RSS "
              f"{runs[-1]['peak_rss_gib']:.2f} GiB", flush=True)
    (args.out / "data_cache.partial.json").unlink()
    store_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    result = {
        "slices_per_dose": args.slices, "patients": args.patients, "files": files,
        "size": 512, "dicom_bytes": sum(f.stat().st_size for f in (args.root / "tree").rglob("*.IMA")),
        "store_bytes": store_bytes, "in_memory_float32_gib": 2 * 2 * args.slices * 512 * 512 * 4 / 2**30,
        "generation_s": generated_s, "runs": runs,
        "startup_speedup": runs[0]["first_step_s"] / runs[1]["first_step_s"],
        "startup_speedup_third": runs[0]["first_step_s"] / runs[2]["first_step_s"],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_at_end": os.getloadavg()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| {name} | {r['first_step_s']:.1f} | {r['wall_s']:.1f} | "
                     f"{r['peak_rss_gib']:.2f} |"
                     for name, r in zip(("first (builds the store)", "second (reuses it)",
                                         "third (reuses it)"), runs))
    (args.out / "data_cache.md").write_text(
        f"# Decoded-slice store: {args.slices} slices of 512² per dose ({files} DICOM files, "
        f"{args.patients} patients)\n\n"
        "| pdml-train run | start-up to the first step (s) | wall (s) | peak RSS (GiB) |\n"
        "|---|---|---|---|\n" + rows + "\n\n"
        f"Start-up speed-up, second run over first: {result['startup_speedup']:.1f}x "
        f"(third: {result['startup_speedup_third']:.1f}x). Store on disk: "
        f"{store_bytes / 2**30:.1f} GiB (HU and wavelet high band, float32); holding both "
        f"doses' slices and high bands in memory would take "
        f"{result['in_memory_float32_gib']:.1f} GiB.\n")
    print((args.out / "data_cache.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
