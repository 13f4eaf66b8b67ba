#!/usr/bin/env bash
# Install headless Chromium (Debian package `chromium`) for the HTML-report test, if it is missing.
# Idempotent: does nothing when /usr/bin/chromium exists. Needs root (or sudo) and the Debian mirror.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install_chromium.sh: not root and no sudo; cannot install chromium" >&2; exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
test -x /usr/bin/chromium
