"""matplotlib for the figures pdml writes to files (the trainer's, ``pdml-eval``'s)."""
from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend (PNG files, no display needed), unless a
    backend was chosen before. Imported on the first figure: matplotlib with pyplot takes
    ~0.5 s, which a console script that draws nothing (or not yet) does not pay."""
    import matplotlib  # here, not at the top: the ~0.5 s above

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
