"""Evaluation: perplexity and zero-shot accuracy through lm-evaluation-harness on graphs in memory."""

import sys

import pytest
import torch
import torch.nn.functional as F
import transformers

from fxflatten import capture
from fxflatten.cli import main
from fxflatten.eval.harness import next_sentence
from fxflatten.eval.perplexity import perplexity
from fxflatten.export.program import save_program
from tests.checkpoints import byte_tokenizer

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from fxflatten.eval.harness import zero_shot  # noqa: E402
from fxflatten.eval.harness.lm import GraphLM  # noqa: E402


def long_context_llama() -> transformers.LlamaForCausalLM:
    """A tiny Llama whose context holds a task item in bytes (context and choice, ~500 tokens)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny():
    model = long_context_llama()
    return model, capture(model), byte_tokenizer()


@torch.no_grad()
def test_perplexity_is_the_mean_next_token_loss_over_all_windows_at_any_batch_size(tiny):
    model, graph, _ = tiny
    windows = torch.randint(0, 257, (5, 12), generator=torch.Generator().manual_seed(0))
    logits = model(windows).logits
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, 257), windows[:, 1:].reshape(-1), reduction="none")
    for batch_size in (1, 2, 5):
        result = perplexity(graph, windows, batch_size=batch_size)
        assert result.tokens == 5 * 11
        assert result.value == pytest.approx(float(losses.mean().exp()), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("long-context-llama")
    tiny[0].save_pretrained(path)
    tiny[2].save_pretrained(path)
    return path


def test_graph_loglikelihood_is_the_models_log_probability_of_the_continuation(tiny):
    model, graph, tokenizer = tiny
    lm = GraphLM(graph, tokenizer, batch_size=2)
    pairs = [("The play was", " written"), ("", "Hamlet"), ("Short", " and a much longer continuation here")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scores = lm.loglikelihood(requests)
    for (context, continuation), (logprob, _) in zip(pairs, scores):
        head = tokenizer(context)["input_ids"] or [lm.prefix_token]
        tail = tokenizer(continuation)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([head + tail])).logits[0]
        expected = F.log_softmax(logits, -1)[len(head) - 1:-1].gather(1, torch.tensor(tail)[:, None]).sum()
        assert logprob == pytest.approx(float(expected), abs=1e-4)


def test_local_task_accuracy_through_lm_eval_matches_scoring_the_items_directly(tiny):
    _, graph, tokenizer = tiny
    (score,) = zero_shot(graph, tokenizer, limit=12)
    lm = GraphLM(graph, tokenizer)
    items = next_sentence.read_items()[:12]
    correct = 0
    for item in items:
        scored = lm.score([lm.encode_pair(item["context"], " " + choice) for choice in item["choices"]])
        correct += max(range(len(scored)), key=lambda k: scored[k][0]) == item["gold"]
    assert score.task == next_sentence.TASK and score.samples == 12
    assert score.acc == pytest.approx(correct / 12)


def test_shipped_task_data_is_what_the_builder_makes_from_the_default_text():
    assert next_sentence.read_items() == next_sentence.default_items()


def test_items_hold_the_true_next_sentence_at_gold_among_distinct_choices():
    text = " ".join(f"Sentence number {i} talks about topic {i} at some length here." for i in range(300))
    items = next_sentence.build_items(text, count=20)
    sentences = next_sentence.sentences(text)
    assert len(items) == 20 and items == next_sentence.build_items(text, count=20)
    for item in items:
        following = sentences.index(item["context"].split(". ")[-1]) + 1
        assert item["choices"][item["gold"]] == sentences[following]
        assert len(set(item["choices"])) == next_sentence.CHOICES


def test_eval_command_reports_perplexity_windows_and_task_accuracy(tiny_dir, capsys):
    assert main(["eval", str(tiny_dir), "--seq-len", "64", "--windows", "3", "--tasks", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "3 windows of 64 tokens, 189 predicted" in out
    assert next_sentence.TASK in out and "2 layers" in out


def test_a_saved_program_evaluates_like_its_checkpoint(tiny, tiny_dir, tmp_path, capsys):
    _, graph, tokenizer = tiny
    save_program(graph, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    outputs = []
    for source in (tiny_dir, tmp_path):
        assert main(["eval", str(source), "--seq-len", "64", "--windows", "3"]) == 0
        outputs.append(capsys.readouterr().out.splitlines()[-1])
    assert outputs[0] == outputs[1] and outputs[0].startswith("held-out perplexity")


def test_eval_command_reports_every_held_out_domain_and_their_geometric_mean(tiny_dir, capsys):
    assert main(["eval", str(tiny_dir), "--seq-len", "64", "--windows", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    values = {}
    for line in lines:
        if line.startswith("held-out perplexity on "):
            domain, rest = line.removeprefix("held-out perplexity on ").split(": ", 1)
            values[domain] = float(rest.split()[0])
            assert "2 windows of 64 tokens, 126 predicted" in rest
    assert list(values) == ["britannica", "plays", "python-docs"]
    mean = float(lines[-1].rsplit(": ", 1)[1])
    assert lines[-1].startswith("held-out perplexity, geometric mean over the 3 domains")
    assert mean == pytest.approx((values["britannica"] * values["plays"] * values["python-docs"]) ** (1 / 3), rel=1e-3)


def test_tasks_without_lm_eval_is_a_one_line_error_naming_the_extra(tiny_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    assert main(["eval", str(tiny_dir), "--seq-len", "64", "--windows", "2", "--tasks"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'fxflatten[eval]'" in err and "\n" not in err
    assert main(["eval", str(tiny_dir), "--seq-len", "64", "--windows", "2"]) == 0
    assert "held-out perplexity" in capsys.readouterr().out


def test_generation_is_the_models_greedy_continuation_cut_at_the_stop_string(tiny):
    model, graph, tokenizer = tiny
    ids = tokenizer("To be, or not")["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = tokenizer.decode(ids[-6:])
    stop = greedy[3:5]
    lm = GraphLM(graph, tokenizer)
    requests = [Instance("generate_until", {}, ("To be, or not", {"until": [], "max_gen_toks": 6}), 0),
                Instance("generate_until", {}, ("To be, or not", {"until": [stop], "max_gen_toks": 6}), 1)]
    assert lm.generate_until(requests) == [greedy, greedy.split(stop)[0]]
