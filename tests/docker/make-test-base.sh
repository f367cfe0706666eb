#!/usr/bin/env bash
# Makes the base image the image test builds on, on a machine that cannot pull from a registry:
# Debian 12 from debootstrap, plus what this machine needs to reach PyPI (its CA bundle) and the
# CPU torch wheel the test build swaps in for CUDA torch. Test-only: the project's Dockerfile
# takes its base images as build args and knows nothing of this.
# Usage: make-test-base.sh IMAGE_NAME  (buildah global options come from $BUILDAH_OPTS)
set -euo pipefail
image=${1:?usage: make-test-base.sh IMAGE_NAME}
read -r -a opts <<<"${BUILDAH_OPTS:-}"
ca=/etc/ssl/certs/ca-certificates.crt
work=$(mktemp -d /var/tmp/desktune-base.XXXXXX)
trap 'rm -rf "$work"' EXIT

debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log"; exit 1; }
install -D -m 0644 "$ca" "$work/rootfs/etc/desktune-test/ca.crt"
mkdir -p "$work/rootfs/opt/wheels"
cp /opt/wheels/torch-*+cpu-cp311-*.whl "$work/rootfs/opt/wheels/"
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb

ctr=$(buildah "${opts[@]}" from scratch)
buildah "${opts[@]}" copy "$ctr" "$work/rootfs" / >/dev/null
buildah "${opts[@]}" config --env PIP_CERT=/etc/desktune-test/ca.crt --env PIP_FIND_LINKS=/opt/wheels \
    --env REQUESTS_CA_BUNDLE=/etc/desktune-test/ca.crt --cmd /bin/bash "$ctr"
buildah "${opts[@]}" commit --rm "$ctr" "$image" >/dev/null
echo "made $image"
