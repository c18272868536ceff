#!/usr/bin/env bash
# Make a Debian bookworm base image from Debian's archive, for machines that can reach Debian's
# package mirror but no container registry: debootstrap a minimal system, drop its package
# caches, add the updates and security suites, and import it as localhost/debian:bookworm-slim.
# Usage (as root): docker/debian-base.sh [IMAGE]; does nothing when the image exists.
set -euo pipefail
IMAGE="${1:-localhost/debian:bookworm-slim}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if podman image exists "$IMAGE"; then
    echo "debian-base: $IMAGE exists"
    exit 0
fi
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
SOURCES
tar -C "$rootfs" -c . | podman import --quiet - "$IMAGE" >/dev/null
echo "debian-base: imported $IMAGE"
