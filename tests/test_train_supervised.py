"""pdml-train's two additions for the HU-shift experiment and its users: the supervised
bound (``--supervised``: G alone, L1 to the paired reference of the same crop) and the
classical comparison in the final summary (``compare_classical``)."""
import json

import numpy as np
import pytest
import torch

from pdml.cli import train_main
from pdml.data import PairedCropDataset
from pdml.training import TrainError, make_config, train
from pdml.training.run import TrainingRun

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")

SUPERVISED = dict(builtin_layout="same-anatomy", supervised=True, loss="none", wavelet=False,
                  input_center_hu=0.0, progress=False)


def test_paired_crops_take_the_same_place_and_flips_of_both_slices():
    rng = np.random.default_rng(0)
    ld = rng.normal(size=(3, 40, 36)).astype(np.float32) * 100
    ds = PairedCropDataset(ld, ld + 50.0, crop=16, margin=2, flip=True, seed=5)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            # unit scale: 50 HU is 0.025 everywhere, so the crops are of the same place
            np.testing.assert_allclose(item["nd"] - item["ld"], 0.025, atol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        PairedCropDataset(ld, ld[:, :30], crop=16)


def test_supervised_settings_are_checked():
    make_config("tiny", **SUPERVISED)
    for bad, why in ((dict(builtin_layout="domains"), "same-anatomy"),
                     (dict(loss="dml"), "--loss none"),
                     (dict(nd_offset_hu=100.0), "--nd-offset-hu")):
        with pytest.raises(TrainError, match=why):
            make_config("tiny", **dict(SUPERVISED, **bad))


def test_a_supervised_run_trains_the_generator_alone_towards_the_truth(tmp_path):
    run = TrainingRun(make_config("tiny", **SUPERVISED, steps=6, decay_steps=2,
                                  out=str(tmp_path / "sup")))
    d_before = {k: v.clone() for k, v in run.discriminator.state_dict().items()}
    g_before = {k: v.clone() for k, v in run.generator.state_dict().items()}
    x, y = run._batch(0)
    with torch.no_grad():
        l1_before = float((run.generator(x) - y).abs().mean())
    summary = run.run()
    assert summary["steps"] == 6
    d_after = run.discriminator.state_dict()
    assert all(torch.equal(d_before[k], d_after[k]) for k in d_before)  # D never steps
    assert any(not torch.equal(g_before[k], v) for k, v in run.generator.state_dict().items())
    with torch.no_grad():
        assert float((run.generator(x) - y).abs().mean()) < l1_before
    records = [json.loads(line) for line in (tmp_path / "sup" / "metrics.jsonl").read_text()
               .splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert all(r["loss_D"] == r["loss_gan"] == r["loss_patch"] == 0 for r in train_records)
    assert all(r["loss_G"] > 0 for r in train_records)


def test_the_summary_puts_the_best_classical_denoiser_beside_the_network(tmp_path, capsys):
    from pdml import classical

    summary = train(make_config("tiny", val_slices=2, compare_classical=True, progress=False,
                                out=str(tmp_path / "run")))
    row = summary["classical"]
    assert row["method"] == classical.best_available()
    assert row["tuning_slices"] == [0] and row["noise_std"] < row["ld_noise_std"]
    # scored by the trainer's own evaluation on the same held-out slices as the network
    assert row["ld_psnr"] == pytest.approx(summary["final_eval"]["ld_psnr"], rel=1e-12)
    printed = capsys.readouterr().out
    assert f"  {classical.SHORT_NAMES[row['method']]}" in printed
    assert (tmp_path / "run" / "figures" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["classical"] == row
    # the tiny preset leaves it out; so does --no-classical
    assert make_config("tiny").compare_classical is False
    code = train_main(["--preset", "tiny", "--out", str(tmp_path / "off"), "--no-progress",
                       "--no-classical"])
    assert code == 0
    assert json.loads((tmp_path / "off" / "summary.json").read_text())["classical"] is None
    assert make_config("demo").compare_classical is True
