"""pdml's backends: the registry, then one module per fused backend (docs/layout.md).

Importing this package registers the reference backend (:mod:`pdml.reference`), then
imports :mod:`pdml.backends.triton` and :mod:`pdml.backends.ext`, which register
themselves or record why they cannot run. Nothing here imports :mod:`pdml.ops`.
"""
from pdml import reference
from pdml.backends.registry import (BACKEND_NAMES, OP_NAMES, Backend, auto_order,  # noqa: F401
                                    available_backends, device_index, mark_unavailable,
                                    register_backend, resolve_backend)

register_backend(Backend(
    name="reference",
    unavailable=lambda: None,
    unsupported=lambda t: None,
    patch_nce=reference.map_nce,
    patch_metric=reference.map_metric,
    patch_similarity=reference.patch_similarity,
    patch_nce_rows=reference.rows_nce,
    patch_metric_rows=reference.rows_metric,
    gather_project=reference.gather_project,
))

from pdml.backends import ext, triton  # noqa: E402,F401  (they register themselves)
