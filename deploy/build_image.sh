#!/usr/bin/env bash
# Build the camex-server image with buildah where no container registry can be reached, then
# smoke-test it: /health and one /generate on 127.0.0.1.
#
#   sudo deploy/build_image.sh             # base (once) + image + smoke test
#   sudo deploy/build_image.sh --no-run    # base + image only
#   sudo deploy/build_image.sh --base-only # only the local Debian base image
#
# The root Dockerfile starts FROM python:3.11-slim-bookworm, which needs a registry. Here we
# instead bootstrap Debian bookworm with debootstrap (python3 3.11 from Debian's packages),
# import that root filesystem as a local image, and build the Dockerfile unchanged with
# --build-arg BASE=<that image>. Only an apt mirror and PyPI/download.pytorch.org are needed.
#
# Environment (all optional):
#   CAMEX_IMAGE       image to build              (localhost/camex-server:latest)
#   CAMEX_BASE_IMAGE  local base image            (localhost/debian-bookworm-python:latest)
#   DEBIAN_MIRROR     apt mirror for debootstrap  (http://deb.debian.org/debian)
#   WORK_DIR          scratch space for rootfs    (/var/tmp/camex-image-build)
#   BUILD_TIMEOUT     seconds for the image build (3600)
#   RUN_TIMEOUT       seconds for the server to become healthy (300)
#   BAKE_DEMO         1: train + bake demo checkpoints into the image (1)
#   TORCH_VARIANT     cpu or a CUDA wheel tag like cu128 (cpu)
#   SMOKE_MODEL       folded LM directory on the host to mount at /models/lm for the smoke
#                     test (CAMEX_MODEL=/models/lm); needed when the image has no demo models
#   SMOKE_CLASSIFIER  likewise for a classifier (/models/classifier, CAMEX_CLASSIFIER)
#   TORCH_WHEELS      directory with a local torch wheel, mounted into the build and used as
#                     --find-links, the other dependencies then come from PyPI
#                     (default: /opt/wheels when it holds a torch wheel, else none)
#   TORCH_INDEX_URL   with local wheels: the index for the other dependencies (PyPI)
set -euo pipefail

IMAGE=${CAMEX_IMAGE:-localhost/camex-server:latest}
BASE_IMAGE=${CAMEX_BASE_IMAGE:-localhost/debian-bookworm-python:latest}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=${WORK_DIR:-/var/tmp/camex-image-build}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-3600}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=${1:-all}
case "$MODE" in
    all | --no-run | --base-only) ;;
    *) echo "usage: $0 [--no-run | --base-only]" >&2; exit 2 ;;
esac

