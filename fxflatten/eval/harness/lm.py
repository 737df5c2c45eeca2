"""A captured graph as an lm-evaluation-harness language model.

lm-eval's own Hugging Face wrapper loads a checkpoint by name; fxflatten's results are often
graphs that are no checkpoint (widened or unevenly pruned blocks, ``model.pt2``). This wrapper
scores text with whatever graph it is given, ``logits = graph(input_ids, attention_mask)``, so
dense models, compressed graphs and programs are evaluated the same way, in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch.fx import GraphModule
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fxflatten.errors import FxflattenError
from fxflatten.graph.capture import MAX_LEN

#: Captured graphs take sequences of at least two tokens (their dynamic sequence dimension starts at 2).
MIN_LEN = 2


class GraphLM(LM):
    """Log-likelihoods and greedy generations from a captured graph's logits."""

    def __init__(self, graph: GraphModule, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16,
                 max_length: int | None = None, progress: bool = False) -> None:
        super().__init__()
        self.graph, self.tokenizer = graph, tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or int(graph.meta.get(MAX_LEN, 2048))
        self.progress = progress
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prefix_token = int(prefix if prefix is not None else 0)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Logits of right-padded rows, shape (rows, longest, vocab).

        Attention is causal, so padding after a row's end cannot change its positions; the mask
        stays all ones, which is the form every captured graph was traced and checked with.
        """
        length = max(MIN_LEN, max(map(len, rows)))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return self.graph(ids, torch.ones_like(ids)).float()

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation after its context, and whether it is greedy.

        Rows are batched longest first (similar lengths, little padding) and kept to the model's
        context by dropping the oldest context tokens.
        """
        longest = max((len(continuation) for _, continuation in pairs), default=0)
        if longest > self.max_length:
            raise FxflattenError(
                f"a continuation of {longest} tokens does not fit the model's context of {self.max_length} tokens"
            )
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="loglikelihood", disable=not self.progress, leave=False):
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in batch]
            logprobs = F.log_softmax(self.logits(rows), dim=-1)
            for row, i in zip(range(len(batch)), batch):
                continuation = torch.tensor(pairs[i][1], dtype=torch.long)
                end = len(rows[row])
                predicted = logprobs[row, end - len(continuation):end]
                total = float(predicted.gather(1, continuation[:, None]).sum())
                results[i] = (total, bool((predicted.argmax(-1) == continuation).all()))
        return results

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of context and continuation, split as lm-eval's own models split them.

        Trailing spaces of the context move to the continuation (tokenizers attach a space to the
        word after it), and the continuation's tokens are those of the whole text after the
        context's, so a token spanning the boundary is not split in two.
        """
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.encode(context + continuation), self.encode(context)
        return (head or [self.prefix_token]), whole[len(head):]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        return self.score([self.encode_pair(*request.args) for request in requests])

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        totals = []
        for request in requests:
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(self.encode(request.args[0]), self.prefix_token, self.max_length, 1)
            ]
            totals.append(sum(logprob for logprob, _ in self.score(windows)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy continuation up to ``max_gen_toks`` tokens or the first stop string."""
        outputs = []
        for request in tqdm(requests, desc="generate", disable=not self.progress, leave=False):
            context, options = request.args
            until = options.get("until") or [self.tokenizer.decode([self.tokenizer.eos_token_id])]
            until = [until] if isinstance(until, str) else until
            ids, new = self.encode(context) or [self.prefix_token], []
            text = ""
            for _ in range(int(options.get("max_gen_toks", 256))):
                window = (ids + new)[-self.max_length:]
                token = int(self.logits([window])[0, len(window) - 1].argmax())
                if token == self.tokenizer.eos_token_id:
                    break
                new.append(token)
                text = self.tokenizer.decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs
