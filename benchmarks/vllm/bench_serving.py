"""vLLM with LESS layers against vLLM with its own paged KV cache: same model, same prompts, same engine settings.

Model: SmolLM2-135M-Instruct in fp32, greedy, eager mode, one OpenMP thread; prompts are slices of real text
(WikiText-2 valid). LESS keeps 5% of the longest request (prompt plus new tokens) per layer and KV head, with the
shipped H2O feature maps. Each engine runs in the same process, one after the other.

Two measurements (`--mode`):
- `decode`: for each setting PROMPTxBATCH, every request arrives at once; decode tokens/s counts the tokens made after
  the last request's first token, over the time they took (so prefill is not in it). KV bytes per request: the
  paged cache's K and V of every token (prompt and new), against the LESS state of all layers (a constant).
- `capacity`: both engines get the same KV memory (`VLLM_CPU_KVCACHE_SPACE`, --kv-space-gib). vLLM's own count of
  how many requests of PROMPT + NEW tokens fit at once, and a stream of --stream-requests requests arriving
  --arrival-s apart: total throughput (prompt and new tokens per second from the first arrival to the last finish),
  time to first token, and the most requests that made a token in one step.

Run with `make bench-vllm`; prints the results and adds them to benchmarks/results/vllm.json, by mode and setting
(a run of one setting keeps the others').
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # decode: room for every setting's paged cache
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import less_cuda  # noqa: E402
from less_cuda.hf.models import export_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = Path(less_cuda.__file__).parent / "checkpoints" / "smollm2-135m-h2o-5pct"
BUDGET_FRACTION = 0.05


def prompts_from(ids: list[int], count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, consecutive slices of the text (wrapping around when it is short)."""
    if len(ids) < length:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than one prompt of {length}")
    return [[ids[(i * length + j) % len(ids)] for j in range(length)] for i in range(count)]


@dataclass
class Request:
    arrival: float
    first_token: float = math.nan
    finish: float = math.nan
    token_times: list[float] = field(default_factory=list)


def run_stream(llm, prompts: list[list[int]], new_tokens: int, arrival_s: float) -> tuple[list[Request], int]:
    """Feeds the engine request i at i * arrival_s seconds (all at once for 0) and steps it until every request is
    done. Returns each request's times (seconds from the start) and the most requests that made a token in one
    step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    requests = [Request(arrival=i * arrival_s) for i in range(len(prompts))]
    start, submitted, peak = time.perf_counter(), 0, 0
    while submitted < len(prompts) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while submitted < len(prompts) and requests[submitted].arrival <= now:
            engine.add_request(str(submitted), TokensPrompt(prompt_token_ids=prompts[submitted]), params)
            submitted += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, requests[submitted].arrival - now))
            continue
        outputs = engine.step()
        now = time.perf_counter() - start
        peak = max(peak, len(outputs))
        for output in outputs:
            request = requests[int(output.request_id)]
            made = len(output.outputs[0].token_ids)
            request.token_times.extend([now] * (made - len(request.token_times)))
            if made and math.isnan(request.first_token):
                request.first_token = now
            if output.finished:
                request.finish = now
    return requests, peak


def decode_rate(requests: list[Request]) -> float:
    """Tokens made after the last request's first token, per second of the time they took."""
    since = max(r.first_token for r in requests)
    tokens = sum(sum(t > since for t in r.token_times) for r in requests)
    return tokens / (max(r.finish for r in requests) - since)


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


def paged_bytes_per_token(llm) -> int:
    config = llm.llm_engine.vllm_config.model_config
    layers = config.get_num_layers(llm.llm_engine.vllm_config.parallel_config)
    return 2 * layers * config.get_total_num_kv_heads() * config.get_head_size() * config.dtype.itemsize