log() { printf '[build_image %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
need() { command -v "$1" >/dev/null || { log "missing $1 (apt-get install -y $2)"; exit 1; }; }
need buildah buildah
need debootstrap debootstrap
need python3 python3

# ---- 1. local Debian base with python3.11 + venv (what python:3.11-slim provides) ---------
build_base() {
    if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base $BASE_IMAGE exists; skipping debootstrap"
        return
    fi
    local rootfs="$WORK/rootfs"
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    log "debootstrap bookworm -> $rootfs"
    timeout 1800 debootstrap --variant=minbase \
        --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
        bookworm "$rootfs" "$MIRROR"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    # Trust what the build host trusts: where HTTPS goes through an intercepting proxy, its CA
    # is in the host bundle and pip inside the build must accept it too (PIP_CERT below).
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    local ctr mnt
    ctr=$(buildah from scratch)
    mnt=$(buildah mount "$ctr")
    tar -C "$rootfs" -cf - . | tar -C "$mnt" -xf -
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin \
        --env LANG=C.UTF-8 --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --cmd python3 "$ctr"
    buildah commit --rm "$ctr" "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "base image $BASE_IMAGE committed"
}

# ---- 2. the image, from the unchanged root Dockerfile ------------------------------------
torch_source_args() {
    local wheels=${TORCH_WHEELS:-}
    if [[ -z $wheels ]] && compgen -G "/opt/wheels/torch-*.whl" >/dev/null; then
        wheels=/opt/wheels
    fi
    [[ -z $wheels ]] && return 0
    log "torch from local wheels in $wheels (other dependencies from PyPI)"
    printf '%s\n' -v "$wheels:/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels \
        --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}"
}

build_image() {
    local torch_args
    mapfile -t torch_args < <(torch_source_args)
    log "building $IMAGE (timeout ${BUILD_TIMEOUT}s)"
    # --format docker keeps HEALTHCHECK (the OCI format has no field for it);
    # --isolation chroot works inside VMs/containers without user namespaces.
    timeout "$BUILD_TIMEOUT" buildah build --format docker --isolation chroot --layers \
        --build-arg "BASE=$BASE_IMAGE" \
        --build-arg "BAKE_DEMO=${BAKE_DEMO:-1}" \
        --build-arg "TORCH_VARIANT=${TORCH_VARIANT:-cpu}" "${torch_args[@]}" \
        -t "$IMAGE" -f "$REPO/Dockerfile" "$REPO"
    log "image size: $(buildah images --format '{{.Size}}' "$IMAGE")"
}

# ---- 3. smoke test: run it on 127.0.0.1, GET /health, POST /generate ---------------------
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

smoke_test() {
    local port ctr pid url
    port=$(free_port)
    url="http://127.0.0.1:$port"
    ctr=$(buildah from "$IMAGE") || return 1
    local mounts=()  # mounted checkpoints exercise the "mount a model, select it by env" path
    if [[ -n ${SMOKE_MODEL:-} ]]; then
        mounts+=(-v "$SMOKE_MODEL:/models/lm:ro" --env CAMEX_MODEL=/models/lm)
    fi
    if [[ -n ${SMOKE_CLASSIFIER:-} ]]; then
        mounts+=(-v "$SMOKE_CLASSIFIER:/models/classifier:ro" --env CAMEX_CLASSIFIER=/models/classifier)
    fi
    # CAMEX_HOST=127.0.0.1 overrides the image's 0.0.0.0: this check never listens outside.
    setsid buildah run --isolation chroot --network host "${mounts[@]}" \
        --env CAMEX_HOST=127.0.0.1 --env "CAMEX_PORT=$port" "$ctr" -- camex-server \
        >"$WORK/server.log" 2>&1 &
    pid=$!
    # shellcheck disable=SC2064  # expand now: the trap must see these values
    trap "kill -TERM -- -$pid 2>/dev/null || true; sleep 2; kill -KILL -- -$pid 2>/dev/null || true; buildah rm $ctr >/dev/null 2>&1 || true" EXIT
    log "waiting for $url/health (pid $pid, timeout ${RUN_TIMEOUT}s)"
    python3 - "$url" "$RUN_TIMEOUT" "$pid" <<'EOF' || return 1
import json, os, sys, time, urllib.request
url, timeout, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("server process exited before becoming healthy")
    try:
        if urllib.request.urlopen(url + "/health", timeout=3).status == 200:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"{url}/health not healthy after {timeout:.0f}s")
    time.sleep(1)
print("GET /health -> 200")
while True:  # /generate needs the engine warmed up: wait for /ready too
    try:
        if urllib.request.urlopen(url + "/ready", timeout=3).status == 200:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"{url}/ready not ready after {timeout:.0f}s")
    time.sleep(1)
body = json.dumps({"inputs": "Q: What is a fortune?\nA:",
                   "parameters": {"max_new_tokens": 16}}).encode()
req = urllib.request.Request(url + "/generate", data=body,
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as res:
    out = json.loads(res.read())
assert res.status == 200 and isinstance(out.get("generated_text"), str), out
print("POST /generate -> 200:", repr(out["generated_text"]))
# the image ships prebuilt native kernels: on a CPU that can run them, they must serve
info = json.loads(urllib.request.urlopen(url + "/info", timeout=10).read())
kernels = {kind: m.get("kernels") for kind, m in info["models"].items()}
print("kernels:", kernels)
flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
              if line.startswith("flags")), [])
if {"avx2", "fma", "f16c"} <= set(flags):
    assert all(str(k).startswith("native") for k in kernels.values()), kernels
EOF
    log "smoke test passed (server log: $WORK/server.log)"
}

mkdir -p "$WORK"
build_base
[[ $MODE == --base-only ]] && exit 0
build_image
if [[ $MODE == all ]]; then
    smoke_test || { log "smoke test FAILED; last server log lines:"; tail -n 40 "$WORK/server.log" >&2; exit 1; }
fi
