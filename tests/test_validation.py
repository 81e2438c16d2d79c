"""The ids check of pdml._validation: bad ids are refused, and on a GPU the check (one host
synchronisation) runs once per ids tensor, not once per call.

- CPU: bad ids (out of range, repeated) are refused with a ValueError naming the argument
  by every op that takes ids, on every call, also after a tensor passed once and was then
  written to (through torch or numpy), and also when marked valid (CPU ids are never
  exempted: there the check costs no stall and numpy writes bypass torch's version counter).
- The "checked once" record itself, exercised on CPU tensors by letting it serve the CPU
  (``CACHED_DEVICE_TYPES``) and counting the checks that read values: a second call with the
  same tensor reads nothing; an in-place write, a smaller H*W, another tensor of equal
  values or an inference tensor is read again; a dead tensor's entry goes; ids from
  :func:`pdml.sample.draw_patch_ids` are never read.
- CUDA (cuda-marked): a training-step-like call (gather_project of the q and k maps, the
  rows-form and map-form losses, backward) is run under ``torch.cuda.set_sync_debug_mode``;
  the synchronisations it reports are counted: none per step once the kernels are warm, for
  ids from the trainer's sampler and for user ids after their first step, and at least one
  on the first step of unchecked user ids (so the counter is seen to count).
"""
import gc
import warnings

import numpy as np
import pytest
import torch

from pdml import _validation, ops
from pdml.sample import PatchSampleF, draw_patch_ids

B, C, H, W, N, D = 2, 5, 4, 6, 7, 3
HW = H * W


def _maps(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    fq = torch.randn(B, C, H, W, generator=g).to(device=device, dtype=dtype)
    fk = torch.randn(B, C, H, W, generator=g).to(device=device, dtype=dtype)
    return fq, fk


def _map_op_calls(fq, fk, weight):
    """Every public op that takes ids, as ``name -> (ids -> result)``."""
    return {
        "patch_nce": lambda ids: ops.patch_nce(fq, fk, ids),
        "patch_metric": lambda ids: ops.patch_metric(fq, fk, ids),
        "patch_similarity": lambda ids: ops.patch_similarity(fq, fk, ids),
        "patch_nce_layers": lambda ids: ops.patch_nce_layers([fq], [fk], ids),
        "patch_metric_layers": lambda ids: ops.patch_metric_layers([fq], [fk], ids),
        "gather_project": lambda ids: ops.gather_project(fq, ids, weight),
    }


@pytest.fixture
def value_checks(monkeypatch):
    """The number of ids checks that read values (and would synchronise on a GPU)."""
    counter = {"n": 0}
    check = _validation._check_ids_values_now

    def counting(ids, hw, name):
        counter["n"] += 1
        return check(ids, hw, name)

    monkeypatch.setattr(_validation, "_check_ids_values_now", counting)
    return counter


@pytest.fixture
def cached_on_cpu(monkeypatch):
    """The "checked once" record serving CPU tensors too, as it serves CUDA ones."""
    monkeypatch.setattr(_validation, "CACHED_DEVICE_TYPES", ("cpu", "cuda"))


# --------------------------------------------------------------------------- CPU: bad ids refused

@pytest.mark.parametrize("op", list(_map_op_calls(*_maps(), torch.randn(D, C))))
def test_bad_ids_refused_on_every_call_cpu(op, value_checks):
    fq, fk = _maps()
    call = _map_op_calls(fq, fk, torch.randn(D, C))[op]
    ids = torch.randperm(HW)[:N]
    for _ in range(2):
        call(ids)
    assert value_checks["n"] == 2  # CPU ids are read on every call
    ids[1] = ids[0]  # in place, through torch
    with pytest.raises(ValueError, match=r"ids must be distinct, got repeated values \["):
        call(ids)
    ids[1] = HW + 3
    with pytest.raises(ValueError, match=r"ids must lie in \[0, H\*W\) = \[0, 24\), got values in \[\d+, 27\]"):
        call(ids)
    ids = torch.randperm(HW)[:N]
    call(ids)
    ids.numpy()[2] = -1  # behind torch's version counter
    with pytest.raises(ValueError, match=r"ids must lie in \[0, H\*W\)"):
        call(ids)
    bad = _validation.mark_ids_valid(torch.tensor([3, 3, 4]), HW)  # marks do not exempt CPU ids
    with pytest.raises(ValueError, match="ids must be distinct"):
        call(bad)


def test_bad_patch_ids_named_by_the_sampler_cpu():
    fq, _ = _maps()
    sampler = PatchSampleF(use_mlp=False)
    out, ids = sampler([fq], num_patches=N)
    ids[0][0] = ids[0][1]
    with pytest.raises(ValueError, match=r"patch_ids\[0\] must be distinct"):
        sampler([fq], num_patches=N, patch_ids=ids)


# --------------------------------------------------------------------------- the "checked once" record

def test_checked_once_per_tensor_until_written(cached_on_cpu, value_checks):
    ids = torch.randperm(HW)[:N]
    _validation.check_ids_values(ids, HW)
    _validation.check_ids_values(ids, HW)
    _validation.check_ids_values(ids, HW + 5)  # valid for hw is valid for any larger one
    assert value_checks["n"] == 1
    ids.add_(0)  # an in-place write (even one that changes nothing) bumps the version
    _validation.check_ids_values(ids, HW)
    assert value_checks["n"] == 2
    ids[0] = ids[1]
    with pytest.raises(ValueError, match="ids must be distinct"):
        _validation.check_ids_values(ids, HW)
    with pytest.raises(ValueError, match="ids must be distinct"):  # a refused tensor stays unchecked
        _validation.check_ids_values(ids, HW)
    assert value_checks["n"] == 4


def test_smaller_hw_is_checked_again(cached_on_cpu, value_checks):
    ids = torch.tensor([0, 5, 20])
    _validation.check_ids_values(ids, HW)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, H\*W\) = \[0, 12\), got values in \[0, 20\]"):
        _validation.check_ids_values(ids, 12)
    _validation.check_ids_values(ids, 21)
    _validation.check_ids_values(ids, HW)
    assert value_checks["n"] == 3  # HW again: 21 was proven, and a smaller bound needs a read


