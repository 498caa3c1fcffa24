"""A RULER-style synthetic long-context suite, generated locally from any long text.

Tasks (after RULER, Hsieh et al. 2024; sizes scaled to short prompts and small models):

| task             | the prompt hides                                   | answers scored        |
| ---------------- | -------------------------------------------------- | --------------------- |
| niah_single      | one "special magic number" for a key                | that number           |
| niah_multikey    | 4 numbers under 4 keys; one key is asked           | its number            |
| niah_multivalue  | 4 numbers under one key                            | all 4                 |
| niah_multiquery  | 4 numbers under 4 keys; 2 keys are asked           | both numbers          |
| vt               | a chain of 4 variable assignments of one value     | every variable name   |
| cwe              | a word list: 5 words 12 times each, others once    | the 5 common words    |
| fwe              | coded words with Zipf counts among filler dots     | the 3 most frequent   |

The needle tasks hide their needles among the sentences of the haystack text (any
UTF-8 file; the default is a text built into this module, so no download is ever
needed). A case's score is RULER's string_match_all: the share of its answers that
appear in the greedy output (case-insensitive). Every case is drawn from a seeded RNG
keyed by (seed, task, length, index); its size is fitted to `length` chat-template
tokens by binary search on the real tokenization, like passkey.py's prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

import torch

from slimfx.measure.errors import UsageError
from slimfx.measure.lm import capacity_for
from slimfx.measure.runner import as_runner, greedy_generate

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
NEW_TOKENS = {"niah_single": 12, "niah_multikey": 12, "niah_multivalue": 40, "niah_multiquery": 28, "vt": 24, "cwe": 28, "fwe": 16}

# The default haystack: plain expository sentences (written for this module).
DEFAULT_TEXT = """
The river town grew slowly around its stone bridge. Merchants crossed it every morning with carts of grain and wool.
In winter the water froze near the banks, and children skated where the current was weak. The mill on the east side
ground flour for three villages. Its wheel turned day and night except when the river ran low in late summer.
A small library stood behind the market square. Its shelves held almanacs, ledgers, and a few books of travel.
The librarian kept a careful list of every loan and sent polite letters when a book was late.
Farmers in the valley planted barley on the higher fields and beans near the river. Good harvests came in years
with early rain. Old records show that a long drought once emptied the wells, and the town dug a deep cistern.
The cistern still collects rain from the roofs of the square. Engineers later added pipes that carry water to the
fountain by the church. Travelers often rest there before the long road over the hills.
On market days the square filled with tents. Cheese makers sold round wheels wrapped in cloth, and potters laid out
bowls and jugs on straw. A clock above the town hall rang each hour, although it ran a few minutes fast.
The school taught reading, arithmetic, and the history of the region. Students walked in from the farms, and in
spring they learned to measure fields with chains and stakes. Their teacher kept a garden of herbs behind the school.
Every autumn the town held a fair. Musicians played in the evening, and prizes went to the largest pumpkin and the
best loaf of bread. The fair ended with a parade of lanterns along the river path.
""".strip()

_COMMON_NOUNS = ("apple", "harbor", "violin", "garden", "pencil", "mountain", "lantern", "blanket", "compass", "anchor",
                 "ribbon", "castle", "feather", "window", "carpet", "saddle", "bucket", "candle", "marble", "orchard",
                 "teapot", "ladder", "meadow", "pepper", "rocket", "button", "falcon", "helmet", "island", "jacket")


@dataclass(frozen=True)
class RulerCase:
    """One prompt: task, target length (tokens), index, answers, token ids [1, T]."""

    task: str
    length: int
    index: int
    answers: tuple[str, ...]
    input_ids: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def sentences(text: str) -> list[str]:
    """The text's sentences (split after . ! ?), whitespace collapsed; at least one."""
    parts = [re.sub(r"\s+", " ", s).strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    parts = [s for s in parts if len(s.split()) >= 3]
    if not parts:
        raise UsageError("--ruler-text: no sentences of three or more words found; allowed: any long UTF-8 prose")
    return parts


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _haystack(sents: list[str], n: int, needles: list[str], rng: random.Random) -> str:
    """n haystack sentences (cycling the text) with the needles at seeded depths."""
    body = [sents[i % len(sents)] for i in range(n)]
    for needle in needles:
        body.insert(rng.randint(0, len(body)), needle)
    return " ".join(body)


def _niah(n_keys: int, n_values: int, n_queries: int) -> Callable:
    def make(n: int, rng: random.Random, sents: list[str]):
        keys = rng.sample(_COMMON_NOUNS, n_keys)
        values = {k: [_number(rng) for _ in range(n_values)] for k in keys}
        needles = [f"One of the special magic numbers for {k} is: {v}." for k in keys for v in values[k]]
        asked = keys[:n_queries]
        what = " and ".join(asked)
        many = "numbers" if n_values > 1 or n_queries > 1 else "number"
        prompt = (f"Some special magic {many} are hidden within the following text. Make sure to memorize them. "
                  f"I will quiz you about the {many} afterwards.\n{_haystack(sents, n, needles, rng)}\n"
                  f"What {'are all the special magic numbers' if n_values > 1 else 'is the special magic ' + many} for {what} "
                  f"mentioned in the provided text?")
        prefix = f"The special magic {many} for {what} mentioned in the provided text {'are' if many.endswith('s') else 'is'}:"
        return prompt, prefix, tuple(v for k in asked for v in values[k])
    return make


def _vt(n: int, rng: random.Random, sents: list[str]):
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 4)]
    body = [sents[i % len(sents)] for i in range(n)]
    spots = sorted(rng.randint(0, len(body)) for _ in chain)  # in order, so each assignment follows its source
    for offset, (spot, line) in enumerate(zip(spots, chain)):
        body.insert(spot + offset, line)
    prompt = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n" + " ".join(body)
              + f"\nQuestion: Find all variables that are assigned the value {value} in the text above.")
    return prompt, f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables are assigned the value {value}, they are:", tuple(names)


