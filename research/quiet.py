"""Quiet TensorFlow on machines without a GPU, in one place for every app and library user.

`import tensorflow` and its first look at the devices print, from C++ and before absl's
logging is set up (so TF_CPP_MIN_LOG_LEVEL cannot stop them), a handful of lines that say
nothing on a CPU machine: CUDA stubs not found, `All log messages before
absl::InitializeLog() ...`, oneDNN's note, the CPU-feature guard. `install()` (run by
`research/__init__.py`) adds an import hook: the first import of tensorflow runs with the
process's stderr captured (`captured`), and every captured line except those known ones is
replayed, so a real error still shows. The import lists no device: CUDA starts at the first
device listing, which research/devices.py makes, under the same capture, once it has placed
the devices (and quotes CUDA's reason when a GPU was expected and none is found). It also
keeps TensorFlow's own Python logger at WARNING, and drops the per-checkpoint 'Sharding
callback duration' INFO line TensorFlow writes through absl's logger. Nothing is imported here
until tensorflow is.

`TF_CPP_MIN_LOG_LEVEL=0` (asking for everything) turns the filter off.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile

NOISE = re.compile(
    r"cudart_stub\.cc|cuda_platform\.cc|cuInit|cuda_executor|cuda drivers|"
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
    r"cpu_feature_guard\.cc|^To enable the following instructions|rebuild TensorFlow with|"
    r"TF-TRT Warning|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already "
    r"registered|absl::InitializeLog\(\) is called are written to STDERR")


def wanted() -> bool:
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") not in ("0",)


@contextlib.contextmanager
def captured():
    """Runs the block with the process's stderr (fd 2, where TensorFlow's C++ writes) captured;
    yields a list that holds the captured lines once the block ends. Lines that are known
    noise are dropped only by the caller (`replay`)."""
    lines: list[str] = []
    saved, capture = os.dup(2), tempfile.TemporaryFile()
    sys.stderr.flush()
    os.dup2(capture.fileno(), 2)
    try:
        yield lines
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        capture.seek(0)
        text = capture.read().decode("utf-8", "replace")
        capture.close()
        lines.extend(line for line in text.splitlines() if line.strip())


def replay(lines: list[str]) -> None:
    """Writes the captured lines that are not known noise back to stderr."""
    kept = [line for line in lines if not NOISE.search(line)]
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if not wanted():  # everything asked for: no capture
            with _no_device_listing_at_app_start():
                self.loader.exec_module(module)
            return
        lines: list[str] = []
        try:
            with captured() as lines, _no_device_listing_at_app_start():
                self.loader.exec_module(module)
                logging.getLogger("tensorflow").setLevel(logging.WARNING)
        finally:
            replay(lines)


# `import tensorflow` imports its test helper tensorflow.python.distribute.combinations,
# which registers absl.app.call_after_init(_set_total_phsyical_gpus): it lists the GPUs when
# an absl app starts, or at once if the app has started. That starts CUDA before an app has
# placed its devices (research/devices.py), so CUDA_VISIBLE_DEVICES set then has no effect.
# The helper only counts GPUs for TensorFlow's own parameterised tests: it is not registered.
_TF_TEST_HELPER = "tensorflow.python.distribute.combinations"


@contextlib.contextmanager
def _no_device_listing_at_app_start():
    from absl import app

    register = app.call_after_init

    def call_after_init(callback):
        if getattr(callback, "__module__", None) != _TF_TEST_HELPER:
            register(callback)

    app.call_after_init = call_after_init
    try:
        yield
    finally:
        app.call_after_init = register


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the rest of tensorflow imports as usual
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


# INFO lines TensorFlow writes through absl's logger (so at our apps' verbosity): one per
# checkpoint save, and two per SavedModel export (its signature's captured variables, the
# fingerprint file).
ABSL_NOISE = re.compile(r"^Sharding callback duration|^Function `\w+` contains input name\(s\)"
                        r"|^Writing fingerprint to")
# TensorFlow's retracing heuristic counts the traces of every tf.function made from the same
# code: a process that trains or scores several models (the lab, compare) builds one train
# loop and one eval step per model, and each traces once; an Explainer compiles each of its
# functions once per model (and input size), and the lab explains several models. That is
# expected, not a retracing bug, so for these alone the warning is dropped; any other
# function's still shows.
RETRACING_EXPECTED = re.compile(
    r"calls to <function (make_eval_step\.<locals>\.eval_step|make_train_loop\.<locals>\."
    r"train_loop|Explainer\.)")


class _AbslNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not ABSL_NOISE.search(record.getMessage())


class _ExpectedRetracing(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not RETRACING_EXPECTED.search(record.getMessage())


def install() -> None:
    """Adds the hook unless tensorflow is imported already (with all output wanted, it only
    keeps TensorFlow's import from listing the devices)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if wanted():
        _install_filters()
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())


def _install_filters() -> None:
    # absl.logging must make the "absl" logger itself (an ABSLLogger, whose caller lookup
    # skips absl's own frames): made here first as a plain Logger, every line would name
    # absl's logging/__init__.py instead of the module that logged.
    from absl import logging as absl_logging

    absl_logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _AbslNoise) for f in absl_logger.filters):
        absl_logger.addFilter(_AbslNoise())
    tf_logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _ExpectedRetracing) for f in tf_logger.filters):
        tf_logger.addFilter(_ExpectedRetracing())
