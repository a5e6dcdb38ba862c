"""`run` and `Popen`: `subprocess.run([sys.executable, "-m", MODULE, ...], capture_output=True,
text=True)` and `subprocess.Popen` (pipes, signals) for the tests' app runs, started warm;
`-c CODE` as well.

The suite is bound by its CPU (tests/README.md), and a fresh interpreter spends about 3 CPU
seconds importing TensorFlow before an app does anything: over a hundred app runs, a fifth of
the suite. A `-m MODULE` or `-c CODE` run here is forked instead from one server per test
process
(tests/warm_server.py) that has imported what every app imports first (the `research`
package, whose quiet hook wraps TensorFlow's import), TensorFlow, Keras, NumPy, OpenCV and
Matplotlib, and has not started TensorFlow's runtime; the child takes the run's argv,
working directory, environment and stdio (files or pipes), then runs the module as `python -m`
would and exits through the interpreter's own exit. Its status, stdout and stderr come back
as subprocess.run's; a `Popen`'s pipes stream as subprocess's do, and its signals reach the
child itself (the server is its parent and reaps it).

What a warm child does not show is the interpreter's start: the import of TensorFlow under
the child's own environment (its log level, research.quiet's silencing of the import's noise)
and anything that depends on the order of that import (binding devices before CUDA starts).
Tests about those pass `fresh=True` or call subprocess themselves; RESEARCH_TESTS_FRESH=1
runs every call fresh (the same tests, each in a new interpreter).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_server.py")
_ENV = dict(os.environ)  # the server's, taken before any test changes os.environ
_server: subprocess.Popen | None = None
_sock: socket.socket | None = None
_answers: dict[int, dict] = {}  # request id: what the server said of it so far
_lock = threading.Lock()  # one reader of the socket at a time
_ids = iter(range(1, 1 << 62))
children_cpu = 0.0  # CPU seconds of the warm runs so far (the server's children, which a test
# process's RUSAGE_CHILDREN does not count): conftest's --cpu-report adds them


def _start() -> socket.socket:
    global _server, _sock
    if _server is None or _server.poll() is not None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _server = subprocess.Popen([sys.executable, _SERVER, str(theirs.fileno())],
                                   pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=_ENV)
        theirs.close()
        _sock = ours
        atexit.register(_server.kill)
    return _sock


def _warm(cmd: list, fresh: bool) -> bool:
    return not (fresh or os.environ.get("RESEARCH_TESTS_FRESH") == "1"
                or cmd[0] != sys.executable or cmd[1:2] not in (["-m"], ["-c"]))


def _request(cmd: list, cwd, env, stdout: int, stderr: int) -> tuple[int, int]:
    """(request id, pid) of `cmd` forked by the server with these stdout and stderr fds."""
    sock = _start()
    rid = next(_ids)
    request = {"id": rid, "argv": cmd[1:], "cwd": os.path.abspath(cwd or os.getcwd()),
               "env": dict(os.environ if env is None else env)}
    socket.send_fds(sock, [json.dumps(request).encode()], [stdout, stderr])
    return rid, _await(rid, "pid", None)["pid"]  # (the first run waits for the imports)


def _left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (a time.monotonic()), none below 0; None: no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _await(rid: int, key: str, deadline: float | None) -> dict:
    """The server's answer about `rid` that has `key`, reading (and keeping) the others'."""
    global children_cpu
    while key not in _answers.get(rid, {}):
        with _lock:
            if key in _answers.get(rid, {}):
                break
            if not select.select([_sock], [], [], _left(deadline))[0]:
                raise TimeoutError
            message = _sock.recv(1 << 16)
            if not message:
                raise RuntimeError("the warm server (tests/warm_server.py) died")
            answer = json.loads(message)
            children_cpu += answer.get("cpu", 0.0)
            _answers.setdefault(answer.pop("id"), {}).update(answer)
    return _answers[rid]


def run(cmd: list, *, capture_output: bool = True, text: bool = True, cwd=None, env=None,
        timeout: float | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)`,
    warm when `cmd` is `[sys.executable, "-m" or "-c", ...]` (see the module's doc); `fresh`
    (or RESEARCH_TESTS_FRESH=1): always a new interpreter."""
    if not (capture_output and text):
        raise ValueError("warm.run captures text output only")
    cmd = [str(a) for a in cmd]
    if not _warm(cmd, fresh):
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=timeout)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        rid, pid = _request(cmd, cwd, env, out.fileno(), err.fileno())
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            code = _await(rid, "returncode", deadline)["returncode"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            _await(rid, "returncode", None)
            _answers.pop(rid)
            raise subprocess.TimeoutExpired(cmd, timeout) from None
        _answers.pop(rid)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, code, out.read(), err.read())


class Popen:
    """`subprocess.Popen(cmd, stdout=PIPE or None, stderr=PIPE, STDOUT or None, text=True,
    cwd=cwd, env=env)`, warm (see the module's doc): `pid`, `stdout`, `stderr`, `returncode`,
    `poll`, `wait`, `communicate`, `send_signal`, `terminate` and `kill` as subprocess has
    them. `fresh` (or RESEARCH_TESTS_FRESH=1), or a command that is not `-m`/`-c`: a
    subprocess.Popen."""

    def __new__(cls, cmd, *, stdout=None, stderr=None, text=False, cwd=None, env=None,
                fresh: bool = False):
        cmd = [str(a) for a in cmd]
        if not _warm(cmd, fresh):
            return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=text, cwd=cwd,
                                    env=env)
        if stdout not in (subprocess.PIPE, None) or stderr not in (
                subprocess.PIPE, subprocess.STDOUT, None):
            raise ValueError("warm.Popen: stdout PIPE or None; stderr PIPE, STDOUT or None")
        if not text:
            raise ValueError("warm.Popen reads text only")
        self = super().__new__(cls)
        self.args, self.returncode = cmd, None
        ends, ours = {}, []  # the child's fds (None: inherited from this process); our ends
        for name, how, inherited in (("out", stdout, 1), ("err", stderr, 2)):
            if how == subprocess.PIPE:
                r, w = os.pipe()
                ends[name] = w
                ours.append((name, r))
            elif how == subprocess.STDOUT:
                ends[name] = ends["out"]
            else:
                ends[name] = inherited
        try:
            self._rid, self.pid = _request(cmd, cwd, env, ends["out"], ends["err"])
        finally:
            for name, _ in ours:
                os.close(ends[name])
        files = {name: io.open(r, "r") for name, r in ours}
        self.stdout, self.stderr = files.get("out"), files.get("err")
        return self

    def _done(self, deadline: float | None) -> int:
        if self.returncode is None:
            self.returncode = _await(self._rid, "returncode", deadline)["returncode"]
            _answers.pop(self._rid, None)
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self._done(time.monotonic())
        except TimeoutError:
            return None

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self._done(None if timeout is None else time.monotonic() + timeout)
        except TimeoutError:
            raise subprocess.TimeoutExpired(self.args, timeout) from None

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        """Both pipes read to their end (a thread each, as subprocess does without poll),
        then the exit."""
        texts: dict = {}
        readers = [threading.Thread(target=lambda k=k, f=f: texts.__setitem__(k, f.read()),
                                    daemon=True)
                   for k, f in (("out", self.stdout), ("err", self.stderr)) if f is not None]
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(_left(deadline))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(_left(deadline))
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        return texts.get("out"), texts.get("err")

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # a pid that has been reaped may be someone else's
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
