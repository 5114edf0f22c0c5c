"""Layer divergence (paper 4.2, appendix G): per-block parameter distance, ranking, the stage's artifacts, and the
layer choice later stages read."""

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from irm.artifacts import write_json
from irm.config import CacheConfig, DivergenceConfig, ModelConfig, RunConfig
from irm.stages.divergence import layer_divergence, run
from irm.layers import chosen_layers, rank_layers
from irm.errors import UserError
from irm.models import load_model
from irm.stages import is_done

torch.set_num_threads(1)

# Block parameter names of the four tiny families, matched without the models registry.
BLOCK_NAME = re.compile(r"^(?:gpt_neox\.layers|transformer\.h|model\.layers)\.(\d+)\.")
FAMILIES = ["tiny-gpt-neox", "tiny-gpt-neo", "tiny-llama", "tiny-gpt2"]


def numpy_divergence(base, tuned):
    """Independent reference: numpy over the two state_dicts, grouped by block index parsed from the name."""
    sd_base, sd_tuned = base.state_dict(), tuned.state_dict()
    totals = defaultdict(float)
    for name, value in sd_base.items():
        m = BLOCK_NAME.match(name)
        if m and value.is_floating_point():
            diff = value.double().numpy() - sd_tuned[name].double().numpy()
            totals[int(m.group(1))] += float(np.sqrt((diff**2).sum()))
    return [totals[i] for i in range(len(totals))]


def tiny(name="tiny-gpt-neox", layers=4, width=32, seed=0):
    return load_model(ModelConfig(name=name, tiny_layers=layers, tiny_d_model=width), seed)[0]


