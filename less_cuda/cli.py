"""The `less-cuda` command: `less-cuda train ...` fits feature maps (`less_cuda.train`), `less-cuda eval ...` compares
perplexities (`less_cuda.evaluate`), `less-cuda serve ...` starts vLLM's server with LESS (`less_cuda.vllm`). `python -m less_cuda.train ...` and torchrun's `-m less_cuda.train` are
`less-cuda train ...`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

from .models import load_model
from .policy import Policy
from .train import DTYPES, TrainConfig, train


def parse_budget(text: str) -> Union[int, float]:
    """"51" is a token count; "0.05" or "5%" a fraction of the sequence length."""
    if text.endswith("%"):
        return float(text[:-1]) / 100.0
    return float(text) if "." in text else int(text)


def _add_policy_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    parser.add_argument("--model", default=defaults.model, help="'smollm2' or a transformers model directory / name")
    parser.add_argument("--data", required=True, help="text file, or Hugging Face dataset name[:config]")
    parser.add_argument("--policy", default=defaults.policy, choices=["h2o", "lambda"])
    parser.add_argument("--budget", type=parse_budget, default=defaults.budget,
                        help="cached tokens per layer and KV head: a count (51) or a fraction (0.05, 5%%)")
    parser.add_argument("--recent", type=parse_budget, default=defaults.recent,
                        help="H2O: newest tokens always kept, count or fraction of the budget (default half)")
    parser.add_argument("--sinks", type=int, default=defaults.sinks, help="Λ: first tokens always kept")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="share of the articles held out (the tail of the text)")
    parser.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPES), help="model dtype")


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig(data="", output="")
    parser = argparse.ArgumentParser(prog="less-cuda", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("train", help="fit the LESS feature maps of a model (torchrun shards the layers)")
    _add_policy_arguments(fit, defaults)
    fit.add_argument("--output", required=True, help="checkpoint directory (progress for resuming is kept inside)")
    fit.add_argument("--rank", type=int, default=defaults.rank, help="R, the rank of the low-rank state")
    fit.add_argument("--hidden", type=int, default=defaults.hidden, help="φ/ψ hidden width (default: head_dim)")
    fit.add_argument("--sequences", type=int, default=defaults.sequences, help="training sequences (at most)")
    fit.add_argument("--val-sequences", type=int, default=defaults.val_sequences)
    fit.add_argument("--epochs", type=int, default=defaults.epochs)
    fit.add_argument("--batch-size", type=int, default=defaults.batch_size)
    fit.add_argument("--positions", type=int, default=defaults.positions,
                     help="decode steps scored per sequence in a training step (a random subset; validation: all)")
    fit.add_argument("--lr", type=float, default=defaults.lr)
    fit.add_argument("--schedule", default=defaults.schedule, choices=["cosine", "constant"])
    fit.add_argument("--seed", type=int, default=defaults.seed)
    fit.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                     help="comma-separated layer indices (default: every full-attention layer)")

    ev = commands.add_parser("eval", help="perplexity: full cache, sparse policy, Baseline+ and LESS")
    _add_policy_arguments(ev, defaults)
    ev.add_argument("--checkpoint", default=None, help="feature maps (default: the shipped one for model + policy)")
    ev.add_argument("--sequences", type=int, default=8, help="held-out sequences to score (at most)")
    ev.add_argument("--skip", type=int, default=0,
                    help="skip the first N held-out sequences (e.g. the ones training picked its best epoch on)")
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--methods", default="full,sparse,baseline_plus,less", help="comma-separated subset")
    ev.add_argument("--output", default=None, help="also write the results to this JSON file")

    srv = commands.add_parser("serve", help="vLLM's OpenAI-compatible server with LESS layers (needs vLLM)",
                              epilog="Arguments after -- go to `vllm serve` unchanged (e.g. -- --port 8001).")
    srv.add_argument("model", help="a transformers model directory, or 'smollm2' (converted once from the GGUF)")
    srv.add_argument("--checkpoint", default=None,
                     help="LESS feature maps; they give the policy, budget and rank (without: sparse-only --policy)")
    srv.add_argument("--policy", default=None, choices=["h2o", "lambda"])
    srv.add_argument("--budget", type=int, default=None,
                     help="tokens kept per layer, request and KV head (default: the checkpoint's budget, a "
                          "fraction resolved against vLLM's max_model_len)")
    return parser


def run_eval(args: argparse.Namespace) -> None:
    from .cache import model_layout
    from .checkpoints import find_checkpoint
    from .data import tokenizer_splits
    from .evaluate import METHODS, compare
    from .integration import load_feature_maps

    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    model, tokenizer = load_model(args.model, DTYPES[args.dtype])
    policy = Policy(kind=args.policy, budget=args.budget, recent=args.recent, sinks=args.sinks)
    checkpoint = args.checkpoint or find_checkpoint(model_layout(model.config), args.policy)  # named in the output
    if checkpoint is None:
        raise SystemExit(f"no LESS checkpoint is shipped for this model and policy {args.policy!r}: pass --checkpoint")
    feature_maps = load_feature_maps(model, checkpoint, args.policy)
    splits = tokenizer_splits(args.data, tokenizer, args.seq_len, args.val_fraction)
    sequences = splits.validation[args.skip : args.skip + args.sequences]
    result = compare(model, sequences, policy, feature_maps, args.batch_size, tuple(args.methods.split(",")))
    print(f"{len(sequences)} held-out sequences of {args.seq_len} tokens (held-out #{args.skip} on); "
          f"feature maps from {checkpoint}")
    print(result.table())
    if args.output:
        Path(args.output).write_text(json.dumps({
            "checkpoint": str(checkpoint), "sequences": len(sequences), "skipped": args.skip, "seq_len": args.seq_len,
            "policy": asdict(policy), "baseline_plus_budget": result.baseline_plus.resolve(args.seq_len).budget,
            "perplexity": result.perplexity,
        }, indent=2) + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = []  # after "--": arguments for the program a command wraps (`vllm serve`)
    if "--" in argv:
        argv, passed_on = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = build_parser().parse_args(argv)
    if passed_on and args.command != "serve":
        raise SystemExit(f"less-cuda {args.command} takes no arguments after --")
    if args.command == "train":
        train(TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}))
    elif args.command == "serve":
        from .vllm.serve import serve

        serve(args.model, args.checkpoint, args.policy, args.budget, passed_on)
    else:
        run_eval(args)


if __name__ == "__main__":
    main()
