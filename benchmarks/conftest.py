"""The benchmarks' ratio table: each benchmark records what it measured under (setting, what), each module declares
the ratios it is judged by, and at the end of the run the ratios of everything measured in that run are printed
and written, with the machine, to benchmarks/results/ratios.md (pytest-benchmark's own JSON goes beside it when
`make bench` passes --benchmark-json). With --plot (`make bench PYTEST_ARGS=--plot`) that JSON is also drawn, by
less_cuda.eval.plots, to a PNG beside it.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"
MEASURED: dict[tuple[str, str], float] = {}


@dataclass(frozen=True)
class Ratio:
    """value = measured[(setting, numerator)] / measured[(setting, denominator)]; met when value >= target."""

    label: str
    setting: str
    numerator: str
    denominator: str
    target: float


RATIOS: list[Ratio] = []


def record(setting: str, what: str, value: float) -> None:
    MEASURED[(setting, what)] = value


@pytest.fixture
def timed(benchmark):
    """timed(setting, what, fn, *args, rounds=0): benchmark fn(*args) in the group `setting` and record its mean
    seconds as `what`. rounds > 0 runs that many pedantic rounds (for slow calls) instead of calibrating."""

    def run(setting: str, what: str, fn, *args, rounds: int = 0):
        benchmark.group = setting
        benchmark.name = what
        if rounds:
            result = benchmark.pedantic(fn, args, rounds=rounds, iterations=1, warmup_rounds=1)
        else:
            result = benchmark(fn, *args)
        if benchmark.stats is not None:  # None under --benchmark-disable
            record(setting, what, benchmark.stats.stats.mean)
        return result

    return run


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}")  # fmt: skip


def pytest_addoption(parser):
    parser.addoption("--plot", action="store_true",
                     help="at the end, draw the --benchmark-json results to a PNG beside them (less_cuda.eval.plots)")


def pytest_sessionfinish(session, exitstatus):
    write_ratios(session)
    if session.config.getoption("plot"):
        plot_benchmark_json(session)


def plot_benchmark_json(session) -> None:
    """Draw the JSON pytest-benchmark wrote; its own sessionfinish, a hook wrapper, has written it before ours."""
    json_path = session.config.option.benchmark_json
    if json_path is None or not Path(json_path).is_file():
        report(session, "--plot: nothing to draw; it plots the file --benchmark-json names (make bench passes it)")
        return
    from less_cuda.eval.plots import plot_file

    try:
        report(session, f"--plot: wrote {plot_file(json_path)}")
    except ValueError as error:  # e.g. only the kernel benchmarks ran: no end-to-end results to draw
        report(session, f"--plot: {error}")


def report(session, text: str) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(text)


def write_ratios(session) -> None:
    """The ratios of everything measured in this run: printed, and written to benchmarks/results/."""
    rows = []
    for r in RATIOS:
        num, den = MEASURED.get((r.setting, r.numerator)), MEASURED.get((r.setting, r.denominator))
        if num is None or den is None:
            continue
        value = num / den
        rows.append({"label": r.label, "setting": r.setting, "ratio": f"{r.numerator} / {r.denominator}",
                     "value": value, "target": r.target, "met": value >= r.target})  # fmt: skip
    if not rows:
        return
    lines = [f"Machine: {machine()}", "", "| setting | measure | ratio | value | target | met |",
             "| --- | --- | --- | ---: | ---: | :-: |"]
    for row in rows:
        lines.append(f"| {row['setting']} | {row['label']} | {row['ratio']} | {row['value']:.2f} | "
                     f">= {row['target']:.3g} | {'yes' if row['met'] else 'NO'} |")  # fmt: skip
    table = "\n".join(lines)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "ratios.md").write_text(table + "\n")
    measured = [{"setting": s, "what": w, "value": v} for (s, w), v in MEASURED.items()]
    (RESULTS_DIR / "ratios.json").write_text(json.dumps({"machine": machine(), "ratios": rows, "measured": measured},
                                                        indent=1))  # fmt: skip
    report(session, "\nLESS benchmark ratios (measured side by side in this run):\n" + table)
