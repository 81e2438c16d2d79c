"""Every Triton kernel of pdml compiles for sm_80 and sm_90 in fp32, fp16 and bf16 (no GPU
needed: ``triton.compile(ASTSource(...), target=GPUTarget(...))`` emits PTX and a cubin).

Block sizes: the launch helpers' choice for small groups (16 rows of 32 channels), the
same code path as the production sizes (32×32 tiles of 256 channels for N = C = 256) with
other constexpr values; production-size compiles take 5-60 s each on the CI machine (the
fp32 "ieee" dots unroll into FMAs), so they are measured once (docs in /work/notes) and
exercised by the cuda-marked tests on a GPU instead.

The PTX shows how the similarity tiles are multiplied: fp16/bf16 must use tensor-core
instructions (mma / wgmma); fp32 must not, because its dots ask for
``input_precision="ieee"`` (tf32 tensor cores would show up as mma with .tf32 operands).
"""
import pytest

triton = pytest.importorskip("triton", reason="triton cannot be imported")

import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from pdml.kernels import kernel_module, launch  # noqa: E402

pytestmark = pytest.mark.skipif(
    not isinstance(tl.standard._sum_combine, JITFunction),
    reason="triton was imported with TRITON_INTERPRET=1: its library is interpreter-only in this process")

KERNELS = ["nce_forward_kernel", "nce_backward_kernel", "metric_forward_kernel",
           "metric_backward_kernel", "similarity_forward_kernel", "similarity_backward_kernel"]
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FEATURE_POINTERS = ("q_ptr", "k_ptr", "dq_ptr", "dk_ptr")
FLOAT_SCALARS = ("inv_tau", "pos_scale", "pair_scale")


def _source(kernel_name, dtype, gather=True):
    """ASTSource of one kernel specialised as the launch helpers would launch it."""
    fn = getattr(kernel_module(False), kernel_name)
    block_m, block_n, block_c, num_warps = launch.block_sizes(16, 32, interpret=False)
    constexprs = {"GATHER": gather, "NORMALIZE": gather, "IEEE": dtype == torch.float32,
                  "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_C": block_c}
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in FEATURE_POINTERS:
            signature[name] = "*" + DTYPES[dtype]
        elif name == "ids_ptr":
            signature[name] = "*i64" if gather else "*" + DTYPES[dtype]
        elif name.endswith("_ptr"):  # losses, logsumexp, similarity, upstream gradients
            signature[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return ASTSource(fn, signature, constexprs), num_warps


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
@pytest.mark.parametrize("kernel_name", KERNELS)
def test_kernel_compiles_and_uses_tensor_cores_for_half(kernel_name, dtype, arch):
    source, num_warps = _source(kernel_name, dtype)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    assert len(compiled.asm["cubin"]) > 0
    uses_tensor_cores = "mma.sync" in ptx or "wgmma" in ptx
    if dtype == torch.float32:
        assert not uses_tensor_cores, "fp32 dots must be exact (input_precision='ieee'), not tf32 mma"
    else:
        assert uses_tensor_cores, f"{kernel_name} {DTYPES[dtype]} sm_{arch}: no mma/wgmma in the PTX"


@pytest.mark.parametrize("kernel_name", KERNELS[:4])
def test_rows_form_kernels_compile(kernel_name):
    """The rows form (no gather, no normalisation) of the loss kernels, fp16 on sm_90."""
    source, num_warps = _source(kernel_name, torch.float16, gather=False)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert "mma" in compiled.asm["ptx"]
