"""Flags derived from dataclasses, and the apps' numeric flag checks (one line per error,
before any work)."""

import dataclasses

import pytest
from absl import flags

import warm
from research.apps import config_flags
from research.fields import setting


@dataclasses.dataclass
class Options:
    size: int = setting(3, "a size", ge=1)
    rate: float | None = setting(None, "a rate", ge=0, le=1)
    widths: tuple[int, ...] = dataclasses.field(default=(8, 16), metadata={"help": "w"})
    mode: str = dataclasses.field(default="a", metadata={"help": "m", "choices": ("a", "b")})
    hidden: dict = dataclasses.field(default_factory=dict, metadata={"flag": False})


def test_flags_round_trip_through_the_dataclass():
    fv = flags.FlagValues()
    names = config_flags.define_flags(Options, flag_values=fv)
    assert names == ["size", "rate", "widths", "mode"]
    fv(["prog", "--size=5", "--widths=1,2,3", "--mode=b"])
    expected = Options(5, None, (1, 2, 3), "b")
    assert Options(**config_flags.values_from_flags(Options, fv)) == expected
    fv["widths"].value = ["1", "x"]
    with pytest.raises(config_flags.FlagValueError, match="--widths"):
        config_flags.values_from_flags(Options, fv)


def test_numeric_flag_errors_name_each_flag():
    """Ranges come from the field (derived flags) or from the definition (hand-made ones)."""
    fv = flags.FlagValues()
    config_flags.define_flags(Options, flag_values=fv)
    config_flags._ranged(flags.DEFINE_integer, "count", 2, "n", gt=0, flag_values=fv)
    fv(["prog", "--size=0", "--rate=nan", "--count=0"])
    assert config_flags.range_errors(fv) == [
        "--size: must be >= 1, got 0", "--rate: must be in [0, 1], got nan",
        "--count: must be > 0, got 0"]
    fv(["prog", "--size=1", "--rate=0.5", "--count=1"])
    assert config_flags.range_errors(fv) == []


@dataclasses.dataclass
class NetAOptions:
    widths: tuple[int, ...] = dataclasses.field(default=(1, 2), metadata={"help": "A widths"})
    depth: int = dataclasses.field(default=3, metadata={"help": "depth"})


@dataclasses.dataclass
class NetBOptions:
    widths: tuple[int, ...] = dataclasses.field(default=(5, 6), metadata={"help": "B widths"})
    depth: int = dataclasses.field(default=3, metadata={"help": "depth"})


def test_option_flags_shared_by_two_models_keep_each_models_default():
    fv = flags.FlagValues()
    for cls in (NetAOptions, NetBOptions):
        config_flags.define_flags(cls, flag_values=fv)
    assert "neta 1,2; netb 5,6" in fv["widths"].help
    fv(["prog"])
    assert config_flags.values_from_flags(NetAOptions, fv) == {"widths": (1, 2), "depth": 3}
    assert config_flags.values_from_flags(NetBOptions, fv) == {"widths": (5, 6), "depth": 3}
    fv(["prog", "--widths=7"])
    assert config_flags.values_from_flags(NetAOptions, fv)["widths"] == (7,)
    assert config_flags.values_from_flags(NetBOptions, fv)["widths"] == (7,)


def test_recipe_flagfiles_name_only_real_flags(syn, tmp_path):
    """Each shipped recipe parses in the train app and gives a valid config."""
    import glob
    import os
    import sys

    recipes = glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "research", "recipes",
                                     "*.flags"))
    assert recipes
    code = ("import sys\nfrom absl import flags\nfrom research.apps import train\n"
            "flags.FLAGS(sys.argv)\ncfg = train.config_from_flags()\ncfg.validate()\n"
            "print(cfg.model, cfg.batch_size, cfg.bias_lr_scale, cfg.model_options)\n")
    needs = {"photos_from_cifar.flags": ["--weights=lab_scratch"]}  # its backbone: a run
    for path in recipes:
        res = warm.run([sys.executable, "-c", code, f"--flagfile={path}", f"--data_dir={syn}",
                        "--run_name=r", *needs.get(os.path.basename(path), [])], timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        if path.endswith("fast_cifar10.flags"):
            assert res.stdout.startswith("fast 1024 64.0"), res.stdout
