#!/usr/bin/env bash
# Install the espeak-ng speech synthesizer (Debian package `espeak-ng`) for the Whisper tests and benchmark, if it
# is missing. Idempotent: does nothing when espeak-ng is on the PATH. Needs root (or sudo) and the Debian mirror.
set -euo pipefail
if command -v espeak-ng >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install_espeak.sh: not root and no sudo; cannot install espeak-ng" >&2; exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null
command -v espeak-ng >/dev/null
