"""less_cuda.eval.plots: each results schema becomes a figure of exactly its data (the lines' points, the heat maps'
cells, the panels and their titles), saved as a PNG, and plot_file dispatches on the file's content. Small inline
results; no model."""

from __future__ import annotations

import json

import math

import numpy
import pytest
from matplotlib.image import imread

from less_cuda.eval.plots import (
    bench_figure,
    passkey_figure,
    perplexity_figure,
    plot_bench,
    plot_file,
    plot_passkey,
    plot_perplexity,
)


def perplexity_entry(kind: str, budget: float, **perplexity: float) -> dict:
    return {"policy": {"kind": kind, "budget": budget, "recent": None, "sinks": 4}, "budget_fraction": budget,
            "budget_tokens": round(1024 * budget), "baseline_plus_budget": round(1024 * budget) + 9,
            "checkpoint": None, "perplexity": perplexity, "gap_closed": {}}  # fmt: skip


PERPLEXITY = {
    "kind": "perplexity", "form": "parallel", "model": "smollm2", "seq_len": 1024, "sequences": 8,
    "package_version": "0.1.0", "settings": {},
    "results": [
        perplexity_entry("h2o", 0.01, full=20.1, sparse=80.0, baseline_plus=60.0, less=30.0),
        perplexity_entry("h2o", 0.05, full=20.1, sparse=30.2, baseline_plus=28.0, less=24.0),
        perplexity_entry("h2o", 0.2, full=20.1, sparse=22.0, less=21.0),  # no Baseline+ at this budget
        perplexity_entry("lambda", 0.05, full=20.1, sparse=40.0, baseline_plus=35.0, less=26.0),
        perplexity_entry("lambda", 0.1, sparse=33.0, less=23.0),  # no full cache
    ],
}  # fmt: skip

PASSKEY = {
    "kind": "passkey", "model": "smollm2", "package_version": "0.1.0", "settings": {},
    "results": [
        {"method": method, "policy": policy, "budget": budget, "context_length": length, "depth": depth,
         "accuracy": accuracy, "trials": 4}
        for method, policy, budget, accuracy in [("full", None, None, 1.0), ("sparse", "h2o", 0.05, 0.25),
                                                 ("less", "h2o", 0.05, 0.75), ("less", "lambda", 64, 0.5)]
        for length in (512, 1024) for depth in (0.0, 0.5, 1.0)
        if (method, length, depth) != ("less", 1024, 1.0)  # cells not measured stay blank
    ],
}  # fmt: skip


def bench_entry(method: str, batch: int, kilo_tokens: int, tokens_per_s: float, kv_bytes=None) -> dict:
    """A trimmed end-to-end entry as `make bench` writes it; without kv_bytes, as files from before it did."""
    setting = f"batch {batch}, {kilo_tokens}k prompt" + ("s" if batch > 1 else "")
    info = {"prefill_s": 2.0, "decode_tokens_per_s": tokens_per_s}
    if kv_bytes is not None:
        info.update(kv_bytes=kv_bytes, batch=batch, context_length=1024 * kilo_tokens)
    return {"group": setting, "name": method, "fullname": f"benchmarks/test_generate.py::test_generate[{method}]",
            "params": {"setting": setting, "method": method}, "extra_info": info, "stats": {"mean": 1.0}}  # fmt: skip


KERNEL_ENTRY = {"group": "B=8 smollm2 heads 9/3/64", "name": "fused step", "fullname": "test_cpu_decode.py::x",
                "params": {"impl": "fused step"}, "extra_info": {}, "stats": {"mean": 0.01}}  # fmt: skip


def bench(with_bytes: bool) -> dict:
    full_bytes = {1: 24e6, 2: 400e6, 4: 800e6}
    entries = [KERNEL_ENTRY]  # not end to end: left out of the plot
    for batch, kilo, speeds in [(1, 1, (13.4, 14.1, 15.1)), (8, 2, (3.5, 7.3, 6.6)), (8, 4, (2.2, 10.3, 7.9))]:
        for method, speed, share in zip(("full", "sparse H2O", "LESS"), speeds, (1.0, 0.05, 0.06)):
            entries.append(bench_entry(method, batch, kilo, speed, full_bytes[kilo] * share if with_bytes else None))
    return {"machine_info": {"cpu": {"brand_raw": "AMD EPYC"}}, "benchmarks": entries}


def lines_of(ax) -> dict[str, list[tuple[float, float]]]:
    """Each labelled line of a panel as its (x, y) points."""
    return {line.get_label(): [tuple(map(float, xy)) for xy in line.get_xydata()] for line in ax.get_lines()}


def test_perplexity_figure_draws_each_method_at_its_budgets():
    h2o, lam = perplexity_figure(PERPLEXITY).axes
    assert (h2o.get_title(), lam.get_title()) == ("H2O", "Λ")
    assert lines_of(h2o) == {
        "full cache": [(0.0, 20.1), (1.0, 20.1)],  # a horizontal line across the panel (axes coordinates in x)
        "sparse": [(1.0, 80.0), (5.0, 30.2), (20.0, 22.0)],
        "Baseline+": [(1.0, 60.0), (5.0, 28.0)],  # none at 20%
        "LESS": [(1.0, 30.0), (5.0, 24.0), (20.0, 21.0)],
    }
    assert lines_of(lam) == {"full cache": [(0.0, 20.1), (1.0, 20.1)], "sparse": [(5.0, 40.0), (10.0, 33.0)],
                             "Baseline+": [(5.0, 35.0)], "LESS": [(5.0, 26.0), (10.0, 23.0)]}  # fmt: skip


