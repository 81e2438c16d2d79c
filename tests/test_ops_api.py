"""Public API of pdml.ops and pdml.losses: validation errors, backend choice, options."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import pdml
from pdml import ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def maps(b=2, c=8, h=5, w=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, c, h, w, generator=g, dtype=dtype),
            torch.randn(b, c, h, w, generator=g, dtype=dtype))


IDS = torch.tensor([0, 4, 9, 29, 17])
MAP_OPS = [ops.patch_nce, ops.patch_metric, ops.patch_similarity]


@pytest.mark.parametrize("op", MAP_OPS)
@pytest.mark.parametrize("fq,fk,ids,exc,words", [
    ("rank3", None, IDS, ValueError, "fq must have shape [B, C, H, W]"),
    (None, "other_shape", IDS, ValueError, "fq and fk must have the same shape"),
    (None, "double", IDS, TypeError, "fq and fk must have the same dtype"),
    ("int", None, IDS, TypeError, "fq must be float32"),
    ("list", None, IDS, TypeError, "fq must be a torch.Tensor"),
    (None, None, torch.tensor([0, 30]), ValueError, "ids must lie in [0, H*W) = [0, 30)"),
    (None, None, torch.tensor([-1, 3]), ValueError, "ids must lie in [0, H*W)"),
    (None, None, torch.tensor([3, 5, 3]), ValueError, "ids must be distinct"),
    (None, None, torch.tensor([1.0, 2.0]), TypeError, "ids must be an integer tensor"),
    (None, None, torch.tensor([[1, 2]]), ValueError, "ids must have shape [N]"),
    (None, None, torch.tensor([], dtype=torch.int64), ValueError, "ids must not be empty"),
    (None, None, [1, 2], TypeError, "ids must be a torch.Tensor"),
])
def test_map_ops_reject_bad_input(op, fq, fk, ids, exc, words):
    good_q, good_k = maps()
    fq = {None: good_q, "rank3": good_q[0], "int": good_q.long(), "list": good_q.tolist()}[fq]
    fk = {None: good_k, "other_shape": good_k[:, :, :4], "double": good_k.double()}[fk]
    with pytest.raises(exc) as info:
        op(fq, fk, ids)
    assert words in str(info.value)


@pytest.mark.parametrize("op", [ops.patch_nce, ops.patch_metric])
def test_scalar_arguments_are_checked(op):
    fq, fk = maps()
    with pytest.raises(ValueError, match="tau must be a positive finite float"):
        op(fq, fk, IDS, tau=0.0)
    with pytest.raises(TypeError, match="tau must be a float"):
        op(fq, fk, IDS, tau="0.1")
    with pytest.raises(ValueError, match="negatives must be one of"):
        op(fq, fk, IDS, negatives="all")
    with pytest.raises(ValueError, match="backend must be one of"):
        op(fq, fk, IDS, backend="cuda")


@pytest.mark.parametrize("op", [ops.patch_nce_rows, ops.patch_metric_rows])
def test_rows_ops_reject_bad_input(op):
    q = torch.nn.functional.normalize(torch.randn(12, 4), dim=1)
    with pytest.raises(ValueError, match=r"batch_size=5 must divide the number of rows of feat_q \(12\)"):
        op(q, q, batch_size=5)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        op(q, q, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        op(q, q, batch_size=2.0)
    with pytest.raises(ValueError, match=r"feat_q must have shape \[B·N, C\]"):
        op(q[None], q[None])
    with pytest.raises(ValueError, match="feat_q and feat_k must have the same shape"):
        op(q, q[:6])


def test_nonfinite_features_rejected_when_checking_is_on():
    fq, fk = maps()
    fk[1, 2, 3, 4] = float("nan")
    ops.patch_metric(fq, fk, IDS)  # off by default: no full read of the features
    ops.set_check_finite(True)
    try:
        with pytest.raises(ValueError, match="fk contains NaN or inf"):
            ops.patch_metric(fq, fk, IDS)
        fq[0, 0, 0, 0] = float("inf")
        with pytest.raises(ValueError, match="fq contains NaN or inf"):
            ops.patch_nce(fq, fk, IDS)
    finally:
        ops.set_check_finite(False)


def test_unavailable_backend_raises_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fq, fk = maps()
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        ops.patch_metric(fq, fk, IDS, backend="triton")


def test_auto_never_fails_and_env_overrides(monkeypatch):
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        fq, fk = maps(dtype=dtype)
        assert torch.isfinite(ops.patch_metric(fq, fk, IDS))
        assert ops.resolve_backend("auto", fq, "patch_metric").name in ops.auto_order(fq)
    fq, fk = maps()
    monkeypatch.setenv("PDML_BACKEND", "reference")
    assert ops.resolve_backend("auto", fq, "patch_metric").name == "reference"
    monkeypatch.setenv("PDML_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        ops.patch_metric(fq, fk, IDS)
    assert ops.resolve_backend("reference", fq, "patch_metric").name == "reference"  # explicit beats the env
    monkeypatch.setenv("PDML_BACKEND", "gpu")
    with pytest.raises(ValueError, match="PDML_BACKEND must be one of"):
        ops.patch_metric(fq, fk, IDS)


def test_available_backends_lists_every_backend():
    table = ops.available_backends(torch.zeros(1))
    assert set(table) == {"reference", "triton", "ext"}
    assert table["reference"] is None
    assert all(v is None or (isinstance(v, str) and v) for v in table.values())


def test_available_backends_without_a_tensor_says_what_runs_on_this_machine(monkeypatch):
    """No tensor: whether a backend can run here at all. Triton needs a CUDA GPU (or its
    interpreter, asked for with TRITON_INTERPRET=1)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    table = ops.available_backends()
    assert table["reference"] is None
    if torch.cuda.is_available():
        assert table["triton"] is None or "triton" in table["triton"].lower()
    else:
        assert table["triton"] is not None and "no CUDA GPU" in table["triton"]
        if pdml.backends.triton._IMPORT_ERROR is None:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            assert ops.available_backends()["triton"] is None
            assert ops.available_backends(torch.zeros(1))["triton"] is None


