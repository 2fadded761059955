#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its pinned dependencies.
#   bash setup_env.sh          runtime dependencies (setup.py install_requires)
#   bash setup_env.sh dev      + test tools ([dev] extra)
# Idempotent and fast on re-runs: it reinstalls only when setup.py or the extras change.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
spec="."
if [ -n "$extras" ]; then spec=".[$extras]"; fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=".venv/.installed-$(sha1sum setup.py | cut -c1-12)-${extras:-base}"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q -e "$spec"
  touch "$stamp"
fi
