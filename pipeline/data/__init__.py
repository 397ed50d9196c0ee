"""What a run reads: task data in the LLM-Adapters format, the commands that fetch and convert
the real model and data, and random-init model folders for trying things without a download."""
