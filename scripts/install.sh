#!/usr/bin/env bash
# Install, upgrade or uninstall the c8 sensor on a Debian or Ubuntu host, as root.
#
#   scripts/install.sh                      install, or upgrade in place, and (re)start the sensor
#   scripts/install.sh --uninstall          stop it; remove the venv, the links and the unit
#   scripts/install.sh --uninstall --purge  ... and the configuration, sensor id and logs
#
# Only the system Python is used (/usr/bin/python3, externally managed per PEP
# 668): the package goes into its own virtual environment under /opt/c8, and
# the commands are linked into /usr/local/bin. The configuration
# /etc/capsule8/capsule8-sensor.yaml is written from conf/ only when absent,
# never over an edited one. The sensor starts through systemd where systemd
# runs, else directly with `c8-supervisor --daemon` (log:
# /var/log/c8-supervisor.log; CAPSULE8_* variables of the caller's
# environment are passed on, nothing else: under systemd, set keys in the
# configuration file or a drop-in). A running sensor is restarted on the new
# code after an upgrade, once its configuration is found valid.
#
# The supervisor forks its children without exec, so they run the supervisor's
# interpreter and import c8 from the venv after dropping to sensor_user: the
# whole venv is made readable (and its directories searchable) by everyone, and
# checked as an unprivileged user before the sensor starts.
#
# Uninstall keeps /etc/capsule8 (configuration), /var/lib/capsule8 (sensor id),
# /var/log/capsule8 (file alert outputs) and /var/log/c8-supervisor.log unless
# --purge. /var/log/capsule8 is left for the supervisor to make, as
# sensor_user's: the children keep no capability to write into a root's one.
# The system user sensor_user (capsule8) is always kept: files may still be
# owned by it, and Debian practice is not to remove system users.
set -euo pipefail
umask 022

PREFIX=/opt/c8
VENV=$PREFIX/venv
BIN_DIR=/usr/local/bin
COMMANDS=(c8-supervisor c8ctl c8-telemetry)
CONF_DIR=/etc/capsule8
CONF=$CONF_DIR/capsule8-sensor.yaml
STATE_DIR=/var/lib/capsule8
LOG_DIR=/var/log/capsule8  # the sensor's own (file alert outputs): made by the supervisor
LOG=/var/log/c8-supervisor.log
UNIT_NAME=c8-supervisor.service
UNIT=/etc/systemd/system/$UNIT_NAME
SYSTEM_PYTHON=/usr/bin/python3
SYSTEM_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
MIN_PYTHON=3.11
START_TIMEOUT=60
STOP_TIMEOUT=30

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

systemd_runs() { [ -d /run/systemd/system ]; }

# The caller's CAPSULE8_* variables, as NAME=VALUE words for env(1).
capsule8_env() {
  local v
  for v in $(compgen -e); do
    case $v in CAPSULE8_*) printf '%s\0' "$v=${!v}" ;; esac
  done
}

# Run a command with a clean environment: the system PATH plus CAPSULE8_*.
clean_env() {
  local -a keep=()
  local kv
  while IFS= read -r -d '' kv; do keep+=("$kv"); done < <(capsule8_env)
  env -i PATH="$SYSTEM_PATH" LANG=C.UTF-8 HOME=/root "${keep[@]}" "$@"
}

# "RUN_DIR PID": the run_dir of this configuration and the pid of the
# c8-supervisor running there (empty when none). Uses the installed package
# when there is one (the configuration decides run_dir), else
# CAPSULE8_RUN_DIR or the default.
sensor_facts() {
  local py=$SYSTEM_PYTHON
  [ -x "$VENV/bin/python" ] && py=$VENV/bin/python
  (cd / && clean_env "$py" -I - <<'EOF'
import json, os, sys
try:
    from c8.supervisor import config, status
except ImportError:
    run_dir = os.environ.get("CAPSULE8_RUN_DIR") or "/var/run/capsule8"
    pid = ""
    try:
        with open(os.path.join(run_dir, "supervisor.json")) as f:
            n = int(json.load(f)["pid"])
        with open(f"/proc/{n}/cmdline", "rb") as f:
            pid = n if b"c8-supervisor" in f.read() else ""
    except (OSError, ValueError, KeyError, TypeError):
        pass
    print(run_dir, pid)
    sys.exit(0)
try:
    run_dir = config.load().run_dir
except config.ConfigError as e:
    print(f"install.sh: warning: {e}", file=sys.stderr)
    from c8.clients.c8ctl import find_run_dir
    run_dir = find_run_dir(None) or "/var/run/capsule8"
print(run_dir, status.running_supervisor(os.path.join(run_dir, "supervisor.json")) or "")
EOF
  )
}

running_pid() {
  local facts
  facts=$(sensor_facts)
  printf '%s\n' "${facts##* }"
}