def test_other_tensors_and_views_are_checked(cached_on_cpu, value_checks):
    ids = torch.randperm(HW)[:N]
    _validation.check_ids_values(ids, HW)
    _validation.check_ids_values(ids.clone(), HW)  # equal values, another tensor
    _validation.check_ids_values(ids[:3], HW)      # a view is another tensor object
    assert value_checks["n"] == 3
    base = torch.randperm(HW)
    view = base[:N]
    _validation.check_ids_values(view, HW)
    base[1] = base[0]  # a write to the base bumps the shared version counter
    with pytest.raises(ValueError, match="ids must be distinct"):
        _validation.check_ids_values(view, HW)
    assert value_checks["n"] == 5
    with torch.inference_mode():
        frozen = torch.randperm(HW)[:N]
    _validation.check_ids_values(frozen, HW)
    _validation.check_ids_values(frozen, HW)  # no version counter: read every time
    assert value_checks["n"] == 7


def test_dead_tensors_leave_the_record(cached_on_cpu, value_checks):
    before = len(_validation._valid_ids.entries)
    for _ in range(5):
        _validation.check_ids_values(torch.randperm(HW)[:N], HW)
    gc.collect()
    assert len(_validation._valid_ids.entries) == before
    assert value_checks["n"] == 5


def test_sampled_ids_are_never_read(cached_on_cpu, value_checks):
    """The trainer's ids (draw_patch_ids) are marked valid where they are drawn; the ops then
    skip the check on every call, the sampler's second call (CUT's k pass) included."""
    fq, fk = _maps(dtype=torch.float64)
    fq.requires_grad_(True)
    weight = torch.randn(D, C, dtype=torch.float64, requires_grad=True)
    ids = draw_patch_ids(HW, N, torch.device("cpu"))
    rows = ops.gather_project(fq, ids, weight)
    loss = ops.patch_nce(fq, fk, ids).mean() + ops.patch_metric(fq, fk, ids) + rows.square().mean()
    loss.backward()
    sampler = PatchSampleF(use_mlp=True, nc=4)
    _, drawn = sampler([fq.detach().float()], num_patches=N)
    sampler([fk.float()], num_patches=N, patch_ids=drawn)
    assert value_checks["n"] == 0
    drawn[0][0] = drawn[0][1]  # written after the draw: read again, refused
    with pytest.raises(ValueError, match="ids must be distinct"):
        ops.gather_project(fq, drawn[0], weight)


