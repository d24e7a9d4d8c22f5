"""Long-context tasks in the manner of RULER (Hsieh et al., 2024), generated offline from token ids: every prompt has
exactly the asked length for any tokenizer, and a sample is deterministic in its seed.

Each sample is a context and a question. The suite (`eval.suite`) feeds the question together with the context
(question-aware compression) or after the context was compressed (question-agnostic). Scoring is RULER's: the share
of the expected values found in the model's continuation (`score`).

Tasks (`TASKS`):
- needle_noise: one needle ("One of the special magic numbers for <key> is: <7 digits>.") in repeated noise;
- needle_text: the same needle in real text (any text file; WikiText-2 in our runs);
- multikey: the asked needle among three needles of other keys, in real text;
- multivalue: four values for one key, all asked;
- multiquery: four needles, all four keys asked at once;
- variable_tracking: a chain of five assignments (VAR A = 12345, VAR B = VAR A, ...) in noise; which variables hold
  the value;
- common_words: a numbered list of words, ten of them repeated far more often; which ten;
- frequent_words: coded words drawn from a Zipf law; which three occur most;
- fact_qa: three facts stated once inside real text, one asked.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from transformers import PreTrainedTokenizerBase

from .haystack import Filler, answer_found, bos_ids, in_context
from .methods import TASKS

# Words for keys, list items and facts: common English words that tokenizers keep whole or nearly so.
ADJECTIVES = ("ancient amber bitter brave bright calm clever crimson curious distant eager early fancy fierce gentle "
              "golden hidden hollow humble icy jolly lively lonely loyal lucky modern narrow noble odd pale patient "
              "polite proud quiet rapid rare royal rusty silent silver simple sleepy smooth solid steady swift tidy "
              "tiny vivid wild wise witty young").split()
NOUNS = ("anchor apple arrow badge basket beacon bell blanket bottle bridge bucket button cabin candle canyon carpet "
         "castle cellar chimney clock cloud compass cottage crystal desk diamond drum engine falcon feather fence "
         "garden glacier harbor helmet island jacket kettle ladder lantern lemon magnet meadow mirror needle orchard "
         "paddle parrot pebble pepper pillow planet pocket quilt rabbit ribbon saddle shovel spoon tower tunnel "
         "violin wagon whistle window").split()
FIRST_NAMES = "Marta Jonas Ingrid Tomas Elena Victor Greta Oskar Lena Henrik Clara Anton Maria Felix Nora Emil".split()
LAST_NAMES = "Olsen Berg Lindqvist Moreau Hartmann Novak Castillo Ferreira Kowalski Brennan Aalto Dubois".split()
PLACES = "Port Adler,Kestrel Bay,North Hollow,Brightwater,Ravensmoor,Cape Verity,Eastmere,Stonebridge".split(",")

NEEDLE_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. I will "
                "quiz you about the numbers afterwards.")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
ONE_QUESTION = ("What is the special magic number for {key} mentioned in the provided text? The special magic number "
                "for {key} mentioned in the provided text is")
ALL_QUESTION = ("What are all the special magic numbers for {key} mentioned in the provided text? The special magic "
                "numbers for {key} mentioned in the provided text are")
VARIABLE_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VARIABLE_QUESTION = ("Question: Find all variables that are assigned the value {value} in the text above. Answer: "
                     "According to the chain(s) of variable assignment in the text above, {count} variables are "
                     "assigned the value {value}, they are:")
COMMON_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.")
COMMON_QUESTION = ("Question: What are the 10 most common words in the above list? Answer: The top 10 words that "
                   "appear most often in the list are:")
FREQUENT_INTRO = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                  "frequently appeared coded words.")
FREQUENT_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                     "most frequently appeared words in the above coded text? Answer: According to the coded text "
                     "above, the three most frequently appeared words are:")
FACT_INTRO = "Read the following text. A few facts are stated in it once; you will be asked about one of them."
FACTS = (  # (statement, question ending where the answer goes, which field is asked)
    ("The lighthouse keeper of {place} was {name}.", "Who was the lighthouse keeper of {place}? The lighthouse keeper "
     "of {place} was", "name"),
    ("The bridge at {place} was finished in the year {year}.", "In which year was the bridge at {place} finished? "
     "The bridge at {place} was finished in the year", "year"),
    ("The harbor master of {place} kept a {adjective} {noun} on the harbor wall.", "What did the harbor master of "
     "{place} keep on the harbor wall? The harbor master of {place} kept a", "thing"),
)

ANSWER_SPARE_TOKENS = 4
"""New tokens allowed beyond the answers' own (a model may open with a quote or "is:"), plus 2 per answer for the
separators of a list."""


@dataclass(frozen=True)
class TaskSample:
    """One prompt: context_ids then question_ids, exactly `length` tokens together; `answers`, the values a
    continuation must contain (RULER's string match, `score`); `max_new_tokens`, enough for all of them."""

    task: str
    length: int
    seed: int
    context_ids: list[int]
    question_ids: list[int]
    answers: tuple[str, ...]
    max_new_tokens: int

    @property
    def prompt_ids(self) -> list[int]:
        return self.context_ids + self.question_ids


def score(continuation: str, answers: tuple[str, ...]) -> float:
    """RULER's string match: the share of `answers` the continuation contains as whole words, in any case."""
    return sum(answer_found(continuation, answer) for answer in answers) / len(answers)


@dataclass
class _Draft:
    """A sample being assembled: intro ids, the pieces to place in the filler (ids, at a depth in [0, 1]), question
    ids, answers; `body` instead of filler and pieces for the list tasks; `unique`, answers that must occur once."""

    intro: list[int]
    question: list[int]
    answers: tuple[str, ...]
    pieces: list[tuple[list[int], float]] = field(default_factory=list)
    body: Optional[list[int]] = None
    unique: tuple[str, ...] = ()


class TaskPrompts:
    """Builds the samples of every task for one tokenizer; `sample(task, length, seed)` is deterministic.

    text: the real text of needle_text, multikey, multivalue, multiquery and fact_qa (`hf.data.read_text` reads one
    from a file or a dataset name); the noise tasks repeat `DEFAULT_FILLER`. A draw whose answer the filler already
    contains is redrawn.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text: str):
        self.tokenizer = tokenizer
        self.noise = Filler(tokenizer, None)
        self.text = Filler(tokenizer, text)
        # common_words lists words of the text (4 to 9 lowercase letters) beside the module's own.
        self._words = sorted(set(re.findall(r"\b[a-z]{4,9}\b", text)) | set(ADJECTIVES) | set(NOUNS))
        self._bos = bos_ids(tokenizer)
        self._builders: dict[str, Callable[[random.Random, int], _Draft]] = {
            "needle_noise": lambda rng, n: self._needles(rng, 1, "one"),
            "needle_text": lambda rng, n: self._needles(rng, 1, "one"),
            "multikey": lambda rng, n: self._needles(rng, 4, "first"),
            "multivalue": lambda rng, n: self._needles(rng, 4, "values"),
            "multiquery": lambda rng, n: self._needles(rng, 4, "all"),
            "variable_tracking": lambda rng, n: self._variables(rng),
            "common_words": self._common_words,
            "frequent_words": self._frequent_words,
            "fact_qa": lambda rng, n: self._facts(rng),
        }

    def _ids(self, text: str) -> list[int]:
        return in_context(self.tokenizer, text)

    def sample(self, task: str, length: int, seed: int) -> TaskSample:
        """A prompt of exactly `length` tokens. Raises ValueError for an unknown task or a length too short for the
        task's fixed parts."""
        if task not in self._builders:
            raise ValueError(f"unknown task {task!r}: choose from {list(TASKS)}")
        rng = random.Random(f"{task}/{seed}")
        filler = self.noise if task in ("needle_noise", "variable_tracking") else self.text
        for _attempt in range(100):
            draft = self._builders[task](rng, length)
            if not draft.answers:
                continue
            context = self._assemble(draft, filler, length, rng, task)
            text = self.tokenizer.decode(context)
            if all(text.count(answer) == 1 for answer in draft.unique):
                new_tokens = sum(len(self._ids(" " + a)) + 2 for a in draft.answers) + ANSWER_SPARE_TOKENS
                return TaskSample(task, length, seed, context, draft.question, draft.answers, new_tokens)
        raise ValueError(f"{task}: the filler text contains the drawn answers wherever they go; give another text")

    def _assemble(self, draft: _Draft, filler: Filler, length: int, rng: random.Random, task: str) -> list[int]:
        """The context: [BOS,] intro, then the filler with the pieces at their depths (or the list body, after as
        much noise as tops it up to length), so that context + question is `length` tokens."""
        fixed = len(self._bos) + len(draft.intro) + len(draft.question)
        fill = length - fixed - (len(draft.body) if draft.body is not None else sum(len(p) for p, _ in draft.pieces))
        if fill < 1:
            raise ValueError(f"{task}: a length of {length} tokens is too short: the task's fixed parts take "
                             f"{length - fill} with this tokenizer; give at least {length - fill + 1}")
        offset = filler.random_start(rng)
        tokens = filler.take(offset, fill)
        if draft.body is not None:
            return self._bos + draft.intro + tokens + draft.body
        context, taken = self._bos + draft.intro, 0
        for piece, depth in sorted(draft.pieces, key=lambda p: p[1]):
            at = max(taken, filler.snap(offset, round(depth * fill), fill))
            context += tokens[taken:at] + piece
            taken = at
        return context + tokens[taken:]

    def _key(self, rng: random.Random, taken: set) -> str:
        while True:
            key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
            if key not in taken:
                taken.add(key)
                return key

    def _needles(self, rng: random.Random, count: int, asked: str) -> _Draft:
        """`count` needles. asked: "one" (the only needle), "first" (one key among distractors), "values" (one key,
        `count` values, all asked) or "all" (`count` keys, all asked)."""
        keys: set = set()
        names = [self._key(rng, keys)] * count if asked == "values" else [self._key(rng, keys) for _ in range(count)]
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(count)]
        pieces = [(self._ids(" " + NEEDLE.format(key=k, value=v)), rng.random()) for k, v in zip(names, values)]
        if asked in ("one", "first"):
            question, answers = ONE_QUESTION.format(key=names[0]), (values[0],)
        elif asked == "values":
            question, answers = ALL_QUESTION.format(key=names[0]), tuple(values)
        else:
            listed = ", ".join(names[:-1]) + f", and {names[-1]}"
            question, answers = ALL_QUESTION.format(key=listed), tuple(values)
        return _Draft(self._ids(" " + NEEDLE_INTRO), self._ids("\n" + question), answers, pieces,
                      unique=tuple(values))

    def _variables(self, rng: random.Random) -> _Draft:
        """A chain of 5 assignments, in order at random depths; the 5 variable names are the answers."""
        names: list[str] = []
        while len(names) < 5:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10_000, 99_999))
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        depths = sorted(rng.random() for _ in lines)
        pieces = [(self._ids(" " + line), depth) for line, depth in zip(lines, depths)]
        question = VARIABLE_QUESTION.format(value=value, count=len(names))
        return _Draft(self._ids(" " + VARIABLE_INTRO), self._ids("\n" + question), tuple(names), pieces,
                      unique=(value,))

    def _common_words(self, rng: random.Random, length: int) -> _Draft:
        """A numbered list: 10 common words repeated `often` times and rare ones `rarely` times each, shuffled, as
        many rare ones as the length allows (RULER's 30 and 3 from 4k tokens on; fewer for short prompts)."""
        often = max(4, min(30, length // 128))
        rarely = 3 if often >= 8 else 1
        words = list(self._words)
        rng.shuffle(words)
        common, rare = words[:10], words[10:]
        intro = self._ids(" " + COMMON_INTRO)
        question = self._ids("\n" + COMMON_QUESTION)
        order_seed = rng.random()

        def listing(rare_count: int) -> list[int]:
            items = common * often + rare[:rare_count] * rarely
            random.Random(order_seed).shuffle(items)
            return [i for n, word in enumerate(items, 1) for i in self._ids(f"\n{n}. {word}")]

        room = length - len(self._bos) - len(intro) - len(question) - 1
        low, high = 0, len(rare)
        while low < high:  # the most rare words whose list fits
            mid = (low + high + 1) // 2
            low, high = (mid, high) if len(listing(mid)) <= room else (low, mid - 1)
        return _Draft(intro, question, tuple(common), body=listing(low))

    def _frequent_words(self, rng: random.Random, length: int) -> _Draft:
        """Coded words drawn from a Zipf law (alpha 2) until the length is filled; the three most frequent are the
        answers. A draw whose third and fourth counts tie has no answer, and `sample` redraws it."""
        intro = self._ids(" " + FREQUENT_INTRO)
        question = self._ids("\n" + FREQUENT_QUESTION)
        vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))) for _ in range(200)]
        weights = [1.0 / (rank + 1) ** 2 for rank in range(len(vocabulary))]
        room = length - len(self._bos) - len(intro) - len(question) - 1
        body, counts = self._ids(" ...."), Counter()
        while True:
            word = rng.choices(vocabulary, weights)[0]
            ids = self._ids(" " + word)
            if len(body) + len(ids) > room:
                break
            body += ids
            counts[word] += 1
        top = counts.most_common(4)
        clear = len(top) == 4 and top[2][1] > top[3][1]
        return _Draft(intro, question, tuple(word for word, _ in top[:3]) if clear else (), body=body)

    def _facts(self, rng: random.Random) -> _Draft:
        """Three facts about three places, one asked."""
        places = rng.sample(PLACES, 3)
        fields = {
            "name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
            "year": str(rng.randint(1700, 1950)),
            "thing": f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}",
        }
        pieces, asked = [], rng.randrange(len(FACTS))
        for (statement, _, _), place in zip(FACTS, places):
            adjective, noun = fields["thing"].split()
            text = statement.format(place=place, name=fields["name"], year=fields["year"], adjective=adjective,
                                    noun=noun)
            pieces.append((self._ids(" " + text), rng.random()))
        _, question, field_name = FACTS[asked]
        answer = fields[field_name]
        return _Draft(self._ids(" " + FACT_INTRO), self._ids("\n" + question.format(place=places[asked])), (answer,),
                      pieces, unique=(answer,))
