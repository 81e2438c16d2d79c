"""Backend "triton": custom-op registration of the Triton kernels in :mod:`pdml.kernels`."""
from pdml import ops

ops._UNBUILT["triton"] = "the Triton kernels are not built yet in this version of pdml"
