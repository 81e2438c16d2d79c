"""Check a folder of wheels made by `make gpu-wheels`: one wheel per wanted package, one
version of each, and every requirement of every wheel met by the folder or by the
packages the target machine already has.

    python tools/check_wheels.py WHEEL_DIR --want NAME... --present NAME...

Exits 1 naming what is missing (pip's `--no-deps` install on the target would not).
"""
from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, requirement names without extras/markers for extras) of a wheel."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    fields = [line.split(":", 1) for line in text.splitlines() if ":" in line]
    name = next(v.strip() for k, v in fields if k == "Name")
    version = next(v.strip() for k, v in fields if k == "Version")
    needs = []
    for k, v in fields:
        if k == "Requires-Dist" and "extra ==" not in v:
            needs.append(canonical(re.split(r"[\s;<>=!~(\[]", v.strip(), maxsplit=1)[0]))
    return canonical(name), version, needs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("wheel_dir")
    p.add_argument("--want", nargs="+", required=True, help="packages the folder must hold")
    p.add_argument("--present", nargs="*", default=[], help="packages the machine already has")
    args = p.parse_args(argv)
    wheels = sorted(Path(args.wheel_dir).glob("*.whl"))
    found: dict[str, list[str]] = {}
    needs: dict[str, list[str]] = {}
    for w in wheels:
        name, version, reqs = wheel_metadata(w)
        found.setdefault(name, []).append(version)
        needs[name] = reqs
        print(f"{w.name}: {name} {version}; needs {', '.join(reqs) or 'nothing'}")
    problems = [f"no wheel for {n}" for n in map(canonical, args.want) if n not in found]
    problems += [f"{n}: {len(v)} versions ({', '.join(v)}): keep one" for n, v in found.items() if len(v) > 1]
    have = set(found) | {canonical(n) for n in args.present}
    for name, reqs in needs.items():
        problems += [f"{name} needs {r}: neither in {args.wheel_dir} nor on the machine" for r in reqs
                     if r not in have]
    for problem in problems:
        print("ERROR:", problem)
    print(f"{len(wheels)} wheels, {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
