"""The warm start behind tests/warm.py: imports what every app imports first (the `research`
package, whose quiet hook wraps TensorFlow's import, research/quiet.py), then TensorFlow, Keras,
NumPy, OpenCV and Matplotlib, once; then forks a child for each `python -m MODULE ARGS` or
`python -c CODE ARGS` it is asked to run, as many at once as asked.

Protocol: a Unix SOCK_SEQPACKET socket (its fd is argv[1]), one JSON object a message. A
request, {"id": N, "argv": [...], "cwd", "env"}, carries two file descriptors (SCM_RIGHTS):
the child's stdout and stderr (a file or a pipe; the same one twice for stderr=STDOUT); a
child's stdin is /dev/null. The answers: {"id": N, "pid": P} once the child is forked, then
{"id": N, "returncode": R, "cpu": seconds} when it has exited (a signal: -signum, as
subprocess has it; its user + system CPU seconds). The server exits when the socket closes.

Nothing here starts TensorFlow's runtime (no op, no device, no thread pool), so a child is, as
far as TensorFlow knows, a process that has just imported it: it configures its own devices,
precision and threads, from its own environment, as the app does in a fresh interpreter.
"""

import atexit
import gc
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading
import traceback
import types

import research  # noqa: F401  (first, as in every app: its quiet hook wraps TensorFlow's import)
import absl.app  # noqa: E402,F401  (absl's own flags: defined once, as in a fresh process)
import cv2  # noqa: E402,F401
import keras  # noqa: E402,F401
import matplotlib.pyplot  # noqa: E402,F401
import numpy  # noqa: E402,F401
import tensorflow  # noqa: E402,F401
from PIL import Image  # noqa: E402,F401

_SITE_PATH = list(sys.path[1:])  # without this script's folder, which -m and -c do not have


def _run(argv: list) -> None:
    """What `python -m MODULE ARGS` or `python -c CODE ARGS` runs."""
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # run_module puts the module's file name first
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    sys.argv = ["-c", *argv[2:]]
    main = types.ModuleType("__main__")  # exec adds __builtins__, as -c's __main__ has
    sys.modules["__main__"] = main
    exec(compile(argv[1], "<string>", "exec"), main.__dict__)


def _child(request: dict, stdout: int, stderr: int) -> int:
    """Becomes the asked interpreter in `cwd` with `env` and the given stdio; returns its exit
    status."""
    signal.set_wakeup_fd(-1)  # the server's SIGCHLD wake-up is not the child's
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)  # fd 0 is already /dev/null
    for fd in {stdout, stderr}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    first = os.getcwd() if request["argv"][0] == "-m" else ""
    sys.path[:] = [first, *extra, *_SITE_PATH]
    try:
        _run(request["argv"])
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # what the interpreter prints for an uncaught exception
        traceback.print_exc()
        return 1


def _fork(request: dict, fds: list, closing: list) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    for fd in closing:
        os.close(fd)
    code = _child(request, *fds)
    # The interpreter's exit, minus the tearing down of every module: that would touch (and
    # so copy) most of the server's memory, a CPU second a run. Python does not promise
    # finalisers at exit, only the threads' join and atexit.
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code & 0xFF)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    wake_r, wake_w = os.pipe()  # SIGCHLD writes a byte here (the select below wakes up)
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    gc.freeze()  # the imports' objects stay out of the children's collections (and pages)
    children: dict[int, int] = {}  # pid: request id

    def answer(message: dict) -> None:
        sock.send(json.dumps(message).encode())

    while True:
        ready = select.select([sock, wake_r], [], [])[0]
        if wake_r in ready:
            os.read(wake_r, 4096)
        while children:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if not pid:
                break
            answer({"id": children.pop(pid), "returncode": os.waitstatus_to_exitcode(status),
                    "cpu": usage.ru_utime + usage.ru_stime})
        if sock in ready:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
            if not message:
                return  # the test process is gone
            request = json.loads(message)
            pid = _fork(request, fds, [sock.fileno(), wake_r, wake_w])
            for fd in fds:
                os.close(fd)
            children[pid] = request["id"]
            answer({"id": request["id"], "pid": pid})


if __name__ == "__main__":
    main()
