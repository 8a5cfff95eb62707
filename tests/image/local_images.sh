#!/usr/bin/env bash
# The images that stand in for what this machine cannot pull, made here from what it can reach:
#
#   bash tests/image/local_images.sh BASE UV SOURCES COMFYUI_SOURCE_DIR
#
# - BASE: Debian bookworm minbase with its own Python 3.11 (for nvidia/cuda), by debootstrap
#   from the Debian mirror this machine's apt sources name (read here, never written down);
# - UV: /uv and /uvx from PyPI's uv wheel, the release Dockerfile.serverless pins (for ghcr.io);
# - SOURCES: the ComfyUI and custom-node archives of COMFYUI_SOURCE_DIR at its root (for GitHub).
# An image that exists is left as it is (the names carry what they were made from).
set -euo pipefail
BASE="$1" UV="$2" SOURCES="$3" SOURCE_DIR="$4"
DOCKER="${DOCKER:-docker}"
die() { echo "local_images.sh: ERROR: $*" >&2; exit 1; }
log() { echo "local_images.sh: $*" >&2; }
have() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if ! have "$BASE"; then
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null \
        || die "debootstrap is not installed and apt-get could not install it"
    # The first apt source for bookworm, in either of the formats apt reads.
    mirror="$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ && u {print u; exit}' \
                /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
    [[ -n "$mirror" ]] || mirror="$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' \
                /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)"
    [[ -n "$mirror" ]] || die "no Debian bookworm mirror in this machine's apt sources"
    log "debootstrap --variant=minbase --include=python3 bookworm -> $BASE"
    debootstrap --variant=minbase --include=python3 bookworm "$work/root" "$mirror" >"$work/log" 2>&1 \
        || { tail -20 "$work/log" >&2; die "debootstrap failed"; }
    rm -rf "$work"/root/var/lib/apt/lists/* "$work"/root/var/cache/apt/archives/*.deb
    tar -C "$work/root" -c . | "$DOCKER" import - "$BASE" >/dev/null
    rm -rf "$work/root"
fi

if ! have "$UV"; then
    version="$(sed -n 's/^ARG UV_IMAGE=.*uv:\([0-9.]*\)$/\1/p' Dockerfile.serverless)"
    [[ -n "$version" ]] || die "no uv release in Dockerfile.serverless's UV_IMAGE"
    log "uv $version from PyPI -> $UV"
    python3 -m pip download -q --no-deps --only-binary :all: -d "$work/uv" "uv==$version" 2>"$work/pip.log" \
        || { cat "$work/pip.log" >&2; die "could not download uv $version from the package registry"; }
    mkdir "$work/uvroot"
    python3 -m zipfile -e "$work"/uv/uv-*.whl "$work/uv/x"
    install -m 0755 "$work"/uv/x/uv-*.data/scripts/uv "$work"/uv/x/uv-*.data/scripts/uvx "$work/uvroot/"
    tar -C "$work/uvroot" -c . | "$DOCKER" import - "$UV" >/dev/null
fi

if ! have "$SOURCES"; then
    [[ -d "$SOURCE_DIR" ]] || die "no ComfyUI archives at $SOURCE_DIR (set DIFFBOX_COMFYUI_SOURCE)"
    log "ComfyUI archives of $SOURCE_DIR -> $SOURCES"
    tar -C "$SOURCE_DIR" -c --exclude=README.md . | "$DOCKER" import - "$SOURCES" >/dev/null
fi