def _word_pool(sents: list[str], rng: random.Random) -> list[str]:
    words = sorted({w.lower() for s in sents for w in re.findall(r"[A-Za-z]{4,}", s)} | set(_COMMON_NOUNS))
    # No word inside another ("late" in "later"), so a substring match finds only itself.
    words = [w for w in words if not any(w != o and w in o for o in words)]
    rng.shuffle(words)
    return words


def _cwe(n: int, rng: random.Random, sents: list[str]):
    pool = _word_pool(sents, rng)
    common, rare = pool[:5], pool[5:]
    words = [w for w in common for _ in range(12)] + [rare[i % len(rare)] for i in range(n)]
    rng.shuffle(words)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    prompt = (f"Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
              f"that appear most often.\n{listing}\nQuestion: What are the 5 most common words in the above list?")
    return prompt, "Answer: The top 5 words that appear most often in the list are:", tuple(common)


def _fwe(n: int, rng: random.Random, sents: list[str]):
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(40)]
    weights = [1.0 / (r + 1) ** 2 for r in range(len(vocab))]  # Zipf, alpha 2: the top three stand out
    counts = [max(1, round(n * w / sum(weights))) for w in weights]
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(words)
    prompt = ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
              "appeared coded words.\n" + " ".join(w if rng.random() < 0.8 else "...." for w in words)
              + "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
              "frequently appeared coded words in the above coded text?")
    return prompt, "Answer: According to the coded text above, the three most frequently appeared words are:", tuple(vocab[:3])


MAKERS = {"niah_single": _niah(1, 1, 1), "niah_multikey": _niah(4, 1, 1), "niah_multivalue": _niah(1, 4, 1),
          "niah_multiquery": _niah(4, 1, 2), "vt": _vt, "cwe": _cwe, "fwe": _fwe}


def prompt_ids(tokenizer, prompt: str, answer_prefix: str) -> torch.Tensor:
    """Token ids [1, T]: the prompt as one user turn, then the answer's opening words
    as the start of the assistant turn (RULER's answer prefix)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text + answer_prefix, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt + "\n" + answer_prefix, return_tensors="pt").input_ids


def _fit(tokenizer, task: str, length: int, seed_key: str, sents: list[str]) -> torch.Tensor | None:
    """(ids, answers) of the largest size whose prompt is at most `length` tokens."""
    def build(n):
        prompt, prefix, answers = MAKERS[task](n, random.Random(seed_key), sents)
        return prompt_ids(tokenizer, prompt, prefix), answers

    lo, hi = 0, 8
    while build(hi)[0].shape[1] <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if build(mid)[0].shape[1] <= length:
            lo = mid
        else:
            hi = mid
    return build(lo) if lo > 0 else None


def build_cases(tokenizer, tasks=TASKS, lengths=(1024,), samples: int = 2, seed: int = 0, text: str | None = None) -> list[RulerCase]:
    """`samples` prompts per (task, length)."""
    unknown = [t for t in tasks if t not in MAKERS]
    if unknown:
        raise UsageError(f"--ruler-tasks: unknown task {unknown[0]!r}; allowed: {', '.join(TASKS)}")
    sents = sentences(text if text is not None else DEFAULT_TEXT)
    cases = []
    for length in lengths:
        for task in tasks:
            for index in range(samples):
                fitted = _fit(tokenizer, task, length, f"ruler/{seed}/{task}/{length}/{index}", sents)
                if fitted is None:
                    raise UsageError(f"--ruler-lengths {length}: too short for the {task} prompt; allowed: about 500 tokens or more")
                ids, answers = fitted
                cases.append(RulerCase(task, int(length), index, answers, ids))
    return cases


def score(answer: str, answers) -> float:
    """RULER's string_match_all: the share of `answers` found in `answer` (case-insensitive)."""
    text = answer.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def run_cases(model, tokenizer, cases: list[RulerCase], device="cpu", on_case: Callable[[], None] | None = None) -> list[dict]:
    """Greedy-decode every case (NEW_TOKENS[task] tokens at most); one record per case."""
    model = as_runner(model)
    records = []
    capacity = capacity_for(max(c.n_tokens for c in cases) + max(NEW_TOKENS.values())) if cases else None
    for case in cases:
        stats: dict = {}
        new = greedy_generate(model, case.input_ids.to(device), NEW_TOKENS[case.task], tokenizer.eos_token_id, stats, capacity)
        answer = tokenizer.decode(new, skip_special_tokens=True)
        records.append({"task": case.task, "length": case.length, "index": case.index, "n_tokens": case.n_tokens,
                        "answers": list(case.answers), "answer": answer, "score": score(answer, case.answers), **stats})
        if on_case is not None:
            on_case()
    return records


def summarize(records: list[dict]) -> dict:
    """{"average": mean of the per-task scores, "by_task": {task: score}, "n": cases};
    a task's score is the mean over its cases (all lengths)."""
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    by_task = {t: sum(r["score"] for r in records if r["task"] == t) / sum(r["task"] == t for r in records) for t in tasks}
    return {"average": sum(by_task.values()) / len(by_task) if by_task else float("nan"), "by_task": by_task, "n": len(records)}
