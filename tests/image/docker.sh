#!/usr/bin/env bash
# A Docker engine for the image test, sourced by run.sh: `docker_up` uses the one running, or
# installs Debian's docker.io when there is none and starts dockerd itself (these machines have
# no bridge networking: --iptables=false --bridge=none; builds and containers use the host's
# network or none); `docker_down` stops only a dockerd that docker_up started. The layer cache
# (dockerd's data root) stays on the machine between runs.

DOCKERD_PID=""
DOCKERD_LOG="${TMPDIR:-/tmp}/diffbox-image-test-dockerd.log"

docker_up() {
    # The client that comes with Debian's engine: a newer client without the buildx plugin
    # would fall back to the legacy builder, which has no RUN --mount.
    DOCKER="${DOCKER:-$( [[ -x /usr/bin/docker ]] && echo /usr/bin/docker || command -v docker || true)}"
    if [[ -n "$DOCKER" ]] && "$DOCKER" info >/dev/null 2>&1; then
        return 0
    fi
    if ! command -v dockerd >/dev/null; then
        echo "image-test: no Docker engine; installing Debian's docker.io" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io; } >/dev/null 2>&1 \
            || { echo "image-test: ERROR: no Docker engine here and apt-get could not install docker.io (needs root and Debian's packages)" >&2; return 1; }
        DOCKER=/usr/bin/docker
    fi
    [[ -n "$DOCKER" ]] || DOCKER=/usr/bin/docker
    dockerd --iptables=false --bridge=none >"$DOCKERD_LOG" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do
        "$DOCKER" info >/dev/null 2>&1 && return 0
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    echo "image-test: ERROR: dockerd did not start (needs root; its log follows)" >&2
    tail -20 "$DOCKERD_LOG" >&2
    docker_down
    return 1
}

docker_down() {
    if [[ -n "$DOCKERD_PID" ]]; then
        kill "$DOCKERD_PID" 2>/dev/null || true
        wait "$DOCKERD_PID" 2>/dev/null || true
        DOCKERD_PID=""
        rm -f "$DOCKERD_LOG"
    fi
}
