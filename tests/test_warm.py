"""tests/warm.py: an app run forked from the warm server looks, to the test, as one in a new
interpreter: the same status, stdout and stderr, argv, working directory, environment and
module path, atexit handlers run, a timeout kills it."""

import subprocess
import sys

import pytest

import warm

PROBE = '''
import atexit, os, sys
print("argv", sys.argv[1:])
print("cwd", os.getcwd())
print("path0", sys.path[0])
print("env", os.environ.get("PROBE_VALUE"), "TF_CONFIG" in os.environ)
print("main", __name__, os.path.basename(__file__))
print("to stderr", file=sys.stderr)
atexit.register(lambda: open("atexit.txt", "w").write("ran"))
mode = sys.argv[1]
if mode == "exit3":
    sys.exit(3)
if mode == "message":
    sys.exit("error: a message")
if mode == "raise":
    raise ValueError("boom")
if mode == "sleep":
    import time
    time.sleep(60)
'''


@pytest.fixture
def probe_dir(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    return tmp_path


@pytest.mark.parametrize("mode", ["ok", "exit3", "message", "raise"])
def test_a_warm_run_is_a_fresh_run(probe_dir, mode):
    env = {"PROBE_VALUE": "42", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "probe", mode, "--flag=x y"]
    runs = []
    for fresh in (True, False):
        (probe_dir / "atexit.txt").unlink(missing_ok=True)
        runs.append(warm.run(cmd, cwd=probe_dir, env=env, timeout=120, fresh=fresh))
        assert (probe_dir / "atexit.txt").read_text() == "ran", (fresh, runs[-1].stderr)
    fresh, warmed = runs
    assert warmed.returncode == fresh.returncode == {"ok": 0, "exit3": 3, "message": 1,
                                                     "raise": 1}[mode]
    assert warmed.stdout == fresh.stdout
    assert f"argv ['{mode}', '--flag=x y']" in warmed.stdout
    assert f"cwd {probe_dir}" in warmed.stdout and f"path0 {probe_dir}" in warmed.stdout
    assert "env 42 False" in warmed.stdout and "main __main__ probe.py" in warmed.stdout
    if mode == "raise":  # the traceback's file lines differ by runpy's frames; its end does not
        assert warmed.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
        assert warmed.stderr.startswith("to stderr\nTraceback")
    else:
        assert warmed.stderr == fresh.stderr


def test_a_warm_run_that_times_out_is_killed(probe_dir):
    with pytest.raises(subprocess.TimeoutExpired):
        warm.run([sys.executable, "-m", "probe", "sleep"], cwd=probe_dir, timeout=3)
    res = warm.run([sys.executable, "-m", "probe", "ok"], cwd=probe_dir, timeout=60)
    assert res.returncode == 0 and "argv ['ok']" in res.stdout  # the server goes on


def test_what_is_not_a_module_run_goes_to_a_new_interpreter(tmp_path):
    res = warm.run([sys.executable, "-c", "import sys; print(sys.argv[1:])", "a"])
    assert res.stdout.strip() == "['a']"
    with pytest.raises(ValueError, match="captures text output only"):
        warm.run([sys.executable, "-m", "probe"], capture_output=False)
