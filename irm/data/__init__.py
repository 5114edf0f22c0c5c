"""Texts for PPO prompts, reward evaluation, the activation cache and triples: loaders, prompt/prefix
tokenisation and the corpus fingerprint (`irm.data.corpus`); the built-in review corpus (`irm.data.generated`)."""

from irm.data.corpus import corpus_fingerprint, load_texts, make_prompts, prefixes

__all__ = ["corpus_fingerprint", "load_texts", "make_prompts", "prefixes"]
