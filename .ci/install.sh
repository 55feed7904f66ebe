#!/usr/bin/env bash
# keeper's one install step: `make setup` (a dev venv, editable) and docker/Dockerfile (Ray's image,
# its own Python) both run this script, so CI's `make test` proves the image's install step too.
#
#   .ci/install.sh --venv .venv --dev --editable            # what `make setup` runs
#   .ci/install.sh --system --python /home/ray/anaconda3/bin/python --extras demo,turbo \
#       --torch-index https://download.pytorch.org/whl/cpu --no-cache   # what the Dockerfile runs
#
# Options:
#   --venv DIR          install into DIR, creating it with --python (default python3.11) if missing;
#                       upgrades pip there (a fresh venv's pip 23 lacks PEP 735 dependency groups)
#   --system            install into the --python interpreter as it is (default: python on PATH)
#   --python PY         the interpreter (see above)
#   --editable          install the packages editable (pip -e); default: regular installs
#   --dev               also the root pyproject's dev dependency group (pip >= 25.1)
#   --extras A,B        keeper-core extras on top of those keeper-train/serve pull (e.g. demo,turbo)
#   --torch-index URL   take torch and torchvision from this index first (the CPU wheels:
#                       https://download.pytorch.org/whl/cpu); default: PyPI's default (CUDA)
#   --no-cache          pip --no-cache-dir (an image's layer keeps no wheel cache)
# Checks before installing: the interpreter is the project's Python (3.11, [tool.mypy] in
# pyproject.toml), and a Ray already there satisfies the ray pin of every packages/*/pyproject.toml
# (Ray's image ships its own Ray: pip must never replace it, so it is also held by a constraint).
# Idempotent: a second run finds everything satisfied and reinstalls only keeper's own packages.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACKAGES=(packages/core packages/train packages/serve)

die() {
  echo "install.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

mode="" venv="" python="" editable=0 dev=0 extras="" torch_index="" no_cache=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) [ $# -ge 2 ] || die "--venv needs a directory"; mode=venv venv="$2"; shift 2 ;;
    --system) mode=system; shift ;;
    --python) [ $# -ge 2 ] || die "--python needs an interpreter"; python="$2"; shift 2 ;;
    --editable) editable=1; shift ;;
    --dev) dev=1; shift ;;
    --extras) [ $# -ge 2 ] || die "--extras needs a comma-separated list"; extras="$2"; shift 2 ;;
    --torch-index) [ $# -ge 2 ] || die "--torch-index needs a URL"; torch_index="$2"; shift 2 ;;
    --no-cache) no_cache=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done
[ -n "$mode" ] || { usage >&2; die "say where to install: --venv DIR or --system"; }
if [[ -n "$extras" && ! "$extras" =~ ^[a-z0-9_-]+(,[a-z0-9_-]+)*$ ]]; then
  die "--extras takes a comma-separated list of names, got '$extras'"
fi
cd "$ROOT"

want_python="$(sed -n 's/^python_version = "\([0-9.]*\)"$/\1/p' pyproject.toml)"
[ -n "$want_python" ] || die "no [tool.mypy] python_version in $ROOT/pyproject.toml"

if [ "$mode" = venv ]; then
  base="${python:-python3.11}"
  if [ ! -x "$venv/bin/python" ]; then
    command -v "$base" >/dev/null 2>&1 || die "cannot create $venv: no '$base' (pass --python)"
    echo "== creating $venv with $base"
    "$base" -m venv "$venv"
  fi
  py="$venv/bin/python"
else
  py="${python:-python}"
  command -v "$py" >/dev/null 2>&1 || die "no interpreter '$py' (pass --python)"
fi

have_python="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || die "$py does not run"
[ "$have_python" = "$want_python" ] \
  || die "$py is Python $have_python; keeper is built and tested on Python $want_python"

# The ray pins, and a Ray already installed in the target, compared with pip's own packaging.
ray_installed="$("$py" - "$ROOT" <<'EOF'
import sys
import tomllib
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

pins = []
for path in sorted(Path(sys.argv[1]).glob("packages/*/pyproject.toml")):
    for dep in tomllib.loads(path.read_text())["project"].get("dependencies", []):
        req = Requirement(dep)
        if req.name == "ray":
            pins.append((path.relative_to(sys.argv[1]), req))
if not pins:
    sys.exit("install.sh: no ray requirement in packages/*/pyproject.toml")
try:
    have = metadata.version("ray")
except metadata.PackageNotFoundError:
    sys.exit(0)
for path, req in pins:
    if not req.specifier.contains(have, prereleases=True):
        sys.exit(
            f"install.sh: {sys.executable} has ray {have}, but {path} pins {req}: "
            "use the Ray image (or venv) of the pinned release, or change the pin"
        )
print(have)
EOF
)" || exit 1

pip=("$py" -m pip)
pip_opts=(-q)
[ "$no_cache" = 1 ] && pip_opts+=(--no-cache-dir)

if [ "$mode" = venv ]; then
  "${pip[@]}" install "${pip_opts[@]}" -U pip
elif [ "$dev" = 1 ]; then
  "$py" -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (25, 1))' \
    || die "--dev needs pip >= 25.1 in $py (dependency groups): $py -m pip install -U pip"
fi

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
if [ -n "$ray_installed" ]; then
  echo "== ray $ray_installed in $py satisfies keeper's pin; held at that version"
  echo "ray==$ray_installed" >>"$constraints"
else
  echo "== no ray in $py: pip installs the pinned release"
fi

if [ -n "$torch_index" ]; then
  echo "== torch and torchvision from $torch_index"
  "${pip[@]}" install "${pip_opts[@]}" --index-url "$torch_index" torch torchvision
  for dist in torch torchvision; do
    echo "$dist==$("$py" -c "from importlib import metadata; print(metadata.version('$dist'))")" \
      >>"$constraints"
  done
fi

targets=()
for pkg in "${PACKAGES[@]}"; do
  spec="./$pkg"
  [ "$pkg" = packages/core ] && [ -n "$extras" ] && spec="./$pkg[$extras]"
  if [ "$editable" = 1 ]; then targets+=(-e "$spec"); else targets+=("$spec"); fi
done
groups=()
[ "$dev" = 1 ] && groups=(--group dev)

echo "== installing ${PACKAGES[*]} ($([ "$editable" = 1 ] && echo editable || echo regular)${extras:+, core extras $extras}${groups:+, dev group}) into $py"
"${pip[@]}" install "${pip_opts[@]}" -c "$constraints" "${targets[@]}" "${groups[@]}"
"$py" -c 'import keeper_core, keeper_train, keeper_serve' \
  || die "installed, but keeper_core / keeper_train / keeper_serve do not import in $py"
echo "== keeper installed in $py"
