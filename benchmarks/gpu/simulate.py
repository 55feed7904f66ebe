"""Run a command here as the GPU device would import it: only its image's packages and the bundle's.

    .venv/bin/python benchmarks/gpu/simulate.py -- .venv/bin/python benchmarks/cascade.py \
        --candidates 40 --vlms tiny --out /tmp/cascade-sim.json

The command runs with a ``sitecustomize`` on ``PYTHONPATH`` that refuses (``ModuleNotFoundError``)
any module whose file belongs to a distribution of keeper's .venv that is in neither
``device-packages.txt`` (the device image's list) nor ``bundle/MANIFEST.txt`` (what
``make_bundle.sh`` packed), in the command's process and in every Python it starts (Ray's workers
inherit ``PYTHONPATH``). Afterwards it prints each refused import (something the device lacks: an
``ImportError`` the code may have caught and gone on without, or the failure itself) and the
bundle's distributions that nothing imported.

What it cannot tell: this machine runs Python 3.11 and .venv's versions, the device Python 3.12 and
its image's versions (torch 2.11, numpy 2.5, ... when last read), so a version mismatch there, or a
cp312 wheel's own problem, shows only on the device. Exit status: the command's.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUFFIXES = (".py", ".so")

# Installed as sitecustomize.py: every Python the command starts runs it before anything else.
GUARD = r"""
import importlib.abc, json, os, sys

_MAP = json.load(open(os.environ["SIMDEV_MAP"]))
_BLOCKED, _USED, _LOG = _MAP["blocked"], _MAP["allowed"], os.environ["SIMDEV_LOG"]
_seen = set()


def _log(line):
    with open(_LOG, "a") as f:  # one short append per line: safe across processes
        f.write(f"{os.getpid()} {line}\n")


class _DeviceGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        origin = os.path.realpath(spec.origin) if spec.origin else ""
        dist = _BLOCKED.get(origin)
        if dist:
            _log(f"REFUSED {name} {dist}")
            raise ModuleNotFoundError(
                f"No module named {name!r} on the GPU device (simulate.py: {dist})", name=name
            )
        dist = _USED.get(origin)
        if dist and dist not in _seen:
            _seen.add(dist)
            _log(f"USED {dist}")
        return spec


sys.meta_path.insert(0, _DeviceGuard())
"""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> set[str]:
    """Distribution names of a list: one a line, ``name`` or ``name==version``, ``#`` comments."""
    if not path.exists():
        raise SystemExit(f"{path} is missing (run benchmarks/gpu/make_bundle.sh first)")
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(norm(line.split("==", 1)[0]))
    return names


def file_map(allowed: set[str]) -> dict[str, dict[str, str]]:
    """Module files of .venv's distributions: refused ones (in no allowed distribution), and
    allowed ones with their distribution (to report what was imported)."""
    owners: dict[str, set[str]] = collections.defaultdict(set)
    for dist in md.distributions():
        name = norm(dist.metadata["Name"] or "")
        for f in dist.files or ():
            if f.suffix in SUFFIXES:
                owners[os.path.realpath(str(dist.locate_file(f)))].add(name)
    blocked, used = {}, {}
    for path, names in owners.items():
        ok = names & allowed
        if ok:
            used[path] = sorted(ok)[0]
        else:
            blocked[path] = sorted(names)[0]
    return {"blocked": blocked, "allowed": used}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=Path, default=HERE / "device-packages.txt")
    parser.add_argument("--manifest", type=Path, default=HERE / "bundle" / "MANIFEST.txt")
    parser.add_argument("--log", type=Path, help="keep the per-process log here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (after --)")
    device, bundle = read_names(args.device), read_names(args.manifest)
    with tempfile.TemporaryDirectory(prefix="simdev-") as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(GUARD)
        map_path, log = Path(tmp) / "map.json", args.log or Path(tmp) / "log.txt"
        map_path.write_text(json.dumps(file_map(device | bundle)))
        log.write_text("")
        env = dict(os.environ, SIMDEV_MAP=str(map_path), SIMDEV_LOG=str(log))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tmp, env.get("PYTHONPATH")) if p)
        rc = subprocess.call(command, env=env)
        lines = [x.split() for x in log.read_text().splitlines()]
    refused = collections.Counter((x[2], x[3]) for x in lines if x[1] == "REFUSED")
    used = {x[2] for x in lines if x[1] == "USED"}
    print(f"\nsimulate.py: exit {rc}; {len({x[0] for x in lines})} Python process(es) imported")
    print("refused (the device lacks these; each was an ImportError in the process):")
    for (module, dist), n in sorted(refused.items(), key=lambda kv: kv[0][1]):
        print(f"  {dist:32s} {module} (x{n})")
    print(f"bundle distributions used: {' '.join(sorted(bundle & used))}")
    print(f"bundle distributions NOT imported: {' '.join(sorted(bundle - used)) or '-'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
