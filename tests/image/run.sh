#!/usr/bin/env bash
# `make image-test`: Dockerfile.serverless built here and run as RunPod runs it (tests/image/run.py).
# Needs root (dockerd, debootstrap), Debian's packages and PyPI; nothing else from outside:
# the base image, uv and ComfyUI's sources are made here (local_images.sh) and passed as build
# arguments; torch comes from the package registry. The tests' tiny models come from
# tests/comfyui_env (make comfyui-env).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"
CACHE_DIR="${DIFFBOX_TEST_CACHE:-$HOME/.cache/diffbox-test}"
SOURCE_DIR="${DIFFBOX_COMFYUI_SOURCE:-}"
[[ -n "$SOURCE_DIR" ]] || { echo "image-test: ERROR: set DIFFBOX_COMFYUI_SOURCE to the ComfyUI archives (this machine has no GitHub)" >&2; exit 1; }
[[ -f "$CACHE_DIR/comfyui-models/checkpoints/tiny.safetensors" ]] \
    || { echo "image-test: ERROR: no tiny models in $CACHE_DIR/comfyui-models; run make comfyui-env first" >&2; exit 1; }

source "$HERE/docker.sh"
docker_up || exit 1
trap docker_down EXIT
export DOCKER

# Image names carry what they were made from, so a changed input makes a new one.
sources_id="$(cd "$SOURCE_DIR" && ls -- *.tar.gz | sort | xargs sha256sum | sha256sum | cut -c1-12)"
uv_version="$(sed -n 's/^ARG UV_IMAGE=.*uv:\([0-9.]*\)$/\1/p' Dockerfile.serverless)"
export IMAGE_TEST_BASE="diffbox-test/base:bookworm-python3"
export IMAGE_TEST_UV="diffbox-test/uv:$uv_version"
export IMAGE_TEST_SOURCES="diffbox-test/comfyui-sources:$sources_id"
export IMAGE_TEST_CA_BUNDLE="${IMAGE_TEST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
# Build and container logs: kept where IMAGE_TEST_LOGS says, or in a temporary folder kept only on failure.
own_logs=""
if [[ -z "${IMAGE_TEST_LOGS:-}" ]]; then
    IMAGE_TEST_LOGS="$(mktemp -d -t diffbox-image-test-logs.XXXX)"
    own_logs="$IMAGE_TEST_LOGS"
fi
export IMAGE_TEST_LOGS
bash "$HERE/local_images.sh" "$IMAGE_TEST_BASE" "$IMAGE_TEST_UV" "$IMAGE_TEST_SOURCES" "$SOURCE_DIR"
if uv run --frozen python -m tests.image.run --tiny-models "$CACHE_DIR/comfyui-models"; then
    [[ -z "$own_logs" ]] || rm -rf "$own_logs"
else
    echo "image-test: FAILED; build and container logs are in $IMAGE_TEST_LOGS" >&2
    exit 1
fi
