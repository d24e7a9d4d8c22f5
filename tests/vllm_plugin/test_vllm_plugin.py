"""vLLM with LESS layers generates what `LessCache` generates: greedy, fp32, SmolLM2 with the shipped feature maps.

The comparison is teacher-forced: `LessCache` reads vLLM's tokens one by one and must predict each of them, so
end-of-sequence handling (vLLM ignores EOS here) cannot make the two differ.
"""

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from engines import (BUDGET, CHECKPOINT, GEMMA3_CHECKPOINT, NEW_TOKENS, QWEN2_CHECKPOINT, engine, readme_prompts,
                     vllm_greedy)

from less_cuda import LessCache, FeatureMaps, Policy
from less_cuda.vllm.model import check_family
from less_cuda.vllm.serve import serve_command
from less_cuda.vllm.settings import serving_settings

pytestmark = pytest.mark.vllm

@torch.no_grad()
def lesscache_predictions(model, policy: str, lowrank: bool, prompt: list[int], tokens: list[int],
                          chunk: int | None = None, checkpoints: dict = CHECKPOINT) -> list[int]:  # fmt: skip
    """LessCache's greedy prediction after the prompt and after each of `tokens` but the last. The prompt is fed in
    one call, or in calls of `chunk` tokens as a chunked prefill feeds it."""
    feature_maps = FeatureMaps.from_pretrained(checkpoints[policy]) if lowrank else None
    cache = LessCache(model, feature_maps, Policy(policy, budget=BUDGET))
    chunk = chunk or len(prompt)
    for start in range(0, len(prompt), chunk):
        logits = model(torch.tensor([prompt[start : start + chunk]]), past_key_values=cache).logits
    predictions = [int(logits[0, -1].argmax())]
    for token in tokens[:-1]:
        logits = model(torch.tensor([[token]]), past_key_values=cache).logits
        predictions.append(int(logits[0, -1].argmax()))
    return predictions


@torch.no_grad()
def full_cache_predictions(model, prompt: list[int], tokens: list[int]) -> list[int]:
    logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
    return logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("policy, compiled", [("h2o", True), ("lambda", False)])
def test_batch_of_prompts_matches_lesscache(model_dir, hf_model, prompts, policy, compiled):
    """Four prompts of different lengths in one engine batch, each prompt compressed in one chunk. H2O runs compiled
    (no enforce_eager): vLLM's CPU platform traces the model once with Dynamo and compiles it with Inductor, each
    LESS layer's step one registered op (`vllm::less_state_attention`) in the graph; Λ runs eager."""
    with engine(model_dir, policy, enforce_eager=not compiled) as llm:
        compilation = llm.llm_engine.vllm_config.compilation_config
        assert (compilation.mode.name, compilation.backend) == ("DYNAMO_TRACE_ONCE", "inductor") if compiled else \
            compilation.mode.name == "NONE"  # fmt: skip
        generated = vllm_greedy(llm, prompts)
    for prompt, tokens in zip(prompts, generated):
        assert len(tokens) == NEW_TOKENS
        assert lesscache_predictions(hf_model[0], policy, True, prompt, tokens) == tokens
    # ...and compression is at work: with the full cache, some prediction along these tokens differs.
    assert any(full_cache_predictions(hf_model[0], p, t) != t for p, t in zip(prompts, generated))


@pytest.mark.parametrize("policy, lowrank", [("h2o", True), ("lambda", False)])
def test_chunked_prefill_matches_lesscache(model_dir, hf_model, prompts, policy, lowrank):
    """A 230-token prompt with at most 64 tokens per engine step: the first chunk is compressed, the others stream
    through the decode rule, as in a LessCache fed the same chunks."""
    prompt = prompts[1]
    with engine(model_dir, policy, lowrank, max_num_batched_tokens=64, enable_chunked_prefill=True) as llm:
        (tokens,) = vllm_greedy(llm, [prompt])
    assert lesscache_predictions(hf_model[0], policy, lowrank, prompt, tokens, chunk=64) == tokens


QWEN2 = dict(checkpoints=QWEN2_CHECKPOINT, architecture="LessQwen2ForCausalLM")


def test_qwen2_batch_of_prompts_matches_lesscache(qwen2_dir, qwen2_hf):
    """Qwen2.5-Coder-0.5B (GQA 7:1, q/k/v biases) with its shipped H2O maps: four prompts of different lengths in
    one engine batch."""
    model, tokenizer = qwen2_hf
    prompts = readme_prompts(tokenizer)
    with engine(qwen2_dir, "h2o", **QWEN2) as llm:
        generated = vllm_greedy(llm, prompts)
    for prompt, tokens in zip(prompts, generated):
        assert lesscache_predictions(model, "h2o", True, prompt, tokens, checkpoints=QWEN2_CHECKPOINT) == tokens
    assert any(full_cache_predictions(model, p, t) != t for p, t in zip(prompts, generated))


