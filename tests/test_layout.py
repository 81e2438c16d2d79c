"""The layering of docs/layout.md: imports point down the package's layers, never up, and
no pdml module imports itself back through others (no import circle)."""
import ast
import os
import subprocess
import sys
import textwrap
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PDML = REPO / "pdml"
# modules below pdml.ops: none of them may import it
LOWER = [PDML / "_validation.py", PDML / "reference.py"] + sorted((PDML / "backends").glob("*.py")) \
    + sorted((PDML / "kernels").glob("*.py"))

# The package's layers, lowest first (docs/layout.md, "Package layers"): a module may import
# modules of its own layer and of the layers below it, never one above. Each pattern is a
# dotted module name or an fnmatch glob of them; every module under pdml/ is in exactly one
# layer, so a new module has to be placed here.
LAYERS = [
    ("foundation", ["pdml._validation", "pdml._files", "pdml._plot", "pdml.reference",
                    "pdml.kernels", "pdml.kernels.*"]),
    ("backends", ["pdml.backends", "pdml.backends.*"]),
    ("ops", ["pdml.ops"]),
    ("drop-ins and models", ["pdml", "pdml.losses", "pdml.sample", "pdml.models",
                             "pdml.models.*"]),
    ("data", ["pdml.data", "pdml.data.*"]),
    ("metrics and classical denoisers", ["pdml.metrics", "pdml.classical"]),
    ("training", ["pdml.training", "pdml.training.*"]),
    ("faces and experiments", ["pdml.inference", "pdml.evaluation", "pdml.experiments",
                               "pdml.experiments.*"]),
    ("console scripts", ["pdml.cli", "pdml.cli_eval", "pdml.info"]),
]


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


def module_name(path: Path) -> str:
    """``pdml/data/hu.py`` -> ``pdml.data.hu``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pdml_modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(p): p for p in sorted(PDML.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_edges(source: str, name: str, is_package: bool, modules) -> list[tuple[str, int, bool]]:
    """The pdml modules that the module ``name`` (its ``source``) imports: ``(module, line,
    typing_only)`` for each import statement at any depth (module level, in a function, in a
    class), and each ``importlib.import_module("pdml...")`` / ``__import__("pdml...")`` with
    a literal name. ``from P import X`` is an import of ``P.X`` when that is a module of
    ``modules``, else of ``P``; ``import a.b.c`` names ``a.b.c``. Names that are no module of
    ``modules`` (other packages, the compiled ``pdml._C``) are no edges. An import under
    ``if TYPE_CHECKING:`` is ``typing_only`` (never run; only the layer order applies to it).
    Importing a submodule also runs its parent packages' ``__init__``; those implicit imports
    are not edges (every module would otherwise import the package's face)."""
    package = name if is_package else name.rpartition(".")[0]
    edges = []

    def visit(node, typing_only: bool):
        for child in ast.iter_child_nodes(node):
            under = typing_only or (isinstance(node, ast.If) and _is_type_checking(node.test)
                                    and child in node.body)
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in child.names]
            elif (isinstance(child, ast.Call) and child.args
                  and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)
                  and ((isinstance(child.func, ast.Name) and child.func.id == "__import__")
                       or (isinstance(child.func, ast.Attribute)
                           and child.func.attr == "import_module"))):
                targets = [child.args[0].value]
            for target in targets:
                if target in modules and target != name:
                    edges.append((target, child.lineno, under))
            visit(child, under)

    visit(ast.parse(source), False)
    return edges


def import_graph(modules=None) -> dict[str, list[tuple[str, int, bool]]]:
    """``{module: import_edges(...)}`` of every pdml module."""
    modules = pdml_modules() if modules is None else modules
    return {name: import_edges(path.read_text(), name, path.name == "__init__.py", modules)
            for name, path in modules.items()}


def layer_of(name: str) -> list[int]:
    """The indices of the layers of :data:`LAYERS` whose patterns match module ``name``."""
    return [i for i, (_, patterns) in enumerate(LAYERS)
            if any(fnmatchcase(name, p) for p in patterns)]


def order_violations(graph) -> list[str]:
    """Each import of a module from a higher layer, as a readable line."""
    out = []
    for name, edges in graph.items():
        for target, line, _ in edges:
            src, dst = layer_of(name), layer_of(target)
            if src and dst and dst[0] > src[0]:
                out.append(f"{name}:{line} ({LAYERS[src[0]][0]}) imports {target} "
                           f"({LAYERS[dst[0]][0]})")
    return out


def import_cycles(graph) -> list[list[str]]:
    """The import circles of ``graph`` (runtime imports only): each strongly connected
    set of more than one module, sorted (Tarjan's algorithm)."""
    succ = {n: sorted({t for t, _, typing_only in e if not typing_only and t in graph})
            for n, e in graph.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(succ) + 100))
    for v in sorted(succ):
        if v not in index:
            connect(v)
    return sorted(found)


# ----------------------------------------------------------------------------- the package