stop_direct() {
  local pid
  pid=$(running_pid)
  [ -n "$pid" ] || return 0
  say "stopping c8-supervisor (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || return 0
  local waited=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
      say "c8-supervisor (pid $pid) did not stop in ${STOP_TIMEOUT}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

stop_sensor() {
  if systemd_runs && systemctl is-active --quiet "$UNIT_NAME" 2>/dev/null; then
    say "stopping $UNIT_NAME"
    systemctl stop "$UNIT_NAME"
  fi
  stop_direct  # started by hand or by an earlier install without systemd
}

# Wait until `c8ctl status` answers; on failure show why and exit 1.
# $1: "systemd", or the byte offset in $LOG where this start's lines begin.
wait_started() {
  local how=$1 i
  for ((i = 0; i < START_TIMEOUT * 5; i++)); do
    if (cd / && clean_env "$BIN_DIR/c8ctl" status >/dev/null 2>&1); then
      return 0
    fi
    if [ "$how" = systemd ]; then
      systemctl is-failed --quiet "$UNIT_NAME" && break
    elif grep -q 'c8-supervisor: \(cannot start\|ConfigError\)' <(tail -c +"$how" "$LOG"); then
      break
    fi
    sleep 0.2
  done
  if [ "$how" = systemd ]; then
    systemctl status --no-pager "$UNIT_NAME" >&2 || true
    die "the sensor did not start (journalctl -u $UNIT_NAME)"
  fi
  tail -c +"$how" "$LOG" | tail -n 30 >&2 || true
  die "the sensor did not start (log: $LOG)"
}

start_sensor() {
  if systemd_runs; then
    systemctl daemon-reload
    systemctl enable --quiet "$UNIT_NAME"
    # A sensor started by hand (or by an install before systemd ran) holds run_dir.
    systemctl is-active --quiet "$UNIT_NAME" || stop_direct
    say "starting $UNIT_NAME"
    systemctl restart "$UNIT_NAME"
    wait_started systemd
  else
    stop_direct
    # Root's file in root's /var/log: no one else can plant a link at its name.
    [ -e "$LOG" ] || install -m 0640 /dev/null "$LOG"
    local offset
    offset=$(( $(stat -c %s "$LOG" 2>/dev/null || echo 0) + 1 ))
    say "systemd is not running: starting c8-supervisor --daemon (log: $LOG)"
    (cd / && clean_env "$BIN_DIR/c8-supervisor" --daemon </dev/null >>"$LOG" 2>&1) ||
      { tail -n 30 "$LOG" >&2; die "c8-supervisor --daemon failed (log: $LOG)"; }
    wait_started "$offset"
  fi
  say "the sensor is running: c8ctl status"
}

check_python() {
  [ -x "$SYSTEM_PYTHON" ] || die "$SYSTEM_PYTHON not found: apt-get install python3"
  "$SYSTEM_PYTHON" -I -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))" ||
    die "$SYSTEM_PYTHON is Python $("$SYSTEM_PYTHON" -c 'import platform; print(platform.python_version())'); c8 needs $MIN_PYTHON or later"
  if ! "$SYSTEM_PYTHON" -I -c 'import ensurepip, venv' 2>/dev/null; then
    say "python3 -m venv is unavailable: apt-get install python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
}

# A venv made by another Python (the system's was upgraded) cannot be reused.
venv_usable() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -I -m pip --version >/dev/null 2>&1 || return 1
  local want have
  want=$("$SYSTEM_PYTHON" -I -c 'import sys; print(sys.version_info[:2])')
  have=$("$VENV/bin/python" -I -c 'import sys; print(sys.version_info[:2])' 2>/dev/null) || return 1
  [ "$want" = "$have" ]
}

