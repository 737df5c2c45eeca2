"""Graph passes, one module each: flatten, fold_norms, fuse (widen), prune."""
