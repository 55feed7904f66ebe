#!/usr/bin/env bash
# On the GPU device machine, from the repository root: unpacks benchmarks/gpu/bundle (built here by
# make_bundle.sh, carried by the run) into a site folder in front of the image's packages, and
# writes the environment that run_all.sh sources. ~10-20 s.
#
#   bash benchmarks/gpu/setup_device.sh && bash benchmarks/gpu/run_all.sh 500
#
# Not a venv: the device's python3 is itself a venv (/opt/torch/.venv), and a venv made from it
# with --system-site-packages sees the base interpreter's packages, not that venv's torch. So the
# image's python3 stays the interpreter and the bundle goes first on PYTHONPATH, which Ray's
# workers inherit; keeper's three packages go on it as source, with stub .dist-info folders so
# that importlib.metadata knows them (their versions and `keeper.commands` entry points).
#
# KEEPER_GPU_ENV (default $HOME/keeper-gpu-env) is where it unpacks; PYTHON (default python3) the
# interpreter. KEEPER_GPU_SKIP_CHECKS=1 unpacks and writes env.sh without the Python 3.12 and
# import checks: a dry run on a machine that is not the device.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
BUNDLE=benchmarks/gpu/bundle
ENV_DIR=${KEEPER_GPU_ENV:-$HOME/keeper-gpu-env}
SITE=$ENV_DIR/site
PYTHON=${PYTHON:-python3}
SKIP_CHECKS=${KEEPER_GPU_SKIP_CHECKS:-0}
LOGS=${OUT:+$OUT/logs}
START=$SECONDS

log() { printf '[setup %3ss] %s\n' "$((SECONDS - START))" "$*"; }
die() { echo "setup_device.sh: $*" >&2; exit 1; }

for f in ray-slim.tar.xz site.tar.xz MANIFEST.txt; do
    [[ -f $BUNDLE/$f ]] || die "$BUNDLE/$f is missing: run 'bash benchmarks/gpu/make_bundle.sh' \
where PyPI is reachable and name benchmarks/gpu/bundle in the run's carry"
done
if [[ $SKIP_CHECKS != 1 ]]; then
    pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [[ $pyver == 3.12 ]] || die "the bundle holds CPython 3.12 builds; $PYTHON is $pyver"
fi

# The archives' sha256 as make_bundle.sh wrote them: a truncated copy fails here, not at import.
(cd "$BUNDLE" && sed -n 's/^# sha256 //p' MANIFEST.txt | sha256sum --quiet -c -) ||
    die "the bundle's archives do not match MANIFEST.txt: build it again"
log "bundle verified: $(grep -vc '^#' "$BUNDLE/MANIFEST.txt") distributions"

unpack() {  # ARCHIVE: into $SITE, by xz where the machine has it, else by Python's lzma
    if command -v xz >/dev/null; then
        tar -C "$SITE" -xJf "$1"
    else
        "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(
            sys.argv[2], filter="tar")' "$1" "$SITE"
    fi
}
rm -rf "$SITE"
mkdir -p "$SITE"
unpack "$BUNDLE/ray-slim.tar.xz" &
ray_pid=$!
unpack "$BUNDLE/site.tar.xz" || die "unpacking site.tar.xz failed"
wait "$ray_pid" || die "unpacking ray-slim.tar.xz failed"
log "unpacked into $SITE ($(du -sm "$SITE" | cut -f 1) MB)"

# Stub .dist-info for keeper-core, keeper-train, keeper-serve: name, version, entry points, read
# from each pyproject.toml; the code itself is imported from packages/*/src.
"$PYTHON" - "$SITE" packages/core packages/train packages/serve <<'EOF'
import sys
import tomllib
from pathlib import Path

site = Path(sys.argv[1])
for pkg in map(Path, sys.argv[2:]):
    project = tomllib.loads((pkg / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    groups = dict(project.get("entry-points", {}))
    if "scripts" in project:
        groups["console_scripts"] = project["scripts"]
    (info / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
            for group, eps in groups.items()
        )
    )
    (info / "INSTALLER").write_text("benchmarks/gpu/setup_device.sh\n")
EOF

cat >"$ENV_DIR/env.sh" <<EOF
# Written by benchmarks/gpu/setup_device.sh; run_all.sh sources it.
export KEEPER_GPU_SITE=$SITE
export PYTHONPATH=$SITE:$ROOT/packages/core/src:$ROOT/packages/train/src:$ROOT/packages/serve/src\${PYTHONPATH:+:\$PYTHONPATH}
export PYTHONUNBUFFERED=1
# No network there: Ray would otherwise try to report usage.
export RAY_USAGE_STATS_ENABLED=0
export RAY_DATA_DISABLE_PROGRESS_BARS=1
EOF
log "wrote $ENV_DIR/env.sh"

if [[ $SKIP_CHECKS == 1 ]]; then
    log "KEEPER_GPU_SKIP_CHECKS=1: no import check"
    exit 0
fi
# shellcheck source=/dev/null
source "$ENV_DIR/env.sh"
# Each import on its own: one that fails (a version clash with the image, say) is named here and
# does not stop run_all.sh, whose checks then fail or pass on their own.
[[ -z $LOGS ]] || mkdir -p "$LOGS"
"$PYTHON" - <<'EOF' 2>&1 | tee "${LOGS:-$ENV_DIR}/setup.log"
import importlib
import importlib.metadata as md
import os
import time

t = time.perf_counter()
names = [
    "torch", "open_clip", "transformers", "pydantic", "mlflow", "ray", "ray.data",
    "ray.train.torch", "ray.serve", "keeper_core.decoders", "keeper_train.jobs.finetune",
    "keeper_serve",
]  # fmt: skip
mods, failed = {}, []
for name in names:
    try:
        mods[name] = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - reported, and the run goes on
        failed.append(f"{name} ({type(e).__name__}: {e})")
line = [f"imports {time.perf_counter() - t:.1f} s"]
if "torch" in mods:
    torch = mods["torch"]
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "-"
    line.append(f"torch {torch.__version__} cuda {cuda} {gpu}")
for dist in ("open_clip_torch", "transformers", "pydantic", "mlflow-skinny", "ray", "keeper-core"):
    try:
        line.append(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        line.append(f"{dist} MISSING")
print(" | ".join(line))
print("import check: " + ("ok" if not failed else "FAILED " + "; ".join(failed)))
# The image's own versions, for device-versions.txt (requirements_check.py reads it there).
site = os.environ["KEEPER_GPU_SITE"]
image = {
    f"{d.metadata['Name']}=={d.version}"
    for d in md.distributions()
    if d.metadata["Name"] and not str(getattr(d, "_path", "")).startswith(site)
}
print(f"image distributions ({len(image)}): " + " ".join(sorted(image, key=str.lower)))
if "keeper_core.decoders" in mods and "torch" in mods and mods["torch"].cuda.is_available():
    # nvImageCodec's self-test on the GPU (a test JPEG through its GPU backends), so a missing
    # nvJPEG library shows here and not as "not measured" rows later.
    try:
        mods["keeper_core.decoders"].GpuDecoder("cuda", engine="nvimgcodec")
        print("nvimgcodec on cuda: ok")
    except Exception as e:  # noqa: BLE001 - reported, and the run goes on
        print(f"nvimgcodec on cuda: FAILED {type(e).__name__}: {e}")
EOF
log "done"
