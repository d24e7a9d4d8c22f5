"""The `less-cuda` command (also `python -m less_cuda`, and torchrun's `-m less_cuda train`):
- `less-cuda train ...` fits feature maps (`less_cuda.train`);
- `less-cuda eval ...` compares perplexities in the parallel, streaming or prefill form (`less_cuda.eval.perplexity`),
  runs the passkey retrieval task (`less_cuda.eval.passkey`), or the long-context task suite (`--task ruler`,
  `less_cuda.eval.suite`);
- `less-cuda plot RESULTS.json` draws a results file (`less_cuda.eval.plots`);
- `less-cuda serve ...` starts vLLM's server with LESS (`less_cuda.vllm`).

Building the parser imports neither torch nor transformers: the names it offers come from torch-free modules, and
each command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Union

from .core.policy import POLICY_IDS, PREFILL_SCORES
from .eval.methods import FORMS, METHODS, PASSKEY_METHODS, PROTOCOLS, SUITE_METHODS, SUITE_SETTINGS, TASKS
from .train import config as train_config
from .train.config import AUTOCAST_NAMES, DTYPE_NAMES, INPUT_SCALINGS, TrainConfig

BUDGET_HELP = "cached tokens per layer and KV head: a count (51) or a fraction (0.05, 5%%)"


def parse_budget(text: str) -> Union[int, float]:
    """"51" is a token count; "0.05" or "5%" a fraction of the sequence length."""
    if text.endswith("%"):
        return float(text[:-1]) / 100.0
    return float(text) if "." in text else int(text)


def comma_list(convert):
    """An argparse type for comma-separated values, each converted by `convert`."""
    return lambda text: [convert(item) for item in text.split(",") if item]


def policy_kind(text: str) -> str:
    """An argparse type for a policy kind: one of POLICY_IDS."""
    if text not in POLICY_IDS:
        raise argparse.ArgumentTypeError(f"unknown policy {text!r}: choose from {', '.join(POLICY_IDS)}")
    return text


def _add_model_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--model", default=defaults["model"],
                        help="'smollm2', 'gemma3-270m' or 'qwen2.5-coder-0.5b' (offline, from their wheels), a "
                             "transformers model directory or hub name, or a .gguf file")
    parser.add_argument("--gguf-file", default=None,
                        help="GGUF file inside the --model directory (as from_pretrained's gguf_file)")
    parser.add_argument("--dtype", default=defaults["dtype"], choices=DTYPE_NAMES, help="model dtype")


def _add_policy_arguments(parser: argparse.ArgumentParser, defaults: dict, several: bool = False) -> None:
    if several:
        parser.add_argument("--policy", type=comma_list(policy_kind), default=None,
                            help=f"h2o, lambda, or both comma-separated (default: {defaults['policy']}; the ruler "
                                 "task: both)")
    else:
        parser.add_argument("--policy", default=defaults["policy"], choices=list(POLICY_IDS))
    parser.add_argument("--recent", type=parse_budget, default=defaults["recent"],
                        help="H2O: newest tokens always kept, count or fraction of the budget (default half)")
    parser.add_argument("--sinks", type=int, default=defaults["sinks"], help="Λ: first tokens always kept")


def _add_text_arguments(parser, defaults: dict, required: bool) -> None:
    parser.add_argument("--data", required=required, default=None,
                        help="text file, or Hugging Face dataset name[:config]")
    parser.add_argument("--seq-len", type=int, default=defaults["seq_len"])
    parser.add_argument("--val-fraction", type=float, default=defaults["val_fraction"],
                        help="share of the articles held out (the tail of the text)")


def build_parser() -> argparse.ArgumentParser:
    defaults = train_config.defaults()
    parser = argparse.ArgumentParser(prog="less-cuda", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_command(commands, defaults)
    _add_eval_command(commands, defaults)
    plot = commands.add_parser("plot", help="draw a results JSON file (eval, passkey, or make bench's) as a PNG")
    plot.add_argument("results", help="JSON file written by `less-cuda eval --output` or `make bench`")
    plot.add_argument("--output", default=None, help="PNG path (default: beside the results file)")
    _add_serve_command(commands)
    return parser


def _add_train_command(commands, defaults: dict) -> None:
    fit = commands.add_parser("train", help="fit the LESS feature maps of a model (torchrun: several processes)")
    _add_model_arguments(fit, defaults)
    _add_text_arguments(fit, defaults, required=True)
    _add_policy_arguments(fit, defaults)
    fit.add_argument("--budget", type=parse_budget, default=defaults["budget"], help=BUDGET_HELP)
    fit.add_argument("--output", required=True, help="checkpoint directory (progress for resuming is kept inside)")
    fit.add_argument("--rank", type=int, default=defaults["rank"], help="R, the rank of the low-rank state")
    fit.add_argument("--hidden", type=int, default=defaults["hidden"], help="φ/ψ hidden width (default: head_dim)")
    fit.add_argument("--sequences", type=int, default=defaults["sequences"], help="training sequences (at most)")
    fit.add_argument("--val-sequences", type=int, default=defaults["val_sequences"])
    fit.add_argument("--epochs", type=int, default=defaults["epochs"])
    fit.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    fit.add_argument("--positions", type=int, default=defaults["positions"],
                     help="decode steps scored per sequence in a training step (a random subset; validation: all)")
    fit.add_argument("--lr", type=float, default=defaults["lr"])
    fit.add_argument("--schedule", default=defaults["schedule"], choices=["cosine", "constant"])
    fit.add_argument("--seed", type=int, default=defaults["seed"])
    fit.add_argument("--layers", type=comma_list(int), default=None,
                     help="comma-separated layer indices (default: every full-attention layer)")
    fit.add_argument("--stages", "--stage", type=comma_list(str), default=list(defaults["stages"]),
                     help="comma-separated, in order: layer (each layer alone, by attention-output MSE), end-to-end "
                          "(all layers together, by next-token KL against the full cache); default: layer")
    fit.add_argument("--init", default=None,
                     help="checkpoint the end-to-end stage starts from when it runs alone (default: --output)")
    fit.add_argument("--e2e-epochs", type=int, default=defaults["e2e_epochs"], help="epochs of the end-to-end stage")
    fit.add_argument("--e2e-lr", type=float, default=defaults["e2e_lr"],
                     help="peak learning rate of the end-to-end stage")
    fit.add_argument("--autocast", default=defaults["autocast"], choices=AUTOCAST_NAMES,
                     help="the end-to-end stage's forward passes under autocast (the maps stay fp32): auto is "
                          "bfloat16 on a GPU and none on a CPU")
    fit.add_argument("--input-scaling", default=defaults["input_scaling"], choices=INPUT_SCALINGS,
                     help="rms (default): fit φ/ψ's first layers as if the queries and keys were divided by their "
                          "RMS over the training data, which keeps models with large q/k (Gemma 3) trainable; none: "
                          "as they are (how the shipped SmolLM2 maps were fitted)")


def _add_eval_command(commands, defaults: dict) -> None:
    ev = commands.add_parser("eval", help="perplexity (full cache, sparse policy, Baseline+, LESS) or passkey "
                                          "retrieval accuracy")
    _add_model_arguments(ev, defaults)
    _add_policy_arguments(ev, defaults, several=True)
    ev.add_argument("--prefill-scores", default=None, choices=PREFILL_SCORES,
                    help="H2O: rank a prompt's tokens at prefill by the attention column sums over the whole prompt "
                         "(sum) or by the attention of its last --prefill-window query rows (window, as SnapKV); "
                         "default: the policy's, sum")
    ev.add_argument("--prefill-window", type=int, default=None,
                    help="H2O with --prefill-scores window: the query rows scored (default: the policy's, 8)")
    ev.add_argument("--task", default="perplexity", choices=["perplexity", "passkey", "ruler"],
                    help="perplexity, passkey retrieval, or ruler: the long-context task suite")
    ev.add_argument("--budgets", "--budget", type=comma_list(parse_budget), default=[defaults["budget"]],
                    help=BUDGET_HELP + "; several comma-separated give a sweep")
    ev.add_argument("--checkpoint", default=None,
                    help="feature maps (default: the shipped one for model + policy); one policy only")
    ev.add_argument("--methods", default=None,
                    help=f"comma-separated subset (perplexity: {','.join(METHODS)}; "
                         f"passkey: {','.join(PASSKEY_METHODS)}; ruler: {','.join(SUITE_METHODS)}, default those "
                         "of --policy)")
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--output", default=None, help="write the results to this JSON file")
    ev.add_argument("--plot", action="store_true", help="also draw the results beside --output (PNG)")
    text = ev.add_argument_group("perplexity task (--data also gives the ruler task's real text)")
    _add_text_arguments(text, defaults, required=False)
    text.add_argument("--form", default="parallel", choices=FORMS,
                      help="parallel (every token streams through the policy, computed at once), streaming (the "
                           "real cache, token by token), prefill (a compressed prompt, then decoding)")
    text.add_argument("--prompt-fraction", type=float, default=0.5,
                      help="prefill form: share of each sequence given as the prompt")
    text.add_argument("--sequences", type=int, default=8, help="held-out sequences to score (at most)")
    text.add_argument("--skip", type=int, default=0,
                      help="skip the first N held-out sequences (e.g. the ones training picked its best epoch on)")
    key = ev.add_argument_group("passkey and ruler tasks")
    key.add_argument("--lengths", type=comma_list(int), default=[512, 1024], help="prompt lengths in tokens")
    key.add_argument("--depths", type=comma_list(float), default=[0.1, 0.5, 0.9],
                     help="where the key sits, as fractions of the context")
    key.add_argument("--trials", type=int, default=3, help="prompts per (length, depth)")
    key.add_argument("--seed", type=int, default=0)
    key.add_argument("--filler", default=None, help="text file to hide the key in (default: repeated sentences)")
    suite = ev.add_argument_group("ruler task")
    suite.add_argument("--tasks", type=comma_list(str), default=None,
                       help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    suite.add_argument("--protocol", type=comma_list(str), default=list(PROTOCOLS),
                       help="aware (the question is compressed with the context), agnostic (it arrives after the "
                            "compression), or both comma-separated")
    suite.add_argument("--samples", type=int, default=20, help="prompts per task and length")


def _add_serve_command(commands) -> None:
    srv = commands.add_parser("serve", help="vLLM's OpenAI-compatible server with LESS layers (needs vLLM)",
                              epilog="Arguments after -- go to `vllm serve` unchanged (e.g. -- --port 8001).")
    srv.add_argument("model", help="a transformers model directory, or 'smollm2' / 'qwen2.5-coder-0.5b' (converted "
                                          "once from the GGUF)")
    srv.add_argument("--checkpoint", default=None,
                     help="LESS feature maps; they give the policy, budget and rank (without: sparse-only --policy)")
    srv.add_argument("--policy", default=None, choices=list(POLICY_IDS))
    srv.add_argument("--budget", type=int, default=None,
                     help="tokens kept per layer, request and KV head (default: the checkpoint's budget, a "
                          "fraction resolved against vLLM's max_model_len)")


def _methods(args: argparse.Namespace, allowed: tuple[str, ...]) -> tuple[str, ...]:
    methods = tuple(args.methods.split(",")) if args.methods else allowed
    unknown = set(methods) - set(allowed)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)} for the {args.task} task; choose from {list(allowed)}")
    return methods


def _checkpoints(args: argparse.Namespace, model, budget=None) -> dict[str, Optional[str]]:
    """The feature-map checkpoint of each policy kind asked for: --checkpoint, or the shipped one (given a budget,
    the one fitted closest to it)."""
    from .checkpoints import find_checkpoint
    from .hf.models import model_layout

    if args.checkpoint is not None:
        if len(args.policy) > 1:
            raise SystemExit("--checkpoint holds feature maps for one policy: give one --policy with it")
        return {args.policy[0]: args.checkpoint}
    found = {kind: find_checkpoint(model_layout(model.config), kind, budget) for kind in args.policy}
    return {kind: str(path) if path is not None else None for kind, path in found.items()}


def _prefill_options(args: argparse.Namespace) -> dict:
    """--prefill-scores and --prefill-window as `Policy` keyword arguments; one not given keeps the policy's default."""
    given = {"prefill_scores": args.prefill_scores, "prefill_window": args.prefill_window}
    return {name: value for name, value in given.items() if value is not None}


