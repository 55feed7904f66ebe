#!/usr/bin/env bash
# Debian's chromium, which tests/integration/test_review_ui.py drives through playwright (the
# review page in a real headless browser). `make setup` runs this where chromium is missing.
# As root it installs the package; otherwise it says how, and fails unless the browser test is
# skipped on purpose (KEEPER_SKIP_BROWSER=1).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "${KEEPER_SKIP_BROWSER:-0}" = "1" ]; then
  echo "chromium not installed; KEEPER_SKIP_BROWSER=1: the review page's browser test is skipped"
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing Debian's chromium for the review page's browser test (apt-get, ~150 MB)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium >/dev/null; }
  chromium --version
  exit 0
fi
echo "chromium is missing: the review page's browser test needs it." >&2
echo "  Debian/Ubuntu: sudo apt-get install chromium   (or set KEEPER_SKIP_BROWSER=1 to skip that test)" >&2
exit 1
