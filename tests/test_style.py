"""The tree passes flake8 with the settings in setup.cfg; test modules have unique names."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flake8_clean():
    res = subprocess.run([sys.executable, "-m", "flake8", "research", "tests"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_test_module_names_are_unique():
    """pytest imports test modules by basename (rootdir mode, no packages): two folders'
    test_x.py make collection fail with "import file mismatch" on whichever comes second."""
    import collections

    tests = os.path.dirname(os.path.abspath(__file__))
    names = collections.Counter(f for _, _, files in os.walk(tests) for f in files
                                if f.startswith("test_") and f.endswith(".py"))
    assert not [n for n, k in names.items() if k > 1], names.most_common(3)
