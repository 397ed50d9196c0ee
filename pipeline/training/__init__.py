"""What every rank runs: the training loop, its checkpoints, the sharded switch, and how ranks
meet, fail together and leave."""
