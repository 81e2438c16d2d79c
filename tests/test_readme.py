"""README.md as a newcomer walks it: every command and every Python snippet runs as written.

The walk goes through README's fenced blocks in order, in a fresh folder that holds the
own-data layout README describes (DICOM series made here from a real CT slice). Commands
run through the console scripts' main functions with the arguments as written; only the
length of training is cut: `--preset tiny` is added to a new pdml-train run and
`--max-minutes 0.05` to a resumed one, and `--no-progress` to both scripts. `make` and
`pip` lines are not run here (they install; CI runs `make test` itself). docs/data.md's
snippet runs too.
"""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

import pdml
from pdml.cli import denoise_main, train_main
from pdml.cli_eval import eval_main

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")

REPO = Path(pdml.__file__).resolve().parent.parent
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = {"make": "installs into .venv, then trains or tests", "pip": "installs packages"}


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """``(language, text)`` of every fenced block of a Markdown file, in order."""
    return FENCE.findall(path.read_text())


def commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [" ".join(shlex.split(line, comments=True)) for line in joined.splitlines()
            if shlex.split(line, comments=True)]


def make_own_data(root: Path) -> None:
    """README's own-data layout, as DICOM: two LD patients, one ND patient, and paired
    validation slices (one slice per series, CT_small's anatomy with different noise); and
    a small tree in the public AAPM-Mayo layout (tests/ct_trees.py)."""
    from pdml.data import load_ct, save_ct

    series = load_ct(get_testdata_file("CT_small.dcm"))[0]
    rng = np.random.default_rng(0)
    folders = {"train/ld/patient1": 40, "train/ld/patient2": 40, "train/nd/patient3": 10,
               "val/ld": 40, "val/nd": 0}
    for folder, noise in folders.items():
        hu = series.hu + rng.normal(0.0, noise, series.hu.shape).astype(np.float32)
        save_ct(series, hu, root / "my_data" / folder)
    from tests.ct_trees import write_tree

    # README's public collection: the AAPM-Mayo layout, three patients
    write_tree(root / "mayo", "mayo", patients=("L067", "L096", "L109"), slices=3, size=64)


def run_command(command: str, root: Path) -> None:
    argv = shlex.split(command)
    name, args = argv[0], argv[1:]
    if name in NOT_RUN:
        return
    if name == "pdml-train":
        args += ["--max-minutes", "0.05"] if "--resume" in args else ["--preset", "tiny"]
        assert train_main(args + ["--no-progress"]) == 0, command
    elif name == "pdml-denoise":
        assert denoise_main(args + ["--no-progress"]) == 0, command
    elif name == "pdml-eval":
        assert eval_main(args) == 0, command
    elif name == "python" and args[:1] == ["-m"]:
        done = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
    else:
        pytest.fail(f"README command this walk does not know: {command!r}")


def run_snippet(code: str, where: str) -> None:
    exec(compile(code, where, "exec"), {"__name__": "__main__"})


def test_readme_is_a_short_path_with_the_quick_start():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for command in ("make train", "make test"):
        assert command in text
    order = [text.index(h) for h in ("## Install", "## 1. ", "## 2. Train on your own DICOM",
                                     "## 3. Denoise", "## 4. Evaluate", "## 5. ")]
    assert order == sorted(order)


@pytest.mark.parametrize("path", [README] + sorted((REPO / "docs").glob("*.md")),
                         ids=lambda p: p.name)
def test_readme_and_docs_describe_pdml_not_how_it_was_made(path):
    text = path.read_text()
    for words in ("lent GPU", "is lent", "device tool", "files_at", "timeout_s", "issue target",
                  "no GPU has been lent", "carry: ["):
        assert words not in text, f"{path.name} speaks of {words!r}"
    if path == README:
        assert ".ci/run" not in text


def test_every_readme_command_and_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_own_data(tmp_path)
    blocks = fenced_blocks(README)
    layout = next(text for lang, text in blocks if "my_data/" in text and not lang)
    assert all(part in layout for part in ("train/ld/", "train/nd/", "val/ld/", "val/nd/"))
    ran = {"bash": 0, "python": 0}
    for k, (lang, text) in enumerate(blocks):
        if lang == "bash":
            for command in commands(text):
                assert command.split()[0] in (*NOT_RUN, "pdml-train", "pdml-denoise", "pdml-eval",
                                              "python")
                run_command(command, tmp_path)
                ran["bash"] += 1
        elif lang == "python":
            run_snippet(text, f"README.md python block {k}")
            ran["python"] += 1
    assert ran["python"] >= 1 and ran["bash"] >= 8
    printed = capsys.readouterr().out
    # what README says the steps do
    assert "pdml-train summary: runs/smoke" in printed
    assert "validation slices" in printed                  # runs/mine: paired validation
    assert "checkpoint runs/mine/checkpoints/best.pt" in printed
    last = torch.load(tmp_path / "runs" / "mine" / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] > 4 and last["config"]["steps"] == 800  # extended by --resume --steps
    assert len(list((tmp_path / "denoised" / "val").glob("*.dcm"))) == 1
    # the public collection: split by patient, the test patient denoised and scored
    split = json.loads((tmp_path / "runs" / "mayo" / "config.json").read_text())["resolved"]
    assert split["patients"]["test"] == ["L096"] and split["patients"]["val"] == ["L067"]
    report = (tmp_path / "reports" / "L096" / "report.md").read_text()
    assert "test patient of the run" in report and "| nlm |" in report
    assert "pdml-eval: wrote" in printed and "p PSNR" in printed
    for lang, text in fenced_blocks(REPO / "docs" / "data.md"):
        if lang == "python":
            run_snippet(text, "docs/data.md")
