"""docker/Dockerfile and `make setup` install keeper with the one script, .ci/install.sh.

CI runs `make test` (so the script's venv mode) on a machine without a Docker daemon; these tests
tie the image to what CI proves without building it: the bases carry the pinned Ray and Python, the
image's RUN and the Makefile's install rule call the same script, every COPY source exists, and the
configs the KubeRay manifests name are in the copied tree. The slow test runs the script's system
mode (the image's) for real into a throwaway venv. Only the image build itself needs a daemon:
where `docker info` answers it is built, elsewhere that one test skips and says why.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SCRIPT = ROOT / ".ci" / "install.sh"
IMAGE_ROOT = "/home/ray/keeper"
INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip
RAY_TAG = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3)(?P<minor>\d+)-(?P<platform>cpu|cu\d+)$")  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    line: int
    name: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """The file's instructions, continuation lines joined, comments and directives dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if not pending:
            start = no
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        name, _, args = text.partition(" ")
        out.append(Instruction(start, name.upper(), " ".join(args.split())))
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return out


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the ones FROM lines can use)."""
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.name == "FROM":
            break
        if ins.name == "ARG":
            key, _, value = ins.args.partition("=")
            args[key] = value
    return args


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def stages(instructions: list[Instruction], **build_args: str) -> list[tuple[str, str | None]]:
    """(image, stage name) for each FROM, with the global ARGs (and build_args) substituted."""
    args = {**global_args(instructions), **build_args}
    out: list[tuple[str, str | None]] = []
    for ins in instructions:
        if ins.name == "FROM":
            words = substitute(ins.args, args).split()
            out.append(
                (words[0], words[2] if len(words) == 3 and words[1].upper() == "AS" else None)
            )
    return out


def base_image(instructions: list[Instruction], variant: str) -> str:
    """The rayproject/ray image the final stage builds on for a VARIANT."""
    by_name = {name: image for image, name in stages(instructions, VARIANT=variant) if name}
    image = stages(instructions, VARIANT=variant)[-1][0]
    while image in by_name:
        image = by_name[image]
    return image


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [p.strip().rstrip("/") for p in lines if p.strip() and not p.lstrip().startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps rel (or a folder above it) out of the build context."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "negations are not handled here: extend ignored()"
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], bare)
            ):
                return True
    return False


def ray_pins() -> list[tuple[Path, Requirement]]:
    pins = []
    for path in sorted(ROOT.glob("packages/*/pyproject.toml")):
        for dep in tomllib.loads(path.read_text())["project"]["dependencies"]:
            req = Requirement(dep)
            if req.name == "ray":
                pins.append((path, req))
    return pins


def project_python() -> str:
    return str(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["python_version"]
    )


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE)


def test_dockerfile_parses_into_known_instructions(dockerfile: list[Instruction]) -> None:
    assert dockerfile, "docker/Dockerfile has no instructions"
    unknown = [(i.line, i.name) for i in dockerfile if i.name not in INSTRUCTIONS]
    assert not unknown, f"not Dockerfile instructions: {unknown}"
    first = next(i for i in dockerfile if i.name != "ARG")
    assert first.name == "FROM", f"line {first.line}: only ARG may come before the first FROM"
    assert {"FROM", "WORKDIR", "COPY", "USER", "RUN"} <= {i.name for i in dockerfile}


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_base_is_rays_image_of_the_pinned_ray_and_python(
    dockerfile: list[Instruction], variant: str
) -> None:
    image = base_image(dockerfile, variant)
    m = RAY_TAG.match(image)
    assert m, f"VARIANT={variant}: base {image!r} is not a rayproject/ray:X.Y.Z-py3NN-PLATFORM tag"
    assert (m["platform"] == "cpu") == (variant == "cpu"), f"VARIANT={variant} builds on {image}"
    tag_ray = Version(m["ray"])
    assert tag_ray == Version(metadata.version("ray")), (
        f"{image}: the image's Ray differs from the Ray the tests run on ({metadata.version('ray')})"
    )
    pins = ray_pins()
    assert len(pins) >= 2, "keeper-train and keeper-serve both pin ray"
    for path, req in pins:
        assert req.specifier.contains(tag_ray), f"{image} is outside {path}'s pin {req}"
        floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
        assert floors == [tag_ray], f"{path} pins {req}; the image's Ray is {tag_ray}"
    assert f"{m['py']}.{m['minor']}" == project_python() == "{}.{}".format(*sys.version_info[:2]), (
        f"{image}: the image's Python differs from the project's ({project_python()})"
    )
    for path in sorted(ROOT.glob("packages/*/pyproject.toml")):
        requires = tomllib.loads(path.read_text())["project"]["requires-python"]
        assert Version(project_python()) in Requirement(f"python{requires}").specifier, path


def test_variants_are_cpu_and_cuda_defaulting_to_cpu(dockerfile: list[Instruction]) -> None:
    names = {name for _, name in stages(dockerfile) if name}
    assert names == {"base-cpu", "base-cuda"}
    assert stages(dockerfile)[-1][0] == "base-cpu", "VARIANT defaults to cpu"


def test_run_installs_with_the_scripts_system_mode(dockerfile: list[Instruction]) -> None:
    runs = [i for i in dockerfile if i.name == "RUN"]
    calls = [i for i in runs if ".ci/install.sh" in i.args]
    assert len(calls) == 1, f"one RUN calls .ci/install.sh; RUNs: {[i.args for i in runs]}"
    args = calls[0].args
    assert "--system" in args, args
    assert "--editable" not in args, args
    assert "--dev" not in args, args
    assert "--python /home/ray/anaconda3/bin/python" in args, "Ray's images keep Python there"
    assert "--torch-index" in args, args
    assert "https://download.pytorch.org/whl/cpu" in args, args
    # The cuda image with PyPI's (CUDA 13) torch gets the CUDA 13 nvImageCodec; cpu does not.
    assert "extras=demo,turbo;" in args, args
    assert '[ -n "$index" ] || extras="$extras,nvimgcodec"' in args, args
    assert not [i.args for i in runs if re.search(r"\bpip3? install\b", i.args)], (
        "the image installs through .ci/install.sh only"
    )
    user = [i.args for i in dockerfile if i.name == "USER" and i.line < calls[0].line]
    assert user, "no USER before the install: it would run as root"
    assert user[-1] == "ray", "the install runs as user ray (Ray's images' user)"


def test_makefile_install_rule_calls_the_same_script() -> None:
    make = shutil.which("make")
    assert make, "make is missing: CI runs `make test`"
    stamp = ROOT / ".venv" / ".keeper-installed"
    out = subprocess.run(
        [make, "-n", "-B", "-C", str(ROOT), stamp.relative_to(ROOT).as_posix()],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    calls = [line for line in out.splitlines() if ".ci/install.sh" in line]
    assert len(calls) == 1, f"`make -n -B` of the install stamp:\n{out}"
    for flag in ("--venv .venv", "--editable", "--dev"):
        assert flag in calls[0], f"the install rule's call lacks {flag}: {calls[0]}"
    assert "pip install" not in out, f"the Makefile installs through .ci/install.sh only:\n{out}"
    assert f"touch {stamp.relative_to(ROOT).as_posix()}" in out


def test_script_installs_every_workspace_package() -> None:
    m = re.search(r"^PACKAGES=\(([^)]*)\)$", SCRIPT.read_text(), re.M)
    assert m, f"{SCRIPT}: no PACKAGES=(...) line"
    members = sorted(p.parent.relative_to(ROOT).as_posix() for p in ROOT.glob("packages/*/pyproject.toml"))  # fmt: skip
    assert sorted(m.group(1).split()) == members
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable"


def test_copy_sources_exist_and_land_in_the_workdir(dockerfile: list[Instruction]) -> None:
    workdirs = [i.args for i in dockerfile if i.name == "WORKDIR"]
    assert workdirs == [IMAGE_ROOT]
    copies = [i for i in dockerfile if i.name in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies the repo"
    patterns = dockerignore_patterns()
    for ins in copies:
        words = [w for w in ins.args.split() if not w.startswith("--")]
        assert not ins.args.startswith("--from"), "single stage: copies come from the context"
        *sources, dest = words
        assert dest in (IMAGE_ROOT, f"{IMAGE_ROOT}/", "."), f"line {ins.line}: copies to {dest}"
        for src in sources:
            assert (ROOT / src).exists(), f"line {ins.line}: COPY source {src} does not exist"
            assert src == "." or not ignored(src, patterns), f"{src} is in .dockerignore"
    for needed in (".ci/install.sh", "pyproject.toml", "packages/core/pyproject.toml"):
        assert not ignored(needed, patterns), f".dockerignore drops {needed}, which the RUN needs"


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for rel in (".venv", ".git", ".venv/bin/python", "keeper-demo", "benchmarks/results/x.json",
                ".mypy_cache", "packages/core/src/keeper_core/__pycache__/x.pyc"):  # fmt: skip
        assert ignored(rel, patterns), f".dockerignore lets {rel} into the image"


def test_configs_the_manifests_name_are_in_the_image() -> None:
    named = set()
    for manifest in sorted((ROOT / "clusters" / "k8s").glob("*.yaml")):
        named |= set(re.findall(rf"{IMAGE_ROOT}/(\S+?\.ya?ml)\b", manifest.read_text()))
    assert any(p.startswith("packages/train/configs/") for p in named), named
    patterns = dockerignore_patterns()
    for rel in sorted(named):
        assert (ROOT / rel).is_file(), f"the manifests run {IMAGE_ROOT}/{rel}: not in the repo"
        assert not ignored(rel, patterns), f".dockerignore drops {rel}, which the manifests run"


def _run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd="/"
    )


def test_script_needs_a_target() -> None:
    done = _run_script()
    assert done.returncode == 1
    assert "--venv DIR or --system" in done.stderr


def test_script_refuses_another_python(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 3.10\n")
    fake.chmod(0o755)
    done = _run_script("--system", "--python", str(fake))
    assert done.returncode == 1
    assert f"is Python 3.10; keeper is built and tested on Python {project_python()}" in done.stderr


def _overlay_venv(path: Path) -> Path:
    """A venv that sees this interpreter's site-packages after its own (the repo's Ray, torch, ...).

    `venv --system-site-packages` from .venv's python would see the base interpreter's packages,
    not .venv's, so a .pth line adds .venv's site-packages instead: a plain path, so .venv's
    editable keeper (its own .pth files) stays out and only its dependencies are visible.
    """
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60
    )
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "_repo_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_script_refuses_a_ray_outside_the_pin(tmp_path: Path) -> None:
    python = _overlay_venv(tmp_path / "venv")
    site = next((tmp_path / "venv").glob("lib/python*/site-packages"))
    dist = site / "ray-2.59.0.dist-info"  # found before the repo's Ray 2.60.0
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ray\nVersion: 2.59.0\n")
    done = _run_script("--system", "--python", str(python))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "has ray 2.59.0, but packages/" in done.stderr, done.stderr
    assert "pins ray" in done.stderr, done.stderr
    assert not list(site.glob("keeper_core*")), "nothing is installed after a refused check"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_system_mode_installs_keeper_into_the_target(tmp_path: Path) -> None:
    """The image's install step for real: regular (not editable) installs in the target Python."""
    venv = tmp_path / "venv"
    try:
        python = _overlay_venv(venv)
        done = _run_script("--system", "--python", str(python), "--no-cache", timeout=540)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"ray {metadata.version('ray')} in" in done.stdout, done.stdout
        assert "held at that version" in done.stdout, done.stdout
        probe = (
            "import json, keeper_core, keeper_train, keeper_serve\n"
            "from importlib import metadata\n"
            "print(json.dumps({m.__name__: list(m.__path__) for m in "
            "(keeper_core, keeper_train, keeper_serve)}))\n"
            "print(json.dumps({d: metadata.distribution(d).read_text('direct_url.json') or '' "
            "for d in ('keeper-core', 'keeper-train', 'keeper-serve')}))\n"
        )
        out = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120
        )
        assert out.returncode == 0, out.stderr
        files_line, urls_line = out.stdout.strip().splitlines()[-2:]
        for name, paths in json.loads(files_line).items():  # keeper_serve is a namespace package
            assert paths, name
            for path in paths:
                assert Path(path).resolve().is_relative_to(venv.resolve()), f"{name} from {path}"
        for dist, direct_url in json.loads(urls_line).items():
            assert '"editable": true' not in direct_url, f"{dist} installed editable"
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def _docker_daemon() -> str | None:
    """Why the image cannot be built here, or None when a Docker daemon answers."""
    docker = shutil.which("docker")
    if docker is None:
        return "docker CLI absent"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker daemon absent (`docker info` did not answer in 30 s)"
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"docker daemon absent (`docker info`: {reason})"
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cpu_image_builds() -> None:
    why = _docker_daemon()
    if why:
        pytest.skip(
            f"{why}: building the image needs a Docker daemon; without one the tests above check "
            "the Dockerfile against the pins and run its install step"
        )
    tag = "keeper-test:cpu"
    try:
        subprocess.run(
            [
                "docker",
                "build",
                "-f",
                str(DOCKERFILE),
                "--build-arg",
                "VARIANT=cpu",
                "-t",
                tag,
                ".",
            ],
            cwd=ROOT,
            check=True,
            timeout=3300,
        )
        probe = "import keeper_core, keeper_train, keeper_serve, ray; print(ray.__version__)"
        out = subprocess.run(
            ["docker", "run", "--rm", tag, "python", "-c", probe],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        )
        assert out.stdout.strip() == metadata.version("ray")
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)
