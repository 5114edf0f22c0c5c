"""The tiny random models (tests and the quick-start config): their configs, one per supported architecture
family, and their deterministic word-level tokenizer (one token per VADER lexicon entry and per corpus word)."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

from irm.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TINY_HEADS = 4  # attention heads of every tiny model
TINY_MLP_RATIO = 4  # MLP hidden width as a multiple of d_model, as in GPT-2/Pythia
TINY_MAX_POSITIONS = 512  # longer than any prompt + completion the tiny configs use
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    # Runs of word characters are words; every other non-space character is a token of its own, so "great!!" is
    # "great", "!", "!" and never an unknown "!!".
    return pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)


def tiny_vocabulary() -> list[str]:
    """The tiny tokenizer's words: every VADER lexicon entry the pre-tokenizer keeps as one token (lower-cased),
    every word of the generated corpus, and ASCII punctuation; sorted, so ids are the same on every machine."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from irm.data.generated import vocabulary

    pre = _pre_tokenizer()
    words = set(string.punctuation)
    for entry in SentimentIntensityAnalyzer().lexicon:
        pieces = pre.pre_tokenize_str(entry.lower())
        if len(pieces) == 1:
            words.add(pieces[0][0])
    for word in vocabulary():
        words.update(piece for piece, _ in pre.pre_tokenize_str(word.lower()))
    return sorted(words - set(SPECIAL_TOKENS))


def tiny_tokenizer() -> "PreTrainedTokenizerBase":
    """A deterministic word-level tokenizer: one token per lexicon entry and per corpus word (lower-cased)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *tiny_vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    # WordPiece's decoder without cleanup puts one space between tokens; no token starts with its "##" continuation
    # prefix (the pre-tokenizer splits off every "#"), so decoding is exactly "join the words with spaces".
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    pad, unk, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        padding_side="left",
        model_max_length=TINY_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(name: str, n_layers: int, width: int, tokenizer) -> object:
    import transformers

    if n_layers < 1 or width < TINY_HEADS or width % TINY_HEADS:
        raise UserError(
            f"tiny model sizes tiny_layers={n_layers}, tiny_d_model={width} are invalid; use tiny_layers >= 1 and "
            f"a tiny_d_model divisible by {TINY_HEADS}"
        )
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    hidden = TINY_MLP_RATIO * width
    if name == "tiny-gpt-neox":
        return transformers.GPTNeoXConfig(
            hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=TINY_HEADS, intermediate_size=hidden,
            max_position_embeddings=TINY_MAX_POSITIONS, **ids,
        )
    if name == "tiny-gpt-neo":
        # GPT-Neo alternates global and local attention, as the 125M model does.
        pattern = [[["global", "local"], n_layers // 2]] + ([[["global"], 1]] if n_layers % 2 else [])
        return transformers.GPTNeoConfig(
            hidden_size=width, num_layers=n_layers, num_heads=TINY_HEADS, intermediate_size=hidden,
            attention_types=pattern, window_size=TINY_MAX_POSITIONS // 2, max_position_embeddings=TINY_MAX_POSITIONS,
            embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, **ids,
        )
    if name == "tiny-llama":
        return transformers.LlamaConfig(
            hidden_size=width, num_hidden_layers=n_layers, num_attention_heads=TINY_HEADS,
            num_key_value_heads=TINY_HEADS, intermediate_size=hidden, max_position_embeddings=TINY_MAX_POSITIONS, **ids,
        )
    # tiny-gpt2; dropout off, as in the other families (PPO's log-probs must be deterministic).
    return transformers.GPT2Config(
        n_embd=width, n_layer=n_layers, n_head=TINY_HEADS, n_inner=hidden, n_positions=TINY_MAX_POSITIONS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
    )


TINY_MODELS = ("tiny-gpt-neox", "tiny-gpt-neo", "tiny-llama", "tiny-gpt2")
