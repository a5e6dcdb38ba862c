"""The tree passes flake8 with the settings in setup.cfg."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flake8_clean():
    res = subprocess.run([sys.executable, "-m", "flake8", "research", "tests"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
