"""Checks the GPU bundle's wheels against what the device machine has, before anything travels.

    python benchmarks/gpu/requirements_check.py WHEEL...      # make_bundle.sh runs it

Every requirement of every bundled wheel (its METADATA's Requires-Dist, markers evaluated for
CPython 3.12 on x86-64 Linux, no extras) must be met by a bundled wheel's version, or else by the
device image's version of that distribution where ``device-versions.txt`` knows it; a requirement
on a distribution the image has at an unknown version (``device-packages.txt``) is listed as
unchecked, and one on a distribution found in neither is an error. Exit 1 on any error.

The 2026-12-04 GPU session is why: transformers 5.25 (bundled) needs huggingface_hub >= 2.4 and
the image's is 1.33, which ``simulate.py`` (imports only, here) could not see; the VLM cascade
check failed at its first import there.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = Path(__file__).resolve().parent
# The device's interpreter and platform (KINDS.md): what the markers are evaluated against.
DEVICE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def wheel_metadata(path: Path) -> tuple[str, Version, list[Requirement]]:
    """(canonical name, version, requirements) from a wheel's .dist-info/METADATA."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        meta = Parser().parsestr(z.read(name).decode())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return canonicalize_name(meta["Name"]), Version(meta["Version"]), reqs


def read_list(path: Path) -> list[str]:
    return [
        line.split("#")[0].strip()
        for line in path.read_text().splitlines()
        if line.split("#")[0].strip()
    ]


def check(
    wheels: list[Path], device_versions: dict[str, Version], device_names: set[str]
) -> tuple[list[str], dict[str, set[str]]]:
    """(errors, {device distribution of unknown version: the bundled ones that need it})."""
    bundled = {name: (version, reqs) for name, version, reqs in map(wheel_metadata, wheels)}
    errors: list[str] = []
    unchecked: dict[str, set[str]] = {}
    for name, (_, reqs) in sorted(bundled.items()):
        for req in reqs:
            if req.marker is not None and not req.marker.evaluate(DEVICE_ENV):
                continue
            dep = canonicalize_name(req.name)
            if dep in bundled:
                have, where = bundled[dep][0], "bundled"
            elif dep in device_versions:
                have, where = device_versions[dep], "the device's"
            elif dep in device_names:
                unchecked.setdefault(dep, set()).add(name)
                continue
            else:
                errors.append(f"{name} needs {req}: neither bundled nor on the device")
                continue
            if not req.specifier.contains(have, prereleases=True):
                errors.append(f"{name} needs {req}; {where} {dep} is {have}")
    return errors, unchecked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheels", nargs="+", type=Path)
    p.add_argument("--device-packages", type=Path, default=HERE / "device-packages.txt")
    p.add_argument("--device-versions", type=Path, default=HERE / "device-versions.txt")
    a = p.parse_args(argv)
    versions = {
        canonicalize_name(n): Version(v)
        for n, v in (line.split("==") for line in read_list(a.device_versions))
    }
    names = {canonicalize_name(n) for n in read_list(a.device_packages)}
    errors, unchecked = check(a.wheels, versions, names)
    if unchecked:
        print(
            f"requirements_check: {len(unchecked)} device distribution(s) of unknown version "
            "needed (unchecked): "
            + ", ".join(f"{d} (by {', '.join(sorted(by))})" for d, by in sorted(unchecked.items()))
        )
    for e in errors:
        print(f"requirements_check: ERROR {e}", file=sys.stderr)
    print(f"requirements_check: {len(a.wheels)} wheels, {len(errors)} error(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
