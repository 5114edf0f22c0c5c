"""Texts for PPO prompts, the activation cache, triples and evaluation (loaders arrive next)."""
