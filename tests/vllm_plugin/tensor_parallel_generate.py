"""Greedy tokens from a vLLM engine with LESS layers and tensor_parallel_size=2 on CPU, printed as JSON: run as a
script by test_vllm_plugin.py, since vLLM's multiprocessing executor spawns its workers by re-importing the main
module. Usage: tensor_parallel_generate.py MODEL_DIR ARCHITECTURE CHECKPOINT PROMPTS_JSON NEW_TOKENS."""

import json
import sys

from engines import BUDGET


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, architecture, checkpoint, prompts, new_tokens = sys.argv[1:]
    overrides = {"architectures": [architecture], "less_budget": BUDGET, "less_checkpoint": checkpoint}
    llm = LLM(model_dir, hf_overrides=overrides, dtype="float32", enforce_eager=True, max_model_len=512,
              max_num_seqs=8, enable_prefix_caching=False, seed=0, tensor_parallel_size=2,
              distributed_executor_backend="mp")  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=int(new_tokens), ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in json.loads(prompts)], params, use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)


if __name__ == "__main__":
    main()