def test_qwen2_chunked_prefill_matches_lesscache(qwen2_dir, qwen2_hf):
    """The longest prompt with at most 64 tokens per engine step."""
    model, tokenizer = qwen2_hf
    prompt = readme_prompts(tokenizer)[1]
    with engine(qwen2_dir, "h2o", **QWEN2, max_num_batched_tokens=64, enable_chunked_prefill=True) as llm:
        (tokens,) = vllm_greedy(llm, [prompt])
    assert lesscache_predictions(model, "h2o", True, prompt, tokens, 64, QWEN2_CHECKPOINT) == tokens


GEMMA3 = dict(checkpoints=GEMMA3_CHECKPOINT, architecture="LessGemma3ForCausalLM")


def test_gemma3_batch_of_prompts_matches_lesscache(gemma3_dir, gemma3_hf):
    """Gemma 3 270M with its shipped H2O maps: the full-attention layers hold LESS states, the sliding-window layers
    (512 tokens) vLLM's paged cache. Five prompts in one engine batch, one longer than the window, so that the paged
    layers slide too."""
    model, tokenizer = gemma3_hf
    prompts = readme_prompts(tokenizer)
    prompts.append(tokenizer((Path(__file__).parents[2] / "README.md").read_text())["input_ids"][100:700])
    assert len(prompts[-1]) > model.config.sliding_window
    with engine(gemma3_dir, "h2o", **GEMMA3, max_model_len=1024) as llm:
        generated = vllm_greedy(llm, prompts)
    for prompt, tokens in zip(prompts, generated):
        assert lesscache_predictions(model, "h2o", True, prompt, tokens, checkpoints=GEMMA3_CHECKPOINT) == tokens
    assert any(full_cache_predictions(model, p, t) != t for p, t in zip(prompts, generated))


