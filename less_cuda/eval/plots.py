"""Results JSON files as PNG figures: perplexity against budget, passkey accuracy and task-suite scores against budget
(written by `less-cuda eval`), and KV bytes and decode speed against context length (`make bench`'s pytest-benchmark JSON).

matplotlib is imported inside the functions, so `import less_cuda` never needs it. Figures are drawn on a bare
`Figure` with the Agg canvas: no display, and no pyplot registry holding figures that would need closing.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, Path]

METHOD_LABELS = {"full": "full cache", "sparse": "sparse", "baseline_plus": "Baseline+", "less": "LESS"}
POLICY_LABELS = {"h2o": "H2O", "lambda": "Λ"}
# "batch 8, 2k prompts": how the end-to-end benchmarks name a setting, for files from before extra_info held it.
SETTING = re.compile(r"batch (\d+), (\d+)k prompt")


def _figure(panels: int, columns: int, panel_size: tuple[float, float] = (5.0, 3.8)):
    """A figure with `panels` axes in rows of `columns`, and the flat list of those axes (unused cells removed)."""
    from matplotlib.figure import Figure

    if panels == 0:
        raise ValueError("the results hold no entries to plot")
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(columns * panel_size[0], rows * panel_size[1]), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for unused in axes[panels:]:
        figure.delaxes(unused)
    return figure, axes[:panels]


def _save(figure, path: PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(path)
    return path


def _log_axis_ticks(axis, values, label) -> None:
    """Tick a log axis at exactly the values measured, labelled as `label(value)`, instead of at powers of ten."""
    from matplotlib.ticker import FixedLocator, NullLocator

    values = sorted(set(values))
    axis.set_major_locator(FixedLocator(values))
    axis.set_minor_locator(NullLocator())
    axis.set_ticklabels([label(v) for v in values])


def _order(value: Optional[str], known) -> tuple:
    """Sort key: the `known` names in their order, then the others by name (None, as for the full cache, first)."""
    known = list(known)
    if value is None:
        return (-1, "")
    return (known.index(value) if value in known else len(known), value)


def perplexity_figure(results: dict):
    """The Figure of perplexity against the budget (% of the sequence, log scale) for each method present, one panel
    per policy; the full cache, which has no budget, is a horizontal line. `results` is `less-cuda eval`'s perplexity
    JSON."""
    from matplotlib.ticker import LogFormatter

    by_policy = defaultdict(list)
    for entry in results["results"]:
        by_policy[entry["policy"]["kind"]].append(entry)
    policies = sorted(by_policy, key=lambda policy: _order(policy, POLICY_LABELS))
    figure, axes = _figure(len(policies), len(policies))
    for ax, policy in zip(axes, policies):
        entries = sorted(by_policy[policy], key=lambda e: e["budget_fraction"])
        # Every entry scores the same full-cache model on the same sequences: one value, drawn once.
        full = next((e["perplexity"]["full"] for e in entries if "full" in e["perplexity"]), None)
        if full is not None:
            ax.axhline(full, color="black", linestyle="--", label=METHOD_LABELS["full"])
        for method in ("sparse", "baseline_plus", "less"):
            points = [(100 * e["budget_fraction"], e["perplexity"][method])
                      for e in entries if method in e["perplexity"]]  # fmt: skip
            if points:
                ax.plot(*zip(*points), marker="o", label=METHOD_LABELS[method])
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Plain numbers (30, not 3×10¹) on the major and, within a decade or two, the minor ticks.
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
        _log_axis_ticks(ax.xaxis, [100 * e["budget_fraction"] for e in entries], lambda v: f"{v:.2g}%")
        ax.set_title(POLICY_LABELS.get(policy, policy))
        ax.set_xlabel("budget (% of the sequence)")
        ax.set_ylabel("perplexity")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    figure.suptitle(f"Perplexity, {results['form']} form: {results['model']}, {results['sequences']} sequences of "
                    f"{results['seq_len']} tokens")  # fmt: skip
    return figure


def passkey_figure(results: dict):
    """The Figure of passkey accuracy heat maps, depth (y) by context length (x), one per (method, policy, budget),
    annotated with the accuracy on a fixed 0..1 colour range. Rows repeating a cell are pooled, weighted by their
    trials."""
    correct, trials = defaultdict(float), defaultdict(int)
    for row in results["results"]:
        cell = (row["method"], row["policy"], row["budget"], row["depth"], row["context_length"])
        correct[cell] += row["accuracy"] * row["trials"]
        trials[cell] += row["trials"]
    panels = sorted({cell[:3] for cell in trials},
                    key=lambda p: (_order(p[0], METHOD_LABELS), _order(p[1], POLICY_LABELS), p[2] or 0.0))
    # One grid of depths and lengths for every panel, so that the same cell sits in the same place in each.
    depths = sorted({cell[3] for cell in trials})
    lengths = sorted({cell[4] for cell in trials})
    panel_size = (0.9 * len(lengths) + 2.0, 0.5 * len(depths) + 1.5)  # room for each cell's annotation
    figure, axes = _figure(len(panels), min(len(panels), 3), panel_size)
    for ax, (method, policy, budget) in zip(axes, panels):
        grid = [[math.nan] * len(lengths) for _ in depths]
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                cell = (method, policy, budget, depth, length)
                if trials[cell]:
                    grid[i][j] = correct[cell] / trials[cell]
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("passkey depth")
        title = METHOD_LABELS.get(method, method)
        if policy is not None:
            # As Policy reads a budget: a float is a fraction of the context, an int a token count.
            at = f"{100 * budget:g}%" if isinstance(budget, float) else f"{budget} tokens"
            title += f", {POLICY_LABELS.get(policy, policy)} at {at}"
        ax.set_title(title)
    figure.colorbar(image, ax=axes, label="accuracy")
    figure.suptitle(f"Passkey retrieval accuracy: {results['model']}")
    return figure


def _bench_entry(benchmark: dict) -> tuple[str, int, int]:
    """(method, batch, context length) of an end-to-end benchmark; older files have these in the setting only."""
    info, params = benchmark["extra_info"], benchmark.get("params") or {}
    method = params.get("method", benchmark["name"])
    if "batch" in info and "context_length" in info:
        return method, info["batch"], info["context_length"]
    setting = SETTING.search(params.get("setting", benchmark.get("group") or ""))
    if setting is None:
        raise ValueError(f"benchmark {benchmark['fullname']!r} records no batch and context length, and its setting "
                         f"is not of the form 'batch B, Nk prompts'")  # fmt: skip
    return method, int(setting.group(1)), 1024 * int(setting.group(2))


def bench_figure(results: dict):
    """The Figure of KV bytes held (log scale) and decode tokens/s against context length, one line per method and
    batch size, from the end-to-end generate benchmarks in a pytest-benchmark JSON (`make bench`). Files from before
    the benchmarks recorded `kv_bytes` get the decode panel only."""
    lines = defaultdict(list)  # (method, batch, model) -> [(context length, extra_info)]
    for benchmark in results["benchmarks"]:
        if "decode_tokens_per_s" in benchmark.get("extra_info", {}):
            method, batch, context_length = _bench_entry(benchmark)
            model = benchmark["extra_info"].get("model", "")  # older files name none: one model
            lines[method, batch, model].append((context_length, benchmark["extra_info"]))
    if not lines:
        raise ValueError("no end-to-end generate benchmarks (extra_info.decode_tokens_per_s) in the results")
    measures = [("decode_tokens_per_s", "decode tokens/s per row", "linear")]
    if any("kv_bytes" in info for points in lines.values() for _, info in points):
        measures.insert(0, ("kv_bytes", "KV cache bytes held", "log"))
    figure, axes = _figure(len(measures), len(measures))
    methods = list(dict.fromkeys(method for method, _, _ in lines))
    series = sorted({(model, batch) for _, batch, model in lines})  # one marker per (model, batch)
    several_models = len({model for model, _ in series}) > 1
    colours = {method: f"C{i}" for i, method in enumerate(methods)}
    markers = {key: "osD^v"[i % 5] for i, key in enumerate(series)}
    lengths = [length for points in lines.values() for length, _ in points]
    for ax, (key, label, scale) in zip(axes, measures):
        for method, batch, model in sorted(lines, key=lambda line: (methods.index(line[0]), line[2], line[1])):
            xy = sorted((length, info[key]) for length, info in lines[method, batch, model] if key in info)
            if xy:
                name = f"{method}, batch {batch}" + (f", {model}" if several_models and model else "")
                ax.plot(*zip(*xy), color=colours[method], marker=markers[model, batch], label=name)
        ax.set_xscale("log", base=2)
        _log_axis_ticks(ax.xaxis, lengths, str)
        ax.set_yscale(scale)
        ax.set_xlabel("context length (prompt tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    cpu = results.get("machine_info", {}).get("cpu", {}).get("brand_raw")
    figure.suptitle("generate end to end" + (f" on {cpu}" if cpu else ""))
    return figure


def suite_figure(results: dict, summary: bool = False):
    """The Figure of a task suite report: score against budget, one panel per (length, protocol, task) with a line
    per method (the full cache dashed), or with `summary` one panel per (length, protocol) of the headline average
    (`suite.headline_tasks`)."""
    from .suite import headline_tasks

    rows = results["results"]
    settings = results["settings"]
    panels = []
    for length in settings["lengths"]:
        tasks = [None] if summary else list(dict.fromkeys(r["task"] for r in rows if r["length"] == length))
        panels += [(length, protocol, task) for protocol in settings["protocols"] for task in tasks]
    figure, axes = _figure(len(panels), min(len(panels), 2 if summary else 3), (5.0, 3.6))
    for ax, (length, protocol, task) in zip(axes, panels):
        counted = headline_tasks(results, length) if task is None else [task]
        lines: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["length"] == length and r["task"] in counted and (r["protocol"] == protocol or r["method"] == "full"):
                lines[r["method"]][r["budget"]].append(r["score"])
        for method, by_budget in lines.items():
            if method == "full":
                full = 100 * sum(by_budget[None]) / len(by_budget[None])
                ax.axhline(full, color="black", linestyle="--", label="full cache")
                continue
            budgets = sorted(by_budget)
            ax.plot([100 * b for b in budgets], [100 * sum(by_budget[b]) / len(by_budget[b]) for b in budgets],
                    marker="o", label=method.replace("baseline_plus", "Baseline+"))
        ax.set_xlabel("budget (% of the prompt)")
        ax.set_ylabel("score (%)")
        ax.set_ylim(-3, 103)
        ax.set_title(f"{task or 'average'}, {length} tokens, question-{protocol}")
    axes[0].legend(fontsize=7)
    figure.suptitle(f"Task suite: {results['model']}, {settings['samples']} samples per task")
    return figure


def plot_suite(results: dict, path: PathLike) -> Path:
    """`suite_figure` as a PNG at `path` (every task), and its summary beside it (`<stem>-summary.png`)."""
    path = Path(path)
    _save(suite_figure(results, summary=True), path.with_name(f"{path.stem}-summary.png"))
    return _save(suite_figure(results), path)


def plot_perplexity(results: dict, path: PathLike) -> Path:
    """`perplexity_figure` as a PNG at `path`."""
    return _save(perplexity_figure(results), path)


def plot_passkey(results: dict, path: PathLike) -> Path:
    """`passkey_figure` as a PNG at `path`."""
    return _save(passkey_figure(results), path)


def plot_bench(results: dict, path: PathLike) -> Path:
    """`bench_figure` as a PNG at `path`."""
    return _save(bench_figure(results), path)


PLOTTERS = {"perplexity": plot_perplexity, "passkey": plot_passkey, "suite": plot_suite}


def plot_file(path: PathLike, output: Optional[PathLike] = None) -> Path:
    """Plot a results JSON file to `output` (default: `<stem>.png` beside it) and return the PNG's path: a
    `less-cuda eval` file by its "kind", a pytest-benchmark file by its "benchmarks"."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    if not isinstance(results, dict):
        plot = None
    elif "benchmarks" in results:
        plot = plot_bench
    else:
        plot = PLOTTERS.get(results.get("kind"))
    if plot is None:
        found = f"keys {sorted(results)}" if isinstance(results, dict) else f"a JSON {type(results).__name__}"
        raise ValueError(f"{path}: expected a results file with \"kind\" one of {sorted(PLOTTERS)}, or a "
                         f"pytest-benchmark file with \"benchmarks\"; found {found}")  # fmt: skip
    try:
        return plot(results, path.with_suffix(".png") if output is None else output)
    except ValueError as error:  # e.g. a benchmark file with no end-to-end results: say which file
        raise ValueError(f"{path}: {error}") from error
