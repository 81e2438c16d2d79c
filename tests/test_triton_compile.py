"""The Triton kernels compile for sm_90 and sm_80 in fp32, fp16 and bf16 without a GPU
(``triton.compile(ASTSource(...), target=GPUTarget(...))`` through :mod:`pdml.kernels.aot`):
no register spills, shared memory within the architecture's limit, and the dots on the
right unit: fp16/bf16 on tensor cores (mma.sync, or wgmma for the 64-row tiles of large
groups on sm_90), fp32 not (its dots ask for ``input_precision="ieee"``; tf32 tensor
cores would show up as mma with .tf32 operands).

A fast subset for CI: every kernel × dtype in the configuration the launcher picks for
the paper's shape (n = 128, C = 256) on sm_90, the backward kernels (the largest) on
sm_80, the large-group half configurations (wgmma) and C = 1000 in fp32. The full set
(every configuration of the paper, CUT and large shapes) is
``python -m pdml.kernels.aot --arch 90 --strict``.
"""
import pytest

pytest.importorskip("triton", reason="triton cannot be imported")

import torch  # noqa: E402

from pdml.kernels import aot  # noqa: E402
from pdml.kernels import patch_loss_launch as launch  # noqa: E402

pytestmark = pytest.mark.skipif(
    not aot.library_compiles(),
    reason="triton was imported with TRITON_INTERPRET=1: its library is interpreter-only in this process")

_RECORDS: dict = {}


def _compile(kernel, dtype, rows, channels, arch, gather=True):
    """Record of the launcher's first choice for groups of ``rows`` rows of ``channels``."""
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    tiles = launch.tiles_for(torch_dtype, rows, channels, interpret=False, kernel=kernel, gather=gather)
    if kernel in aot.WITHOUT_DOTS:
        tiles = tiles._replace(block_n=16)
    job = aot.LossJob(kernel, dtype, gather, *tiles)
    if (job, arch) not in _RECORDS:
        _RECORDS[job, arch] = aot.compile_job(job, arch)
    return _RECORDS[job, arch]


def _assert_clean(record, arch):
    assert record.error is None, record.error
    assert aot.problems(record, arch) == [], aot.format_table([record], arch)


def test_every_launch_configuration_is_enumerated():
    """aot covers each kernel × dtype × form × tiles the launcher can pick."""
    jobs = aot.loss_jobs()
    for kernel in aot.LOSS_KERNELS:
        for dtype in aot.DTYPES:
            blocks = {job.block_m for job in jobs if job.kernel == kernel and job.dtype == dtype}
            assert 32 in blocks  # the paper's choice
            # wgmma tiles of large groups; the gradient kernels keep 32 rows (their accumulator)
            assert (64 in blocks) == (dtype != "fp32" and kernel not in launch.GRADIENT_KERNELS)
    assert any(not job.gather for job in jobs)  # rows form
    for kernel in launch.GRADIENT_KERNELS:  # one gradient chunk up to C = 256, 256-channel chunks above
        assert {job.grad_c for job in jobs if job.kernel == kernel} == {128, 256}


@pytest.mark.parametrize("dtype", aot.DTYPES)
@pytest.mark.parametrize("kernel", aot.LOSS_KERNELS)
def test_paper_configuration_compiles_for_sm90(kernel, dtype):
    record = _compile(kernel, dtype, 128, 256, 90)
    _assert_clean(record, 90)
    if kernel not in aot.WITHOUT_DOTS:
        assert record.mma == ("none" if dtype == "fp32" else "mma.sync")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["nce_backward_kernel", "metric_backward_kernel"])
def test_backward_kernels_compile_for_sm80(kernel, dtype):
    _assert_clean(_compile(kernel, dtype, 128, 256, 80), 80)


@pytest.mark.parametrize("kernel", ["nce_forward_kernel", "metric_forward_kernel"])
def test_large_groups_use_wgmma_on_sm90(kernel):
    """bf16/fp16 groups of >= 1024 rows take 64-row tiles, which Hopper multiplies with wgmma."""
    record = _compile(kernel, "fp16", 4096, 256, 90)
    _assert_clean(record, 90)
    assert record.mma == "wgmma"


def test_fp32_c1000_compiles_within_sm90_shared_memory():
    """C = 1000 in fp32 (validation accepts C <= 1024): channel chunks keep every tile small."""
    for kernel in ("nce_backward_kernel", "metric_backward_kernel"):
        record = _compile(kernel, "fp32", 4096, 1000, 90)
        _assert_clean(record, 90)
        assert record.shared <= aot.SHARED_LIMIT[90]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", aot.DTYPES)
@pytest.mark.parametrize("kernel", ["nce_backward_kernel", "metric_backward_kernel"])
def test_whole_gradient_accumulators_do_not_spill(kernel, dtype, arch):
    """C = 256 in one gradient chunk (``GRAD_C = 256``: a [32, 256] fp32 accumulator per
    program), the configuration that brings the backward to the minimum work, in both forms."""
    for gather in (True, False):
        record = _compile(kernel, dtype, 4096, 256, arch, gather=gather)
        assert "g256" in record.config
        _assert_clean(record, arch)


def test_rows_form_compiles():
    """The rows form (no gather, no normalisation; dq̂ is dq in the input dtype)."""
    _assert_clean(_compile("metric_backward_kernel", "fp16", 128, 256, 90, gather=False), 90)
    _assert_clean(_compile("metric_positive_kernel", "fp16", 128, 256, 90, gather=False), 90)
