"""Running the installed console commands from tests."""

import subprocess
import sys
from pathlib import Path


def run(command, env, expect_success=True) -> subprocess.CompletedProcess:
    """Run an installed console command (from this interpreter's environment)."""
    command = [str(Path(sys.executable).with_name(command[0])), *command[1:]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if expect_success:
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result
