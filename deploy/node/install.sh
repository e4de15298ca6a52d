#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Installs metadata-guard's boot enforcement into a node image (or a running node):
# the static binary, the policy and the systemd unit, enabled so that it runs before
# the container runtime and kubelet. Run it where the node image is built (Packer,
# EC2 Image Builder, the Kubernetes image-builder, a Dockerfile for a bootc image),
# with the binary copied out of the agent's image beforehand (extract-binary.sh):
# nothing is downloaded when a node boots.
#
#   install.sh BINARY [CONFIG]      CONFIG defaults to deploy/base/config.yaml
#
# ROOT=/mnt/image installs into a mounted image instead of /.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
binary=${1:?usage: install.sh BINARY [CONFIG]}
config=${2:-$here/../base/config.yaml}
root=${ROOT:-}

[ -f "$binary" ] || { echo "install.sh: no binary at $binary (see extract-binary.sh)" >&2; exit 1; }
[ -f "$config" ] || { echo "install.sh: no config at $config" >&2; exit 1; }

install -D -m 0755 "$binary" "$root/usr/local/bin/metadata-guard"
install -D -m 0644 "$config" "$root/etc/metadata-guard/config.yaml"
install -D -m 0644 "$here/metadata-guard-apply.service" "$root/etc/systemd/system/metadata-guard-apply.service"
# systemctl enable works offline (no running systemd) with --root.
systemctl --root="${root:-/}" enable metadata-guard-apply.service
echo "install.sh: metadata-guard-apply.service installed and enabled${root:+ in $root}"
