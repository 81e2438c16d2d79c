"""Bad input never hurts (issue 15): a table of hostile inputs walked through both console
scripts, the DICOM reader and save_ct; a run whose losses go non-finite; two trainers on one
run folder; a killed run's temporary files; several series with a bad one among them.

Every CLI case must end with exit status 2 and exactly one line on stderr (no traceback),
leave the input files' bytes unchanged and leave no output behind. The table runs the
scripts' main functions in this process (an escaping exception fails the test, as a
traceback would); a few cases also run as real subprocesses.
"""
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

import pdml
from pdml.cli import denoise_main, train_main
from pdml.data import DicomReadError, load_ct, save_ct
from pdml.training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from pdml.training.config import make_config
from pdml.training.networks import build_generator

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")

REPO = Path(pdml.__file__).resolve().parent.parent


def _tree_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _checkpoint(cfg_dict: dict, generator_state: dict, step: int = 0) -> dict:
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
            "config": cfg_dict, "model": {"generator": generator_state, "discriminator": {},
                                          "heads": {}}}


def _run_folder(root: Path, name: str, ckpt: dict) -> Path:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run / "checkpoints" / "last.pt")
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """What the cases point at (never written by them): a CT folder, checkpoints (an
    untrained generator; NaN weights; a nonsense config), run folders, a plain file."""
    root = tmp_path_factory.mktemp("hostile_inputs")
    ct = root / "ct"
    ct.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), ct / "CT_small.dcm")
    cfg = make_config("tiny")
    torch.manual_seed(0)
    state = build_generator(cfg).state_dict()
    torch.save(_checkpoint(cfg.to_dict(), state), root / "good.pt")
    nan_state = dict(state)
    first = next(iter(nan_state))
    nan_state[first] = torch.full_like(nan_state[first], float("nan"))
    torch.save(_checkpoint(cfg.to_dict(), nan_state), root / "nan_weights.pt")
    torch.save(_checkpoint(dict(cfg.to_dict(), features=-1), state), root / "bad_config.pt")
    w = SimpleNamespace(root=root, ct=ct, ct_file=ct / "CT_small.dcm", good=root / "good.pt",
                        nan=root / "nan_weights.pt", bad_config=root / "bad_config.pt",
                        a_file=root / "a_file.txt")
    w.a_file.write_text("not a folder\n")
    w.run_nonsense = _run_folder(root, "run_nonsense", _checkpoint(
        dict(cfg.to_dict(), steps="many", tau=float("nan")), state))
    w.run_negative = _run_folder(root, "run_negative", _checkpoint(
        dict(cfg.to_dict(), lr=-1.0), state))
    w.run_listcfg = _run_folder(root, "run_listcfg", _checkpoint([1, 2, 3], state))
    w.run_nan = _run_folder(root, "run_nan", _checkpoint(cfg.to_dict(), nan_state))
    return w


