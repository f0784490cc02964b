"""Thought generation on the sharded training model, in the training process (no weight copy)."""