install_package() {
  if ! venv_usable; then
    rm -rf "$VENV"
    mkdir -p "$PREFIX"
    say "creating the virtual environment $VENV ($SYSTEM_PYTHON)"
    "$SYSTEM_PYTHON" -I -m venv "$VENV"
  fi
  # Build from a copy: the checkout may be read-only or shared, and an in-tree
  # build would write build/ and *.egg-info into it.
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  cp "$SRC/pyproject.toml" "$tmp/"
  cp -r "$SRC/c8" "$tmp/"
  find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
  say "installing c8 from $SRC into $VENV"
  (cd / && env -u PYTHONPATH -u PYTHONHOME -u PYTHONUSERBASE -u PIP_USER -u PIP_TARGET \
     -u PIP_PREFIX -u VIRTUAL_ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
     "$VENV/bin/python" -I -m pip install --quiet --upgrade "$tmp") ||
    die "pip install into $VENV failed"
  rm -rf "$tmp"
  trap - EXIT
  chmod -R a+rX,go-w "$PREFIX"
  # What the children will do after dropping privileges, done as nobody with
  # no capabilities: run the interpreter, read every file, import every role
  # (first as root, so that broken code is not reported as a permission problem).
  local check='
import os, sys
for top, dirs, files in os.walk(sys.prefix):
    for d in dirs:
        p = os.path.join(top, d)
        if not os.path.islink(p) and not os.access(p, os.R_OK | os.X_OK):
            print("not searchable:", p)
    for f in files:
        p = os.path.join(top, f)
        if not os.path.islink(p) and not os.access(p, os.R_OK):
            print("not readable:", p)
import c8.broker.main, c8.clients.c8ctl, c8.clients.telemetry, c8.collectors.main
import c8.detections.main, c8.supervisor.main
' problem
  problem=$(cd / && "$VENV/bin/python" -I -c "$check" 2>&1) ||
    die "the installed package does not import: $problem"
  problem=$(cd / && setpriv --reuid=65534 --regid=65534 --clear-groups \
    "$VENV/bin/python" -I -c "$check" 2>&1) || true
  [ -z "$problem" ] || die "an unprivileged user cannot use $VENV: $problem"
}

link_commands() {
  local c target
  for c in "${COMMANDS[@]}"; do
    target=$BIN_DIR/$c
    if [ -e "$target" ] || [ -L "$target" ]; then
      case $(readlink "$target" || true) in
        "$VENV"/bin/*) ;;
        *) die "$target exists and is not this installation's link; remove it first" ;;
      esac
    fi
    ln -sfn "$VENV/bin/$c" "$target"
  done
}

write_config() {
  mkdir -p "$CONF_DIR"
  if [ -e "$CONF" ]; then
    say "keeping the configuration $CONF"
  else
    install -m 0644 "$SRC/conf/capsule8-sensor.yaml" "$CONF"
    say "wrote the configuration $CONF (every key, commented out: the defaults)"
  fi
  # Refuse to restart a running sensor on a configuration that would stop it.
  local err
  err=$(cd / && clean_env "$VENV/bin/python" -I -c '
import sys
from c8.supervisor import config
try:
    config.load()
except config.ConfigError as e:
    print(e)
' 2>&1)
  [ -z "$err" ] || die "the configuration is invalid; the running sensor was not restarted: $err"
}

install_unit() {
  install -m 0644 "$SRC/conf/$UNIT_NAME" "$UNIT"
}

do_install() {
  local was
  { [ -f "$SRC/pyproject.toml" ] && [ -d "$SRC/c8" ]; } || die "$SRC is not a c8 checkout"
  was=$([ -x "$VENV/bin/python" ] && echo upgrade || echo install)
  check_python
  install_package
  link_commands
  write_config
  install_unit
  start_sensor
  say "done ($was): $("$VENV/bin/python" -I -c 'from importlib.metadata import version; print("c8", version("c8"))') in $VENV"
}

do_uninstall() {
  local purge=$1 c run_dir
  run_dir=$(sensor_facts)
  run_dir=${run_dir% *}
  stop_sensor
  if [ -e "$UNIT" ]; then
    if systemd_runs; then
      systemctl disable --quiet "$UNIT_NAME" 2>/dev/null || true
    fi
    rm -f "$UNIT" "/etc/systemd/system/multi-user.target.wants/$UNIT_NAME"
    if systemd_runs; then systemctl daemon-reload; fi
  fi
  for c in "${COMMANDS[@]}"; do
    case $(readlink "$BIN_DIR/$c" 2>/dev/null || true) in
      "$VENV"/bin/*) rm -f "$BIN_DIR/$c" ;;
    esac
  done
  rm -rf "$PREFIX"
  # The supervisor removes run_dir's sockets when it stops; the directory stays.
  rmdir "$run_dir" 2>/dev/null || true
  if [ "$purge" = 1 ]; then
    rm -rf "$CONF_DIR" "$STATE_DIR" "$LOG_DIR" "$LOG"
    say "removed c8 and its configuration, sensor id and logs"
  else
    say "removed c8; kept $CONF_DIR, $STATE_DIR, $LOG_DIR and $LOG (--purge removes them)"
  fi
}

main() {
  local uninstall=0 purge=0 arg
  for arg in "$@"; do
    case $arg in
      --uninstall) uninstall=1 ;;
      --purge) purge=1 ;;
      -h|--help) usage; exit 0 ;;
      *) usage >&2; die "unknown argument: $arg" ;;
    esac
  done
  [ "$purge" = 0 ] || [ "$uninstall" = 1 ] || die "--purge goes with --uninstall"
  [ "$(id -u)" = 0 ] || die "run as root"
  if [ "$uninstall" = 1 ]; then
    do_uninstall "$purge"
  else
    do_install
  fi
}

main "$@"
