#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine, as root:
# kernel tools, container runtimes, and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if [ -x .ci/install-runtimes.sh ]; then
  bash .ci/install-runtimes.sh
else
  apt-get update -qq
  apt-get install -y -qq linux-perf gcc busybox-static docker.io podman runc crun containerd >/dev/null
fi
# systemd: systemd-analyze verifies the unit scripts/install.sh installs (tests/integration/test_install.py).
apt-get install -y -qq linux-perf gcc binutils iproute2 util-linux passwd systemd >/dev/null
# fuse3: libfuse3 for the FUSE daemon of tests/integration/test_hostile_proc.py (mfusepy).
apt-get install -y -qq --no-install-recommends fuse3 >/dev/null
# prometheus: the metrics test scrapes a sensor with Debian's Prometheus server
# (tests/integration/test_metrics_prometheus.py).
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
python -m pip install -q -e '.[test]'
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
