"""Training and evaluation text: read a text file or a Hugging Face dataset, split it into articles, hold out whole
articles for validation, tokenise, and pack each split into fixed-length sequences.

Splitting by articles (not by sequences) keeps any one article on one side of the split, so validation text was
never seen in training, not even as the other half of a packed sequence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor

# A WikiText top-level heading: " = Title = " (sub-sections use "= =" and deeper).
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


@dataclass
class TokenSplits:
    """Packed token sequences. train, validation: [N, seq_len] int64 (N may be 0 for a tiny text)."""

    train: Tensor
    validation: Tensor


def read_text(source: Union[str, Path], split: str = "train", text_column: str = "text") -> str:
    """The raw text of `source`: a path to a UTF-8 text file, or a Hugging Face dataset name, optionally with a
    configuration after a colon ("wikitext:wikitext-2-raw-v1"), whose `text_column` rows are joined by newlines.
    The `datasets` package is imported only for the dataset form."""
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    name, _, config = str(source).partition(":")
    try:
        import datasets
    except ImportError as err:
        raise FileNotFoundError(
            f"{source!r} is not a file, and loading it as a Hugging Face dataset needs the `datasets` package "
            "(pip install datasets)"
        ) from err
    rows = datasets.load_dataset(name, config or None, split=split)
    return "\n".join(rows[text_column])


def split_articles(text: str) -> list[str]:
    """Cut a text into articles at WikiText top-level headings (" = Title = " lines); a text without such headings
    is cut at blank lines instead. Empty pieces are dropped."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _ARTICLE_HEADING.match(line.rstrip("\n"))]
    if starts:
        bounds = sorted({0, *starts, len(lines)})  # text before the first heading is a piece of its own
        pieces = ["".join(lines[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        pieces = re.split(r"\n\s*\n", text)
    return [p for p in pieces if p.strip()]


def pack(token_lists: list[list[int]], seq_len: int, separator: Optional[int], bos: Optional[int] = None) -> Tensor:
    """Concatenate token lists (with `separator` between them, if given) and cut the stream into [N, seq_len]
    sequences; the incomplete tail is dropped. With `bos`, every sequence starts with that token followed by
    seq_len - 1 tokens of the stream."""
    stream: list[int] = []
    for tokens in token_lists:
        if stream and separator is not None:
            stream.append(separator)
        stream.extend(tokens)
    width = seq_len - (bos is not None)
    n = len(stream) // width
    packed = torch.tensor(stream[: n * width], dtype=torch.int64).view(n, width)
    return packed if bos is None else torch.cat([torch.full((n, 1), bos, dtype=torch.int64), packed], dim=1)


def load_splits(
    source: Union[str, Path],
    tokenize: Callable[[str], list[int]],
    seq_len: int,
    validation_fraction: float = 0.1,
    separator: Optional[int] = None,
    bos: Optional[int] = None,
) -> TokenSplits:
    """Read `source`, hold out the last `validation_fraction` of its articles (at least one), tokenise each article
    with `tokenize` (text -> token ids, no special tokens) and pack both splits into `seq_len`-token sequences,
    with `separator` (e.g. the EOS id) between articles and, if given, `bos` at the start of every sequence.

    The held-out articles are the trailing ones, so the split is reproducible without a seed.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    articles = split_articles(read_text(source))
    if len(articles) < 2:
        raise ValueError(f"{source!r} has {len(articles)} article(s): need at least 2 to hold some out for validation")
    n_val = max(1, round(validation_fraction * len(articles)))
    tokens = [tokenize(article) for article in articles]
    return TokenSplits(
        train=pack(tokens[:-n_val], seq_len, separator, bos), validation=pack(tokens[-n_val:], seq_len, separator, bos)
    )


def expected_bos(tokenizer) -> Optional[int]:
    """The BOS id when the tokenizer starts every text with it (the model was trained that way: Gemma-family models
    score far worse without it), else None."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else None


def tokenizer_splits(source: Union[str, Path], tokenizer, seq_len: int,
                     validation_fraction: float = 0.1) -> TokenSplits:
    """`load_splits` with a transformers tokenizer: articles tokenised without special tokens, EOS between them, and
    each sequence starting with BOS when the tokenizer adds one (`expected_bos`)."""
    return load_splits(source, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], seq_len,
                       validation_fraction, tokenizer.eos_token_id, expected_bos(tokenizer))
