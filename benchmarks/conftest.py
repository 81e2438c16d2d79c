"""pytest configuration of ``pytest benchmarks/``: the device, and the summary at the end.

The summary (speedups, memory ratios, GPU rates) is printed after the run and written
to ``$PDML_BENCH_OUT`` (default ``.benchmarks/pdml``): summary.json, summary.md,
speedups.png.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, summary  # noqa: E402


# pytest-benchmark's table: set here rather than in pyproject's addopts, so that
# `pytest tests/` runs without the plugin. A value given on the command line wins.
TABLE_OPTIONS = {"benchmark_columns": ["median", "iqr", "rounds"], "benchmark_sort": "name"}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # tryfirst: before the plugin's own pytest_configure reads these into its session.
    given = " ".join(config.invocation_params.args)
    for dest, value in TABLE_OPTIONS.items():
        if hasattr(config.option, dest) and "--" + dest.replace("_", "-") not in given:
            setattr(config.option, dest, value)


def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="cpu or cuda (default: cuda when available)")


@pytest.fixture(scope="session")
def device(pytestconfig):
    return pytestconfig.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device_rates(device):
    """Matmul and copy rates of this GPU, measured once at the start of the run."""
    return harness.measured_rates(device)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    # A case that failed before timing has no rounds: it has no figures to summarise.
    result = summary.summarise([b.as_dict(include_data=False) for b in session.benchmarks if b.stats])
    if not (result["rows"] or result["fused_vs_eager"]):
        return
    out_dir = os.environ.get("PDML_BENCH_OUT", os.path.join(harness.REPO, ".benchmarks", "pdml"))
    paths = summary.write(result, out_dir)
    terminalreporter.write_sep("=", "pdml benchmark summary")
    terminalreporter.write(summary.to_markdown(result))
    terminalreporter.write_line(f"written: {', '.join(paths)}")

