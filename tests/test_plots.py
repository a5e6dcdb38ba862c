"""The shared figure helpers: in a grid of several rows, no cell title runs into the images
above it (nor the figure's title into the first row), and heatmap figures carry a 0..1
colour bar."""

from types import SimpleNamespace

from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg

import helpers
from research import metrics, plots
from research.data import pipeline
from research.evaluation import report as reporting
from research.explain import render
from research.lab import figures
from research.training import record
from research.training.config import TrainConfig

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
MAPS = RNG.random((16, 8, 8))


def _drawn(fig):
    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]


def assert_titles_clear(fig):
    """No cell title overlaps any image cell (its own or the row above), and the figure's
    title overlaps no cell title."""
    renderer = _drawn(fig)
    axes = _image_axes(fig)
    assert len(axes) > 1
    boxes = [ax.get_window_extent(renderer) for ax in axes]
    titles = [ax.title.get_window_extent(renderer) for ax in axes if ax.get_title()]
    assert titles
    for t in titles:
        for b in boxes:
            assert not t.overlaps(b), (t, b)
    if fig.get_suptitle():
        sup = fig._suptitle.get_window_extent(renderer)
        for t in titles + boxes:
            assert not sup.overlaps(t), (sup, t)


def _colorbars(fig):
    return [ax for ax in fig.axes if not ax.images]


def assert_relevance_colorbar(fig):
    (bar,) = _colorbars(fig)
    assert bar.get_ylim() == (0.0, 1.0)
    assert bar.get_ylabel().startswith("relevance")


@pytest.mark.parametrize("n,ncols,cell,titles", [
    (16, 8, 1.6, lambda i: f"automobile p=0.{i:02d}"),
    (12, 6, 1.2, lambda i: f"airplane\n#{i}"),          # two-line titles (the data figure)
    (64, 16, 0.9, str)])                                 # a layer's activations
def test_image_grid_rows_leave_room_for_titles(n, ncols, cell, titles):
    fig = plots.image_grid(IMAGES[np.arange(n) % 16], [titles(i) for i in range(n)],
                           ncols=ncols, cell=cell, title="augmented training inputs")
    assert len(_image_axes(fig)) == n
    assert_titles_clear(fig)
    assert not _colorbars(fig)  # a grid of photos has no colour scale
    renderer = _drawn(fig)
    second = fig.axes[ncols]  # the first cell of row 2: its title sits below row 1's images
    above = fig.axes[0].get_window_extent(renderer)
    assert second.title.get_window_extent(renderer).y1 < above.y0


def test_overlay_and_class_grids_have_one_colorbar_and_clear_titles():
    grid = render.overlay_grid(IMAGES, MAPS, [f"cat p=0.{i:02d}" for i in range(16)],
                               title="lab_scratch: Grad-CAM at step 8")
    assert_titles_clear(grid)
    assert_relevance_colorbar(grid)
    classes = render.class_comparison_figure(IMAGES[:3], [MAPS[:3], MAPS[3:6]],
                                             [["cat"] * 3, ["dog\np=0.1"] * 3], title="run x")
    assert_titles_clear(classes)
    assert_relevance_colorbar(classes)


def test_three_panel_figure_has_a_colorbar():
    big = np.kron(IMAGES[0], np.ones((4, 4, 1), np.uint8))
    colored, overlay = render.overlay_heatmap(big, MAPS[0])
    fig = render.three_panel_figure(big, colored, overlay, "run lab_scratch: a.png: gradcam")
    assert [ax.get_title() for ax in _image_axes(fig)] == ["original", "heatmap", "overlay"]
    assert_relevance_colorbar(fig)
    assert_titles_clear(fig)


def test_heatmap_colorbar_is_the_overlay_colours():
    colored, _ = render.overlay_heatmap(np.zeros((1, 256, 3), np.uint8),
                                        np.linspace(0, 1, 256)[None])
    np.testing.assert_allclose(render.HEATMAP_CMAP(np.linspace(0, 1, 256))[:, :3] * 255,
                               colored[0], atol=1.0)


def test_side_by_side_rows_leave_room_for_titles():
    res = {run: SimpleNamespace(maps=MAPS[:2], probabilities=np.array([0.8, 0.1]),
                                layer="conv3")
           for run in ("lab_scratch", "lab_transfer_scratch_fine_tune_src")}
    fig = figures.side_by_side(IMAGES[:2], ["cat (test #3)\ntabby", "dog (test #9)"], res,
                               "gradcam", "on 2 test images")
    assert len(_image_axes(fig)) == 2 * 5
    assert_titles_clear(fig)
    assert_relevance_colorbar(fig)


def _titles(fig):
    return [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes]


