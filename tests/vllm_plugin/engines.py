"""The engines the vLLM plugin tests start, and the LESS settings they share."""

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import less_cuda

CHECKPOINTS = Path(less_cuda.__file__).parent / "checkpoints"
CHECKPOINT = {"h2o": CHECKPOINTS / "smollm2-135m-h2o-5pct", "lambda": CHECKPOINTS / "smollm2-135m-lambda-5pct"}
BUDGET = 32  # tokens per layer and KV head: every test prompt is longer, so prefill and decode both evict


@contextmanager
def engine(model_dir: Path, policy: str, lowrank: bool = True, **engine_args) -> Iterator:
    """An in-process vLLM engine serving SmolLM2 in fp32 with LESS layers, torn down on exit so that the next
    test can start its own."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    overrides = {"architectures": ["LessLlamaForCausalLM"], "less_budget": BUDGET, "less_policy": policy}
    if lowrank:
        overrides["less_checkpoint"] = str(CHECKPOINT[policy])
    args = dict(dtype="float32", enforce_eager=True, distributed_executor_backend="uni", max_model_len=512,
                max_num_seqs=8, enable_prefix_caching=False, seed=0)  # fmt: skip
    args.update(engine_args)
    llm = LLM(str(model_dir), hf_overrides=overrides, **args)
    try:
        yield llm
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