# (case id, script, argv given the world, the output path and the expected words)
TRAIN = "pdml-train"
DENOISE = "pdml-denoise"
CASES = [
    ("tau-nan", TRAIN, lambda w, o: ["--tau", "nan", "--out", o], "--tau"),
    ("tau-inf", TRAIN, lambda w, o: ["--tau", "inf", "--out", o], "--tau"),
    ("tau-negative", TRAIN, lambda w, o: ["--tau", "-0.1", "--out", o], "--tau"),
    # the metric loss's exp(1/tau) overflows float32 below tau ~ 0.015 (pdml/_validation.py)
    ("tau-too-small-for-metric", TRAIN, lambda w, o: ["--tau", "1e-4", "--out", o], "--tau"),
    ("lr-nan", TRAIN, lambda w, o: ["--lr", "nan", "--out", o], "--lr"),
    ("lr-negative", TRAIN, lambda w, o: ["--lr", "-1", "--out", o], "--lr"),
    ("lr-zero", TRAIN, lambda w, o: ["--lr", "0", "--out", o], "--lr"),
    ("lambda-metric-nan", TRAIN, lambda w, o: ["--lambda-metric", "nan", "--out", o],
     "--lambda-metric"),
    ("lambda-gan-negative", TRAIN, lambda w, o: ["--lambda-gan", "-1", "--out", o],
     "--lambda-gan"),
    ("max-minutes-nan", TRAIN, lambda w, o: ["--max-minutes", "nan", "--out", o],
     "--max-minutes"),
    ("seed-negative", TRAIN, lambda w, o: ["--seed", "-1", "--out", o], "--seed"),
    ("steps-not-a-number", TRAIN, lambda w, o: ["--steps", "ten", "--out", o], "--steps"),
    ("device-tpu", TRAIN, lambda w, o: ["--device", "tpu", "--out", o], "--device"),
    ("device-meta", TRAIN, lambda w, o: ["--device", "meta", "--out", o], "--device"),
    ("device-cuda-word", TRAIN, lambda w, o: ["--device", "cuda:first", "--out", o], "--device"),
    ("out-is-a-file", TRAIN, lambda w, o: ["--out", str(w.a_file)], "not a folder"),
    ("out-below-a-file", TRAIN, lambda w, o: ["--out", str(w.a_file / "run")], "is a file"),
    ("resume-missing", TRAIN, lambda w, o: ["--resume", o], "no such run folder"),
    ("resume-nonsense-config", TRAIN, lambda w, o: ["--resume", str(w.run_nonsense)],
     "stored config"),
    ("resume-negative-lr", TRAIN, lambda w, o: ["--resume", str(w.run_negative)], "--lr"),
    ("resume-config-not-a-dict", TRAIN, lambda w, o: ["--resume", str(w.run_listcfg)],
     "dict"),
    ("resume-nan-weights", TRAIN, lambda w, o: ["--resume", str(w.run_nan)], "NaN"),
    ("denoise-device-tpu", DENOISE, lambda w, o: ["--checkpoint", str(w.good), "--input",
                                                  str(w.ct), "--output", o, "--device", "tpu"],
     "--device"),
    ("denoise-device-meta", DENOISE, lambda w, o: ["--checkpoint", str(w.good), "--input",
                                                   str(w.ct), "--output", o, "--device", "meta"],
     "--device"),
    ("denoise-nan-weights", DENOISE, lambda w, o: ["--checkpoint", str(w.nan), "--input",
                                                   str(w.ct), "--output", o], "NaN"),
    ("denoise-bad-config", DENOISE, lambda w, o: ["--checkpoint", str(w.bad_config), "--input",
                                                  str(w.ct), "--output", o], "--features"),
    ("denoise-output-is-a-file", DENOISE, lambda w, o: ["--checkpoint", str(w.good), "--input",
                                                        str(w.ct), "--output", str(w.a_file)],
     "not a folder"),
    ("denoise-batch-size-zero", DENOISE, lambda w, o: ["--checkpoint", str(w.good), "--input",
                                                       str(w.ct), "--output", o,
                                                       "--batch-size", "0"], "--batch-size"),
    ("denoise-precision-fp8", DENOISE, lambda w, o: ["--checkpoint", str(w.good), "--input",
                                                     str(w.ct), "--output", o,
                                                     "--precision", "fp8"], "--precision"),
    ("denoise-input-missing", DENOISE, lambda w, o: ["--checkpoint", str(w.good), "--input",
                                                     str(w.root / "nope"), "--output", o],
     "no such file"),
]
if not torch.cuda.is_available():
    CASES += [
        ("device-cuda-without-gpu", TRAIN, lambda w, o: ["--device", "cuda", "--out", o],
         "no CUDA GPU"),
        ("loss-backend-triton-on-cpu", TRAIN,
         lambda w, o: ["--loss-backend", "triton", "--device", "cpu", "--out", o], "triton"),
        ("denoise-device-cuda-without-gpu", DENOISE,
         lambda w, o: ["--checkpoint", str(w.good), "--input", str(w.ct), "--output", o,
                       "--device", "cuda"], "no CUDA GPU"),
    ]

MAINS = {TRAIN: train_main, DENOISE: denoise_main}


def _extra(script: str) -> list:
    return ["--preset", "tiny", "--no-progress"] if script == TRAIN else ["--no-progress"]


def _call(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return e.code


def _assert_one_line_error(rc, err: str, words: str, code: int = 2) -> None:
    lines = err.splitlines()
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert words in lines[0], err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_refuses_bad_input_with_one_line(case, world, tmp_path, capfd, monkeypatch):
    _, script, argv, words = case
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton on CPU only when asked
    out = tmp_path / "out"
    before = _tree_hash(world.root)
    rc = _call(MAINS[script], argv(world, str(out)) + _extra(script))
    _, err = capfd.readouterr()
    _assert_one_line_error(rc, err, words)
    assert _tree_hash(world.root) == before  # inputs untouched, nothing added beside them
    assert not out.exists()                  # no partial output


# ------------------------------------------------------------------ real subprocesses

def _script(name: str, argv, drop_dac_override: bool = False, env=None, **kw):
    """Run a console script's main function in a fresh interpreter (this checkout's pdml)."""
    func = {TRAIN: "train_main", DENOISE: "denoise_main"}[name]
    code = f"import sys; from pdml.cli import {func}; sys.exit({func}(sys.argv[1:]))"
    full_env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=300, env=full_env,
                          preexec_fn=_without_dac_override if drop_dac_override else None, **kw)


