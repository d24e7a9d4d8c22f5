"""Tiny models and their inputs, shared by the tests: random Llama and Qwen2 models, untrained feature maps, prompts
and greedy generation, a WikiText-shaped text with a byte tokenizer, and the tiny training run's arguments."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from less_cuda.core.feature_maps import FeatureMaps, FeatureMapsConfig
from less_cuda.hf.models import model_layout

VOCAB, PAD = 128, 0


REPO = Path(__file__).resolve().parents[1]
WORDS = "the of lobster river season army song album road church game team city league storm ship".split()


SMOLLM2_LAYOUT = {"num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "hidden_size": 576}


def tiny_llama(num_kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=None,
        eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2_with_a_sliding_layer() -> Qwen2ForCausalLM:
    """Layer 0 full attention, layer 1 a 6-token sliding window."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, layer_types=["full_attention", "sliding_attention"],
        use_sliding_window=True, sliding_window=6, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
    )
    return Qwen2ForCausalLM(config).eval()


def random_feature_maps(model, kind: str = "h2o", rank: int = 4, layers=None) -> FeatureMaps:
    """Untrained feature maps, with psi's scale raised from its 1e-4 start so the low-rank state carries weight."""
    layout = model_layout(model.config)
    config = FeatureMapsConfig(
        base_model="tiny", **layout, layers=list(range(layout["num_layers"])) if layers is None else layers,
        policy={"kind": kind}, rank=rank, kernel_hidden=16,
    )
    torch.manual_seed(1)
    feature_maps = FeatureMaps(config)
    with torch.no_grad():
        for maps in feature_maps.layers.values():
            maps.psi_scale.fill_(1.0)
    return feature_maps


def tiny_config(**overrides) -> FeatureMapsConfig:
    fields = dict(base_model="tiny", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64,
                  layers=[0, 2], policy={"kind": "h2o", "budget": 0.05, "recent": None, "sinks": 4}, rank=4,
                  kernel_hidden=8)
    return FeatureMapsConfig(**{**fields, **overrides})


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] for prompts of different lengths, padded on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = p
        mask[i, T - len(p) :] = 1
    return ids, mask


def prompts(*lengths: int, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def generate(model, ids, mask, new_tokens, **kwargs) -> torch.Tensor:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **kwargs)
    return out[:, ids.shape[1] :]


def greedy(model, inputs: dict, new_tokens: int, **kwargs) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :]


def article_text(n_articles: int = 8, words_per_article: int = 300, seed: int = 0) -> str:
    """A WikiText-shaped text: ` = Title = ` headings, a sub-section heading, paragraphs of random words."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for a in range(n_articles):
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (words_per_article,), generator=g)]
        half = len(words) // 2
        first, second = " ".join(words[:half]), " ".join(words[half:])
        parts.append(f" \n = Article {a} = \n \n {first} \n \n = = Part = = \n \n {second} \n")
    return "".join(parts)


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + <eos>) that transformers can save and load offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_args(model_dir: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(model_dir / "articles.txt"), "--output", str(output),
            "--seq-len", "64", "--budget", "8", "--sequences", "6", "--val-sequences", "2", "--val-fraction", "0.25",
            "--epochs", "2", "--rank", "4", "--hidden", "8", *extra]


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "kernels.safetensors"))


def toy_tokenizer(bos_first: bool, corpus: list[str]):
    """A BPE tokenizer trained in memory on `corpus` (a task's own sentences): a SentencePiece-style one that puts <s>
    before every text (as Llama's), or a byte-level one that names a BOS token but does not add it (as SmolLM2's)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if bos_first:  # SentencePiece-style: "▁" marks a space, <s> before every text
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet, special = list(string.printable), ["<unk>", "<s>", "</s>"]
    else:  # byte-level, a space belongs to the word after it
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet, special = pre_tokenizers.ByteLevel.alphabet(), ["<|endoftext|>", "<s>"]
    tokenizer.train_from_iterator(
        corpus * 4, trainers.BpeTrainer(vocab_size=1000, special_tokens=special, initial_alphabet=alphabet,
                                        show_progress=False)
    )
    if bos_first:
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>")
