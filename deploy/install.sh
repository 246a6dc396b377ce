#!/usr/bin/env bash
# Install or upgrade edge-agent as a systemd service from this source tree. Safe to run again:
# the virtualenv is reused, the package and the unit are updated, an existing config is kept.
#
#   sudo deploy/install.sh            install or upgrade
#   deploy/install.sh --dry-run       print the commands it would run, change nothing
#
# Environment: PYTHON (interpreter for the virtualenv, default python3).
set -euo pipefail

SOURCE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
PREFIX=/opt/edge-agent
VENV="$PREFIX/venv"
CONFIG_DIR=/etc/edge-agent
UNIT_PATH=/etc/systemd/system/edge-agent.service
DRY_RUN=0

usage() {
    sed -n '2,8s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

case "${1:-}" in
    "") ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (expected --dry-run or --help)" >&2; exit 2 ;;
esac

# Print a command, and run it unless this is a dry run.
run() {
    echo "+ $*"
    if [ "$DRY_RUN" -eq 0 ]; then
        "$@"
    fi
}

# Copy a file into place only when the target does not exist yet: the user's edits win.
install_if_absent() {
    local mode="$1" source="$2" target="$3"
    if [ -e "$target" ]; then
        echo "= keeping existing $target"
    else
        run install -m "$mode" "$source" "$target"
    fi
}

if [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: must run as root (try: sudo $0), or use --dry-run to see the steps" >&2
    exit 1
fi

if [ -x "$VENV/bin/python" ]; then
    echo "= reusing virtualenv $VENV"
else
    run install -d -m 0755 "$PREFIX"
    run "$PYTHON" -m venv "$VENV"
fi
run "$VENV/bin/pip" install --upgrade "$SOURCE_DIR"
run install -m 0644 "$SOURCE_DIR/deploy/README.md" "$PREFIX/README.md"

run install -d -m 0755 "$CONFIG_DIR"
install_if_absent 0644 "$SOURCE_DIR/config.yaml" "$CONFIG_DIR/config.yaml"
# LoadCredential= refuses to start the unit when its file is missing; empty means "no password".
install_if_absent 0600 /dev/null "$CONFIG_DIR/mqtt-password"

run install -m 0644 "$SOURCE_DIR/deploy/edge-agent.service" "$UNIT_PATH"
if [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
else
    echo "= systemd is not running here: skipping systemctl daemon-reload"
fi

cat <<EOF

Next steps:
  1. Edit $CONFIG_DIR/config.yaml: camera source, questions, mqtt.host/username, and
     model.path under /var/lib/edge-agent, model.cache_dir: /var/cache/edge-agent.
  2. Put the MQTT password in $CONFIG_DIR/mqtt-password (config: password_file: mqtt-password).
  3. Export a model into /var/lib/edge-agent (see $PREFIX/README.md).
  4. systemctl enable --now edge-agent && journalctl -u edge-agent -f
EOF
