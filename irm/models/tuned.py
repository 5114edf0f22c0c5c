"""A tuned model given by the user (`model.tuned`; the rlhf stage saves it as the run's policy instead of running
PPO): the check that it pairs with `model.name` (same architecture, layer count, hidden size and tokenizer) and what
the manifest records of it. Loading it is `irm.models.loading.load_given_tuned`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from irm.artifacts import local_checksum
from irm.errors import UserError
from irm.models.loading import first_line, has_tokenizer, hf_config, hf_source, model_hint
from irm.models.tiny import TINY_MODELS, tiny_config, tiny_tokenizer

if TYPE_CHECKING:
    from irm.config import ModelConfig


def _config_and_vocab(name: str, model_cfg: "ModelConfig", seed: int, revision: Optional[str]) -> tuple:
    """(HF config, tokenizer vocabulary or None when the directory ships no tokenizer) of a model name, without
    loading its weights."""
    if name in TINY_MODELS:
        tokenizer = tiny_tokenizer()
        return tiny_config(name, model_cfg.tiny_layers, model_cfg.tiny_d_model, tokenizer), tokenizer.get_vocab()
    from transformers import AutoTokenizer

    source, config = hf_config(hf_source(name), revision, model_cfg.trust_remote_code)
    if not has_tokenizer(source):
        return config, None  # a fine-tune saved without its tokenizer: it uses the base model's
    try:
        return config, AutoTokenizer.from_pretrained(source, revision=revision,
                                                     trust_remote_code=model_cfg.trust_remote_code).get_vocab()
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the tokenizer of {source!r} ({first_line(e)}); {model_hint()}") from None


def pair_problem(model_cfg: "ModelConfig", seed: int = 0) -> Optional[str]:
    """Why `model_cfg.tuned` cannot be the tuned descendant of `model_cfg.name` (another architecture, layer count,
    hidden size or tokenizer), in one line with the fix; None when the pair matches. The CLI's start-up
    (irm.cli.run_stage) asks before any stage runs; only the configs and tokenizers are read."""
    try:
        base, base_vocab = _config_and_vocab(model_cfg.name, model_cfg, seed, model_cfg.revision)
        tuned, tuned_vocab = _config_and_vocab(model_cfg.tuned, model_cfg, seed, None)
    except UserError as e:
        return f"model.tuned: {e}"
    fix = f"give model.tuned a model fine-tuned from {model_cfg.name} (or set model.name to its base)"
    for what, get in (("architecture", lambda c: c.model_type), ("layer count", lambda c: c.num_hidden_layers),
                      ("hidden size", lambda c: c.hidden_size)):
        if get(base) != get(tuned):
            return (f"model.tuned {model_cfg.tuned} has {what} {get(tuned)!r} but model.name {model_cfg.name} has "
                    f"{get(base)!r}; {fix}")
    if base_vocab is not None and tuned_vocab is not None and base_vocab != tuned_vocab:
        return (f"model.tuned {model_cfg.tuned} has another tokenizer than model.name {model_cfg.name} "
                f"({len(tuned_vocab)} vs {len(base_vocab)} tokens, {len(set(tuned_vocab.items()) ^ set(base_vocab.items()))} "
                f"entries differ); {fix}")
    return None


def tuned_identity(model_cfg: "ModelConfig", commit: Optional[str] = None) -> dict:
    """What the manifest records of a given tuned model: its name, the directory read and, for local files, the
    checksum of every file (a .gguf: of the file itself); for a hub id the commit it resolved to (`commit`, from
    the loaded model's config)."""
    name = model_cfg.tuned
    out: dict = {"name": name}
    digest = local_checksum(name)
    if digest is not None:
        out["sha256"] = digest
    elif commit is not None:
        out["commit"] = commit
    return out