def _policy(args: argparse.Namespace, kind: str):
    """The `Policy` the eval arguments describe for one kind, at its default budget (each run sets its own)."""
    from .core.policy import Policy

    return Policy(kind=kind, recent=args.recent, sinks=args.sinks, **_prefill_options(args))


SUITE_TEXT = "wikitext:wikitext-2-raw-v1"
"""The ruler task's real text without --data: WikiText-2's validation split, from the Hugging Face hub."""


def _suite_methods(policies: list[str]) -> tuple[str, ...]:
    """The suite's methods for the policy kinds asked for: the full cache and every setting of those kinds."""
    return tuple(m for m in SUITE_METHODS if m == "full" or SUITE_SETTINGS[m.partition("/")[2]][0] in policies)


def run_eval(args: argparse.Namespace) -> None:
    from .hf.models import DTYPES, load_model

    if args.policy is None:
        args.policy = list(POLICY_IDS) if args.task == "ruler" else [train_config.defaults()["policy"]]
    allowed = {"perplexity": METHODS, "passkey": PASSKEY_METHODS, "ruler": _suite_methods(args.policy)}[args.task]
    methods = _methods(args, allowed)
    if args.plot and not args.output:
        raise SystemExit("--plot draws the results file: give --output RESULTS.json")
    if args.task == "ruler":
        for name, given, known in (("tasks", args.tasks or (), TASKS), ("protocols", args.protocol, PROTOCOLS)):
            unknown = [value for value in given if value not in known]
            if unknown:
                raise SystemExit(f"unknown {name} {unknown} for the ruler task; choose from {list(known)}")
    if args.task == "perplexity" and args.data is None:
        raise SystemExit("the perplexity task needs --data (a text file or a dataset name)")
    try:
        _policy(args, args.policy[0])  # a bad --prefill-window fails before the model loads
    except ValueError as error:
        raise SystemExit(f"--prefill-window: {error}") from None
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], args.gguf_file)
    checkpoints = _checkpoints(args, model)
    if any(m.startswith(("less", "baseline_plus")) for m in methods):  # Baseline+ is sized by the state's bytes
        missing = [kind for kind, path in checkpoints.items() if path is None]
        if missing:
            raise SystemExit(f"no LESS checkpoint is shipped for this model and policy {missing[0]!r}: pass "
                             "--checkpoint, or give --methods without less and baseline_plus")
    run = {"perplexity": _perplexity_results, "passkey": _passkey_results, "ruler": _suite_results}[args.task]
    results = run(args, model, tokenizer, methods)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.output}")
    if args.plot:
        from .eval.plots import plot_file

        print(f"plot written to {plot_file(args.output)}")


