"""Measuring a graph: held-out perplexity, and zero-shot accuracy through lm-evaluation-harness."""
