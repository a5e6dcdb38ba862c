"""The extension records: each `Backbone` (research.model_options) and each `Method`
(research.explain.methods) is declared once and read everywhere; these check that what a
record claims is true of the thing it describes, and that docs/explain.md's generated table
is the records'."""

import inspect
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from research.model_options import APPLICATIONS, BACKBONES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_model_options_imports_without_keras():
    code = ("import sys, research.model_options as m; "
            "print(len(m.BACKBONES), 'keras' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.stdout.split() == [str(len(BACKBONES)), "False", "False"], out.stderr


@pytest.mark.parametrize("name", APPLICATIONS)
def test_backbone_record_matches_keras_source(name):
    """Preprocess mode, weight files and md5s as keras' own source has them."""
    from research.models import backbones

    b = BACKBONES[name]
    source = inspect.getsource(inspect.getmodule(backbones.application(b)))
    for md5 in (b.weights_md5, b.top_weights_md5):
        assert md5 is None or md5 in source, md5
    for f in (b.weights_file, b.top_weights_file):  # some are built from parts in keras
        assert f in source or f.split("_weights")[0].split("_notop")[0].split(".")[0] in source
    mode = re.search(r'mode="(\w+)"', source.split("def preprocess_input")[-1])
    assert b.preprocess == (mode.group(1) if mode else "none")


@pytest.mark.slow  # 16 s for all on 2 idle cores, 96 s when shared
@pytest.mark.parametrize("name", APPLICATIONS)
def test_backbone_record_matches_the_built_model(name):
    """The minimum size is keras' own, the Grad-CAM layer is the one find_layer picks by
    default, and every block name starts some layer (2-4 s a backbone on 2 idle cores)."""
    from research.explain import core
    from research.models import backbones

    b = BACKBONES[name]
    with pytest.raises(ValueError):
        backbones.applications_base(b, (b.min_size - 1,) * 2 + (3,), None)
    size = max(2 * b.min_size, 64)  # the last feature map more than 1x1, as at 224
    base = backbones.applications_base(b, (size, size, 3), None)
    assert core.find_layer(base)[0] == b.cam_layer
    names = [layer.name for layer in base.layers]
    for block in b.blocks:
        assert any(n.startswith(block) for n in names), block


def test_preprocess_layer_equals_keras_preprocess_input():
    """BackbonePreprocess (the record's mode) computes what each family's own
    preprocess_input does."""
    from research.models import backbones

    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    for name in APPLICATIONS:
        ctor = backbones.application(BACKBONES[name])
        module = sys.modules[ctor.__module__]
        got = backbones.BackbonePreprocess(name)(x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(module.preprocess_input(x.copy())),
                                   rtol=1e-6, atol=1e-4, err_msg=name)


def test_every_method_record_runs_with_its_options():
    """Each record's options are ExplainOptions fields and keyword arguments of its function;
    the names the explain app reads from source (before TensorFlow) are the records' names.
    (The app module itself is not imported: its absl flags would collide with other apps'
    in this process.)"""
    import dataclasses

    from research.explain import methods, source_values
    from research.explain.options import ExplainOptions

    fields = {f.name for f in dataclasses.fields(ExplainOptions)}
    assert source_values.record_names("methods", "METHODS") == methods.NAMES
    for m in methods.METHODS:
        assert (m.cam is None) != (m.run is None), m.name
        assert set(m.options.values()) <= fields, m.name
        fn = m.run if m.cam is None else None
        if fn is not None:
            params = inspect.signature(fn).parameters
            assert set(m.options) <= set(params), m.name
            assert ("layer" in params) == m.layer, m.name
        assert ExplainOptions().method_params(m.name).keys() == m.options.keys()
    with pytest.raises(Exception, match="unknown method 'nosuch'"):
        methods.find("nosuch")
