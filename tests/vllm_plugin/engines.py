"""The engines the vLLM plugin tests start, and the LESS settings they share."""

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import less_cuda

CHECKPOINTS = Path(less_cuda.__file__).parent / "checkpoints"
CHECKPOINT = {"h2o": CHECKPOINTS / "smollm2-135m-h2o-5pct", "lambda": CHECKPOINTS / "smollm2-135m-lambda-5pct"}
QWEN2_CHECKPOINT = {kind: CHECKPOINTS / f"qwen2.5-coder-0.5b-{kind}-5pct" for kind in ("h2o", "lambda")}
GEMMA3_CHECKPOINT = {kind: CHECKPOINTS / f"gemma3-270m-{kind}-5pct" for kind in ("h2o", "lambda")}
BUDGET = 32  # tokens per layer and KV head: every test prompt is longer, so prefill and decode both evict


NEW_TOKENS = 24


def new_engine(model_dir: Path, policy: str, lowrank: bool = True, checkpoints: dict = CHECKPOINT,
               architecture: str = "LessLlamaForCausalLM", **engine_args):  # fmt: skip
    """A vLLM engine (`LLM`) serving a model (SmolLM2 unless told) in fp32 with LESS layers, in this process unless
    `engine_args` say otherwise."""
    from vllm import LLM

    overrides = {"architectures": [architecture], "less_budget": BUDGET, "less_policy": policy}
    if lowrank:
        overrides["less_checkpoint"] = str(checkpoints[policy])
    args = dict(dtype="float32", enforce_eager=True, distributed_executor_backend="uni", max_model_len=512,
                max_num_seqs=8, enable_prefix_caching=False, seed=0)  # fmt: skip
    args.update(engine_args)
    return LLM(str(model_dir), hf_overrides=overrides, **args)


@contextmanager
def engine(*args, **kwargs) -> Iterator:
    """`new_engine`, torn down on exit so that the next test can start its own."""
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = new_engine(*args, **kwargs)
    try:
        yield llm
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def vllm_greedy(llm, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def readme_prompts(tokenizer) -> list[list[int]]:
    """Four prompts of different lengths (48 to 230 tokens) of real prose: slices of this repository's README."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    ids = tokenizer(text)["input_ids"]
    return [ids[start : start + length] for start, length in ((0, 48), (300, 230), (700, 97), (1100, 150))]
