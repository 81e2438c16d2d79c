"""The layered ops of pdml.ops (several layers of equal shape, one backend call) against
per-layer calls, on the reference and ext backends, in float64; and their validation."""
import pytest
import torch
import torch.nn.functional as F

from pdml import ops
from pdml.backends import ext as ext_backend

BACKENDS = ["reference", pytest.param("ext", marks=pytest.mark.skipif(
    ext_backend.LOAD_ERROR is not None, reason=f"pdml._C not loaded: {ext_backend.LOAD_ERROR}"))]
MODES = ("image", "batch")
L, B, N, C, H, W = 3, 3, 97, 123, 11, 13
TOL = dict(rtol=1e-10, atol=1e-10)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def stacked_rows(seed=0, layers=L, rows=B * N, channels=C):
    """Normalised rows of ``layers`` layers stacked ``[L·R, C]``, as a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(layers * rows, channels, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(layers * rows, channels, generator=g, dtype=torch.float64), dim=1)
    return q.T.contiguous().T, k.T.contiguous().T


def layer_maps(seed=0):
    g = torch.Generator().manual_seed(seed)
    fqs = [torch.randn(B, C, H, W, generator=g, dtype=torch.float64) for _ in range(L)]
    fks = [fq + 0.5 * torch.randn(B, C, H, W, generator=g, dtype=torch.float64) for fq in fqs]
    ids = torch.randperm(H * W, generator=g)[:N]
    return fqs, fks, ids


def weights_for(out, seed=1):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", MODES)
def test_nce_rows_layers_equals_per_layer_calls(backend, negatives):
    q, k = stacked_rows()
    assert not q.is_contiguous()
    fused_q, = leaves(q)
    fused = ops.patch_nce_rows_layers(fused_q, k, L, 0.07, B, negatives, backend)
    assert fused.shape == (L, B * N) and fused.dtype == torch.float64
    (fused * weights_for(fused)).sum().backward()
    r = B * N
    per_layer, grads = [], []
    for layer in range(L):
        lq, = leaves(q[layer * r:(layer + 1) * r])
        out = ops.patch_nce_rows(lq, k[layer * r:(layer + 1) * r], 0.07, B, negatives, backend)
        (out * weights_for(fused)[layer]).sum().backward()
        per_layer.append(out.detach())
        grads.append(lq.grad)
    torch.testing.assert_close(fused.detach(), torch.stack(per_layer), **TOL)
    torch.testing.assert_close(fused_q.grad, torch.cat(grads), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", MODES)
def test_metric_rows_layers_is_the_mean_of_per_layer_calls(backend, negatives):
    q, k = stacked_rows(seed=2)
    fused_q, fused_k = leaves(q, k)
    fused = ops.patch_metric_rows_layers(fused_q, fused_k, L, 0.15, B, negatives, backend)
    assert fused.shape == () and fused.dtype == torch.float64
    fused.backward()
    r = B * N
    losses, grads_q, grads_k = [], [], []
    for layer in range(L):
        lq, lk = leaves(q[layer * r:(layer + 1) * r], k[layer * r:(layer + 1) * r])
        loss = ops.patch_metric_rows(lq, lk, 0.15, B, negatives, backend)
        (loss / L).backward()
        losses.append(loss.detach())
        grads_q.append(lq.grad)
        grads_k.append(lk.grad)
    torch.testing.assert_close(fused.detach(), torch.stack(losses).mean(), **TOL)
    torch.testing.assert_close(fused_q.grad, torch.cat(grads_q), **TOL)
    torch.testing.assert_close(fused_k.grad, torch.cat(grads_k), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", MODES)
def test_map_layers_equal_per_layer_calls(backend, negatives):
    fqs, fks, ids = layer_maps(seed=3)
    nce_q = leaves(*fqs)
    nce = ops.patch_nce_layers(nce_q, fks, ids, 0.07, negatives, backend)
    assert nce.shape == (L, B * N)
    (nce * weights_for(nce)).sum().backward()
    met_q, met_k = leaves(*fqs), leaves(*fks)
    met = ops.patch_metric_layers(met_q, met_k, ids, 0.15, negatives, backend)
    assert met.shape == ()
    met.backward()
    for layer in range(L):
        lq, = leaves(fqs[layer])
        out = ops.patch_nce(lq, fks[layer], ids, 0.07, negatives, backend)
        (out * weights_for(nce)[layer]).sum().backward()
        torch.testing.assert_close(nce[layer].detach(), out.detach(), **TOL)
        torch.testing.assert_close(nce_q[layer].grad, lq.grad, **TOL)
    losses = []
    for layer in range(L):
        lq, lk = leaves(fqs[layer], fks[layer])
        loss = ops.patch_metric(lq, lk, ids, 0.15, negatives, backend)
        (loss / L).backward()
        losses.append(loss.detach())
        torch.testing.assert_close(met_q[layer].grad, lq.grad, **TOL)
        torch.testing.assert_close(met_k[layer].grad, lk.grad, **TOL)
    torch.testing.assert_close(met.detach(), torch.stack(losses).mean(), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_layer_equals_the_plain_op(backend):
    q, k = stacked_rows(layers=1, seed=4)
    torch.testing.assert_close(ops.patch_nce_rows_layers(q, k, 1, 0.07, B, "image", backend)[0],
                               ops.patch_nce_rows(q, k, 0.07, B, "image", backend), **TOL)
    torch.testing.assert_close(ops.patch_metric_rows_layers(q, k, 1, 0.15, B, "batch", backend),
                               ops.patch_metric_rows(q, k, 0.15, B, "batch", backend), **TOL)


def test_layers_make_exactly_one_backend_call(monkeypatch):
    """One backend call with groups = layers × the groups of one layer."""
    from pdml.backends import registry

    calls = []
    ref = registry.resolve_backend("reference", torch.zeros(1), "patch_nce_rows")

    def spy(name):
        def run(*args):
            calls.append((name, args[-1]))
            return getattr(ref, name)(*args)
        return run

    spied = registry.Backend(name="reference", unavailable=ref.unavailable, unsupported=ref.unsupported,
                             **{op: spy(op) for op in ("patch_nce", "patch_metric", "patch_nce_rows",
                                                       "patch_metric_rows")})
    monkeypatch.setitem(registry._REGISTRY, "reference", spied)
    q, k = stacked_rows(seed=5)
    ops.patch_nce_rows_layers(q, k, L, batch_size=B, negatives="image", backend="reference")
    ops.patch_metric_rows_layers(q, k, L, batch_size=B, negatives="batch", backend="reference")
    fqs, fks, ids = layer_maps(seed=6)
    ops.patch_nce_layers(fqs, fks, ids, negatives="image", backend="reference")
    ops.patch_metric_layers(fqs, fks, ids, negatives="batch", backend="reference")
    assert calls == [("patch_nce_rows", L * B), ("patch_metric_rows", L), ("patch_nce", L * B),
                     ("patch_metric", L)]


def test_rows_layers_validation():
    q, k = stacked_rows(layers=2, rows=12, channels=4)
    with pytest.raises(ValueError, match=r"layers=5 must divide the number of rows of feat_q \(24\)"):
        ops.patch_nce_rows_layers(q, k, 5)
    with pytest.raises(ValueError, match="layers must be >= 1"):
        ops.patch_metric_rows_layers(q, k, 0)
    with pytest.raises(TypeError, match="layers must be an int"):
        ops.patch_metric_rows_layers(q, k, 2.0)
    with pytest.raises(ValueError, match=r"batch_size=5 must divide the number of rows of one layer \(12\)"):
        ops.patch_nce_rows_layers(q, k, 2, batch_size=5)
    with pytest.raises(ValueError, match="feat_q and feat_k must have the same shape"):
        ops.patch_nce_rows_layers(q, k[:12], 2)
    with pytest.raises(ValueError, match="negatives must be one of"):
        ops.patch_metric_rows_layers(q, k, 2, negatives="all")


def test_map_layers_validation():
    fqs, fks, ids = layer_maps(seed=7)
    with pytest.raises(ValueError, match="fqs and fks must be non-empty and of the same length"):
        ops.patch_nce_layers(fqs, fks[:2], ids)
    with pytest.raises(ValueError, match="fqs and fks must be non-empty"):
        ops.patch_metric_layers([], [], ids)
    with pytest.raises(TypeError, match="fqs must be a list"):
        ops.patch_metric_layers(fqs[0], fks[0], ids)
    with pytest.raises(ValueError, match=r"fqs\[1\] and fqs\[0\] must have the same shape"):
        ops.patch_nce_layers([fqs[0], fqs[1][:, :5]], [fks[0], fks[1][:, :5]], ids)
    with pytest.raises(TypeError, match=r"fqs\[2\] and fqs\[0\] must have the same dtype"):
        ops.patch_metric_layers(fqs[:2] + [fqs[2].float()], fks[:2] + [fks[2].float()], ids)
    with pytest.raises(ValueError, match=r"fqs\[1\] and fks\[1\] must have the same shape"):
        ops.patch_nce_layers(fqs[:2], [fks[0], fks[1][:1]], ids)
    with pytest.raises(ValueError, match="ids must be distinct"):
        ops.patch_nce_layers(fqs, fks, torch.tensor([1, 1]))
