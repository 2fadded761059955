#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its pinned dependencies.
#   bash setup_env.sh          runtime dependencies (setup.py install_requires)
#   bash setup_env.sh dev      + test tools ([dev] extra), torch ([torch] extra, the CPU wheel)
#                              and open_clip_torch + timm (both --no-deps: they require
#                              torchvision), which tests/test_import_*.py and
#                              benchmarks/open_clip_step.py compare against
# Idempotent and fast on re-runs: it reinstalls only when setup.py, this script or the extras
# change.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
OPEN_CLIP="open_clip_torch==3.3.0"
TIMM="timm==1.0.31"  # reference models of the checkpoint-import tests (timm ViT, AugReg npz)
PEFT="peft==0.21.2 accelerate==1.15.0"  # HF peft: tests/test_peft.py's LoRA parity reference
with_open_clip=0
case ",$extras," in
  *,dev,*) extras="$extras,torch"; with_open_clip=1 ;;
esac
spec="."
if [ -n "$extras" ]; then spec=".[$extras]"; fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=".venv/.installed-$(cat setup.py setup_env.sh | sha1sum | cut -c1-12)-${extras:-base}"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q -e "$spec"
  if [ "$with_open_clip" = 1 ]; then
    # --no-deps: open_clip's requirements include torchvision, which has no CPU wheel for the
    # pinned torch (pip would replace it with a multi-GB CUDA build). The modules the tests use
    # (open_clip.model / transformer / loss) need only torch and numpy; tests/open_clip_shim.py
    # imports them without open_clip's __init__ (which imports torchvision).
    # shellcheck disable=SC2086  # PEFT holds two requirement specs
    .venv/bin/pip install -q --no-deps "$OPEN_CLIP" "$TIMM" $PEFT
  fi
  touch "$stamp"
fi
