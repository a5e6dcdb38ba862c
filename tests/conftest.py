"""Test session set-up: quiet TF logs and two logical CPU devices for replica tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite runs on the CPU, also on a GPU box (TF32 and float16 would break its float
# tolerances); RESEARCH_TESTS_ON_GPU=1 leaves the GPUs visible (BUILD.md, On a GPU box).
if os.environ.get("RESEARCH_TESTS_ON_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402


def pytest_configure(config):
    """Two logical CPU devices (MirroredStrategy tests need 2 replicas), set before anything
    initialises TensorFlow's devices: test modules are imported after this. Not in xdist's
    controller (`make test`), which runs no test: TensorFlow's import there (3-4 s) would
    only delay the workers' start. --timeline's rows are kept only by the process that writes
    them (xdist's controller, or the one process without xdist)."""
    global _TIMELINE
    if config.getoption("timeline") and not hasattr(config, "workerinput"):
        _TIMELINE = []
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


def pytest_collection_finish(session):
    """What the test modules imported (TensorFlow, Keras, research: about 330,000 objects)
    is moved out of the cyclic collector's reach once collected: it lives as long as the
    process, and every full collection scanned it all again. And a full collection comes
    after 50 of the middle generation's, not 10: the tests build graphs whose objects
    survive a while. Two training test modules in one process: 21 full collections took 7.1 s
    of its 107 CPU-s; frozen, 31 took 5.6 s; frozen and at 50, 9 took 3.5 s. The garbage
    waits longer meanwhile; each worker has gigabytes to spare."""
    import gc

    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 50)


@pytest.fixture(scope="session")
def two_replicas():
    # One MirroredStrategy per process: two strategies over the same devices can reuse
    # collective instance keys and abort each other's all-reduces (make_strategy keeps one).
    from research.training.strategy import make_strategy

    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    return strategy


@pytest.fixture(scope="session")
def syn(tmp_path_factory):
    """A learnable tiny CIFAR-like TFRecord folder (300 train, 50 test), shared read-only by
    the training, transfer, fault, multi-worker and lab tests."""
    import helpers

    d = tmp_path_factory.mktemp("syn") / "data"
    helpers.make_synthetic_tfrecords(str(d), n_train=300, n_test=50)
    return str(d)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup` (make test): a test marked `xdist_group(name)` gets the suffix
    `@name` on its node id, which is how xdist's scheduler keeps a group on one worker.
    pytest-xdist 3.8 writes it to `item._nodeid`, which pytest 9 no longer reads (a node's id
    is `item._id`), so without this every group was silently split between the workers and
    its module fixtures built on both. Does nothing where xdist's own suffix took."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # an older pytest: xdist's own suffix works there
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)


# --cpu-report=N: each test's CPU seconds (user + system of its worker process and of the
# processes it waited for, its warm app runs (tests/warm.py) included, over setup, call and
# teardown; a module fixture's cost lands on the first test that uses it), the N largest
# printed at the end, so the suite's CPU budget (it is CPU-bound on 2 cores:
# tests/README.md) can be spent where it shows.
def pytest_addoption(parser):
    parser.addoption("--cpu-report", type=int, default=0, metavar="N",
                     help="print the N tests that used the most CPU seconds")
    parser.addoption("--timeline", default="", metavar="PATH",
                     help="write one JSON line per test phase (worker, node id, phase, "
                          "start, stop, CPU seconds) to PATH, to see where the workers idle")


def _cpu_seconds() -> float:
    import resource

    import warm

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
            + warm.children_cpu)  # warm runs are the warm server's children


def _measuring(config) -> bool:
    """Each test's CPU is measured for --cpu-report and for --timeline's rows alike."""
    return bool(config.getoption("cpu_report") or config.getoption("timeline"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if _measuring(item.config):  # each phase: the CPU since the last mark
        now = _cpu_seconds()
        outcome.get_result().user_properties.append(("cpu_seconds", now - item._cpu_mark))
        item._cpu_mark = now


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _measuring(item.config):  # before any fixture of the test is set up
        item._cpu_mark = _cpu_seconds()


_CPU_BY_TEST: dict = {}
_TIMELINE: list | None = None  # --timeline's rows, in the process that writes them


def pytest_runtest_logreport(report):
    cpu = 0.0
    for key, value in getattr(report, "user_properties", ()):
        if key == "cpu_seconds":
            cpu += value
            _CPU_BY_TEST[report.nodeid] = _CPU_BY_TEST.get(report.nodeid, 0.0) + value
    if _TIMELINE is None:
        return
    node = getattr(report, "node", None)  # xdist's controller: the worker that ran it
    _TIMELINE.append({"worker": node.gateway.id if node is not None else "main",
                      "nodeid": report.nodeid, "when": report.when, "start": report.start,
                      "stop": report.stop, "cpu": round(cpu, 3)})


def pytest_sessionfinish(session):
    if _TIMELINE is not None:
        import json

        with open(session.config.getoption("timeline"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in _TIMELINE)


def pytest_terminal_summary(terminalreporter, config):
    n = config.getoption("cpu_report")
    if not n or not _CPU_BY_TEST:
        return
    ranked = sorted(_CPU_BY_TEST.items(), key=lambda kv: -kv[1])
    total = sum(_CPU_BY_TEST.values())
    terminalreporter.write_sep("=", f"CPU seconds per test: {total:,.0f} s over "
                               f"{len(ranked)} tests, the {min(n, len(ranked))} largest")
    for nodeid, secs in ranked[:n]:
        terminalreporter.write_line(f"{secs:8.1f} s  {100 * secs / total:5.1f}%  {nodeid}")