def test_losses_read_cut_and_dml_options():
    cut_opt = SimpleNamespace(nce_T=0.05, batch_size=4, nce_includes_all_negatives_from_minibatch=True)
    crit = pdml.PatchNCELoss(cut_opt)
    assert (crit.tau, crit.batch_size, crit.negatives) == (0.05, 4, "batch")
    dml_opt = SimpleNamespace(metric_T=0.2, batch_size=8, nce_includes_all_negatives_from_minibatch=False)
    crit = pdml.PatchMetricLoss(dml_opt, backend="reference")
    assert (crit.tau, crit.batch_size, crit.negatives, crit.backend) == (0.2, 8, "image", "reference")
    crit = pdml.PatchMetricLoss(dml_opt, tau=0.3)  # a keyword beats the options object
    assert crit.tau == 0.3
    assert "tau=0.3" in repr(crit)
    defaults = pdml.PatchNCELoss()
    assert (defaults.tau, defaults.batch_size, defaults.negatives) == (0.07, 1, "image")
    assert pdml.PatchMetricLoss().tau == 0.15
    assert pdml.PatchMetricLoss(cut_opt).tau == 0.15  # CUT's options carry no metric_T
    with pytest.raises(ValueError, match="backend must be one of"):
        pdml.PatchNCELoss(backend="fast")
    with pytest.raises(ValueError, match="tau must be a positive"):
        pdml.PatchMetricLoss(tau=-1)


def test_losses_group_rows_by_batch_size():
    """CUT's view(batch_size, -1, C): image negatives never mix images."""
    g = torch.Generator().manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(2 * 6, 5, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(2 * 6, 5, generator=g), dim=1)
    per_row = pdml.PatchNCELoss(batch_size=2)(q, k)
    first = pdml.PatchNCELoss(batch_size=1)(q[:6], k[:6])
    torch.testing.assert_close(per_row[:6], first)
    whole = pdml.PatchNCELoss(batch_size=2, all_negatives_from_minibatch=True)(q, k)
    torch.testing.assert_close(whole, pdml.PatchNCELoss(batch_size=1)(q, k))


