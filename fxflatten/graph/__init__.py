"""The graph and what is found in it: capture with torch.export, fx helpers, discovery of the
residual stream, its branches and blocks, the layout data classes every pass reads, and access
to the parameters a graph's ``get_attr`` nodes name."""
