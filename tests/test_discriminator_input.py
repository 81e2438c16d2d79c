"""The discriminator's high-pass input (``d_input="highpass"``, the demo preset): it adds
no state, and a discriminator trained on it tells LD noise from clean images of the SAME
anatomy (held-out paired slices), which is what lets the demo's generator learn to denoise."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdml.data import builtin_dataset, hu_to_unit, wavelet_split
from pdml.models import PatchDiscriminator
from pdml.models.discriminator import HighPass
from pdml.training import make_config
from pdml.training.data import HighFrequencyCrops
from pdml.training.networks import build_networks, discriminator_highpass_gain

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


def test_highpass_input_is_a_fixed_filter_without_state():
    torch.manual_seed(0)
    plain = PatchDiscriminator()
    filtered = PatchDiscriminator(highpass_gain=7.0)
    assert list(filtered.state_dict()) == list(plain.state_dict())  # old checkpoints load
    filtered.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 24, 20)
    local_mean = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    torch.testing.assert_close(filtered.eval()(x), plain.eval()(7.0 * (x - local_mean)))
    assert torch.count_nonzero(HighPass(3.0)(torch.full((1, 1, 9, 9), 0.5))) == 0  # flat: nothing
    with pytest.raises(ValueError, match="gain"):
        HighPass(0.0)


def test_highpass_gain_makes_one_unit_twenty_hu():
    for wavelet in (True, False):
        cfg = make_config("tiny", d_input="highpass", wavelet=wavelet)
        # HU -> unit window (2000 HU) -> networks' scale -> gain: 20 HU is one unit
        assert discriminator_highpass_gain(cfg) * cfg.resolved_net_scale * 20.0 / 2000.0 == pytest.approx(1.0)
    assert discriminator_highpass_gain(make_config("tiny")) is None
    assert make_config("demo").d_input == "highpass" and make_config("paper").d_input == "image"


def _network_input(hu: np.ndarray, cfg) -> torch.Tensor:
    """HU slices [S, H, W] -> the networks' input [S, 1, H, W] (high band × net_scale)."""
    unit = hu_to_unit(hu, clip=False).astype(np.float32)
    high = wavelet_split(unit, cfg.wavelet_name, cfg.wavelet_level)[1]
    return torch.from_numpy(np.ascontiguousarray(high) * cfg.resolved_net_scale)[:, None]


def test_trained_discriminator_scores_ld_and_clean_slices_differently():
    # the demo's data (128² built-in slices; at 64² the resampling has smoothed the noise)
    cfg = make_config("tiny", crop=32, batch_size=4, d_input="highpass", builtin_size=128)
    ds = builtin_dataset(size=cfg.builtin_size, progress=False)
    crops = HighFrequencyCrops(ds.load("train/ld"), ds.load("train/nd"), cfg)
    torch.manual_seed(0)
    discriminator = build_networks(cfg)[1]
    opt = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    n = len(crops)
    for step in range(150):  # the trainer's D step, with an identity generator (fake = LD)
        pairs = [crops.get((step * 4 + j) // n, (step * 4 + j) % n) for j in range(4)]
        ld = torch.stack([p[0] for p in pairs])  # already in the networks' scale
        nd = torch.stack([p[1] for p in pairs])
        scores = discriminator(torch.cat([nd, ld]))
        loss = 0.5 * ((scores[:4] - 1).square().mean() + scores[4:].square().mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # held-out slices, the same anatomy with and without noise
    with torch.no_grad():
        discriminator.eval()
        ld_scores = discriminator(_network_input(ds.load("test/ld"), cfg)).mean(dim=(1, 2, 3))
        clean_scores = discriminator(_network_input(ds.load("test/truth"), cfg)).mean(dim=(1, 2, 3))
    gap = clean_scores - ld_scores
    assert bool((gap > 0).all()), (clean_scores, ld_scores)
    assert float(gap.mean()) > 0.3, (clean_scores, ld_scores)  # measured: 1.1