def _without_dac_override():
    """(In the child, before exec.) As root, drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    from the bounding set: root's program then gets its capabilities from that set, so file
    mode bits bind it as they bind any user (chmod 0o555 makes a folder read-only)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture
def read_only_folder(tmp_path) -> Path:
    """A folder that the scripts' processes cannot write into (mode 0o555; as root, the
    processes run without CAP_DAC_OVERRIDE). Skips if a write there still succeeds."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    probe = subprocess.run([sys.executable, "-c", f"open({str(folder / 'x')!r}, 'w')"],
                           capture_output=True, preexec_fn=_without_dac_override)
    if probe.returncode == 0:
        (folder / "x").unlink()
        pytest.skip("a write into a mode-0o555 folder succeeds here even without "
                    "CAP_DAC_OVERRIDE (a file system that ignores mode bits?)")
    yield folder
    folder.chmod(0o755)


def test_read_only_output_folders_are_refused_in_one_line(world, read_only_folder):
    before = _tree_hash(world.root)
    res = _script(DENOISE, ["--checkpoint", str(world.good), "--input", str(world.ct),
                            "--output", str(read_only_folder), "--no-progress"],
                  drop_dac_override=True)
    _assert_one_line_error(res.returncode, res.stderr, "cannot write")
    res = _script(TRAIN, ["--preset", "tiny", "--out", str(read_only_folder / "run"),
                          "--no-progress"], drop_dac_override=True)
    _assert_one_line_error(res.returncode, res.stderr, "cannot write")
    assert list(read_only_folder.iterdir()) == [] and _tree_hash(world.root) == before


@pytest.mark.parametrize("script,argv,words", [
    (TRAIN, ["--tau", "nan", "--lr", "-1"], "--tau"),
    (DENOISE, ["--device", "tpu"], "--device"),
])
def test_console_scripts_print_no_traceback(world, tmp_path, script, argv, words):
    if script == DENOISE:
        argv = argv + ["--checkpoint", str(world.good), "--input", str(world.ct),
                       "--output", str(tmp_path / "out")]
    else:
        argv = argv + ["--out", str(tmp_path / "out")]
    res = _script(script, argv + _extra(script))
    _assert_one_line_error(res.returncode, res.stderr, words)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ DICOM reader, save_ct

@pytest.fixture(scope="module")
def ct_series():
    return load_ct(get_testdata_file("CT_small.dcm"))[0]


