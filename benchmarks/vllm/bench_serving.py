"""vLLM with LESS layers against vLLM with its own full paged KV cache: same model, same prompts.

Setting (the issue's): SmolLM2-135M-Instruct in fp32, a batch of 8 prompts of 2,048 tokens of real text, 64 new
tokens each, greedy, eager mode, one OpenMP thread. LESS keeps 5% of the prompt (102 tokens per layer and KV head)
with the shipped H2O feature maps. Decode time is the time of a 65-token run less that of a 1-token run (the
prefill), so decode tokens/s = 8 * 64 / (t65 - t1). KV bytes per request: the full cache's K and V of every token
(prompt and generated) in all layers, against the LESS state of all layers (a constant).

Run with `make bench-vllm`; prints a table and writes benchmarks/results/vllm.json.
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import less_cuda  # noqa: E402
from less_cuda.hf.models import export_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = Path(less_cuda.__file__).parent / "checkpoints" / "smollm2-135m-h2o-5pct"


def prompts_from(text_file: Path, tokenizer, count: int, length: int) -> list[list[int]]:
    ids = tokenizer(text_file.read_text())["input_ids"]
    if len(ids) < count * length:
        raise SystemExit(f"{text_file} has {len(ids)} tokens, fewer than {count} x {length}")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def timed_runs(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """Seconds for a 1-token run (prefill) and a run of 1 + new_tokens tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    seconds = []
    for tokens in (1, 1 + new_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def less_state_bytes(llm) -> int:
    """Bytes of one request's LESS state over all layers (what vLLM allocates per request)."""
    from vllm.model_executor.layers.mamba.abstract import MambaBase

    context = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    total = 0
    for layer in context.values():
        if isinstance(layer, MambaBase):
            for shape, dtype in zip(layer.get_state_shape(), layer.get_state_dtype()):
                total += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "smollm2-135m-instruct",
                        help="SmolLM2 as a transformers directory; converted from the GGUF when missing")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "vllm.json")
    args = parser.parse_args()
    # vLLM's `python -m` subprocesses put the working directory first on sys.path: from the repository root they
    # would import its less_cuda/ (built for the main venv's torch) instead of the one installed in this venv.
    args.text, args.model_dir, args.output = args.text.resolve(), args.model_dir.resolve(), args.output.resolve()
    os.chdir(tempfile.mkdtemp())

    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    if not (args.model_dir / "config.json").is_file():
        export_model("smollm2", args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = prompts_from(args.text, tokenizer, args.batch, args.prompt_tokens)
    budget = round(0.05 * args.prompt_tokens)
    engine_args = dict(dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
                       max_model_len=args.prompt_tokens + args.new_tokens + 16, max_num_seqs=args.batch,
                       enable_prefix_caching=False, seed=0)  # fmt: skip
    methods = {
        "full": {},
        "less": {"architectures": ["LessLlamaForCausalLM"], "less_checkpoint": str(CHECKPOINT), "less_budget": budget},
    }
    results = {}
    for name, overrides in methods.items():
        llm = LLM(str(args.model_dir), hf_overrides=overrides or None, **engine_args)
        config = llm.llm_engine.vllm_config.model_config
        prefill_s, total_s = timed_runs(llm, prompts, args.new_tokens)
        if name == "full":
            per_token = 2 * config.get_num_layers(llm.llm_engine.vllm_config.parallel_config) * \
                config.get_total_num_kv_heads() * config.get_head_size() * 4  # fmt: skip
            kv_bytes = per_token * (args.prompt_tokens + args.new_tokens)
        else:
            kv_bytes = less_state_bytes(llm)
        decode_s = total_s - prefill_s
        results[name] = {"prefill_s": prefill_s, "decode_s": decode_s,
                         "decode_tokens_per_s": args.batch * args.new_tokens / decode_s,
                         "kv_bytes_per_request": kv_bytes}  # fmt: skip
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()

    import vllm

    report = {
        "setting": {"model": "SmolLM2-135M-Instruct fp32", "batch": args.batch, "prompt_tokens": args.prompt_tokens,
                    "new_tokens": args.new_tokens, "less_budget": budget, "checkpoint": CHECKPOINT.name,
                    "vllm": vllm.__version__, "torch": torch.__version__},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS")},
        "results": results,
        "ratios": {"decode_tokens_per_s_less_over_full":
                   results["less"]["decode_tokens_per_s"] / results["full"]["decode_tokens_per_s"],
                   "kv_bytes_less_over_full":
                   results["less"]["kv_bytes_per_request"] / results["full"]["kv_bytes_per_request"],
                   "prefill_s_less_over_full": results["less"]["prefill_s"] / results["full"]["prefill_s"]},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