def test_every_module_is_in_exactly_one_layer():
    modules = pdml_modules()
    assert len(modules) >= 60, sorted(modules)  # the walk found the package
    placed = {name: layer_of(name) for name in modules}
    assert not {n: ls for n, ls in placed.items() if len(ls) != 1}, \
        "place each module in exactly one layer of LAYERS (and docs/layout.md)"


def test_imports_point_down_the_layers():
    """Module-level and function-level imports alike."""
    graph = import_graph()
    assert sum(len(e) for e in graph.values()) >= 150   # the walk saw the package's imports
    assert order_violations(graph) == []


def test_no_import_circle():
    assert import_cycles(import_graph()) == []


def test_lower_layers_never_import_ops():
    assert len(LOWER) >= 8, LOWER  # the walk found the files (a wrong glob would pass vacuously)
    offenders = {str(p.relative_to(REPO)): sorted(n for n in _imported_modules(p) if n == "pdml.ops")
                 for p in LOWER}
    assert not any(offenders.values()), offenders


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


# ------------------------------------------------------------------------ the checker itself

def test_the_import_walk_sees_ops_imports():
    """The checker itself: it does find an import of pdml.ops where there is one."""
    assert "pdml.ops" in _imported_modules(PDML / "losses.py")
    assert "pdml.ops" in _imported_modules(PDML / "info.py")


_MODULES = {name: None for name in ("pdml", "pdml.ops", "pdml.cli", "pdml.data", "pdml.data.hu",
                                    "pdml.data.store", "pdml.training", "pdml.training.config",
                                    "pdml.training.run", "pdml.inference")}


def _edges(source: str, name: str, is_package: bool = False):
    return import_edges(textwrap.dedent(source), name, is_package, _MODULES)


def test_the_walk_resolves_every_form_of_import():
    edges = _edges("""
        import numpy
        import pdml._C
        import pdml.data.hu
        from pdml import ops, __version__
        from . import store
        from .hu import HU_WINDOW
        from ..training.config import TrainConfig
        importlib.import_module("pdml.cli")
        __import__("pdml")
        """, "pdml.data.datasets")
    assert [t for t, _, _ in edges] == ["pdml.data.hu", "pdml.ops", "pdml", "pdml.data.store",
                                        "pdml.data.hu", "pdml.training.config", "pdml.cli",
                                        "pdml"]