def test_every_evaluation_figure_names_its_run(syn):
    test = pipeline.take_examples(syn, "test")
    labels = test["label"].astype(np.float32)
    scores = np.random.default_rng(1).random(len(labels)).astype(np.float32)
    raw = {"labels": labels, "scores": scores, "class_ids": test["class_id"],
           "index": test["index"]}
    report = {"split": "test", **metrics.detection_report(labels, scores, 0.5)}
    cfg = TrainConfig(data_dir=syn, run_name="lab_transfer_scratch_fine_tune_src")
    figs = reporting.eval_figures(cfg, report, raw, worst=12)
    assert set(figs) == {"test_roc_pr.png", "test_confusion.png",
                         "test_worst_false_positives.png", "test_worst_false_negatives.png"}
    for name, fig in figs.items():
        assert any(cfg.run_name in t for t in _titles(fig)), (name, _titles(fig))
    assert_titles_clear(figs["test_worst_false_positives.png"])  # 12 cells: two rows
    renderer = _drawn(figs["test_confusion.png"])
    (ax,) = figs["test_confusion.png"].axes  # the long run name fits the figure
    assert ax.title.get_window_extent(renderer).x1 <= figs["test_confusion.png"].bbox.x1


def test_worst_mistakes_show_the_images_scored_when_a_run_reads_a_subset(syn):
    """Rows of the scored arrays are not split positions under --eval_fraction: each cell
    must show the image whose score and class its title gives."""
    test = pipeline.take_examples(syn, "test")
    keep = np.arange(len(test["label"])) % 3 == 1  # a subset, as --eval_fraction reads
    rows = np.flatnonzero(keep)
    labels = test["label"][rows].astype(np.float32)
    scores = np.random.default_rng(2).random(len(rows)).astype(np.float32)
    raw = {"labels": labels, "scores": scores, "class_ids": test["class_id"][rows],
           "index": test["index"][rows]}
    report = {"split": "test", **metrics.detection_report(labels, scores, 0.5)}
    shown = []
    real_grid = plots.image_grid

    def grid(images, titles, **kw):
        shown.extend(zip(images, titles))
        return real_grid(images, titles, **kw)

    cfg = TrainConfig(data_dir=syn, run_name="subset")
    with mock.patch.object(plots, "image_grid", grid):
        reporting.eval_figures(cfg, report, raw, worst=6)
    assert shown
    by_image = {test["image"][p].tobytes(): p for p in test["index"][rows]}
    names = pipeline.load_manifest(syn)["class_names"]
    for image, title in shown:
        position = by_image[np.asarray(image).tobytes()]  # a scored image, not another one
        assert title.startswith(names[test["class_id"][position]] + " ")


def test_tensorboard_figures_name_their_run(syn, tmp_path, monkeypatch):
    shown = {}
    monkeypatch.setattr(record, "image_summary", lambda name, fig, step: shown.update(
        {name: fig}))
    cfg = helpers.tiny_config(syn, tmp_path, run_name="my_run")
    writer = tf.summary.create_file_writer(str(tmp_path / "tb"))
    record.log_sample_inputs(cfg, pipeline.load_manifest(syn), writer)
    labels = np.array([0, 1, 1, 0, 1], np.float32)
    scores = np.array([0.1, 0.8, 0.3, 0.6, 0.9], np.float32)
    result = SimpleNamespace(loss=0.5, accuracy=0.6, class_accuracy=None, split="val",
                             labels=labels, scores=scores)
    report = metrics.detection_report(labels, scores)
    record.log_eval(writer, result, report, 8, ["other", "cat"], cfg.run_name)
    assert set(shown) == {"sample_inputs", "confusion_matrix", "roc_pr_curves"}
    for name, fig in shown.items():
        assert any("my_run" in t for t in _titles(fig)), (name, _titles(fig))
    assert_titles_clear(shown["sample_inputs"])  # 16 inputs: two rows


def test_a_figure_laid_out_when_built_is_drawn_once_and_saved_as_before():
    """figure_to_png drops the placeholder engine tight_layout leaves: savefig then draws the
    figure once, not twice, and writes the bytes it wrote with the placeholder kept."""
    import io

    scores, labels = RNG.random(200), RNG.integers(0, 2, 200)
    figs = [metrics.roc_pr_figure(labels, scores, "run") for _ in range(2)]
    kept = io.BytesIO()
    figs[0].savefig(kept, format="png", dpi=100)
    with mock.patch.object(type(figs[1]), "draw", autospec=True,
                           side_effect=type(figs[1]).draw) as draw:
        png = plots.figure_to_png(figs[1])
    assert draw.call_count == 1
    assert png == kept.getvalue()