def test_passkey_figure_has_a_heat_map_per_setting_with_each_cell_its_accuracy():
    panels = [ax for ax in passkey_figure(PASSKEY).axes if ax.images]  # the colour bar is an axes too
    titles = [ax.get_title() for ax in panels]
    assert titles == ["full cache", "sparse, H2O at 5%", "LESS, H2O at 5%", "LESS, Λ at 64 tokens"]
    for ax, accuracy in zip(panels, (1.0, 0.25, 0.75, 0.5)):
        grid = numpy.ma.filled(ax.images[0].get_array(), math.nan)  # rows: depths 0, 0.5, 1; columns: 512, 1024
        expected = numpy.full((3, 2), accuracy)
        if ax.get_title().startswith("LESS"):
            expected[2, 1] = math.nan  # (depth 1.0, 1024 tokens) was not measured: blank
        numpy.testing.assert_array_equal(grid, expected, err_msg=ax.get_title())


def test_bench_figure_draws_bytes_and_speed_per_method_and_batch():
    kv, speed = bench_figure(bench(with_bytes=True)).axes
    assert lines_of(kv)["full, batch 8"] == [(2048.0, 400e6), (4096.0, 800e6)]
    assert lines_of(kv)["LESS, batch 1"] == [(1024.0, 24e6 * 0.06)]
    assert lines_of(speed)["sparse H2O, batch 8"] == [(2048.0, 7.3), (4096.0, 10.3)]
    assert set(lines_of(speed)) == {f"{m}, batch {b}" for m in ("full", "sparse H2O", "LESS") for b in (1, 8)}
    (speed_only,) = bench_figure(bench(with_bytes=False)).axes  # files without kv_bytes: the speed panel alone
    assert lines_of(speed_only) == lines_of(speed)


def test_bench_figure_draws_a_second_model_as_its_own_lines():
    results = bench(with_bytes=True)
    for entry in results["benchmarks"][1:]:
        entry["extra_info"]["model"] = "smollm2"
    qwen = bench_entry("LESS", 1, 4, 2.5, kv_bytes=3e6)
    qwen["extra_info"]["model"] = "qwen2.5-coder-0.5b"
    results["benchmarks"].append(qwen)
    kv, speed = bench_figure(results).axes
    assert lines_of(speed)["LESS, batch 1, qwen2.5-coder-0.5b"] == [(4096.0, 2.5)]
    assert lines_of(speed)["LESS, batch 1, smollm2"] == [(1024.0, 15.1)]  # not joined with Qwen's point
    assert len(lines_of(kv)) == 7


def assert_drawn(png) -> None:
    """A real PNG of some size with varied pixels, not a blank canvas."""
    assert png.is_file() and png.stat().st_size > 5_000, png
    assert imread(png).std() > 0.05


@pytest.mark.parametrize("plot, results", [(plot_perplexity, PERPLEXITY), (plot_passkey, PASSKEY),
                                           (plot_bench, bench(with_bytes=True)),
                                           (plot_bench, bench(with_bytes=False))],
                         ids=["perplexity", "passkey", "bench", "bench-without-kv-bytes"])  # fmt: skip
def test_plot_draws_png(tmp_path, plot, results):
    png = plot(results, tmp_path / "out" / "figure.png")
    assert png == tmp_path / "out" / "figure.png"
    assert_drawn(png)


def test_bench_without_kv_bytes_has_only_the_speed_panel(tmp_path):
    # One panel instead of two: the figure is half as wide.
    with_bytes = imread(plot_bench(bench(with_bytes=True), tmp_path / "both.png"))
    speed_only = imread(plot_bench(bench(with_bytes=False), tmp_path / "speed.png"))
    assert speed_only.shape[1] == pytest.approx(with_bytes.shape[1] / 2, rel=0.05)


@pytest.mark.parametrize("results", [PERPLEXITY, PASSKEY, bench(with_bytes=True)], ids=["perplexity", "passkey",
                                                                                         "bench"])  # fmt: skip
def test_plot_file_dispatches_and_writes_beside_the_input(tmp_path, results):
    source = tmp_path / "results.json"
    source.write_text(json.dumps(results))
    png = plot_file(source)
    assert png == tmp_path / "results.png"
    assert_drawn(png)
    assert plot_file(source, tmp_path / "elsewhere.png") == tmp_path / "elsewhere.png"


@pytest.mark.parametrize("content, message", [
    ('{"kind": "latency"}', "found keys \\['kind'\\]"),
    ("[1, 2]", "found a JSON list"),
    ("not json", "not JSON"),
    (json.dumps({"benchmarks": [KERNEL_ENTRY]}), "no end-to-end generate benchmarks"),
], ids=["unknown-kind", "not-an-object", "not-json", "no-end-to-end-benchmarks"])  # fmt: skip
def test_plot_file_rejects_unknown_content(tmp_path, content, message):
    source = tmp_path / "bad.json"
    source.write_text(content)
    with pytest.raises(ValueError, match=f"bad.json: .*{message}"):
        plot_file(source)
    assert not (tmp_path / "bad.png").exists()