def _run_settings(args: argparse.Namespace) -> dict:
    """The command's settings for a results file: every argument, and the package version."""
    from . import __version__

    settings = {k: v for k, v in vars(args).items() if k not in ("command", "plot")}
    return {"package_version": __version__, "model": args.model, "settings": settings}


def _perplexity_results(args, model, tokenizer, methods) -> dict:
    from dataclasses import replace

    from .checkpoints import checkpoint_label
    from .eval.perplexity import compare
    from .hf.data import tokenizer_splits
    from .hf.press import load_feature_maps

    splits = tokenizer_splits(args.data, tokenizer, args.seq_len, args.val_fraction)
    sequences = splits.validation[args.skip : args.skip + args.sequences]
    if len(sequences) == 0:
        raise SystemExit(f"{args.data!r} holds no held-out sequence of {args.seq_len} tokens after skipping "
                         f"{args.skip}: lower --seq-len or --skip, or raise --val-fraction")
    prompt_length = round(args.prompt_fraction * args.seq_len) if args.form == "prefill" else None
    print(f"{len(sequences)} held-out sequences of {args.seq_len} tokens (held-out #{args.skip} on), "
          f"{args.form} form")
    results, full = [], {}  # the full cache does not depend on the policy: scored once
    for kind in args.policy:
        for budget in args.budgets:
            checkpoint = _checkpoints(args, model, budget)[kind]
            feature_maps = load_feature_maps(model, checkpoint, kind, budget=budget) if checkpoint is not None else None
            result = compare(model, sequences, replace(_policy(args, kind), budget=budget), feature_maps,
                             args.batch_size, tuple(m for m in methods if m not in full), args.form, prompt_length,
                             checkpoint_label(checkpoint) if checkpoint is not None else None)
            full = full or {m: p for m, p in result.perplexity.items() if m == "full"}
            result.perplexity = {**full, **result.perplexity}
            print(result.table() + (f"\nfeature maps from {checkpoint}" if "less" in methods else "") + "\n")
            results.append(result.to_json())
    return {"kind": "perplexity", "form": args.form, **_run_settings(args), "seq_len": args.seq_len,
            "sequences": len(sequences), "prompt_length": prompt_length, "results": results}