@pytest.mark.parametrize("hu,error,words", [
    (lambda s: s.hu.tolist(), TypeError, "hu must be a NumPy array"),
    (lambda s: s.hu.astype(np.complex64), TypeError, "hu must hold real numbers"),
    (lambda s: torch.from_numpy(s.hu).to(torch.complex64), TypeError, "hu must hold real"),
    (lambda s: s.hu > 0, TypeError, "hu must hold real numbers"),
    (lambda s: s.hu.astype(object), TypeError, "hu must hold real numbers"),
    (lambda s: "hu", TypeError, "hu must be a NumPy array"),
    (lambda s: np.full_like(s.hu, np.nan), ValueError, "NaN"),
    (lambda s: s.hu[:, :5], ValueError, "shape"),
], ids=["list", "complex", "complex-tensor", "bool", "object", "str", "nan", "shape"])
def test_save_ct_refuses_bad_hu(tmp_path, ct_series, hu, error, words):
    with pytest.raises(error, match=words):
        save_ct(ct_series, hu(ct_series), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_ct_refuses_bad_series_and_paths(tmp_path, ct_series):
    with pytest.raises(TypeError, match="series must be a CTSeries"):
        save_ct([ct_series], ct_series.hu, tmp_path / "out")
    with pytest.raises(TypeError, match="out_dir must be a path"):
        save_ct(ct_series, ct_series.hu, 123)
    with pytest.raises(TypeError, match="description must be a str"):
        save_ct(ct_series, ct_series.hu, tmp_path / "out", description=5)
    assert not (tmp_path / "out").exists()
    # bf16 tensors are real numbers: accepted
    assert len(save_ct(ct_series, torch.from_numpy(ct_series.hu).bfloat16(), tmp_path / "ok")) == 1


def test_save_ct_failing_half_way_leaves_no_partial_series(tmp_path, monkeypatch):
    from pdml.data import dicom_write as dicom

    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0, 0, float(k)]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(src / f"s{k}.dcm")
    series = load_ct(src)[0]
    real, calls = dicom._write_new, []

    def write_then_fail(ds, target, overwrite):
        calls.append(target)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(ds, target, overwrite)

    monkeypatch.setattr(dicom, "_write_new", write_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_ct(series, series.hu, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------ training that goes wrong

def _strict_json_lines(path: Path) -> list:
    def refuse(token):
        raise ValueError(f"non-JSON number {token} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(world, tmp_path, capfd):
    """A learning rate of 1e30 is a valid number, and it blows the networks up within a
    few steps: the run stops (exit 1, one line naming the step and the loss terms), the
    checkpoint left is finite, and metrics.jsonl stays valid JSON."""
    out = tmp_path / "run"
    rc = train_main(["--preset", "tiny", "--ldct", str(world.ct), "--ndct", str(world.ct),
                     "--lr", "1e30", "--steps", "20", "--decay-steps", "0", "--ckpt-every", "1",
                     "--eval-every", "100", "--out", str(out), "--no-progress"])
    _, err = capfd.readouterr()
    _assert_one_line_error(rc, err, "pdml-train: error: stopped: ", code=1)
    assert "step" in err and "loss_G=" in err and "loss_patch=" in err
    records = _strict_json_lines(out / "metrics.jsonl")
    stopped = [r for r in records if r["kind"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] < 20
    last = out / "checkpoints" / "last.pt"
    if last.exists():
        ckpt = torch.load(last, weights_only=True)
        assert ckpt["step"] < stopped[0]["step"]
        for part in ckpt["model"].values():
            assert all(torch.isfinite(t).all() for t in part.values() if t.is_floating_point())
    assert not (out / "summary.json").exists()


def test_non_finite_loss_for_a_few_steps_stops_the_run(world, tmp_path, capfd, monkeypatch):
    """Losses that are NaN while the weights stay finite (the guard, not the weight check,
    stops the run): exactly NONFINITE_PATIENCE consecutive steps on the CPU."""
    from pdml.training import step as step_module
    from pdml.training.guard import NONFINITE_PATIENCE

    real = step_module.GanStep.__call__

    def nan_from_step_3(self, x, y):
        losses = real(self, x, y)
        nan_from_step_3.calls += 1
        if nan_from_step_3.calls >= 3:
            losses["loss_patch"] = torch.tensor(float("nan"))
        return losses
    nan_from_step_3.calls = 0
    monkeypatch.setattr(step_module.GanStep, "__call__", nan_from_step_3)
    out = tmp_path / "run"
    rc = train_main(["--preset", "tiny", "--ldct", str(world.ct), "--ndct", str(world.ct),
                     "--steps", "20", "--decay-steps", "0", "--ckpt-every", "2",
                     "--eval-every", "100", "--device", "cpu", "--out", str(out),
                     "--no-progress"])
    _, err = capfd.readouterr()
    last_bad = 3 + NONFINITE_PATIENCE - 1
    _assert_one_line_error(rc, err, f"steps 3-{last_bad}", code=1)
    assert "loss_patch=nan" in err and "of step 2 is kept" in err
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    records = _strict_json_lines(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, last_bad))
    assert [r["loss_patch"] for r in records if r["kind"] == "train"][2:] == [None] * (last_bad - 3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_guard_counts_consecutive_non_finite_steps(device):
    """The CPU reads the step just done; a GPU reads CUDA_LAG steps behind without waiting
    on the step itself, and flush() reads everything. A finite step resets the count."""
    from pdml.training.guard import CUDA_LAG, NonFiniteGuard

    lag = CUDA_LAG if device == "cuda" else 0
    guard = NonFiniteGuard(("a", "b"), torch.device(device), patience=3)
    seen = []
    for step, bad in enumerate([0, 1, 1, 0, 1, 1, 1, 1, 1, 1], start=1):
        value = torch.tensor(float("nan") if bad else 1.0, device=device)
        guard.update(step, {"a": torch.tensor(2.0, device=device), "b": value})
        seen.append((guard.count, guard.problem() is not None))
    # step s reads the record of step s - lag: counts 0 1 2 0 1 2 3 4 5 6
    truth = [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    assert seen == [((truth[s - lag] if s >= lag else 0), (s >= lag and truth[s - lag] >= 3))
                    for s in range(10)]
    guard.flush()
    assert guard.count == 6 and "steps 5-10" in guard.problem() and "b=nan" in guard.problem()


# ------------------------------------------------------------------ one run folder, one trainer

# a process holding the run folder's lock as the trainer does (flock on .pdml-train.lock)
HOLD_LOCK = """
import fcntl, os, socket, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], ".pdml-train.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()} {socket.gethostname()}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_trainer_on_a_locked_run_folder_is_refused(world, tmp_path, capfd):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        argv = ["--preset", "tiny", "--ldct", str(world.ct), "--ndct", str(world.ct),
                "--steps", "1", "--decay-steps", "0", "--out", str(run), "--no-progress"]
        rc = train_main(argv)
        _, err = capfd.readouterr()
        _assert_one_line_error(rc, err, f"in use by another pdml-train (pid {holder.pid}")
        rc = train_main(["--resume", str(run)])
        _, err = capfd.readouterr()
        _assert_one_line_error(rc, err, "in use by another pdml-train")
        assert [p.name for p in run.iterdir()] == [".pdml-train.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died with its lock file in place: the lock is taken over, and a killed
    # run's temporary files (only those) are removed at the start
    (run / "checkpoints").mkdir()
    stale = [run / ".config.json.tmp-4242", run / "checkpoints" / ".last.pt.tmp-4242",
             run / "checkpoints" / ".best.pt.tmp-77"]
    kept = [run / "notes.txt", run / "checkpoints" / ".last.pt.tmp-mine"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    assert (run / ".pdml-train.lock").exists()
    assert train_main(argv) == 0
    assert not any(p.exists() for p in stale) and all(p.read_bytes() == b"partial" for p in kept)
    assert not (run / ".pdml-train.lock").exists()  # released at the end
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 1


def test_lock_is_exclusive_and_released(tmp_path):
    """flock locks belong to an open file: a second acquire, even in this process, is
    refused naming the holder; after release the folder is free and the file gone."""
    from pdml.training.config import TrainError
    from pdml.training.rundir import LOCK_NAME, RunLock, check_writable_folder

    lock = RunLock.acquire(tmp_path / "run")
    try:
        with pytest.raises(TrainError, match=f"in use by another pdml-train \\(pid {os.getpid()} "):
            RunLock.acquire(tmp_path / "run")
    finally:
        lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunLock.acquire(tmp_path / "run").release()
    (tmp_path / "f").write_text("x")
    with pytest.raises(TrainError, match="--out .*f is not a folder"):
        check_writable_folder(tmp_path / "f", "--out")
    with pytest.raises(TrainError, match=r"\(.*f is a file\)"):
        check_writable_folder(tmp_path / "f" / "run", "--out")
    check_writable_folder(tmp_path / "new" / "deeper", "--out")  # creatable: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "run"]  # nothing left behind


# ------------------------------------------------------------------ several series, one bad

def _write_series(folder: Path, name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / f"{name}.dcm")


def test_denoise_of_several_series_writes_the_good_ones_and_reports_the_bad(world, tmp_path, capfd):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a", "b", "c"):
        _write_series(inp, name)
    out = tmp_path / "out"
    (out / "series_001").mkdir(parents=True)
    in_the_way = out / "series_001" / "0000_b.dcm"   # series 1's target exists already
    in_the_way.write_bytes(b"someone else's file")
    before = _tree_hash(inp)
    rc = denoise_main(["--checkpoint", str(world.good), "--input", str(inp), "--output",
                       str(out), "--no-progress"])
    captured = capfd.readouterr()
    _assert_one_line_error(rc, captured.err, "series 1")
    assert "b.dcm" in captured.err and "exists" in captured.err
    assert "wrote 2 slice(s) of 2 series" in captured.out
    assert len(list((out / "series_000").glob("*.dcm"))) == 1
    assert len(list((out / "series_002").glob("*.dcm"))) == 1
    assert in_the_way.read_bytes() == b"someone else's file"
    assert _tree_hash(inp) == before
