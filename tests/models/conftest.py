"""espeak-ng for the speech tests: installed by scripts/install_espeak.sh when missing (as the HTML-report tests
install chromium); the tests skip with the reason only when it cannot be installed."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        script = os.path.join(ROOT, "scripts", "install_espeak.sh")
        try:
            proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"espeak-ng missing and scripts/install_espeak.sh could not run: {e}")
        exe = shutil.which("espeak-ng")
        if proc.returncode != 0 or exe is None:
            pytest.skip(f"espeak-ng missing and installing it failed (apt-get install espeak-ng): {proc.stderr[-500:]}")
    return exe
