"""Backend "ext": fake impls and autograd of the C++/CUDA ops of ``pdml._C``."""
from pdml import ops

ops._UNBUILT["ext"] = "the C++/CUDA extension ops are not built yet in this version of pdml"
