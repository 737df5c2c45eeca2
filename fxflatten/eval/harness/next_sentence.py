"""A small multiple-choice task built from the default evaluation text: which sentence comes next?

Each item gives a few consecutive sentences of the held-out article as context and four
candidate continuations: the sentence that really follows, and three sentences of similar
length from far away in the same text. A model that follows the topic and the syntax of the
context picks the true one; word statistics alone do not help, since every candidate is from
the same article. The items are drawn with a fixed seed, so the task is the same on every run
and machine; ``python -m fxflatten.eval.harness.next_sentence`` rewrites the shipped data file and
a test checks that it still matches what this module builds.

It exists so that the lm-evaluation-harness path reports an accuracy offline; it is not a
standard benchmark, and its numbers compare models with each other, not with the literature.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from fxflatten.text import default_text

TASK = "fxflatten_next_sentence"
DATA_FILE = Path(__file__).with_name("next_sentence.jsonl")
SEED = 0
ITEMS = 200
CHOICES = 4
CONTEXT_SENTENCES = 2
#: Sentences between a target and any of its distractors, so a distractor never continues it.
MIN_DISTANCE = 40
#: Candidates' lengths in words; shorter ones are OCR fragments, longer ones run-ons.
MIN_WORDS, MAX_WORDS = 8, 35
#: A distractor's length is within this factor of the true sentence's, so length gives no hint.
LENGTH_FACTOR = 1.35

_HYPHEN_BREAK = re.compile(r"(\w)[-—]\n(\w)")
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)”\"'][.!?])\s+(?=[A-Z“\"(])")


def sentences(text: str) -> list[str]:
    """The text's sentences in order: hard line breaks joined, words split at a line end rejoined."""
    joined = " ".join(_HYPHEN_BREAK.sub(r"\1\2", text).split())
    return [s.strip() for s in _SENTENCE_END.split(joined) if s.strip()]


def build_items(text: str, count: int = ITEMS, seed: int = SEED) -> list[dict[str, Any]]:
    """``count`` items ``{"context", "choices", "gold"}`` drawn from ``text`` with ``seed``."""
    all_sentences = sentences(text)
    words = [len(s.split()) for s in all_sentences]
    usable = [i for i in range(CONTEXT_SENTENCES, len(all_sentences)) if MIN_WORDS <= words[i] <= MAX_WORDS]
    rng = random.Random(seed)
    targets = sorted(rng.sample(usable, min(count, len(usable))))
    items = []
    for target in targets:
        similar = [
            j for j in usable
            if abs(j - target) >= MIN_DISTANCE and words[target] / LENGTH_FACTOR <= words[j] <= words[target] * LENGTH_FACTOR
        ]
        if len(similar) < CHOICES - 1:
            continue
        choices = [all_sentences[target]] + [all_sentences[j] for j in rng.sample(similar, CHOICES - 1)]
        order = list(range(CHOICES))
        rng.shuffle(order)
        items.append({
            "context": " ".join(all_sentences[target - CONTEXT_SENTENCES:target]),
            "choices": [choices[k] for k in order],
            "gold": order.index(0),
        })
    return items


def default_items() -> list[dict[str, Any]]:
    """The shipped task's items, built from the default evaluation text."""
    return build_items(default_text().evaluation)


def write_items(items: list[dict[str, Any]], path: Path = DATA_FILE) -> None:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")


def read_items(path: Path = DATA_FILE) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def load(**_: Any) -> Any:
    """The shipped items as a ``datasets.DatasetDict`` with one ``test`` split.

    The task YAML names this function as its ``custom_dataset``, so lm-eval reads the data file
    beside this module wherever the package is installed (a relative ``data_files`` path would
    be resolved against the working directory). lm-eval passes the task's metadata as keyword
    arguments; none of them matter here.
    """
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_items())})


if __name__ == "__main__":
    built = default_items()
    write_items(built)
    print(f"wrote {len(built)} items to {DATA_FILE}")
