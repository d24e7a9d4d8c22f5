"""Greedy tokens from a vLLM engine with LESS layers and tensor_parallel_size=2 on CPU, printed as JSON: run as a
script by test_vllm_plugin.py, since vLLM's multiprocessing executor spawns its workers by re-importing the main
module. Usage: tensor_parallel_generate.py MODEL_DIR ARCHITECTURE POLICY CHECKPOINT PROMPTS_JSON."""

import json
import sys

from engines import new_engine, vllm_greedy


def main() -> None:
    model_dir, architecture, policy, checkpoint, prompts = sys.argv[1:]
    llm = new_engine(model_dir, policy, checkpoints={policy: checkpoint}, architecture=architecture,
                     tensor_parallel_size=2, distributed_executor_backend="mp")  # fmt: skip
    print("TOKENS " + json.dumps(vllm_greedy(llm, json.loads(prompts))), flush=True)


if __name__ == "__main__":
    main()