def measure_engines(model_dir: Path, max_len: int, measure, **engine_args) -> dict:
    """{name: measure(llm)} for the paged cache and for LESS, each engine torn down before the next starts."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    budget = round(BUDGET_FRACTION * max_len)
    methods = {
        "full": None,
        "less": {"architectures": ["LessLlamaForCausalLM"], "less_checkpoint": str(CHECKPOINT), "less_budget": budget},
    }
    args = dict(dtype="float32", enforce_eager=True, distributed_executor_backend="uni", max_model_len=max_len,
                enable_prefix_caching=False, seed=0, **engine_args)  # fmt: skip
    results = {}
    for name, overrides in methods.items():
        llm = LLM(str(model_dir), hf_overrides=overrides, **args)
        results[name] = measure(llm, name)
        print(name, results[name], flush=True)
        del llm  # the last reference: the engine shuts down before the next one starts
        gc.collect()
        cleanup_dist_env_and_memory()
    return results


def decode_mode(args, ids: list[int]) -> dict:
    report = {}
    for setting in args.settings.split(","):
        prompt_tokens, batch = (int(x) for x in setting.split("x"))
        prompts = prompts_from(ids, batch, prompt_tokens)
        max_len = prompt_tokens + args.new_tokens

        def measure(llm, name: str) -> dict:
            requests, _ = run_stream(llm, prompts, args.new_tokens, arrival_s=0.0)
            kv = less_state_bytes(llm) if name == "less" else paged_bytes_per_token(llm) * max_len
            return {"prefill_s": max(r.first_token for r in requests), "decode_tokens_per_s": decode_rate(requests),
                    "kv_bytes_per_request": kv}  # fmt: skip

        results = measure_engines(args.model_dir, max_len, measure, max_num_seqs=batch,
                                  max_num_batched_tokens=max(2048, prompt_tokens))  # fmt: skip
        report[setting] = {"budget": round(BUDGET_FRACTION * max_len), "results": results, "ratios": {
            "decode_tokens_per_s_less_over_full": results["less"]["decode_tokens_per_s"]
            / results["full"]["decode_tokens_per_s"],
            "kv_bytes_less_over_full": results["less"]["kv_bytes_per_request"] / results["full"]["kv_bytes_per_request"],
        }}  # fmt: skip
    return report


def capacity_mode(args, ids: list[int]) -> dict:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_space_gib)
    max_len = args.prompt_tokens + args.new_tokens
    prompts = prompts_from(ids, args.stream_requests, args.prompt_tokens)

    def measure(llm, name: str) -> dict:
        fits = llm.llm_engine.vllm_config.cache_config.kv_cache_max_concurrency
        requests, peak = run_stream(llm, prompts, args.new_tokens, args.arrival_s)
        span = max(r.finish for r in requests)
        tokens = len(prompts) * (args.prompt_tokens + args.new_tokens)
        ttft = [r.first_token - r.arrival for r in requests]
        return {"requests_that_fit": fits, "most_in_one_step": peak, "stream_s": span, "tokens_per_s": tokens / span,
                "ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft)}  # fmt: skip

    results = measure_engines(args.model_dir, max_len, measure, max_num_seqs=args.stream_requests,
                              max_num_batched_tokens=max(2048, args.prompt_tokens))  # fmt: skip
    setting = f"{args.prompt_tokens}+{args.new_tokens}x{args.stream_requests}"
    return {setting: {"kv_space_gib": args.kv_space_gib, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "requests": args.stream_requests, "arrival_s": args.arrival_s, "budget": round(BUDGET_FRACTION * max_len),
            "results": results, "ratios": {
                "requests_that_fit_less_over_full":
                results["less"]["requests_that_fit"] / results["full"]["requests_that_fit"],
                "tokens_per_s_less_over_full": results["less"]["tokens_per_s"] / results["full"]["tokens_per_s"],
                "ttft_median_less_over_full": results["less"]["ttft_median_s"] / results["full"]["ttft_median_s"]}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["decode", "capacity"], default="decode")
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt")
    parser.add_argument("--settings", default="2048x8,4096x8,2048x32", help="decode: PROMPTxBATCH, comma-separated")
    parser.add_argument("--new-tokens", type=int, help="new tokens per request (default: decode 64, capacity 256)")
    parser.add_argument("--prompt-tokens", type=int, default=4096, help="capacity: tokens per prompt")
    parser.add_argument("--kv-space-gib", type=int, default=1, help="capacity: KV memory of each engine (GiB)")
    parser.add_argument("--stream-requests", type=int, default=16)
    parser.add_argument("--arrival-s", type=float, default=5.0, help="capacity: seconds between arrivals")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "smollm2-135m-instruct",
                        help="SmolLM2 as a transformers directory; converted from the GGUF when missing")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "vllm.json")
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or (256 if args.mode == "capacity" else 64)
    # vLLM's `python -m` subprocesses put the working directory first on sys.path: from the repository root they
    # would import its less_cuda/ (built for the main venv's torch) instead of the one installed in this venv.
    args.text, args.model_dir, args.output = args.text.resolve(), args.model_dir.resolve(), args.output.resolve()
    os.chdir(tempfile.mkdtemp())

    import vllm
    from transformers import AutoTokenizer

    if not (args.model_dir / "config.json").is_file():
        export_model("smollm2", args.model_dir)
    ids = AutoTokenizer.from_pretrained(args.model_dir)(args.text.read_text())["input_ids"]
    measured = decode_mode(args, ids) if args.mode == "decode" else capacity_mode(args, ids)
    report = json.loads(args.output.read_text()) if args.output.is_file() else {}
    report.update({
        "setting": {"model": "SmolLM2-135M-Instruct fp32", "checkpoint": CHECKPOINT.name,
                    "budget_fraction": BUDGET_FRACTION, "new_tokens": args.new_tokens, "text": args.text.name,
                    "vllm": vllm.__version__, "torch": torch.__version__},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS")},
    })  # fmt: skip
    report.setdefault(args.mode, {}).update(measured)  # by setting: runs of other settings stay
    print(json.dumps(report, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
