"""The build of pdml._C: CUDA code for sm_80 and sm_90 where a CUDA toolkit exists (read
from the library's fatbinary, no GPU needed), and a CPU-only build with PDML_SKIP_CUDA=1."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from pdml.backends import ext as ext_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FATBIN_MAGIC = 0xBA55ED50
FATBIN_KIND_PTX, FATBIN_KIND_ELF = 1, 2


def elf_section(path: str, name: str) -> bytes:
    """The contents of section ``name`` of a 64-bit little-endian ELF file."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{path} is not a 64-bit ELF file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):
        off = shoff + i * shentsize
        name_off, = struct.unpack_from("<I", data, off)
        offset, size = struct.unpack_from("<QQ", data, off + 0x18)
        return name_off, offset, size

    _, strtab_off, _ = header(shstrndx)
    for i in range(shnum):
        name_off, offset, size = header(i)
        end = data.index(b"\0", strtab_off + name_off)
        if data[strtab_off + name_off:end].decode() == name:
            return data[offset:offset + size]
    return b""


def fatbin_entries(blob: bytes) -> list[tuple[int, int]]:
    """``(kind, sm)`` of every entry of the fatbinaries in ``blob`` (a .nv_fatbin section).

    Layout (as cuobjdump reads it): a container header (magic, version, header size,
    payload size) followed by entries whose header holds the kind (1 PTX, 2 ELF cubin),
    the entry's header and payload sizes, and the SM version at byte 28.
    """
    entries, pos = [], 0
    while pos + 16 <= len(blob):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # containers are 8-byte aligned, padding in between
            continue
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            sm, = struct.unpack_from("<I", blob, entry + 28)
            entries.append((kind, sm))
            entry += entry_header + payload
        pos = end
    return entries


def _cuda_toolkit() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


@pytest.mark.skipif(ext_backend.LOAD_ERROR is not None, reason=f"pdml._C not loaded: {ext_backend.LOAD_ERROR}")
def test_library_has_cuda_code_for_sm80_and_sm90():
    if torch.version.cuda is None or _cuda_toolkit() is None or os.environ.get("PDML_SKIP_CUDA", "0") != "0":
        pytest.skip("no CUDA toolkit / CUDA build of torch here: the build is CPU-only by design")
    import pdml._C

    assert set(ext_backend.cuda_archs()) >= {800, 900}, f"build_info() = {ext_backend.build_info()}"
    entries = fatbin_entries(elf_section(pdml._C.__file__, ".nv_fatbin"))
    cubins = {sm for kind, sm in entries if kind == FATBIN_KIND_ELF}
    assert {80, 90} <= cubins, f"fatbinary entries (kind, sm): {entries}"


def test_fatbin_parser_reads_a_known_layout():
    entry = struct.pack("<HHIQ", FATBIN_KIND_ELF, 0x101, 64, 16) + b"\0" * 12 + struct.pack("<I", 90)
    entry += b"\0" * (64 - len(entry)) + b"x" * 16
    ptx = struct.pack("<HHIQ", FATBIN_KIND_PTX, 0x101, 64, 8) + b"\0" * 12 + struct.pack("<I", 80)
    ptx += b"\0" * (64 - len(ptx)) + b"y" * 8
    body = entry + ptx
    blob = b"\0" * 8 + struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body
    assert fatbin_entries(blob) == [(FATBIN_KIND_ELF, 90), (FATBIN_KIND_PTX, 80)]


PROBE = r"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
fq, fk = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
loss, _, _ = torch.ops.pdml.patch_metric(fq, fk, torch.arange(10), 0.15, 2, False)
assert torch.isfinite(loss)
print(torch.ops.pdml.build_info())
"""


@pytest.mark.slow
def test_skip_cuda_builds_cpu_kernels_only(tmp_path):
    """PDML_SKIP_CUDA=1 (what a machine without a CUDA toolkit gets): the library builds
    from csrc/ with the CPU kernels only, loads and runs, and says so."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if os.path.exists(os.path.join(REPO, name)):
            shutil.copy(os.path.join(REPO, name), src / name)
    shutil.copytree(os.path.join(REPO, "csrc"), src / "csrc")
    env = dict(os.environ, PDML_SKIP_CUDA="1", MAX_JOBS="2", CFLAGS="-g0")
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")],
                         cwd=src, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "CUDA kernels OFF (PDML_SKIP_CUDA=1)" in out.stderr
    libs = list((tmp_path / "lib" / "pdml").glob("_C*.so"))
    assert len(libs) == 1, libs
    run = subprocess.run([sys.executable, "-c", PROBE, str(libs[0])], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "cpu"
    assert elf_section(str(libs[0]), ".nv_fatbin") == b""
