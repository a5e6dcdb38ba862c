"""What every app shares about its flags: the flags derived from dataclass fields
(research/dataclass_flags.py) on absl's global FLAGS, one-line flag errors (`parse`, `fail`),
and the flags several apps define (devices, images, exports, train's own)."""

from __future__ import annotations

import sys

from absl import app, flags

from research import dataclass_flags, runs
from research.data import imaging
from research.dataclass_flags import FlagValueError, flag_fields  # noqa: F401 (the apps' names)
from research.errors import UserError
from research.fields import bounds, range_error

HELP_FLAGS = ("--help", "-help", "--helpshort", "--helpfull", "-?", "-h")


def define_flags(cls, skip=(), flag_values=flags.FLAGS, module_name: str | None = None
                 ) -> list[str]:
    """dataclass_flags.define_flags on the app's FLAGS; the flags are the calling app's."""
    return dataclass_flags.define_flags(cls, flag_values, skip,
                                        module_name or _module_name(sys._getframe(1)))


def values_from_flags(cls, flag_values=flags.FLAGS, skip=()) -> dict:
    """dataclass_flags.values_from_flags from the app's FLAGS."""
    return dataclass_flags.values_from_flags(cls, flag_values, skip)


def _ranged(define, name, default, help_text, ge=None, gt=None, le=None, lt=None,
            flag_values=flags.FLAGS, module_name: str | None = None):
    define(name, default, help_text, flag_values=flag_values, module_name=module_name)
    flag_values[name]._range = bounds(ge=ge, gt=gt, le=le, lt=lt)


def _module_name(frame) -> str:
    """absl's name for the module of `frame` (the main module goes by sys.argv[0])."""
    name = frame.f_globals["__name__"]
    return sys.argv[0] if name == "__main__" else name


def _caller() -> str:
    """The module that called define_*: the flag is that app's (its --help lists it)."""
    return _module_name(sys._getframe(2))


def define_integer(name: str, default, help_text: str, **limits) -> None:
    """DEFINE_integer with its range (ge/gt/le/lt) declared beside it, checked by `parse`."""
    _ranged(flags.DEFINE_integer, name, default, help_text, module_name=_caller(), **limits)


def define_float(name: str, default, help_text: str, **limits) -> None:
    """DEFINE_float with its range (ge/gt/le/lt) declared beside it, checked by `parse`."""
    _ranged(flags.DEFINE_float, name, default, help_text, module_name=_caller(), **limits)


def range_errors(flag_values=flags.FLAGS) -> list[str]:
    """'--flag: must be ..., got v' for every set flag outside its declared range."""
    errors = []
    for name in flag_values:
        flag = flag_values[name]
        r = getattr(flag, "_range", None)
        if r is not None and flag.value is not None and name == flag.name:  # no short alias
            problem = range_error(flag.value, r)
            if problem:
                errors.append(f"--{name}: {problem}")
    return errors


def parse(argv: list[str]) -> list[str]:
    """app.run's flags parser: `--help` prints the app's flags and exits 0; a flag absl
    cannot parse (an unknown flag, an enum value that is not one of its choices, a number
    that is not one) and a number outside its range are one line each, `error: ...`, exit 1,
    before any work."""
    try:
        rest = flags.FLAGS(argv)
    except SystemExit:
        if any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        sys.exit(f"error: {e}")
    errors = range_errors(flags.FLAGS)
    if errors:
        sys.exit("\n".join(f"error: {e}" for e in errors))
    if "max_image_pixels" in flags.FLAGS:  # one setting for every image this process reads
        imaging.MAX_IMAGE_PIXELS = flags.FLAGS.max_image_pixels
    return rest


