"""`run`: `subprocess.run([sys.executable, "-m", MODULE, ...], capture_output=True, text=True)`
for the tests' app runs, started warm.

The suite is bound by its CPU (tests/README.md), and a fresh interpreter spends about 3 CPU
seconds importing TensorFlow before an app does anything: over a hundred app runs, a fifth of
the suite. A `-m MODULE` run here is forked instead from one server per test process
(tests/warm_server.py) that has imported what every app imports first (the `research`
package, whose quiet hook wraps TensorFlow's import), TensorFlow, Keras, NumPy, OpenCV and
Matplotlib, and has not started TensorFlow's runtime; the child takes the run's argv,
working directory, environment and stdio, then runs the module as `python -m` would and exits
through the interpreter's own exit. Its status, stdout and stderr come back as
subprocess.run's.

What a warm child does not show is the interpreter's start: the import of TensorFlow under
the child's own environment (its log level, research.quiet's silencing of the import's noise)
and anything that depends on the order of that import (binding devices before CUDA starts).
Tests about those pass `fresh=True` or call subprocess themselves; RESEARCH_TESTS_FRESH=1
runs every call fresh (the same tests, each in a new interpreter).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_server.py")
_ENV = dict(os.environ)  # the server's, taken before any test changes os.environ
_server: subprocess.Popen | None = None
_pending = b""  # what the server said past the last line read
children_cpu = 0.0  # CPU seconds of the warm runs so far (the server's children, which a test
# process's RUSAGE_CHILDREN does not count): conftest's --cpu-report adds them


def _start() -> subprocess.Popen:
    global _server, _pending
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, _SERVER], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True, bufsize=1, env=_ENV)
        _pending = b""
        os.set_blocking(_server.stdout.fileno(), True)
        atexit.register(_server.kill)
    return _server


def _answer(server: subprocess.Popen, deadline: float | None) -> dict:
    """The server's next line, read from its fd itself (a buffered reader could hold the
    next answer where select cannot see it)."""
    global _pending
    fd = server.stdout.fileno()
    while b"\n" not in _pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError("the warm server (tests/warm_server.py) died")
        _pending += chunk
    line, _pending = _pending.split(b"\n", 1)
    return json.loads(line)


def run(cmd: list, *, capture_output: bool = True, text: bool = True, cwd=None, env=None,
        timeout: float | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)`,
    warm when `cmd` is `[sys.executable, "-m", MODULE, ...]` (see the module's doc); `fresh`
    (or RESEARCH_TESTS_FRESH=1): always a new interpreter."""
    if not (capture_output and text):
        raise ValueError("warm.run captures text output only")
    cmd = [str(a) for a in cmd]
    if (fresh or os.environ.get("RESEARCH_TESTS_FRESH") == "1" or cmd[0] != sys.executable
            or cmd[1:2] != ["-m"]):
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=timeout)
    server = _start()
    with tempfile.TemporaryDirectory(prefix="warm") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for path in (out, err):
            open(path, "w").close()
        request = {"argv": cmd[1:], "cwd": os.path.abspath(cwd or os.getcwd()),
                   "env": dict(os.environ if env is None else env), "stdout": out,
                   "stderr": err}
        server.stdin.write(json.dumps(request) + "\n")
        pid = _answer(server, None)["pid"]  # (the first run waits for the server's imports)
        deadline = None if timeout is None else time.monotonic() + timeout
        global children_cpu
        try:
            done = _answer(server, deadline)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            children_cpu += _answer(server, None)["cpu"]
            raise subprocess.TimeoutExpired(cmd, timeout)
        children_cpu += done["cpu"]
        code = done["returncode"]
        with open(out) as f, open(err) as g:
            return subprocess.CompletedProcess(cmd, code, f.read(), g.read())
