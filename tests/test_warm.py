"""tests/warm.py: an app run forked from the warm server looks, to the test, as one in a new
interpreter: the same status, stdout and stderr, argv, working directory, environment and
module path, atexit handlers run, a timeout kills it; a warm Popen streams its output while
it runs, takes signals as the process itself, and runs beside others."""

import signal
import subprocess
import sys
import time

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
if mode == "serve":  # a line, then wait for SIGTERM: a handler that says so and exits 75
    import signal, time
    def stop(signum, frame):
        print("got", signal.Signals(signum).name, flush=True)
        sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
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


CODE = ("import os, sys; print(sys.argv, repr(sys.path[0]), __name__, os.getcwd()); "
        "print('err', file=sys.stderr); sys.exit(int(sys.argv[1]))")


@pytest.mark.parametrize("code", ["0", "4"])
def test_a_warm_c_run_is_a_fresh_one(tmp_path, code):
    cmd = [sys.executable, "-c", CODE, code, "b"]
    fresh, warmed = (warm.run(cmd, cwd=tmp_path, timeout=60, fresh=f) for f in (True, False))
    assert (warmed.returncode, warmed.stdout, warmed.stderr) == (
        fresh.returncode, fresh.stdout, fresh.stderr)
    assert warmed.stdout == f"['-c', '{code}', 'b'] '' __main__ {tmp_path}\n"


def test_what_is_not_python_m_or_c_goes_to_a_new_process(tmp_path):
    res = warm.run(["echo", "a"])
    assert (res.returncode, res.stdout) == (0, "a\n")
    assert isinstance(warm.Popen(["true"]), subprocess.Popen)
    with pytest.raises(ValueError, match="captures text output only"):
        warm.run([sys.executable, "-m", "probe"], capture_output=False)


def test_a_warm_popen_streams_and_takes_signals_as_the_process_itself(probe_dir):
    """Two at once: one stopped by SIGTERM through its own handler after its first line came
    (before it exits), one killed; stderr to stdout or to its own pipe; the exit statuses as
    subprocess gives them."""
    serve = [sys.executable, "-m", "probe", "serve"]
    a = warm.Popen(serve, cwd=probe_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                   text=True)
    b = warm.Popen(serve, cwd=probe_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True)
    lines = [a.stdout.readline()]
    while lines[-1] != "ready\n":
        lines.append(a.stdout.readline())
    assert lines[0] == "argv ['serve']\n" and "to stderr\n" in lines
    assert a.poll() is None and b.poll() is None
    a.send_signal(signal.SIGTERM)
    out, err = a.communicate(timeout=60)
    assert (a.returncode, out, err) == (75, "got SIGTERM\n", None)
    while b.stdout.readline() != "ready\n":
        pass
    start = time.monotonic()
    b.kill()
    out, err = b.communicate(timeout=60)
    assert b.returncode == -signal.SIGKILL and time.monotonic() - start < 30
    assert err == "to stderr\n" and "ready" not in out
    b.kill()  # reaped: nothing is sent
    c = warm.Popen([sys.executable, "-m", "probe", "sleep"], cwd=probe_dir, text=True)
    with pytest.raises(subprocess.TimeoutExpired):
        c.wait(timeout=1)
    c.kill()
    assert c.wait(timeout=60) == -signal.SIGKILL