def fail(e: BaseException) -> None:
    """Ends an app on a UserError: its message as one line, and its exit status (1, or the
    error's own: 74 for a full disk)."""
    print(f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_status", 1))


def define_device_flags() -> None:
    """--gpu_memory_growth, for the apps that may run on a GPU (research/devices.py); once
    per process (a test or a tool may import several apps)."""
    if "gpu_memory_growth" in flags.FLAGS:
        return
    flags.DEFINE_bool("gpu_memory_growth", True, "Take GPU memory as it is needed (so evaluate, "
                      "explain or TensorBoard can share a GPU with a training); false: all of "
                      "every visible GPU at once.", module_name=_caller())


def setup_devices(strategy: str = "auto", cpu_replicas: int = 0):
    """Places the devices before TensorFlow touches one (research.devices.setup), with the
    app's --gpu_memory_growth; a device problem is one line."""
    from research import devices

    try:
        return devices.setup(flags.FLAGS.gpu_memory_growth, strategy, cpu_replicas)
    except UserError as e:
        fail(e)


def run(main) -> None:
    """Starts an app: our flag parser, then `main`."""
    app.run(main, flags_parser=parse)


def define_train_flags() -> None:
    """Every train flag (TrainConfig's fields and every model's options), for the train app and
    the apps that run trainings (sweep): the definitions the recipe reader uses too."""
    from research.training import recipes

    recipes.define_train_flags(flags.FLAGS, _caller())


def train_config_from_flags(flag_values=flags.FLAGS):
    """The TrainConfig the train flags describe (its model's options from their flags)."""
    from research.training import recipes

    return recipes.config_from_flags(flag_values)


def define_max_image_pixels() -> None:
    """--max_image_pixels: the largest image (width x height, read from its header) an app
    decodes; above it an image is refused in one line, as PIL's DecompressionBombError.
    Once per process (a test or a tool may import several apps)."""
    if "max_image_pixels" in flags.FLAGS:
        return
    _ranged(flags.DEFINE_integer, "max_image_pixels", imaging.DEFAULT_MAX_IMAGE_PIXELS,
            "Largest image decoded, in pixels (width x height from its header, read before "
            "decoding); a bigger one is refused (skipped in a source) in one line naming it. "
            "The default is PIL's.", ge=1, module_name=_caller())


def define_image_flags(help_text: str) -> None:
    """--images (a comma-separated list) and --images_from (a file of paths, one a line: the
    way to give a path that holds a comma)."""
    module = _caller()
    flags.DEFINE_list("images", None, help_text, module_name=module)
    flags.DEFINE_string("images_from", None, "A text file of image paths (files, folders or "
                        "globs as --images), one a line; for paths with a comma in them, "
                        "which --images would split.", module_name=module)


def image_paths(flag_values=flags.FLAGS) -> list[str]:
    """--images, then the lines of --images_from (blank lines skipped)."""
    paths = [p for p in flag_values.images or [] if p]
    path = flag_values.images_from
    if path:
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                paths += [line.rstrip("\r\n") for line in f if line.strip()]
        except OSError as e:
            raise UserError(f"--images_from: cannot read {path} ({e.strerror})") from None
    return paths


def define_export_flags() -> None:
    """--model / --run_name and --checkpoint_dir: the export an app reads (predict, export)."""
    module = _caller()
    flags.DEFINE_string("model", None, "An exported model.keras (metadata.json beside it).",
                        module_name=module)
    flags.DEFINE_string("run_name", None, "Instead of --model: the training run whose export "
                        "to use.", module_name=module)
    flags.DEFINE_string("checkpoint_dir", runs.CHECKPOINT_DIR,
                        "Parent folder of training runs (with --run_name).", module_name=module)


def export_path(flag_values=flags.FLAGS) -> tuple[str, str]:
    """(the model.keras that --model or --run_name names, that flag); exactly one of them
    must be given (UserError otherwise)."""
    if (flag_values.model is None) == (flag_values.run_name is None):
        raise UserError("--model, --run_name: give exactly one")
    if flag_values.model:
        return flag_values.model, "--model"
    return runs.exported_model_path(flag_values.checkpoint_dir, flag_values.run_name), \
        "--run_name"