def perturb(model, blocks_scales, seed=0):
    """Add Gaussian noise of the given scale to every parameter of the given blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            m = BLOCK_NAME.match(name)
            if m and int(m.group(1)) in blocks_scales:
                p.add_(torch.randn(p.shape, generator=g) * blocks_scales[int(m.group(1))])


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_numpy_over_state_dict_and_finds_perturbed_blocks(family):
    base, tuned = tiny(family), tiny(family)
    perturb(tuned, {0: 1e-3, 1: 5e-2, 2: 1e-3, 3: 2e-2})
    values = layer_divergence(base, tuned)
    expected = numpy_divergence(base, tuned)
    assert len(values) == 4
    np.testing.assert_allclose(values, expected, rtol=1e-9, atol=0)
    order, top = rank_layers(values, 2)
    assert top == [1, 3]
    assert order[:2] == [1, 3] and sorted(order) == [0, 1, 2, 3]


def test_identical_models_have_zero_divergence():
    assert layer_divergence(tiny(), tiny()) == [0.0, 0.0, 0.0, 0.0]


def test_layernorm_and_attention_biases_count():
    """Hand-worked: shifting block 3's LayerNorm bias by 0.5 everywhere adds 0.5 * sqrt(width); shifting block 0's
    attention output bias by 2 adds 2 * sqrt(width)."""
    base, tuned = tiny(width=32), tiny(width=32)
    with torch.no_grad():
        tuned.gpt_neox.layers[3].input_layernorm.bias.add_(0.5)
        tuned.gpt_neox.layers[0].attention.dense.bias.add_(2.0)
    values = layer_divergence(base, tuned)
    assert values[3] == pytest.approx(0.5 * math.sqrt(32), rel=1e-6)
    assert values[0] == pytest.approx(2.0 * math.sqrt(32), rel=1e-6)
    assert values[1] == values[2] == 0.0


def test_sum_of_norms_not_norm_of_sum():
    """Two tensors of one block moved by orthogonal amounts: the block value is the sum of their norms (3 + 4 = 7),
    not the norm of everything together (5)."""
    base, tuned = tiny(width=32), tiny(width=32)
    with torch.no_grad():
        w = tuned.gpt_neox.layers[2].mlp.dense_4h_to_h.bias
        w[0] += 3.0
        tuned.gpt_neox.layers[2].post_attention_layernorm.weight[5] += 4.0
    assert layer_divergence(base, tuned)[2] == pytest.approx(7.0, rel=1e-6)


def test_bfloat16_differences_are_not_rounded_away():
    base, tuned = tiny(), tiny()
    base, tuned = base.to(torch.bfloat16), tuned.to(torch.bfloat16)
    perturb(tuned, {2: 1e-1})
    ref = numpy_divergence(base.float(), tuned.float())
    np.testing.assert_allclose(layer_divergence(base, tuned), ref, rtol=1e-6)


@pytest.mark.parametrize("other", [
    dict(layers=3),                 # different number of blocks
    dict(width=64),                 # same names, other shapes
    dict(name="tiny-gpt-neo"),      # other architecture
])
def test_mismatched_models_raise_user_error(other):
    base = tiny()
    tuned = tiny(**{**dict(name="tiny-gpt-neox", layers=4, width=32), **other})
    with pytest.raises(UserError, match="fine-tuned from model.name"):
        layer_divergence(base, tuned)


def test_rank_layers_ties_and_bounds():
    assert rank_layers([1.0, 3.0, 3.0, 0.5], 2) == ([1, 2, 0, 3], [1, 2])
    for k in (0, 5):
        with pytest.raises(UserError, match="divergence.top_k"):
            rank_layers([1.0, 2.0, 3.0, 4.0], k)


# chosen_layers -------------------------------------------------------------------------------------------------


def cfg_for(tmp_path, layers=None, k=2, name="tiny-gpt-neox"):
    return RunConfig(run_dir=str(tmp_path / "run"), device="cpu", model=ModelConfig(name=name, tiny_d_model=32),
                     divergence=DivergenceConfig(top_k=k), cache=CacheConfig(layers=layers))


def test_chosen_layers_from_divergence_json_sorted(tmp_path):
    cfg = cfg_for(tmp_path)
    write_json(tmp_path / "run" / "divergence.json", {"values": [1, 9, 2, 8], "order": [1, 3, 2, 0],
                                                      "top_k": [1, 3], "k": 2})
    assert chosen_layers(cfg) == [1, 3]
    cfg.cache.layers = [2, 0]  # explicit layers win over the divergence top-k
    assert chosen_layers(cfg) == [0, 2]
    cfg.cache.layers = [4]
    with pytest.raises(UserError, match="out of range"):
        chosen_layers(cfg)  # range taken from divergence.json's four values


def test_chosen_layers_errors(tmp_path):
    with pytest.raises(UserError, match="cache.layers or run `python -m irm divergence`"):
        chosen_layers(cfg_for(tmp_path))
    with pytest.raises(UserError, match="out of range"):
        chosen_layers(cfg_for(tmp_path, layers=[-1]))
    with pytest.raises(UserError, match="out of range"):
        chosen_layers(cfg_for(tmp_path, layers=[1, 7]), n_layers=4)
    assert chosen_layers(cfg_for(tmp_path, layers=[3, 1]), n_layers=4) == [1, 3]
    cfg = cfg_for(tmp_path, k=3)
    write_json(tmp_path / "run" / "divergence.json", {"values": [1, 2, 3, 4], "order": [3, 2, 1, 0],
                                                      "top_k": [3, 2], "k": 2})
    with pytest.raises(UserError, match="rerun `python -m irm divergence`"):
        chosen_layers(cfg)  # top_k changed since the file was written


# The stage ------------------------------------------------------------------------------------------------------


def save_tuned(cfg, scales):
    """A perturbed copy of the base model saved where the rlhf stage puts the policy."""
    model, tokenizer = load_model(cfg.model, cfg.seed)
    perturb(model, scales)
    path = Path(cfg.run_dir) / "rlhf" / "policy"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_stage_writes_json_plot_and_manifest(tmp_path):
    cfg = cfg_for(tmp_path, k=2)
    tuned = save_tuned(cfg, {0: 1e-3, 1: 1e-3, 2: 3e-2, 3: 1e-2})
    run(cfg)
    out = json.loads((tmp_path / "run" / "divergence.json").read_text())
    base = load_model(cfg.model, cfg.seed)[0]
    np.testing.assert_allclose(out["values"], numpy_divergence(base, tuned), rtol=1e-6)
    assert out["top_k"] == [2, 3] and out["order"][:2] == [2, 3] and out["k"] == 2
    png = (tmp_path / "run" / "divergence.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert is_done(cfg, "divergence")
    assert chosen_layers(cfg) == [2, 3]
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_cli_without_tuned_policy_exits_2_with_one_line(tmp_path, capsys):
    """In this process through irm.cli.main (a subprocess costs seconds of imports): exit 2 and one line."""
    from irm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["divergence", "--config", "configs/tiny.yaml", "--run_dir", str(tmp_path / "r")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "run `python -m irm rlhf` first" in lines[0]
