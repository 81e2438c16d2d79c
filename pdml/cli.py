"""Console scripts ``pdml-train`` and ``pdml-denoise``."""
import sys


def _not_built(name: str) -> int:
    print(f"{name}: not built yet in pdml {__import__('pdml').__version__} "
          "(see the issue 'Training system')", file=sys.stderr)
    return 2


def train_main(argv=None) -> int:
    return _not_built("pdml-train")


def denoise_main(argv=None) -> int:
    return _not_built("pdml-denoise")
