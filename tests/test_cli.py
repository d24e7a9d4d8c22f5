"""The `less-cuda` command as a user meets it: `python -m less_cuda`, a --help that loads no heavy module, and
arguments that fail with a clear message before any model is loaded."""

import subprocess
import sys
from pathlib import Path

import pytest

from less_cuda import cli

REPO = Path(__file__).resolve().parents[1]


def test_help_imports_neither_torch_nor_transformers():
    # `import torch` imports torch.distributed, so a --help that loads no torch is one that loads no torch.distributed.
    probe = ("import sys\nfrom less_cuda.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'torch.distributed', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: less-cuda" in done.stdout and done.stdout.strip().endswith("[]")


def test_python_dash_m_less_cuda_is_the_command():
    done = subprocess.run([sys.executable, "-m", "less_cuda", "eval", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--form {parallel,streaming,prefill}" in done.stdout and "--task {perplexity,passkey,ruler}" in done.stdout


@pytest.mark.parametrize("argv,message", [
    (["eval", "--data", "x.txt", "--methods", "full,quest"], "unknown methods"),
    (["eval", "--task", "passkey", "--methods", "baseline_plus"], "unknown methods"),
    (["eval", "--task", "ruler", "--policy", "lambda", "--methods", "less/h2o"], "unknown methods"),
    (["eval", "--task", "ruler", "--tasks", "needle_text,haystack"], "unknown tasks \\['haystack'\\]"),
    (["eval", "--task", "ruler", "--protocol", "later"], "unknown protocols \\['later'\\]"),
    (["eval", "--data", "x.txt", "--plot"], "--plot draws the results file"),
    (["eval"], "needs --data"),
    (["eval", "--task", "passkey", "--prefill-scores", "window", "--prefill-window", "0"],
     "--prefill-window: prefill_window must be at least 1"),
    (["train", "--data", "x.txt", "--output", "o", "--", "--port", "1"], "no arguments after --"),
])
def test_bad_arguments_fail_before_loading_a_model(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)


def test_budgets_parse_as_counts_fractions_and_percentages():
    assert [cli.parse_budget(t) for t in ("51", "0.05", "5%")] == [51, 0.05, 0.05]
    assert cli.comma_list(cli.parse_budget)("0.02,0.05,64") == [0.02, 0.05, 64]


def test_prefill_options_reach_the_policy_only_when_given():
    parse = cli.build_parser().parse_args
    args = parse(["eval", "--task", "passkey", "--prefill-scores", "window", "--prefill-window", "8"])
    assert cli._prefill_options(args) == {"prefill_scores": "window", "prefill_window": 8}
    assert cli._prefill_options(parse(["eval", "--data", "x.txt"])) == {}  # Policy's defaults apply
