"""``python -m pdml.experiments.hu_shift``: the HU-shift experiment's command line.

Parses the arguments and runs :func:`pdml.experiments.ablation.run_experiment` (the
design: :mod:`pdml.experiments.design`; docs/hu-shift.md). One ``error:`` line and exit
code 2 for a user's mistake, 130 for Ctrl-C (an invocation repeated later reuses every
finished run and resumes the interrupted ones).
"""
from __future__ import annotations

import argparse
import sys

from pdml.classical import METHODS as CLASSICAL_METHODS
from pdml.experiments.design import ND_OFFSET_HU, PLANS, PRESET_JOBS


def _parser() -> argparse.ArgumentParser:
    from pdml import ops
    from pdml.training import PRECISIONS

    p = argparse.ArgumentParser(
        prog="python -m pdml.experiments.hu_shift",
        description="The HU-shift experiment (docs/hu-shift.md): GAN only, metric learning "
                    "and PatchNCE on same-anatomy domains whose ND side carries a known "
                    f"{ND_OFFSET_HU:+g} HU acquisition offset, a λ sweep, the confirmation on "
                    "fresh seeds, controls at 0 HU, a supervised bound, TV / NLM / BM3D, and "
                    "the paper's own design as a second table; verdicts by rules declared "
                    "before the runs.")
    p.add_argument("--preset", choices=sorted(PLANS), default="shift",
                   help="shift: the whole experiment on a CPU (2 runs at a time, one thread "
                        "each); shift-gpu: the same runs on one GPU, 12 at a time, each capped "
                        "at 4 min; quick: a few steps per run (it runs; not a result)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder; repeating a command with the same folder reuses its "
                        "finished runs (default runs/<time>-hu-shift)")
    p.add_argument("--jobs", type=int,
                   help=f"runs trained at a time, as processes (default {PRESET_JOBS})")
    p.add_argument("--classical", nargs="+", choices=CLASSICAL_METHODS,
                   default=list(CLASSICAL_METHODS),
                   help="classical baselines in the main table, each tuned once on half the "
                        "held-out slices (bm3d needs pip install 'pdml[classical]')")
    p.add_argument("--no-classical", action="store_true", help="no classical baselines")
    p.add_argument("--precision", choices=PRECISIONS, help="training precision of every run")
    p.add_argument("--loss-backend", choices=ops.BACKEND_NAMES)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the preset's)")
    p.add_argument("--threads", type=int, help="CPU threads per run (default: the preset's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    from pdml.experiments.ablation import run_experiment
    from pdml.training import TrainError

    args = _parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("precision", "loss_backend", "device", "threads")}
    if args.no_progress:
        overrides["progress"] = False
    command = "python -m pdml.experiments.hu_shift " + " ".join(
        sys.argv[1:] if argv is None else argv)
    try:
        run_experiment(args.preset, args.out, jobs=args.jobs,
                       classical=[] if args.no_classical else args.classical,
                       command=command.strip(), **overrides)
    except TrainError as e:
        print(f"hu_shift: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hu_shift: interrupted; run the same command again to continue (finished runs "
              "are reused)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
