"""The warm start behind tests/warm.py: imports what every app imports first (the `research`
package, whose quiet hook wraps TensorFlow's import, research/quiet.py), then TensorFlow, Keras,
NumPy, OpenCV and Matplotlib, once; then forks a child for each `python -m MODULE ARGS` it is
asked to run.

Protocol, one JSON object a line: the request on stdin ({"argv": [...], "cwd", "env", "stdout",
"stderr"}, argv[0] == "-m"; a child's stdin is /dev/null); on the protocol stream, {"pid": N}
when the child has started, then {"returncode": N, "cpu": seconds} when it has exited (a
signal: -signum, as subprocess has it; its user + system CPU seconds).

Nothing here starts TensorFlow's runtime (no op, no device, no thread pool), so a child is, as
far as TensorFlow knows, a process that has just imported it: it configures its own devices,
precision and threads, from its own environment, as the app does in a fresh interpreter.
"""

import atexit
import gc
import json
import os
import runpy
import sys
import threading
import traceback

import research  # noqa: F401  (first, as in every app: its quiet hook wraps TensorFlow's import)
import absl.app  # noqa: E402,F401  (absl's own flags: defined once, as in a fresh process)
import cv2  # noqa: E402,F401
import keras  # noqa: E402,F401
import matplotlib.pyplot  # noqa: E402,F401
import numpy  # noqa: E402,F401
import tensorflow  # noqa: E402,F401
from PIL import Image  # noqa: E402,F401

_SITE_PATH = list(sys.path[1:])  # without this script's folder, which -m would not have


def _child(request: dict) -> int:
    """Becomes `python -m MODULE ARGS` in `cwd` with `env` and the given stdio files; returns
    its exit status."""
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):  # fd 0: /dev/null
        target = os.open(path, os.O_WRONLY)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *extra, *_SITE_PATH]
    module, args = request["argv"][1], request["argv"][2:]
    sys.argv = [module, *args]  # run_module puts the module's file name first
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # what the interpreter prints for an uncaught exception
        traceback.print_exc()
        return 1


def main() -> None:
    # Requests arrive on stdin and answers leave on a copy of stdout, so that a child's own
    # fds 0-2 can be pointed at its files without touching the protocol.
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    gc.freeze()  # the imports' objects stay out of the children's collections (and pages)
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            answers.close()
            code = _child(request)
            # The interpreter's exit, minus the tearing down of every module: that would touch
            # (and so copy) most of the server's memory, a CPU second a run. Python does not
            # promise finalisers at exit, only the threads' join and atexit.
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code & 0xFF)
        answers.write(json.dumps({"pid": pid}) + "\n")
        _, status, usage = os.wait4(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status),
                                  "cpu": usage.ru_utime + usage.ru_stime}) + "\n")


if __name__ == "__main__":
    main()
