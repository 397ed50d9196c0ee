"""Starting a run: the `tsd` command, the Ray driver, the per-rank entry for torchrun and the
DeepSpeed launcher, and the checks made before anything starts."""
