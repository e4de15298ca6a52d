#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Copies the static agent out of its image, for one architecture, without running
# it: the binary a node's boot unit runs is then the very file the DaemonSet's image
# holds. Uses podman, or containerd's ctr where podman is absent.
#
#   extract-binary.sh IMAGE ARCH OUT      e.g. registry.example.com/metadata-guard:0.1.0 arm64 ./metadata-guard
set -eu

image=${1:?usage: extract-binary.sh IMAGE ARCH OUT}
arch=${2:?usage: extract-binary.sh IMAGE ARCH OUT (ARCH: amd64 or arm64)}
out=${3:?usage: extract-binary.sh IMAGE ARCH OUT}

if command -v podman >/dev/null; then
    podman pull --platform "linux/$arch" "$image" >/dev/null
    container=$(podman create --platform "linux/$arch" "$image")
    trap 'podman rm "$container" >/dev/null' EXIT
    podman cp "$container:/metadata-guard" "$out"
elif command -v ctr >/dev/null; then
    ctr image pull --platform "linux/$arch" "$image" >/dev/null
    mnt=$(mktemp -d)
    trap 'ctr image unmount "$mnt" >/dev/null; rmdir "$mnt"' EXIT
    ctr image mount --platform "linux/$arch" "$image" "$mnt" >/dev/null
    cp "$mnt/metadata-guard" "$out"
else
    echo "extract-binary.sh: needs podman or ctr (containerd)" >&2
    exit 1
fi
chmod 0755 "$out"
echo "extract-binary.sh: $out from $image (linux/$arch)"
