#!/bin/sh
# Install Chromium for the dashboard's browser test if it is missing (idempotent; Debian/Ubuntu, needs root).
set -eu
for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "$name is already installed: $(command -v "$name")"
        exit 0
    fi
done
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
command -v chromium