def _run(code, env=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_import_without_extension():
    """`import pdml` works, on the reference backend, when pdml._C cannot be loaded."""
    code = ("import sys; sys.modules['pdml._C'] = None\n"
            "import torch, pdml\n"
            "print(pdml.__version__)\n"
            "assert pdml.ops.available_backends()['ext'] is not None\n"
            "fq = torch.randn(1, 4, 3, 3); print(pdml.ops.patch_metric(fq, fq, torch.arange(5)).item())\n")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == pdml.__version__


@pytest.mark.slow
def test_build_without_extension(tmp_path):
    """PDML_SKIP_EXT=1 installs a working pure-Python pdml with no _C at all."""
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), REPO],
        capture_output=True, text=True, env={**os.environ, "PDML_SKIP_EXT": "1"}, timeout=600)
    assert build.returncode == 0, build.stderr
    assert not list((target / "pdml").glob("_C*"))
    out = subprocess.run([sys.executable, "-c", "import pdml; print(pdml.__version__, pdml.__file__)"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == pdml.__version__
    assert str(target) in out.stdout


def test_resolve_backend_skips_a_backend_without_the_op(monkeypatch):
    """A backend whose field for an op is None: "auto" skips it, naming it raises."""
    from pdml.backends import registry

    no_nce = registry.Backend(name="ext", unavailable=lambda: None, unsupported=lambda t: None,
                              patch_metric=lambda *args: torch.tensor(0.0))
    monkeypatch.setitem(registry._REGISTRY, "ext", no_nce)
    monkeypatch.delenv("PDML_BACKEND", raising=False)
    fq, fk = maps()
    assert ops.resolve_backend("auto", fq, "patch_nce").name == "reference"
    assert ops.resolve_backend("auto", fq, "patch_metric").name == "ext"
    assert ops.available_backends(fq, "patch_nce")["ext"] == "it has no patch_nce op"
    with pytest.raises(RuntimeError, match="backend 'ext' is not available for patch_nce: it has no patch_nce op"):
        ops.resolve_backend("ext", fq, "patch_nce")
    with pytest.raises(RuntimeError, match="backend 'ext' is not available for patch_nce"):
        ops.patch_nce(fq, fk, IDS, backend="ext")
    torch.testing.assert_close(ops.patch_nce(fq, fk, IDS), ops.patch_nce(fq, fk, IDS, backend="reference"))
    with pytest.raises(ValueError, match="op must be one of"):
        ops.resolve_backend("auto", fq, "patch_loss")


def test_mark_unavailable_gives_the_reason(monkeypatch):
    from pdml.backends import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_UNAVAILABLE", dict(registry._UNAVAILABLE))
    registry.mark_unavailable("ext", "pdml._C did not load (test)")
    fq, _ = maps()
    assert ops.available_backends(fq)["ext"] == "pdml._C did not load (test)"
    with pytest.raises(RuntimeError, match=r"pdml._C did not load \(test\)"):
        ops.resolve_backend("ext", fq, "patch_metric")


def test_device_index_is_the_one_resolver():
    from pdml.backends.registry import device_index

    with pytest.raises(ValueError, match="expected a CUDA tensor or device"):
        device_index(torch.zeros(1))
    assert device_index(torch.device("cuda", 3)) == 3


def test_finite_check_skips_meta_and_fake_tensors():
    """The NaN/inf check reads values; meta/fake tensors (tracing) have none to read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops.set_check_finite(True)
    try:
        fq = torch.empty(2, 4, 3, 3, device="meta")
        ids = torch.arange(4, device="meta")
        out = ops.patch_similarity(fq, fq, ids, backend="reference")
        assert out.shape == (2, 4, 4) and out.device.type == "meta"
        with FakeTensorMode():
            fake = torch.randn(2, 4, 3, 3)
            assert ops.patch_metric(fake, fake, torch.arange(4), backend="reference").shape == ()
    finally:
        ops.set_check_finite(False)