def test_draw_patch_ids_values():
    torch.manual_seed(3)
    ids = draw_patch_ids(HW, N, "cpu")
    torch.manual_seed(3)
    assert torch.equal(ids, torch.randperm(HW)[:N])  # the same RNG draw as CUT's sampler
    assert ids.dtype == torch.int64 and len(set(ids.tolist())) == N
    assert draw_patch_ids(HW, 100, "cpu").sort().values.tolist() == list(range(HW))


# --------------------------------------------------------------------------- CUDA: no host sync per step

SYNC_MESSAGE = "called a synchronizing CUDA operation"


def _count_syncs(fn) -> int:
    """The synchronisations ``fn()`` makes, as torch's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(SYNC_MESSAGE in str(w.message) for w in caught)


def _backends_for_cuda():
    probe = torch.zeros(1, device="cuda") if torch.cuda.is_available() else None
    names = []
    for name in ("triton", "ext"):
        if probe is not None and ops.available_backends(probe, "gather_project")[name] is None:
            names.append(name)
    return names or ["none"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", _backends_for_cuda())
def test_training_step_has_no_host_sync_cuda(backend):
    if backend == "none":
        pytest.skip("neither triton nor the ext CUDA kernels can run here")
    b, c, h, w, n, d, layers = 2, 32, 16, 16, 64, 16, 2
    g = torch.Generator().manual_seed(0)
    maps = [[torch.randn(b, c, h, w, generator=g).cuda() for _ in range(2)] for _ in range(layers)]
    weight = torch.randn(d, c, generator=g).cuda().requires_grad_(True)
    bias = torch.randn(d, generator=g).cuda().requires_grad_(True)

    def step(ids_per_layer):
        q_rows, k_rows, map_loss = [], [], 0.0
        for (q_map, k_map), ids in zip(maps, ids_per_layer):
            q_map = q_map.detach().requires_grad_(True)
            q_rows.append(ops.gather_project(q_map, ids, weight, bias, backend=backend))
            k_rows.append(ops.gather_project(k_map, ids, weight, bias, backend=backend))
            map_loss = (map_loss + ops.patch_nce(q_map, k_map, ids, backend=backend).mean()
                        + ops.patch_metric(q_map, k_map, ids, backend=backend))
        q = torch.nn.functional.normalize(torch.cat(q_rows), dim=1)
        k = torch.nn.functional.normalize(torch.cat(k_rows), dim=1)
        loss = (map_loss
                + ops.patch_nce_rows_layers(q, k, layers, batch_size=b, backend=backend).mean()
                + ops.patch_metric_rows_layers(q, k, layers, batch_size=b, backend=backend))
        loss.backward()

    def trainer_ids():
        return [draw_patch_ids(h * w, n, torch.device("cuda")) for _ in range(layers)]

    step(trainer_ids())  # warm-up: kernel compilation and first launches may synchronise
    torch.cuda.synchronize()
    for _ in range(3):
        assert _count_syncs(lambda: step(trainer_ids())) == 0
    user_ids = [torch.randperm(h * w, device="cuda")[:n] for _ in range(layers)]
    assert _count_syncs(lambda: step(user_ids)) >= 1  # unchecked user ids are read once...
    for _ in range(2):
        assert _count_syncs(lambda: step(user_ids)) == 0  # ...and not again
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(trainer_ids())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    user_ids[0][1] = user_ids[0][0]  # written: read again, refused
    with pytest.raises(ValueError, match="ids must be distinct"):
        step(user_ids)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, H\*W\)"):
        step([torch.tensor([0, h * w], device="cuda")] * layers)
