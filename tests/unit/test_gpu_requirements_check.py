"""benchmarks/gpu/requirements_check.py: the GPU bundle's wheels against the device's versions."""

from __future__ import annotations

import zipfile
from pathlib import Path

from packaging.version import Version
from support import import_benchmark

check_mod = import_benchmark("gpu.requirements_check")


def wheel(folder: Path, name: str, version: str, *requires: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_a_requirement_the_device_version_misses_is_an_error(tmp_path: Path) -> None:
    """The 2026-12-04 case: bundled transformers, the image's older huggingface_hub."""
    wheels = [wheel(tmp_path, "transformers", "5.25.0", "huggingface-hub<3.0,>=2.4.0")]
    errors, _ = check_mod.check(wheels, {"huggingface-hub": Version("1.33.0")}, set())
    assert errors == [
        "transformers needs huggingface-hub<3.0,>=2.4.0; the device's huggingface-hub is 1.33.0"
    ]
    wheels.append(wheel(tmp_path, "huggingface_hub", "2.4.0"))  # bundled: the bundle's counts
    assert check_mod.check(wheels, {"huggingface-hub": Version("1.33.0")}, set())[0] == []


def test_markers_unknown_versions_and_missing_distributions(tmp_path: Path) -> None:
    wheels = [
        wheel(
            tmp_path,
            "hub",
            "2.4.0",
            'tomli>=1.1.0; python_version < "3.11"',  # not on Python 3.12: skipped
            "pyyaml>=5.1",  # on the device at a version not known: unchecked
            "httpx2>=2",  # nowhere: an error
            'pytest; extra == "testing"',  # an extra: skipped
        )
    ]
    errors, unchecked = check_mod.check(wheels, {}, {"pyyaml"})
    assert errors == ["hub needs httpx2>=2: neither bundled nor on the device"]
    assert unchecked == {"pyyaml": {"hub"}}


def test_the_shipped_lists_parse() -> None:
    """device-versions.txt and device-packages.txt as main() reads them."""
    gpu = Path(check_mod.__file__).parent
    for line in check_mod.read_list(gpu / "device-versions.txt"):
        _name, version = line.split("==")
        Version(version)
    assert "torch" in check_mod.read_list(gpu / "device-packages.txt")