def test_the_checker_finds_an_upward_import_at_module_or_function_level():
    top = {"pdml.data.hu": _edges("from pdml.training.run import train\n", "pdml.data.hu")}
    inner = {"pdml.ops": _edges("""
        def f():
            if True:
                from pdml.cli import main
        """, "pdml.ops")}
    typing_only = {"pdml.data.hu": _edges("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from pdml.inference import denoise_hu
        """, "pdml.data.hu")}
    assert order_violations(top) == ["pdml.data.hu:1 (data) imports pdml.training.run (training)"]
    assert order_violations(inner) == ["pdml.ops:4 (ops) imports pdml.cli (console scripts)"]
    assert len(order_violations(typing_only)) == 1
    down = {"pdml.cli": _edges("from pdml.data.hu import HU_WINDOW\nimport pdml.ops\n", "pdml.cli")}
    assert down["pdml.cli"] and order_violations(down) == []


@pytest.mark.parametrize("closing", ["import pdml.ops\n", "def f():\n    from pdml import ops\n"])
def test_the_checker_finds_a_circle(closing):
    """A circle of three modules, closed at module level or in a function."""
    graph = {"pdml.ops": _edges("import pdml.cli\n", "pdml.ops"),
             "pdml.cli": _edges("from pdml import inference\n", "pdml.cli"),
             "pdml.inference": _edges(closing, "pdml.inference"),
             "pdml.data.hu": _edges("import pdml.ops\n", "pdml.data.hu")}
    assert import_cycles(graph) == [["pdml.cli", "pdml.inference", "pdml.ops"]]


def test_the_checker_finds_a_circle_through_a_package_face_but_not_a_typing_import():
    face = _edges("from pdml.data.store import SliceStack\n", "pdml.data", is_package=True)
    back = _edges("from pdml.data import hu\nimport pdml.data\n", "pdml.data.store")
    typing_only = _edges("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            import pdml.data
        """, "pdml.data.store")
    assert import_cycles({"pdml.data": face, "pdml.data.store": back, "pdml.data.hu": []}) \
        == [["pdml.data", "pdml.data.store"]]
    assert import_cycles({"pdml.data": face, "pdml.data.store": typing_only}) == []
# --------------------------------------------------------------------------- vocabulary
# docs/layout.md, "Vocabulary": one name per op in every layer, read from the table.

LAYOUT_DOC = REPO / "docs" / "layout.md"
VOCABULARY_COLUMNS = ("op", "ops", "field", "reference", "groups_form", "triton", "cpp")


def _vocabulary_table(text: str) -> list[dict[str, list[str]]]:
    """The rows of the table under "## Vocabulary": ``{column: [names]}`` (backticks and the
    separators between several names dropped; the "op" column keeps its words)."""
    section = text.split("\n## Vocabulary\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = []
    for line in lines[2:]:  # header and its rule
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == len(VOCABULARY_COLUMNS), line
        row = {"op": [cells[0]]}
        for column, cell in zip(VOCABULARY_COLUMNS[1:], cells[1:]):
            row[column] = [name.strip().strip("`") for name in cell.split(",")]
        rows.append(row)
    return rows


def _cpp_schemas() -> set[str]:
    """The op names ``csrc/pdml.cpp`` defines (``m.def("name(...``)."""
    import re
    return set(re.findall(r'm\.def\("(\w+)\(', (REPO / "csrc" / "pdml.cpp").read_text()))


def _module_functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


def _vocabulary_problems(rows: list[dict[str, list[str]]]) -> list[str]:
    """Every name of the table that its layer does not have (empty when all agree)."""
    import torch

    import pdml.ops
    from pdml import reference
    from pdml.backends import registry, triton as triton_backend

    problems = []
    cpp = _cpp_schemas()
    backend_functions = {name: _module_functions(PDML / "backends" / f"{name}.py") for name in ("triton", "ext")}
    probe = torch.zeros(1)
    for row in rows:
        op = row["op"][0]
        for name in row["ops"]:
            if name not in pdml.ops.__all__ or not callable(getattr(pdml.ops, name, None)):
                problems.append(f"{op}: pdml.ops has no public {name}")
        for name in row["field"]:
            if name not in registry.OP_NAMES:
                problems.append(f"{op}: registry.Backend has no field {name}")
                continue
            for backend, functions in backend_functions.items():
                if name not in functions:
                    problems.append(f"{op}: pdml/backends/{backend}.py defines no callable {name}")
            if name not in row["ops"]:
                problems.append(f"{op}: field {name} is not the public op's name {row['ops']}")
        for name in row["reference"]:
            if not callable(getattr(reference, name, None)):
                problems.append(f"{op}: pdml.reference has no {name}")
        for name, field in zip(row["groups_form"], row["field"]):
            registered = getattr(registry.resolve_backend("reference", probe, field), field) \
                if field in registry.OP_NAMES else None
            if getattr(reference, name, None) is not registered or registered is None:
                problems.append(f"{op}: the reference backend's {field} is not pdml.reference.{name}")
        if triton_backend.patch_loss_launch is not None:  # triton importable: its ops are registered
            for name in row["triton"]:
                if not hasattr(torch.ops.pdml_triton, name):
                    problems.append(f"{op}: no op pdml_triton::{name}")
        for name in row["cpp"]:
            if name not in cpp:
                problems.append(f"{op}: csrc/pdml.cpp defines no schema pdml::{name}")
    return problems


def test_vocabulary_table_names_every_op_in_every_layer():
    from pdml.backends import registry

    rows = _vocabulary_table(LAYOUT_DOC.read_text())
    assert sorted(row["field"][0] for row in rows) == sorted(registry.OP_NAMES)  # every op has its row
    assert _vocabulary_problems(rows) == []


def test_vocabulary_check_fails_on_a_wrong_name_in_any_column():
    """The checker itself: one wrong name in any column of any row is reported."""
    rows = _vocabulary_table(LAYOUT_DOC.read_text())
    for column in VOCABULARY_COLUMNS[1:]:
        for index in range(len(rows)):
            wrong = [dict(row) for row in rows]
            wrong[index][column] = [wrong[index][column][0] + "x"] + wrong[index][column][1:]
            if column == "triton":
                from pdml.backends import triton as triton_backend
                if triton_backend.patch_loss_launch is None:
                    continue
            assert _vocabulary_problems(wrong), (column, index)


def test_one_spelling_of_normalise():
    """No identifier spelled "normaliz..." in pdml/ or csrc/; the only "Normalize" is CUT's
    class and the only "normalize" torch's ``F.normalize``."""
    import re

    def offenders(text: str) -> list[str]:
        text = re.sub(r"(F|functional)\.normalize\b", "", text)
        return [word for word in re.findall(r"\w*[Nn][Oo][Rr][Mm][Aa][Ll][Ii][Zz]\w*", text)
                if word != "Normalize"]

    assert offenders("x = reference.normalize_rows(F.normalize(y))") == ["normalize_rows"]
    assert offenders("CUT's Normalize; NORMALIZE") == ["NORMALIZE"]
    paths = sorted(PDML.rglob("*.py")) + sorted((REPO / "csrc").rglob("*.[ch]*"))
    assert len(paths) > 40, paths
    found = {str(p.relative_to(REPO)): offenders(p.read_text()) for p in paths}
    assert not any(found.values()), {k: v for k, v in found.items() if v}


def test_the_metric_loss_has_one_name_inside_the_code():
    """The config's and CLI's "dml" is written once, as ``config.METRIC_LOSS``; no other
    module under pdml/ compares with the string (pdml/experiments/ aside: its records keep
    their keys and its split is another issue's)."""
    pattern = '"dml"'
    found = {str(p.relative_to(REPO)): p.read_text().count(pattern) for p in PDML.rglob("*.py")
             if "experiments" not in p.parts and pattern in p.read_text()}
    assert found == {"pdml/training/config.py": 1}, found
