"""The layering of docs/layout.md: imports point down, never up to pdml.ops."""
import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PDML = REPO / "pdml"
# modules below pdml.ops: none of them may import it
LOWER = [PDML / "_validation.py", PDML / "reference.py"] + sorted((PDML / "backends").glob("*.py")) \
    + sorted((PDML / "kernels").glob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from pdml import ops`` -> pdml.ops)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_lower_layers_never_import_ops():
    assert len(LOWER) >= 8, LOWER  # the walk found the files (a wrong glob would pass vacuously)
    offenders = {str(p.relative_to(REPO)): sorted(n for n in _imported_modules(p) if n == "pdml.ops")
                 for p in LOWER}
    assert not any(offenders.values()), offenders


def test_the_import_walk_sees_ops_imports():
    """The checker itself: it does find an import of pdml.ops where there is one."""
    assert "pdml.ops" in _imported_modules(PDML / "losses.py")
    assert "pdml.ops" in _imported_modules(PDML / "info.py")


def test_no_module_under_pdml_imports_the_old_backend_modules():
    for path in PDML.rglob("*.py"):
        names = _imported_modules(path)
        assert not {"pdml._ops_ext", "pdml._ops_triton"} & names, path


def test_backends_import_without_ops():
    """With pdml's package __init__ bypassed, importing pdml.backends registers every
    backend and never loads pdml.ops (so there is no import cycle through it)."""
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('pdml'); pkg.__path__ = [{str(PDML)!r}]; sys.modules['pdml'] = pkg\n"
        "import torch\n"
        "import pdml.backends as b\n"
        "assert 'pdml.ops' not in sys.modules, sorted(m for m in sys.modules if m.startswith('pdml'))\n"
        "table = b.available_backends(torch.zeros(1))\n"
        "assert set(table) == {'reference', 'triton', 'ext'} and table['reference'] is None, table\n"
        "import pdml.ops\n"
        "assert pdml.ops.resolve_backend is b.resolve_backend\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
