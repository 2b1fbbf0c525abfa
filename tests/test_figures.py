"""The report's figures: what they show and say (item 10 of issue 15)."""
import numpy as np
from matplotlib.colors import to_hex
import pytest

from dataset.labels import CLASS_NAMES, PALETTE
from reporting.report import class_legend_entries, curve_bands, plot_miou_curves, plot_qualitative


def test_curve_bands_are_the_mean_and_range_over_the_seeds():
    seeds = [{"A": [(0, 0.10), (4, 0.30)], "B": [(4, 0.5)]},
             {"A": [(0, 0.20), (4, 0.20)], "B": [(4, 0.7)]}]
    bands = curve_bands(seeds)
    assert bands["A"] == [(0, pytest.approx(0.15), 0.10, 0.20), (4, pytest.approx(0.25), 0.20, 0.30)]
    assert bands["B"] == [(4, pytest.approx(0.6), 0.5, 0.7)]


def test_miou_curves_say_how_many_seeds_use_whole_iterations_and_keep_single_points_visible(tmp_path):
    one_seed = [{"A": [(0, 0.1), (1, 0.2), (2, 0.3)], "B": [(2, 0.3)]}]
    figure = plot_miou_curves(one_seed, tmp_path / "one.png")
    axis = figure.axes[0]
    assert "one seed (seed 0), no spread" in axis.get_title()
    assert all(float(tick).is_integer() for tick in axis.get_xticks())  # no 0.5 iterations
    markers = [line.get_marker() for line in axis.get_lines()]
    assert len(set(markers)) == 2 and axis.get_lines()[1].get_fillstyle() == "none"  # B's lone point, hollow
    figure = plot_miou_curves(one_seed * 3, tmp_path / "three.png")
    assert "mean of 3 seeds, band: lowest to highest seed" in figure.axes[0].get_title()
    assert len(figure.axes[0].collections) == 2  # one band per method


def test_qualitative_figure_has_a_class_legend_that_names_black_as_ignore(tmp_path):
    entries = class_legend_entries()
    assert [name for name, _ in entries] == [*CLASS_NAMES, "ignore / unlabelled"]
    assert entries[0][1] == tuple(channel / 255 for channel in PALETTE[0]) and entries[-1][1] == (0.0, 0.0, 0.0)
    image = np.zeros((8, 16, 3), np.uint8)
    label = np.zeros((8, 16), np.uint8)
    figure = plot_qualitative([image], [label], {"ours": [label]}, tmp_path / "q.png")
    legend = figure.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == [name for name, _ in entries]
    assert "black: ignore" in legend.get_title().get_text()
    assert min(axis.title.get_fontsize() for axis in figure.axes) >= 12


def test_every_method_of_the_full_table_gets_its_own_colour_and_marker_pair(tmp_path):
    curves = [{f"method {index}": [(0, 0.1), (index + 1, 0.2)] for index in range(15)}]  # --methods all: 15 rows
    axis = plot_miou_curves(curves, tmp_path / "all.png").axes[0]
    styles = [(to_hex(line.get_color()), line.get_marker()) for line in axis.get_lines()]
    assert len(styles) == 15 and len({colour for colour, _ in styles}) == 15
    assert [text.get_text() for text in axis.get_legend().get_texts()] == list(curves[0])
