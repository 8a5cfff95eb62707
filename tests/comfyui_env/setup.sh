#!/usr/bin/env bash
# Install the real ComfyUI (with its custom nodes) that the tests' real leg runs, plus tiny
# random-weight models for it and stand-ins for the typed workflows' weights, into a cache:
#
#   bash tests/comfyui_env/setup.sh [CACHE_DIR]
#
# CACHE_DIR defaults to ${DIFFBOX_TEST_CACHE:-$HOME/.cache/diffbox-test}. Where the code comes from:
# - DIFFBOX_COMFYUI_SOURCE set (folders/archives, see `python -m builder comfyui --help`): from
#   there, torch from the package registry with pip (TORCH_PACKAGES below), nothing from GitHub;
# - otherwise an install from local sources already in the cache, as it is;
# - otherwise the commits pinned in workflows/comfyui.json from GitHub, CPU torch from the
#   PyTorch index (`--cpu`).
# Idempotent: the builder skips what is in place, the models carry a stamp; a second run takes seconds.
set -euo pipefail

# The registry's builds that run ComfyUI 0.3.64 with --cpu (no torchaudio needed).
TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1"
MODELS_RECIPE_VERSION="1"   # bump when make_tiny_models.py changes its output

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE_DIR="${1:-${DIFFBOX_TEST_CACHE:-$HOME/.cache/diffbox-test}}"
DEST="$CACHE_DIR/comfyui"
MODELS="$CACHE_DIR/comfyui-models"
STAMP="$MODELS/.diffbox-stamp"

die() { echo "comfyui_env/setup.sh: ERROR: $*" >&2; exit 1; }
log() { echo "comfyui_env/setup.sh: $*" >&2; }

mkdir -p "$CACHE_DIR"
cd "$REPO"
if [[ -n "${DIFFBOX_COMFYUI_SOURCE:-}" ]]; then
    log "installing ComfyUI from local sources: $DIFFBOX_COMFYUI_SOURCE"
    uv run python -m builder comfyui --dest "$DEST" --torch-index default --torch "$TORCH_PACKAGES" --installer pip \
        || die "install from DIFFBOX_COMFYUI_SOURCE=$DIFFBOX_COMFYUI_SOURCE failed (see above)"
elif [[ -x "$DEST/venv/bin/python" && -f "$DEST/ComfyUI/main.py" && ! -e "$DEST/ComfyUI/.git" ]]; then
    # Installed from local sources before (a machine without GitHub: `.ci/run`, then `make run`).
    log "using the ComfyUI installed from local sources in $DEST (DIFFBOX_COMFYUI_SOURCE=DIR updates it)"
else
    log "installing the pinned ComfyUI from GitHub (set DIFFBOX_COMFYUI_SOURCE to install from local archives)"
    uv run python -m builder comfyui --dest "$DEST" --cpu \
        || die "could not install ComfyUI from GitHub. Without GitHub, set DIFFBOX_COMFYUI_SOURCE to a folder of archives NAME-COMMIT.tar.gz (ComfyUI and each custom node), as .ci/run does with ../shared/comfyui/src"
fi

PY="$DEST/venv/bin/python"
want="recipe=$MODELS_RECIPE_VERSION $(sha256sum "$HERE/make_tiny_models.py" | cut -c1-16) $(cat "$DEST/venv/.diffbox-deps.json" | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    log "tiny models up to date in $MODELS"
else
    log "making tiny models in $MODELS"
    rm -rf "$MODELS"
    "$PY" "$HERE/make_tiny_models.py" "$DEST/ComfyUI" "$MODELS" || die "make_tiny_models.py failed"
    echo "$want" >"$STAMP"
fi

# Stand-ins for every file the typed workflows' presets name (full-size text encoders and VAE,
# tiny diffusion models, LoRAs): about 15 GB, made once.
TYPED="$CACHE_DIR/comfyui-typed-models"
TYPED_STAMP="$TYPED/.diffbox-stamp"
want="$(cat "$HERE/make_typed_models.py" "$REPO/workflows/models.json" "$DEST/venv/.diffbox-deps.json" | sha256sum | cut -c1-16)"
if [[ -f "$TYPED_STAMP" && "$(cat "$TYPED_STAMP")" == "$want" ]]; then
    log "typed-workflow models up to date in $TYPED"
else
    log "making the typed workflows' random-weight models in $TYPED (a few minutes, about 15 GB)"
    rm -rf "$TYPED"
    mkdir -p "$TYPED"
    "$PY" "$HERE/make_typed_models.py" "$DEST/ComfyUI" "$TYPED" "$REPO/workflows/models.json" >&2 \
        || die "make_typed_models.py failed"
    echo "$want" >"$TYPED_STAMP"
fi
echo "$PY"
