"""The shared figure helpers: in a grid of several rows, no cell title runs into the images
above it (nor the figure's title into the first row), and heatmap figures carry a 0..1
colour bar."""

from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from research import plots
from research.explain import render
from research.lab import figures

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
