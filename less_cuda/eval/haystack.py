"""Long prompts assembled from token ids, shared by the passkey task and the task suite: pieces tokenized as they
join inside a text (`in_context`), a filler text read as a cycle of tokens with its sentence starts (`Filler`), and
the string match that scores an answer (`answer_found`).

Building from ids gives a prompt the exact length asked for with any tokenizer, and lets a needle sit at a chosen
depth, moved at most `SNAP_TOKENS` to a sentence boundary of the filler.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Union

from transformers import PreTrainedTokenizerBase

from ..hf.data import expected_bos

DEFAULT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SNAP_TOKENS = 8
"""How far (in tokens) a needle may move from its exact depth to sit between two sentences of the filler rather
than inside one; where no sentence boundary is that close it goes at the exact depth."""

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def in_context(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids of `text` as it tokenizes after a sentence end. Pieces tokenized this way join as the whole text
    would tokenize, which pieces tokenized alone do not: a byte-level BPE tokenizes a word at the start of a text
    without its space, a SentencePiece tokenizer adds a space there."""
    anchor = tokenizer.encode(".", add_special_tokens=False)
    ids = tokenizer.encode("." + text, add_special_tokens=False)
    if ids[: len(anchor)] != anchor:  # the text's first characters merged into the anchor's token
        return tokenizer.encode(text, add_special_tokens=False)
    return ids[len(anchor) :]


def bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] for tokenizers that put it before every text themselves (Llama, Mistral: their models expect it), else
    [] (SmolLM2 and GPT-2 name a BOS token but do not add it, and their models were not trained with it first)."""
    bos = expected_bos(tokenizer)
    return [] if bos is None else [bos]


def answer_found(continuation: str, answer: str) -> bool:
    """Does the model's continuation contain the answer as a whole, in any case: " 48213." does, " 482135" (another
    number) does not."""
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", continuation, re.IGNORECASE) is not None


def _names_file(text: str) -> bool:
    try:
        return "\n" not in text and Path(text).is_file()
    except OSError:  # a long text is no file name: "File name too long"
        return False


class Filler:
    """A filler text read as a cycle of tokens: a prompt's filler is the stretch of tokens starting at a sentence
    start, wrapping around at the end.

    filler: None for `DEFAULT_FILLER` repeated; a `Path`, or a str naming an existing file, for that file's text
    (e.g. WikiText-2); any other str is the filler text itself. `description` says which, for reports.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, filler: Union[str, Path, None] = None):
        self.tokenizer = tokenizer
        if filler is None:
            text, self.description = DEFAULT_FILLER, f"repeated: {DEFAULT_FILLER}"
        elif isinstance(filler, Path) or _names_file(filler):
            text, self.description = Path(filler).read_text(encoding="utf-8"), f"file: {filler}"
        else:
            text, self.description = filler, f"text of {len(filler)} characters"
        if not text.strip():
            raise ValueError("filler has no text")
        self.stream = in_context(tokenizer, " " + text.strip())
        self._is_start = self._sentence_starts(self.stream)
        self._starts = [i for i, start in enumerate(self._is_start) if start]

    def _sentence_starts(self, ids: list[int]) -> list[bool]:
        """Per token of the cyclic stream: does a sentence start there? True after a newline, or after a token
        ending in .!? when a space follows (not in "3.5"). Decodes each distinct token and candidate pair once."""
        decode = self.tokenizer.decode
        texts = {i: decode([i]) for i in set(ids)}
        starts = []
        for j, current in enumerate(ids):
            previous = texts[ids[j - 1]]  # j = 0 looks at the stream's last token: the cycle's join
            if previous.endswith("\n"):
                starts.append(True)
            elif _SENTENCE_END.search(previous.rstrip(" ")):
                starts.append(decode([ids[j - 1], current])[len(previous) :][:1].isspace())
            else:
                starts.append(False)
        starts[0] = True  # the text's own beginning
        return starts

    def random_start(self, rng: random.Random) -> int:
        """A sentence start of the stream, drawn by `rng`: where a prompt's filler begins."""
        return rng.choice(self._starts)

    def take(self, offset: int, count: int) -> list[int]:
        """`count` tokens of the cycle from `offset` on."""
        return [self.stream[(offset + i) % len(self.stream)] for i in range(count)]

    def snap(self, offset: int, exact: int, fill: int) -> int:
        """Where a needle goes among `fill` filler tokens taken from `offset`: the sentence boundary nearest to the
        `exact` token count within SNAP_TOKENS (ties to the earlier one), or `exact` where there is none."""
        near = range(max(0, exact - SNAP_TOKENS), min(fill, exact + SNAP_TOKENS) + 1)
        bounds = [a for a in near if self._is_start[(offset + a) % len(self.stream)]]
        return min(bounds, key=lambda a: (abs(a - exact), a)) if bounds else exact
