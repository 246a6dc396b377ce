#!/usr/bin/env bash
# The test command: installs everything the tests need (Debian and Python packages), builds the tiny
# test models once (cached under .cache/), then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# The broker, test videos, systemd-analyze for the unit file, openssl for test certificates, GStreamer's RTSP server for
# a test camera, and headless Chromium with its WebDriver for the status page's browser tests.
DEBIAN_PACKAGES=(mosquitto ffmpeg systemd openssl gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-base
                 gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly chromium chromium-driver)
missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Pinned torch (the CPU wheel) and the torchvision release that matches it: see scripts/constraints.txt.
python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt -e ".[export,dev]"
# optimum-intel pulls PyPI's torchvision, which fails to import beside this torch and breaks transformers.
python -m pip uninstall -y -q torchvision >/dev/null 2>&1 || true

# Lint and format first: a style slip fails in seconds, before the long tests (settings in pyproject.toml).
python -m ruff check .
python -m ruff format --check .

python -m tests.support.models
# Home Assistant as a test peer, in its own virtual environment under .cache/ (about 2 minutes when missing).
python -m tests.support.homeassistant
exec python -m pytest -q "$@"
