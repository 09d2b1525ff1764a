#!/usr/bin/env bash
# Build the hsmkms container image (Containerfile) and run its smoke test
# (ci/container_smoke.py: start with a seed file, create a key with boto3, encrypt, stop, start
# again on the same volume, decrypt).
#
#   ci/container.sh [build | smoke | all]      (default: all)
#
# Environment:
#   HSMKMS_CONTAINER_ENGINE   docker or podman (default: the first that can run a container)
#   HSMKMS_IMAGE              image name (default localhost/hsmkms:test)
#   HSMKMS_BASE_IMAGE         the Debian bookworm base (default: debian:bookworm-slim; where no
#                             registry answers, localhost/debian:bookworm made with debootstrap)
#   HSMKMS_BUILD_CA_BUNDLE    CA certificates for HTTPS inside the build, given as a build
#                             secret, never part of the image (default: this host's bundle)
#
# Exit status: 0 passed, 1 failed, 3 no container engine can run here (the reason on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."

action="${1:-all}"
image="${HSMKMS_IMAGE:-localhost/hsmkms:test}"
say() { echo "container: $*" >&2; }
unusable() { echo "container: cannot run containers here: $*" >&2; exit 3; }

can_run() { command -v "$1" >/dev/null 2>&1 && timeout 30 "$1" info >/dev/null 2>&1; }

engine="${HSMKMS_CONTAINER_ENGINE:-}"
if [ -z "$engine" ]; then
    if can_run docker; then engine=docker
    elif can_run podman; then engine=podman
    elif command -v docker >/dev/null 2>&1 || command -v podman >/dev/null 2>&1; then
        unusable "docker and podman are installed but neither can run (docker info / podman info fail)"
    else
        unusable "neither docker nor podman is installed (ci/bootstrap.sh installs podman on Debian)"
    fi
elif ! can_run "$engine"; then
    unusable "$engine info fails"
fi

# podman only: runc rather than crun (crun refuses hybrid cgroup hierarchies, as on some VMs),
# and ulimits no higher than this host allows (podman's defaults exceed the hard limits of a
# root without CAP_SYS_RESOURCE). Both belong here, not in the Containerfile.
engine_args=()
if [ "$engine" = podman ]; then
    if command -v runc >/dev/null 2>&1; then engine_args+=(--runtime runc); fi
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
    if [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; then nofile=1048576; fi
    engine_args+=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
fi

base_image() {
    if [ -n "${HSMKMS_BASE_IMAGE:-}" ]; then echo "$HSMKMS_BASE_IMAGE"; return; fi
    if [ "$engine" = podman ] && podman image exists localhost/debian:bookworm; then
        echo localhost/debian:bookworm; return
    fi
    if timeout 120 "$engine" pull -q docker.io/library/debian:bookworm-slim >/dev/null 2>&1; then
        echo docker.io/library/debian:bookworm-slim; return
    fi
    debootstrap_base >&2
    echo localhost/debian:bookworm
}

debootstrap_base() {
    local debootstrap mirror rootfs
    debootstrap=$(command -v debootstrap || echo /usr/sbin/debootstrap)
    [ -x "$debootstrap" ] || unusable "no registry answers and debootstrap is not installed"
    [ "$(id -u)" = 0 ] || unusable "no registry answers and debootstrap needs root"
    # The mirror apt uses here (a deb822 source, else sources.list), else Debian's.
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\/*\)$/\1/p' /etc/apt/sources.list.d/*.sources \
        2>/dev/null | head -n 1)
    [ -n "$mirror" ] || mirror=$(sed -n 's/^deb \(http[^ ]*debian\/*\) .*/\1/p' \
        /etc/apt/sources.list 2>/dev/null | head -n 1)
    mirror="${mirror:-http://deb.debian.org/debian}"
    rootfs=$(mktemp -d)
    # A RETURN trap outlives the function (it fires again when the caller returns, with this
    # local gone): it clears itself.
    trap 'rm -rf "$rootfs"; trap - RETURN' RETURN
    say "no registry answers: making localhost/debian:bookworm with debootstrap from $mirror"
    "$debootstrap" --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
    tar -C "$rootfs" -c . | "$engine" import - localhost/debian:bookworm >/dev/null
}

build() {
    local base ca build_args=()
    base=$(base_image)
    ca="${HSMKMS_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
    if [ -s "$ca" ]; then build_args+=(--secret "id=ca-bundle,src=$ca"); fi
    # HEALTHCHECK is part of the docker image format (podman's default OCI format drops it).
    if [ "$engine" = podman ]; then build_args+=(--format docker "${engine_args[@]}"); fi
    say "building $image from $base with $engine"
    "$engine" build --quiet "${build_args[@]}" --build-arg "BASE=$base" -t "$image" \
        -f Containerfile . >/dev/null
}

smoke() {
    local python=python3
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
    "$python" ci/container_smoke.py --engine "$engine" --image "$image" -- "${engine_args[@]}"
}

case "$action" in
    build) build ;;
    smoke) smoke ;;
    all) build; smoke ;;
    *) echo "usage: ci/container.sh [build | smoke | all]" >&2; exit 2 ;;
esac
