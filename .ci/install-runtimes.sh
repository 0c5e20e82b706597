#!/bin/sh
# Install the container runtimes that tests/integration/runtimes.py starts
# (docker, podman, runc, crun; containerd for manual checks) on a fresh
# Debian 12 machine, as root. No daemon is enabled or started: the test
# harness starts private instances in temp dirs and stops them.
#
#   C8_CRUN_HYBRID=1 .ci/install-runtimes.sh   also lets crun run on a hybrid
#   cgroup layout (v1 controllers + cgroup2 at /sys/fs/cgroup/unified) by
#   moving the hugetlb controller off cgroup2 onto its own v1 hierarchy: crun
#   refuses to start while any controller is attached to cgroup2 in hybrid mode.
#   Without it, tests/integration/test_containers_e2e.py mounts it for each crun
#   run and undoes it (see docs/containers.md, "crun on a hybrid host").
set -eu

if [ "$(id -u)" != 0 ]; then
    echo "install-runtimes.sh: run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    docker.io containerd runc crun podman conmon \
    busybox-static uidmap fuse-overlayfs slirp4netns iptables \
    ca-certificates tar util-linux

# tracefs for the lifecycle observations in docs/containers.md
if [ ! -e /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing || true
fi

if [ "${C8_CRUN_HYBRID:-0}" = 1 ] && [ -e /sys/fs/cgroup/unified/cgroup.controllers ]; then
    if grep -qw hugetlb /sys/fs/cgroup/unified/cgroup.controllers \
        && ! grep -qw hugetlb /sys/fs/cgroup/unified/cgroup.subtree_control; then
        mkdir -p /sys/fs/cgroup/hugetlb
        mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
    fi
fi

# report what the harness will find
for exe in dockerd docker containerd runc crun podman conmon busybox; do
    printf '%-10s %s\n' "$exe" "$(command -v "$exe" || echo MISSING)"
done