def test_tensor_parallel_over_two_processes_matches_lesscache(qwen2_dir, qwen2_hf, tmp_path):
    """Qwen's 2 KV heads split over tensor_parallel_size=2: two worker processes, one core and one OpenMP thread
    each (vLLM's CPU workers bind their threads to the cores VLLM_CPU_OMP_THREADS_BIND names), each rank holding
    its KV head's slots, H and z and its heads' feature maps."""
    model, tokenizer = qwen2_hf
    prompts = readme_prompts(tokenizer)
    script = Path(__file__).with_name("tensor_parallel_generate.py")
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(script.parent)}  # fmt: skip
    run = subprocess.run([sys.executable, str(script), str(qwen2_dir), "LessQwen2ForCausalLM", "h2o",
                          str(QWEN2_CHECKPOINT["h2o"]), json.dumps(prompts)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("TOKENS ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    generated = json.loads(lines[-1].removeprefix("TOKENS "))
    for prompt, tokens in zip(prompts, generated):
        assert lesscache_predictions(model, "h2o", True, prompt, tokens, checkpoints=QWEN2_CHECKPOINT) == tokens


def test_server_answers_a_completion(model_dir, tmp_path):
    """`less-cuda serve` starts vLLM's OpenAI-compatible server on localhost with the plugin; one request."""
    port = free_port()
    # The installed console script, run outside the source tree (whose less_cuda/ holds the main venv's build).
    command = [str(Path(sys.executable).parent / "less-cuda"), "serve", str(model_dir), "--checkpoint", str(CHECKPOINT["h2o"]),
               "--budget", str(BUDGET), "--", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "512", "--max-num-seqs", "4", "--distributed-executor-backend", "uni",
               "--enforce-eager"]  # fmt: skip (compiling is tested apart; here it would only add a minute)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"the server exited: {(tmp_path / 'server.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the server did not come up in 300 s"
            try:
                urllib.request.urlopen(f"{base}/models", timeout=5)
                break
            except OSError:
                time.sleep(1)
        body = json.dumps({"model": str(model_dir), "prompt": "The capital of France is", "max_tokens": 8,
                           "temperature": 0, "ignore_eos": True}).encode()  # fmt: skip
        request = urllib.request.Request(f"{base}/completions", body, {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(request, timeout=120))
        assert answer["usage"]["completion_tokens"] == 8
        assert answer["choices"][0]["text"].strip()
        assert "LessLlamaForCausalLM" in (tmp_path / "server.log").read_text()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_settings_come_from_the_checkpoint_and_overrides(hf_model):
    config = copy.deepcopy(hf_model[0].config)
    config.less_checkpoint = str(CHECKPOINT["lambda"])
    settings = serving_settings(config, max_model_len=1000)
    assert (settings.policy.kind, settings.rank) == ("lambda", 8)
    assert settings.resolved.budget == 50  # the checkpoint's 5%, of max_model_len: a state has one size
    config.less_budget, config.less_sinks = 40, 2
    assert serving_settings(config, 1000).resolved.as_args()[1:] == (40, 38, 2)
    config.less_checkpoint, config.less_policy = None, "h2o"
    sparse = serving_settings(config, 1000)
    assert (sparse.rank, sparse.checkpoint, sparse.resolved.recent) == (0, None, 20)
    assert sparse.load_feature_maps(torch.device("cpu")) is None
    assert sparse.resolved.prompt_window is None  # the prompt ranked by column sums unless asked otherwise
    config.less_prefill_scores, config.less_prefill_window = "window", 6
    assert serving_settings(config, 1000).resolved.prompt_window == 6


@pytest.mark.parametrize("overrides, message", [
    ({}, "needs hf_overrides 'less_checkpoint'"),
    ({"less_checkpoint": str(CHECKPOINT["h2o"]), "less_policy": "lambda"}, "disagrees with the checkpoint"),
    ({"less_policy": "h2o", "less_budget": 8, "less_recent": 8}, "budget > recent"),
    ({"less_checkpoint": "/nonexistent"}, "no LESS checkpoint"),
    ({"less_policy": "h2o", "less_prefill_scores": "snapkv"}, "prefill_scores must be one of"),
])  # fmt: skip
def test_bad_settings_fail_clearly(hf_model, overrides, message):
    config = copy.deepcopy(hf_model[0].config)
    for name, value in overrides.items():
        setattr(config, name, value)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        serving_settings(config, max_model_len=1000)


def test_other_architectures_are_refused(hf_model):
    config = copy.deepcopy(hf_model[0].config)
    check_family(config, "LessLlamaForCausalLM")
    config.model_type = "qwen2"
    with pytest.raises(ValueError, match="serves model_type llama / mistral, not 'qwen2'; use LessQwen2ForCausalLM"):
        check_family(config, "LessLlamaForCausalLM")
    config.model_type = "gpt_neox"
    with pytest.raises(ValueError, match="no vLLM model class for that architecture"):
        check_family(config, "LessQwen2ForCausalLM")


def test_serve_command_picks_the_class_for_the_model_type(model_dir, qwen2_dir):
    for directory, architecture in ((model_dir, "LessLlamaForCausalLM"), (qwen2_dir, "LessQwen2ForCausalLM")):
        command = serve_command(directory, None, "h2o", 64)
        assert json.loads(command[command.index("--hf-overrides") + 1])["architectures"] == [architecture]


def test_serve_command_names_the_plugin_settings(model_dir):
    command = serve_command(model_dir, str(CHECKPOINT["h2o"]), None, 64, vllm_args=["--port", "9"])
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert overrides == {"architectures": ["LessLlamaForCausalLM"], "less_checkpoint": str(CHECKPOINT["h2o"]),
                         "less_budget": 64}  # fmt: skip
    assert "--no-enable-prefix-caching" in command and command[-2:] == ["--port", "9"]


def test_request_groups_pad_on_the_right_and_say_where_each_output_goes():
    """The builder's groups: requests 0 and 2 of a step (3 and 1 new tokens) become a [2, 3] batch; the pad repeats
    the short request's token, and `real` / `destination` send the 4 real outputs to their rows of the flat batch."""
    from less_cuda.vllm.backend import request_group

    query_start = torch.tensor([0, 3, 5, 6])  # request 1 (tokens 3-4) is not in the group
    group = request_group(torch.tensor([0, 2]), query_start, torch.tensor([7, 8, 9]), torch.device("cpu"))
    assert group.tokens.tolist() == [[0, 1, 2], [5, 5, 5]]
    assert group.valid.tolist() == [[True, True, True], [True, False, False]]
    assert group.rows.tolist() == [7, 9]
    assert group.real.tolist() == [0, 1, 2, 3] and group.destination.tolist() == [0, 1, 2, 5]
    single = request_group(torch.tensor([1]), query_start, torch.tensor([7, 8, 9]), torch.device("cpu"))
    assert single.valid is None and single.real is None and single.destination.tolist() == [3, 4]
    assert request_group(torch.tensor([], dtype=torch.int64), query_start, torch.tensor([7, 8, 9]),
                         torch.device("cpu")) is None  # fmt: skip
