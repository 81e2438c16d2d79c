"""pdml.experiments: the HU-shift experiment end to end at the quick size (every phase:
the λ sweep, the choice, the confirmation arms, the supervised bound, the paper's table,
classical rows, the report), the result file written as runs finish, reuse and refusal of
a folder, and the declared rules (endpoint, plateau, statistics, validity, choice of λ,
verdicts) on numbers made here."""
import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pdml.experiments import design, endpoints, hu_shift, statistics, verdicts
from pdml.experiments.design import Arm

# BM3D takes about a second per 64² slice here: the wiring is tested with the two fast
# baselines (tests/test_classical.py tests BM3D itself)
CLASSICAL = ("tv", "nlm")

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


def _main(args) -> tuple[int, str]:
    printed = io.StringIO()  # module-scoped fixtures: capsys is not available there
    with contextlib.redirect_stdout(printed):
        code = hu_shift.main(args)
    return code, printed.getvalue()


def _again(out: Path) -> tuple[dict, str]:
    """The quick experiment run again into ``out`` (no classical rows); it must succeed.
    -> (its ablation.json, what it printed)."""
    code, printed = _main(["--preset", "quick", "--out", str(out), "--no-progress",
                           "--no-classical"])
    assert code == 0, printed[-2000:]
    return json.loads((out / "ablation.json").read_text()), printed


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``--preset quick`` through the command line -> (out dir, ablation.json)."""
    out = tmp_path_factory.mktemp("hu-shift")
    code, printed = _main(["--preset", "quick", "--out", str(out), "--no-progress",
                           "--classical", *CLASSICAL])
    assert code == 0, printed[-3000:]
    return out, json.loads((out / "ablation.json").read_text())


def test_every_arm_and_seed_of_the_plan_is_trained_once_with_its_settings(quick):
    out, doc = quick
    plan = design.PLANS["quick"]
    assert doc["format"] == "pdml-hu-shift-experiment" and doc["complete"] is True
    choice = {loss: doc["lambda_choice"][loss]["lambda"] for loss in ("dml", "patchnce")}
    assert all(lam in plan.lambda_grid for lam in choice.values())
    arms = plan.first_arms() + plan.chosen_arms(choice["dml"], choice["patchnce"])
    arms = list(dict.fromkeys(arms))
    want = sorted((a.role, a.key, s) for a in arms for s in a.seeds)
    got = sorted((r["role"], r["arm"], r["seed"]) for r in doc["runs"])
    assert got == want
    for run in doc["runs"]:
        assert not Path(run["run_dir"]).is_absolute() and run["config"]["out"] == run["run_dir"]
        cfg = json.loads((out / run["run_dir"] / "config.json").read_text())
        assert cfg.pop("resolved")["device"] == "cpu"
        assert Path(cfg.pop("out")) == out / run["run_dir"]
        assert cfg == {k: v for k, v in run["config"].items() if k != "out"}
        arm = next(a for a in arms if a.key == run["arm"] and a.role == run["role"])
        assert cfg["seed"] == run["seed"] and cfg["nd_offset_hu"] == arm.nd_offset_hu
        assert cfg["loss"] == arm.loss and cfg["supervised"] == arm.supervised
        assert cfg["wavelet"] == (arm.setting == "paper")
        assert cfg["d_input"] == ("image" if arm.setting == "paper" else "image+highpass+lowpass")
        assert cfg["builtin_layout"] == "same-anatomy" and cfg["eval_figures"] is False
        assert cfg["max_minutes"] is None and not run["stopped_early"]
        if arm.lambda_metric is not None:
            assert cfg["lambda_metric"] == arm.lambda_metric
        # every evaluation on every held-out slice; the endpoint from the last 25 %
        assert run["evals"] and all(e["slices"] == cfg["val_slices"] for e in run["evals"])
        assert run["values"]["window_steps"] == [4]  # evaluations at 2 and 4: the last one
        # the commit each run was trained at
        session = run["provenance"]["sessions"][0]
        assert session["how"] == "trained" and set(session) >= {"commit", "pdml_modified"}
        assert json.loads((out / run["run_dir"] / "provenance.json").read_text()) == \
            run["provenance"]


def test_the_tables_follow_from_the_runs_and_the_rules(quick):
    out, doc = quick
    main = doc["tables"]["main"]
    by_key = {r["key"]: r for r in main["rows"]}
    gan = by_key["none"]
    runs = [r for r in doc["runs"] if r["role"] == "main" and r["arm"] == "none"]
    assert gan["hu_shift"]["per_seed"] == [r["values"]["hu_shift"] for r in
                                           sorted(runs, key=lambda r: r["seed"])]
    assert gan["hu_shift"]["mean"] == pytest.approx(np.mean(gan["hu_shift"]["per_seed"]))
    assert gan["abs_hu_shift"]["per_seed"] == [abs(v) for v in gan["hu_shift"]["per_seed"]]
    assert {r["key"] for r in main["classical"]} == set(CLASSICAL)
    assert main["validity"]["rule"] == design.VERDICT_RULES["validity"]
    dml_keys = {v["arm"] for v in main["verdicts"]}
    assert f"dml-l{design.PAPER_LAMBDA:g}" in dml_keys
    for v in main["verdicts"]:
        assert set(v["parts"]) == {"ct_numbers", "noise", "anatomy", "classical"}
        if not main["validity"]["valid"]:
            assert v["parts"]["ct_numbers"]["verdict"] == "no verdict"
    assert doc["tables"]["paper"]["rows"] and doc["tables"]["sweep"]["rows"]
    md = (out / "ablation.md").read_text()
    for rule in design.VERDICT_RULES.values():
        assert rule in md
    assert design.LAMBDA_RULE in md and main["validity"]["statement"] in md
    assert md.count("| LD input (untouched) |") == 3  # sweep, main, paper tables
    for name in ("tradeoff.png", "curves.png", "examples.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert doc["figures"] == {"tradeoff": "tradeoff.png", "curves": "curves.png",
                              "examples": "examples.png"}


def test_a_repeated_command_reuses_every_run_and_other_settings_are_refused(quick, capsys):
    out, before = quick
    # a run folder written before a setting existed (here: supervised, "resolved") and
    # before τ was recorded: read as pdml-train reads it, still the same run
    old = out / before["runs"][0]["run_dir"] / "config.json"
    config = json.loads(old.read_text())
    for key in ("supervised", "resolved"):
        config.pop(key)
    config["tau"] = None
    old.write_text(json.dumps(config))
    after, _ = _again(out)
    assert {r["how"] for r in after["runs"]} == {"reused"}
    assert [r["values"] for r in after["runs"]] == [r["values"] for r in before["runs"]]
    # the same folder with other training settings: one line, exit 2, nothing trained
    from pdml.experiments import ablation

    other = dict(design.PRESET_OVERRIDES["quick"], steps=6)
    original = dict(design.PRESET_OVERRIDES["quick"])
    design.PRESET_OVERRIDES["quick"] = other
    try:
        code, _ = _main(["--preset", "quick", "--out", str(out), "--no-progress",
                         "--no-classical"])
    finally:
        design.PRESET_OVERRIDES["quick"] = original
    err = capsys.readouterr().err
    assert code == 2 and "other settings" in err and len(err.strip().splitlines()) == 1
    assert ablation is not None


def test_a_results_folder_without_the_weights_is_reused_from_its_records(quick, tmp_path):
    """Results shared or kept without the checkpoints: every run is reused, same values."""
    import shutil

    out, before = quick
    copy = tmp_path / "results"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints", "*.log"))
    assert not list(copy.rglob("*.pt"))
    after, printed = _again(copy)
    assert {r["how"] for r in after["runs"]} == {"reused"}
    assert [r["values"] for r in after["runs"]] == [r["values"] for r in before["runs"]]
    assert [r["provenance"] for r in after["runs"]] == [r["provenance"] for r in before["runs"]]
    assert (copy / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_whose_folders_are_gone_are_restored_from_ablation_json(quick, tmp_path):
    """ablation.json kept without runs/ (or with some run folders lost): the kept records
    are restored, a lost run that the file did not keep is trained, and a kept record with
    other settings is refused."""
    import shutil

    out, before = quick
    copy = tmp_path / "results"
    shutil.copytree(out, copy)
    doc = json.loads((copy / "ablation.json").read_text())
    dropped = doc["runs"].pop()  # as if the invocation was stopped before this run ended
    doc["complete"] = False
    (copy / "ablation.json").write_text(json.dumps(doc))
    shutil.rmtree(copy / "runs")
    after, printed = _again(copy)
    assert f"{len(before['runs']) - 1} runs restored" in printed
    how = {(r["role"], r["arm"], r["seed"]): r["how"] for r in after["runs"]}
    key = (dropped["role"], dropped["arm"], dropped["seed"])
    assert how.pop(key) == "trained" and set(how.values()) == {"restored"}
    assert sorted((r["role"], r["arm"], r["seed"], json.dumps(r["values"]))
                  for r in after["runs"]) == \
        sorted((r["role"], r["arm"], r["seed"], json.dumps(r["values"]))
               for r in before["runs"])
    assert all(r["run_dir"] == r["config"]["out"] and not Path(r["run_dir"]).is_absolute()
               for r in after["runs"])
    assert after["earlier_elapsed_s"] == pytest.approx(doc.get("earlier_elapsed_s", 0.0)
                                                      + doc["elapsed_s"])
    assert "min in all with the earlier ones" in (copy / "ablation.md").read_text()
    # a kept record trained with other settings: refused, nothing trained
    doc = json.loads((copy / "ablation.json").read_text())
    doc["runs"][0]["config"]["lr"] *= 2
    (copy / "ablation.json").write_text(json.dumps(doc))
    shutil.rmtree(copy / "runs")
    code, _ = _main(["--preset", "quick", "--out", str(copy), "--no-progress",
                     "--no-classical"])
    assert code == 2
    # an ablation.json that is not one (edited by hand, cut short by a full disk): refused
    (copy / "ablation.json").write_text('{"format": "pdml-hu-')
    code, _ = _main(["--preset", "quick", "--out", str(copy), "--no-progress",
                     "--no-classical"])
    assert code == 2


def test_a_run_stopped_by_its_time_limit_is_resumed_when_its_checkpoint_is_kept(
        tmp_path, monkeypatch):
    """A later invocation continues a capped run; without its weights it is kept as it is
    (and the experiment excludes it)."""
    from pdml import training
    from pdml.experiments import runner

    cfg = training.make_config("tiny", out=str(tmp_path / "run"), steps=8)
    run = Path(cfg.out)
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    capped = {"steps": 5, "planned_steps": 8, "stopped_early": True, "elapsed_s": 1.0}
    calls = []

    def fake_train(cfg=None, resume=None, stream=None):
        calls.append(resume)
        return dict(capped, steps=8, stopped_early=False)

    monkeypatch.setattr(training, "train", fake_train)
    summary, how, _ = runner.train_or_reuse(cfg, io.StringIO())
    assert how == "trained" and calls == [None]  # no checkpoint, no summary: a new run
    (run / "summary.json").write_text(json.dumps(capped))
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    summary, how, provenance = runner.train_or_reuse(cfg, io.StringIO())
    assert how == "resumed" and calls[-1] == str(run) and summary["steps"] == 8
    assert [s["how"] for s in provenance["sessions"]] == ["trained", "resumed"]
    (run / "checkpoints" / "last.pt").unlink()
    summary, how, _ = runner.train_or_reuse(cfg, io.StringIO())
    assert how == "reused" and summary == capped and len(calls) == 2


def test_a_run_stopped_by_a_signal_is_not_a_result(tmp_path, monkeypatch):
    """Ctrl-C reaches the training workers too: a run they stop is resumed next time, never
    recorded as finished."""
    from pdml import training
    from pdml.experiments import runner

    cfg = training.make_config("tiny", out=str(tmp_path / "run"), steps=8)
    stopped = {"steps": 3, "planned_steps": 8, "stopped_early": False, "interrupted": "SIGINT"}
    monkeypatch.setattr(runner, "train_or_reuse", lambda cfg, stream: (stopped, "trained", {}))
    with runner.RunPool(1, tmp_path, io.StringIO()) as pool:
        pool.submit("key", cfg)
        with pytest.raises(KeyboardInterrupt):
            pool.next_done()


def _long_tiny_runs(root: Path, n: int) -> list:
    from pdml import training

    return [training.make_config("tiny", out=str(root / "runs" / f"seed{s}"), seed=s,
                                 steps=100_000, ckpt_every=10**6, eval_every=10**6,
                                 progress=False, threads=1) for s in range(n)]


def _when(condition, timeout_s: float = 300.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_sigterm_stops_the_pool_workers_after_their_step_and_starts_no_new_run(tmp_path):
    """SIGTERM to the experiment (as to any process of a shell's job): each of the two
    training workers stops after its current step with a checkpoint (resumed next time),
    the pool waits for them, and the third run never starts."""
    import multiprocessing
    import os
    import signal
    import threading

    from pdml.experiments import runner

    handler = signal.getsignal(signal.SIGTERM)
    cfgs = _long_tiny_runs(tmp_path, 3)
    metrics = [Path(c.out) / "metrics.jsonl" for c in cfgs]

    def stop_when_both_train():
        try:
            _when(lambda: all(m.exists() for m in metrics[:2]))
        finally:  # also on a timeout: the pool must not wait for 100,000 steps
            os.kill(os.getpid(), signal.SIGTERM)

    printed = io.StringIO()
    stopper = threading.Thread(target=stop_when_both_train, daemon=True)
    with pytest.raises(KeyboardInterrupt):
        with runner.RunPool(2, tmp_path / "logs", printed) as pool:
            for i, cfg in enumerate(cfgs):
                pool.submit(i, cfg)
            stopper.start()
            pool.next_done()
    stopper.join(1)
    assert "stopping 2 running run(s)" in printed.getvalue()
    assert not multiprocessing.active_children()
    for cfg in cfgs[:2]:
        summary = json.loads((Path(cfg.out) / "summary.json").read_text())
        assert summary["interrupted"] == "SIGTERM" and 0 < summary["steps"] < 100_000
        assert (Path(cfg.out) / "checkpoints" / "last.pt").exists()
    assert not Path(cfgs[2].out).exists()
    assert signal.getsignal(signal.SIGTERM) is handler


def test_a_pool_worker_that_dies_is_an_error_naming_its_run(tmp_path):
    import multiprocessing
    import os
    import signal
    import threading

    from pdml.experiments import runner
    from pdml.training import TrainError

    cfg, = _long_tiny_runs(tmp_path, 1)

    def kill_the_worker():
        try:
            _when(lambda: (Path(cfg.out) / "metrics.jsonl").exists())
        finally:  # also on a timeout: the pool must not wait for 100,000 steps
            (worker,) = multiprocessing.active_children()
            os.kill(worker.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_worker, daemon=True)
    with runner.RunPool(2, tmp_path / "logs", io.StringIO()) as pool:
        pool.submit("key", cfg)
        killer.start()
        with pytest.raises(TrainError, match=r"seed0 ended without a result \(exit code -9\)"):
            pool.next_done()
    killer.join(1)


_POOL_SCRIPT = """
import io, sys
from pdml import training
from pdml.experiments import runner
cfg = training.make_config("tiny", out=sys.argv[1], steps=100_000, ckpt_every=10**6,
                           eval_every=10**6, progress=False, threads=1)
with runner.RunPool(2, sys.argv[2], io.StringIO()) as pool:
    pool.submit("key", cfg)
    pool.next_done()
"""


def test_a_pool_killed_outright_stops_its_workers_after_their_step(tmp_path):
    """SIGKILL to the experiment's process (no handler runs there): its worker still stops
    after its step with a checkpoint instead of training on alone."""
    import os
    import signal
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    run = tmp_path / "run"
    pool = subprocess.Popen([sys.executable, "-c", _POOL_SCRIPT, str(run), str(tmp_path / "logs")])
    try:
        _when(lambda: (run / "metrics.jsonl").exists())
    finally:
        os.kill(pool.pid, signal.SIGKILL)
        pool.wait()
    _when(lambda: (run / "summary.json").exists(), timeout_s=120)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["steps"] < 100_000
    assert (run / "checkpoints" / "last.pt").exists()


def test_the_result_file_is_written_as_runs_finish_and_ctrl_c_is_one_line(tmp_path, monkeypatch,
                                                                         capsys):
    from pdml.experiments import runner

    real = runner.RunPool.next_done
    calls = []

    def stop_after_two(self):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self)

    monkeypatch.setattr(runner.RunPool, "next_done", stop_after_two)
    code, _ = _main(["--preset", "quick", "--out", str(tmp_path), "--no-progress",
                     "--no-classical"])
    assert code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run the same command again" in err[0]
    doc = json.loads((tmp_path / "ablation.json").read_text())
    assert doc["complete"] is False and len(doc["runs"]) == 2 and "tables" not in doc


# --------------------------------------------------------------------------- the rules

def _evals(shifts, start=100, every=100):
    return [{"step": start + i * every, "slices": 10, "hu_shift": s, "noise_std": 5.0,
             "psnr": 30.0, "ssim": 0.9, "ld_hu_shift": 0.0, "ld_noise_std": 20.0,
             "ld_psnr": 40.0, "ld_ssim": 0.95} for i, s in enumerate(shifts)]


def test_the_endpoint_is_the_last_quarter_of_the_evaluations_and_plateau_is_10_hu():
    evals = _evals([0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 98])
    assert [e["step"] for e in endpoints.endpoint_window(evals)] == [1000, 1100, 1200]
    values = endpoints.run_values(evals)
    assert values["hu_shift"] == pytest.approx(np.mean([90, 100, 98]))
    # least-squares rise across the window: slope 4 HU / 100 steps over 200 steps
    assert values["hu_shift_movement"] == pytest.approx(8.0)
    assert values["plateaued"] is True
    moving = endpoints.run_values(_evals([0] * 9 + [80, 100, 121]))
    assert moving["hu_shift_movement"] == pytest.approx(41.0) and moving["plateaued"] is False
    assert endpoints.endpoint_window(_evals([5, 6, 7]))[0]["step"] == 300  # ceil(0.75) = 1
    assert [e["step"] for e in endpoints.endpoint_window(_evals(range(5)))] == [400, 500]
    with pytest.raises(ValueError, match="no held-out evaluation"):
        endpoints.endpoint_window([])


def test_confidence_intervals_and_paired_differences():
    from scipy import stats

    ci = statistics.mean_ci([1.0, 2.0, 3.0, 4.0])
    half = stats.t.ppf(0.975, 3) * np.std([1, 2, 3, 4], ddof=1) / 2
    assert ci["mean"] == 2.5 and ci["lo"] == pytest.approx(2.5 - half) and ci["n"] == 4
    one = statistics.mean_ci([7.0])
    assert one["mean"] == 7.0 and math.isnan(one["lo"]) and math.isnan(one["sd"])
    d = statistics.paired_difference([5.0, 6.0, 9.0], [1.0, 1.0, 2.0])
    assert d["values"] == [4.0, 5.0, 7.0] and d["mean"] == pytest.approx(16 / 3)
    assert d["p"] == pytest.approx(stats.ttest_rel([5, 6, 9], [1, 1, 2]).pvalue)
    assert statistics.excludes_zero(d) == "above"
    assert statistics.excludes_zero(statistics.mean_ci([-1.0, 1.0])) == "spans"
    assert statistics.excludes_zero(statistics.mean_ci([-3.0, -2.0, -2.5])) == "below"
    with pytest.raises(ValueError, match="paired"):
        statistics.paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        statistics.mean_ci([1.0, math.nan])


def _row(key, shifts, noise, loss="none", lam=None, offset=100.0, psnr=35.0, ssim=0.95):
    from pdml.experiments.tables import summarize_arm

    arm = Arm(loss, lam, offset, tuple(range(len(shifts))))
    records = []
    for seed, (s, n) in enumerate(zip(shifts, noise if isinstance(noise, list)
                                      else [noise] * len(shifts))):
        values = {"hu_shift": s, "noise_std": n, "psnr": psnr + 0.1 * seed,
                  "ssim": ssim, "hu_shift_movement": 0.0, "plateaued": True}
        records.append({"seed": seed, "stopped_early": False, "values": values,
                        "train_s": 1.0, "steps": 10, "provenance": {"sessions": []}})
    row = summarize_arm(arm, records)
    assert row["key"] == key
    return row


LD = {"key": "ld", "title": "LD", "noise_std": {"mean": 20.0}, "hu_shift": {"mean": 0.0},
      "psnr": {"mean": 34.0}, "ssim": {"mean": 0.9}, "abs_hu_shift": {"mean": 0.0}}


def test_validity_needs_every_seed_to_denoise_and_to_shift_50_hu_over_its_control():
    control = _row("none-0hu", [0.0, -5.0, 10.0], 10.0, offset=0.0)
    good = verdicts.validity(_row("none", [80.0, 60.0, 70.0], 10.0), control, LD)
    assert good["valid"] is True and good["statement"].startswith("Valid")
    assert [p["differential_hu"] for p in good["per_seed"]] == [80.0, 65.0, 60.0]
    short = verdicts.validity(_row("none", [80.0, 40.0, 70.0], 10.0), control, LD)
    assert short["valid"] is False and short["failing_seeds"] == [1]  # +45 HU
    noisy = verdicts.validity(_row("none", [80.0, 60.0, 70.0], [10.0, 17.0, 10.0]), control, LD)
    assert noisy["valid"] is False and noisy["failing_seeds"] == [1]  # 0.85× the LD noise
    one = verdicts.validity(_row("none", [80.0], 10.0), _row("none-0hu", [0.0], 10.0, offset=0.0),
                            LD)
    assert one["valid"] is False and "fewer than two seeds" in one["statement"]


def test_lambda_is_the_smallest_shift_among_those_that_denoise():
    rows = [_row("dml-l0.1", [80.0, 90.0], 10.0, "dml", 0.1),
            _row("dml-l1", [20.0, 30.0], 15.0, "dml", 1.0),
            _row("dml-l3", [2.0, 3.0], 19.0, "dml", 3.0)]  # keeps CT numbers but not denoising
    choice = verdicts.choose_lambda(rows, LD)
    assert choice["lambda"] == 1.0 and choice["denoising_lambdas"] == [0.1, 1.0]
    assert choice["flagged"] is False
    tie = verdicts.choose_lambda([_row("dml-l0.3", [5.0, 5.0], 10.0, "dml", 0.3),
                                  _row("dml-l0.1", [5.0, 5.0], 10.0, "dml", 0.1)], LD)
    assert tie["lambda"] == 0.1
    none = verdicts.choose_lambda([_row("dml-l1", [20.0, 30.0], 19.0, "dml", 1.0),
                                   _row("dml-l3", [2.0, 3.0], 19.0, "dml", 3.0)], LD)
    assert none["lambda"] == 3.0 and none["flagged"] is True and "flagged" in none["statement"]


def test_the_verdict_parts_follow_their_rules():
    gan = _row("none", [80.0, 90.0, 85.0, 95.0], 10.0)
    classical = [{"key": "bm3d", "title": "BM3D", "psnr": {"mean": 36.0},
                  "ssim": {"mean": 0.97}, "noise_std": {"mean": 3.0},
                  "hu_shift": {"mean": 0.0}}]
    kept = verdicts.verdict(_row("dml-l0.1", [2.0, -3.0, 4.0, 1.0], 10.0, "dml", 0.1), gan, LD,
                            classical, valid=True)
    parts = kept["parts"]
    assert parts["ct_numbers"]["verdict"] == "reproduced"
    assert parts["ct_numbers"]["paired_difference"]["hi"] < 0
    assert parts["noise"]["verdict"] == "reproduced" and parts["noise"]["ratio"] == 0.5
    assert parts["anatomy"]["verdict"] == "kept"
    assert parts["classical"]["verdict"] == "not better" and parts["classical"]["best"] == "bm3d"
    partly = verdicts.verdict(_row("dml-l0.1", [40.0, 50.0, 45.0, 42.0], 10.0, "dml", 0.1), gan,
                              LD, classical, valid=True)
    assert partly["parts"]["ct_numbers"]["verdict"] == "partly"
    same = verdicts.verdict(_row("dml-l0.1", [85.0, 88.0, 86.0, 94.0], 19.0, "dml", 0.1), gan, LD,
                            classical, valid=True)
    assert same["parts"]["ct_numbers"]["verdict"] == "not reproduced"
    assert same["parts"]["noise"]["verdict"] == "not reproduced"
    invalid = verdicts.verdict(_row("dml-l0.1", [2.0, -3.0, 4.0, 1.0], 10.0, "dml", 0.1), gan, LD,
                               classical, valid=False)
    assert invalid["parts"]["ct_numbers"]["verdict"] == "no verdict"
    assert invalid["parts"]["noise"]["verdict"] == "reproduced"  # judged on its own
    blurry = verdicts.verdict(_row("dml-l0.1", [2.0, -3.0, 4.0, 1.0], 10.0, "dml", 0.1,
                                   psnr=30.0), gan, LD, classical, valid=True)
    assert blurry["parts"]["anatomy"]["verdict"] == "not kept"


def test_arms_are_paired_by_seed_and_the_sweep_never_uses_confirmation_seeds():
    for plan in design.PLANS.values():
        sweep = {s for a in plan.first_arms() if a.role == "sweep" for s in a.seeds}
        main = {s for a in plan.first_arms() + plan.chosen_arms(0.3, 1.0) if a.role != "sweep"
                for s in a.seeds}
        assert not sweep & main
    arms = design.PLANS["shift"].first_arms()
    assert len({(a.key, a.role) for a in arms}) == len(arms)
    assert design.PLANS["shift"].chosen_arms(design.PAPER_LAMBDA, 1.0)[0].key == "dml-l0.1-0hu"
    keys = [a.key for a in design.PLANS["shift"].chosen_arms(0.3, 1.0)]
    assert keys == ["dml-l0.3", "dml-l0.3-0hu", "patchnce-l1"]


def test_runs_of_one_seed_start_from_the_same_networks_and_draw_the_same_crops(tmp_path):
    import torch

    from pdml.data import AcquisitionShift
    from pdml.training import make_config
    from pdml.training.run import TrainingRun

    quick = dict(design.PRESET_OVERRIDES["quick"], threads=1, progress=False)
    arms = (Arm("none", None, 100.0, (3,)), Arm("dml", 0.3, 0.0, (3,)))
    runs = [TrainingRun(make_config("demo", **dict(a.overrides(3), **quick,
                                                   out=str(tmp_path / a.key)))) for a in arms]
    try:
        for name in ("generator", "discriminator"):
            one, two = (getattr(r, name).state_dict() for r in runs)
            assert all(torch.equal(one[k], two[k]) for k in one), name
        (x1, y1), (x2, y2) = (r._batch(0) for r in runs)
        assert torch.equal(x1, x2)  # the same LD crops
        # the same ND crops, one with the +100 HU offset: undo it on the unit scale
        def unit(t):  # the networks' scale (centred on 0 HU, ×1) -> HU
            return t.numpy() * 2000.0
        np.testing.assert_allclose(unit(y1), AcquisitionShift(offset_hu=100.0)(unit(y2)),
                                   atol=1e-3)
    finally:
        for r in runs:
            r.close()
