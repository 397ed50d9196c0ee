"""What people read after runs: the paper-style comparison table and the direction analyses."""
