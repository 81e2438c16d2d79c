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