def _passkey_results(args, model, tokenizer, methods) -> dict:
    from .eval.passkey import evaluate_passkey, format_table
    from .hf.press import SHIPPED_MAPS

    runs = []
    for kind in args.policy:  # --checkpoint, or the shipped ones picked per budget; the report names them
        runs.append(evaluate_passkey(model, tokenizer, args.lengths, args.depths, args.budgets,
                                     policy=_policy(args, kind), methods=methods,
                                     feature_maps=args.checkpoint or SHIPPED_MAPS, trials=args.trials, seed=args.seed,
                                     filler=args.filler))
    # One results file for all policies; the full cache does not depend on the policy, so it is kept once.
    results = runs[0]
    for run in runs[1:]:
        results["results"] += [r for r in run["results"] if r["method"] != "full"]
    results.update(_run_settings(args))
    print(format_table(results))
    return results


def _saver(args: argparse.Namespace):
    """For a long run: write the report so far to --output after each prompt (None without --output)."""
    if args.output is None:
        return None
    arguments = _run_settings(args)["settings"]
    return lambda report: Path(args.output).write_text(json.dumps({**report, "arguments": arguments}, indent=2) + "\n")


def _suite_results(args, model, tokenizer, methods) -> dict:
    from .eval.suite import evaluate_suite, format_table
    from .hf.data import read_text

    source = args.data or SUITE_TEXT
    try:
        text = read_text(source, split="validation")
    except Exception as error:  # no such file, no `datasets`, or no hub to load the dataset from
        raise SystemExit(f"the ruler task's real text {source!r} could not be read ({error}): give --data with a "
                         "text file") from None
    checkpoints = _checkpoints(args, model) if args.checkpoint else {}
    try:
        results = evaluate_suite(model, tokenizer, text, tasks=args.tasks or TASKS, lengths=args.lengths,
                                 budgets=args.budgets, protocols=args.protocol, samples=args.samples,
                                 methods=methods, feature_maps=checkpoints, seed=args.seed, text_name=source,
                                 on_prompt=_saver(args))
    except ValueError as error:  # a bad task, protocol or length: said before the model ran
        raise SystemExit(f"ruler task: {error}") from None
    results["arguments"] = _run_settings(args)["settings"]
    print(format_table(results))
    return results


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = []  # after "--": arguments for the program a command wraps (`vllm serve`)
    if "--" in argv:
        argv, passed_on = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = build_parser().parse_args(argv)
    if passed_on and args.command != "serve":
        raise SystemExit(f"less-cuda {args.command} takes no arguments after --")
    if args.command == "train":
        from .train.run import train

        train(TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}))
    elif args.command == "serve":
        from .vllm.serve import serve

        serve(args.model, args.checkpoint, args.policy, args.budget, passed_on)
    elif args.command == "plot":
        from .eval.plots import plot_file

        print(f"plot written to {plot_file(args.results, args.output)}")
    else:
        run_eval(args)
