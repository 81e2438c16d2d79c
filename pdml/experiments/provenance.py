"""Where a result comes from: the source commit, the machine, the versions."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path


def source_commit() -> dict:
    """The git commit of the pdml source in use and whether ``pdml/`` differs from it
    (``{"commit": None, "pdml_modified": None}`` outside a git checkout)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "pdml"], cwd=repo,
                               capture_output=True, timeout=30).returncode != 0
    except (OSError, subprocess.SubprocessError):  # not a git checkout (installed wheel)
        return {"commit": None, "pdml_modified": None}
    return {"commit": commit, "pdml_modified": dirty}


def commit_label(source: dict) -> str:
    """The commit of :func:`source_commit` for a report line."""
    commit = source.get("commit") or "unknown"
    return commit[:12] + (" (pdml/ modified locally)" if source.get("pdml_modified") else "")


def cpu_name() -> str:
    """The CPU model and core count, e.g. ``"AMD EPYC 9654 (2 cores)"``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def environment(device) -> dict:
    """The device (GPU name or CPU model), torch, pdml and Python versions, the commit and
    the time (UTC), for a result file."""
    import torch

    import pdml

    name = (torch.cuda.get_device_name(device) if getattr(device, "type", "cpu") == "cuda"
            else cpu_name())
    return {"device": name, "torch": torch.__version__, "pdml": pdml.__version__,
            "python": platform.python_version(), "source": source_commit(),
            "utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
