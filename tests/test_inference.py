"""pdml.inference: tiled denoising equals whole slices (float64), the bf16 denoise stays
within 0.5 HU of fp32 on the built-in slices, "auto" picks bf16 only where it is native;
the CPU thread count follows the load at start, not the 1-minute average."""
import numpy as np
import pytest
import torch

from pdml.inference import denoise_hu, denoise_precision, forward_tiled
from pdml.models import DmlCtGenerator, RRDNGenerator
from pdml.training import distributed
from pdml.training.config import make_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("tile", [8, 16, 25, 40])
def test_tiles_equal_the_whole_slice_float64(tile):
    torch.manual_seed(0)
    net = DmlCtGenerator(init_std=0.1).double().eval()
    assert net.receptive_radius() == 17
    x = torch.randn(2, 1, 53, 37, dtype=torch.float64)
    with torch.no_grad():
        whole = net(x)
        tiled = forward_tiled(net, x, tile)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-10)


def test_too_small_a_halo_is_not_exact():
    """The halo is needed: a halo of 3 pixels changes pixels next to the tile seams (the
    influence of the last pixels of the 17-pixel field is below float64's resolution at
    these weights, so the test uses a clearly short halo)."""
    torch.manual_seed(0)
    net = DmlCtGenerator(init_std=0.1).double().eval()
    x = torch.randn(1, 1, 41, 41, dtype=torch.float64)
    short = DmlCtGenerator(init_std=0.1).double().eval()
    short.load_state_dict(net.state_dict())
    short.receptive_radius = lambda: 3
    with torch.no_grad():
        assert (forward_tiled(short, x, 20) - net(x)).abs().max() > 1e-6


def test_networks_with_a_global_operation_run_whole_slices():
    net = RRDNGenerator().eval()  # squeeze-excitation means over the whole map
    assert net.receptive_radius() is None
    x = torch.randn(1, 1, 30, 30)
    with torch.no_grad():
        torch.testing.assert_close(forward_tiled(net, x, 8), net(x), rtol=0, atol=0)


def test_denoise_in_tiles_gives_the_whole_slice_result():
    cfg = make_config("tiny", arch="dmlct")
    torch.manual_seed(0)
    net = DmlCtGenerator(init_std=0.05)
    hu = np.random.default_rng(0).normal(0, 300, (3, 45, 39)).astype(np.float32)
    cpu = torch.device("cpu")
    whole = denoise_hu(net, hu, cfg, cpu, "fp32", batch_size=2)
    tiled = denoise_hu(net, hu, cfg, cpu, "fp32", batch_size=2, tile=16)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="tile must be >= 1"):
        denoise_hu(net, hu, cfg, cpu, tile=0)


@pytest.mark.usefixtures("private_cache")
@pytest.mark.parametrize("arch,wavelet", [("pdml", False), ("pdml", True), ("dmlct", False),
                                          ("dmlct", True)])
def test_bf16_denoise_is_within_half_a_hu_of_fp32_on_the_builtin_slices(arch, wavelet):
    from pdml.data import builtin_dataset

    hu = builtin_dataset(size=64, progress=False).load("test/ld")[:4]
    cfg = make_config("tiny", arch=arch, wavelet=wavelet)
    torch.manual_seed(0)
    # weights that change the image (an untrained DML_CT at its 0.01 init outputs ~0)
    net = RRDNGenerator() if arch == "pdml" else DmlCtGenerator(init_std=0.08)
    cpu = torch.device("cpu")
    fp32 = denoise_hu(net, hu, cfg, cpu, "fp32")
    bf16 = denoise_hu(net, hu, cfg, cpu, "bf16")
    changed = np.abs(fp32 - hu).mean()
    error = np.abs(bf16 - fp32).mean()
    assert changed > 5.0, changed      # the network does change the slices
    assert error <= 0.5, (error, changed)


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(distributed, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert denoise_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(distributed, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert denoise_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(distributed, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert denoise_precision("auto", cpu) == "fp32"
    assert denoise_precision("bf16", cpu) == "bf16"   # forced
    assert denoise_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        denoise_precision("fp8", cpu)


# ------------------------------------------------------------------------------ threads

def _machine(monkeypatch, busy_share: float, load_1min: float, cores: int = 2):
    """``cores`` cores, torch's default of as many threads, a 1-minute load average of
    ``load_1min`` and /proc/stat showing each core busy ``busy_share`` of the time now."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (load_1min, load_1min, load_1min))
    ticks = iter([(0.0, 0.0), (100.0 * cores * busy_share, 100.0 * cores)])
    monkeypatch.setattr(distributed, "_proc_stat_times", lambda cpus=None: next(ticks))
    monkeypatch.setattr(distributed.time, "sleep", lambda s: None)


def test_a_lingering_load_average_on_an_idle_machine_gets_all_cores(monkeypatch):
    _machine(monkeypatch, busy_share=0.02, load_1min=2.9)   # a compile that just ended
    choice = distributed.choose_cpu_threads(None)
    assert choice.threads == 2 and choice.busy == pytest.approx(0.04)
    assert "0.0 of 2 core(s) busy at start" in choice.describe()


def test_a_busy_machine_now_gets_fewer_threads(monkeypatch):
    _machine(monkeypatch, busy_share=0.5, load_1min=0.0)    # one core busy now
    assert distributed.choose_cpu_threads(None).threads == 1
    _machine(monkeypatch, busy_share=1.0, load_1min=0.0)    # both busy: still one thread
    assert distributed.choose_cpu_threads(None).threads == 1
    _machine(monkeypatch, busy_share=0.25, load_1min=0.0, cores=16)   # 4 of 16 busy
    assert distributed.choose_cpu_threads(None).threads == 12


def test_requested_threads_win_and_no_proc_stat_keeps_torchs_default(monkeypatch):
    assert distributed.choose_cpu_threads(3).threads == 3
    assert "--threads" in distributed.choose_cpu_threads(3).describe()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(distributed, "_proc_stat_times", lambda cpus=None: None)
    assert distributed.choose_cpu_threads(None).threads == 4


def test_proc_stat_is_read_here():
    """On Linux the sample is real: a number of busy cores between 0 and the cores."""
    busy = distributed.busy_cpus(interval=0.05)
    if busy is None:
        assert distributed._proc_stat_times() is None
    else:
        assert 0.0 <= busy <= (distributed.os.cpu_count() or 1) + 1e-6


def test_keep_freed_memory_takes_effect_on_glibc():
    import platform
    kept = distributed.keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert kept is True
    else:
        assert kept is False
