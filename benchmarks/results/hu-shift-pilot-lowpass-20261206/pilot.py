"""The pilot's runs (README.md): ``python benchmarks/results/hu-shift-pilot-lowpass-20261206/pilot.py``
from the repository root; finished runs are reused, interrupted ones resumed."""
import json
import sys
from pathlib import Path

from pdml.experiments.design import SHIFT_SETTING
from pdml.experiments.runner import RunPool
from pdml.training import make_config

HERE = Path(__file__).resolve().parent
RUNS = [(100.0, seed) for seed in range(400, 408)] + [(0.0, seed) for seed in (400, 401)]


def main() -> None:
    records = []
    with RunPool(2, HERE / "logs", sys.stdout) as pool:
        for offset, seed in RUNS:
            cfg = make_config("demo", **dict(SHIFT_SETTING, d_input="image+highpass+lowpass",
                                             loss="none", nd_offset_hu=offset, seed=seed,
                                             threads=1, progress=False,
                                             out=str(HERE / "runs" / f"gan-{offset:+g}-seed{seed}")))
            cfg.max_minutes = None  # no time limit (make_config reads None as "the preset's")
            pool.submit((offset, seed), cfg)
        while pool.pending:
            _, record = pool.next_done()
            records.append(record)
            records.sort(key=lambda r: (r["config"]["nd_offset_hu"], r["seed"]))
            (HERE / "records.json").write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
