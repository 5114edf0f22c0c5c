"""Explanations and feature pages of the crosscoder's tuned-specific latents (irm.diff.explain), on a world where one
direction exists only in the tuned model and fires exactly on the tokens a fake tokenizer spells "good"."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from irm.calibration.diff import LEARNING_RATE, TOKENS_PER_DOC, paired_world, write_pair
from irm.config import ExplainConfig, RewardConfig

ROWS = 2048


class _Planted:
    """A vocabulary where token i (the world's row i) spells "good" exactly where the planted direction fires."""

    def __init__(self, on: np.ndarray):
        self.on = on

    def decode(self, ids):
        return "".join(" good" if self.on[int(i)] else f" w{int(i) % 5}" for i in ids)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The world's caches and its trained crosscoder (train_layer, as the stage trains it)."""
    from irm.diff.config import DiffConfig
    from irm.stages.diff import _latents, train_layer

    tmp = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    w = paired_world(rng, {"rows": ROWS})
    on = (np.arange(ROWS) % 7 == 0) & (rng.random(ROWS) < 0.5)
    tuned = w.tuned + (on * (1.0 + rng.exponential(1.0, ROWS)))[:, None] * w.planted
    base_dir, tuned_dir = write_pair(tmp, w.base, tuned)
    d = DiffConfig(k=4, epochs=30, learning_rate=LEARNING_RATE, diff_sae=False,
                   trainer={"enable_progress_bar": False, "enable_model_summary": False})
    record = train_layer(d, base_dir, tuned_dir, 0, (False, False), tmp / "layer-00")
    return {"tmp": tmp, "d": d, "record": record, "latents": _latents(tmp / "layer-00"), "on": on,
            "dirs": (base_dir, tuned_dir), "x": np.stack([w.base, tuned], axis=1)}


def _explain(world, ex, unembed=(None, "no lens in this test")):
    from irm.diff.data import PairedCache
    from irm.diff.explain import LayerLatents, explain_latents, load_crosscoder
    from irm.explain.backends import make_backend
    from irm.reward import reward_description

    lat = world["latents"]
    cc = load_crosscoder(world["tmp"] / "layer-00" / "crosscoder.safetensors", world["d"])
    layer = LayerLatents(0, PairedCache(*world["dirs"]), cc, 2,
                         [int(j) for j in np.flatnonzero(lat["classes"] == "tuned-specific")], lat["fired"],
                         world["record"]["held_out_rows"])
    reward = RewardConfig()  # VADER: "good" is one of its words
    out = explain_latents(ex, 0, [layer], _Planted(world["on"]), "cpu", unembed,
                          make_backend(ex, device="cpu", reward_cfg=reward), reward_description(reward),
                          world["tmp"] / "explanations.jsonl")
    lines = [json.loads(s) for s in (world["tmp"] / "explanations.jsonl").read_text().splitlines()]
    return cc, layer, out, lines


def test_the_tuned_only_latent_is_explained_from_its_own_windows_and_labelled_related(world):
    from irm.diff.model import TUNED

    ex = ExplainConfig(backend="offline", n_top=4, n_quantile=2, n_score=5)
    w_VD = torch.as_tensor(np.random.default_rng(1).normal(size=(30, 32)), dtype=torch.float32)
    cc, layer, out, lines = _explain(world, ex, (w_VD, "test unembedding"))
    assert len(layer.latents) == 1  # the planted latent and nothing else is tuned-specific
    j = layer.latents[0]
    assert out["latents"] == out["explained"] == out["related"] == 1 and out["backend"] == "offline"
    (line,) = lines
    assert (line["dictionary"], line["role"], line["index"], line["layer"]) == ("crosscoder", "tuned-specific", j, 0)
    assert "pair" not in line and line["status"] == "ok"
    assert '"good"' in line["explanation"] and line["label"] == 1
    assert line["score"]["accuracy"] == 1.0  # "good" windows are exactly the active ones
    # Independently: the latent's codes over every row from the saved crosscoder, a window per 16-token document
    # (explain.window is longer than a document), the top windows the documents with the largest maxima.
    with torch.no_grad():
        codes = cc.encode(torch.as_tensor(world["x"], dtype=torch.float32))[:, j].numpy()
    maxima = codes.reshape(-1, TOKENS_PER_DOC).max(axis=1)
    top = [r["doc"] for r in line["records"] if r["kind"] == "top"]
    assert top == np.argsort(-maxima, kind="stable")[:4].tolist()
    first = line["records"][0]
    np.testing.assert_allclose(first["activations"], codes[top[0] * TOKENS_PER_DOC:(top[0] + 1) * TOKENS_PER_DOC],
                               rtol=1e-5, atol=1e-6)
    assert line["density"]["tokens_active"] == int((codes > 0).sum())
    assert line["density"]["held_out"] == pytest.approx(layer.fired[j] / layer.held_out_rows)
    assert "crosscoder" in line["density"]["held_out_of"]
    # the logit effect is the tuned decoder direction through the unembedding
    d = cc.W_dec.detach()[j, TUNED].double().numpy()
    logits = w_VD.double().numpy() @ (d / np.linalg.norm(d))
    assert [t for t, _ in line["logit_lens"]["promoted"]][:3] == [" good" if world["on"][i] else f" w{i % 5}"
                                                                   for i in np.argsort(-logits)[:3]]
    # pay-once: a second run asks nothing again
    again = _explain(world, ex)[2]
    assert again["sent"] == 0 and again["reused"] == out["sent"] > 0


def test_explanations_are_capped_by_explain_max_features_most_often_firing_first():
    from irm.diff.explain import LayerLatents, targets

    layer = LayerLatents(3, None, None, 2, [5, 1, 9], np.array([0, 7, 0, 0, 0, 2, 0, 0, 0, 7]), 100)
    got = [(t.index, t.explain, t.dictionary) for t in targets(layer, cap=2)]
    assert got == [(1, True, "crosscoder"), (9, True, "crosscoder"), (5, False, "crosscoder")]
    assert all(t.explain for t in targets(layer, cap=None))
    # a crosscoder latent's random stream is not the SAE feature's of the same index and expansion
    from irm.explain.features import Target

    assert Target(3, "large", 2, 1).stream != targets(layer, None)[0].stream


def test_the_report_lists_the_explained_latents_and_renders_their_pages(world):
    from irm.report.diffing import explained_section
    from irm.report.doc import Doc

    ex = ExplainConfig(backend="offline", n_top=4, n_quantile=2, n_score=5)
    _, layer, out, lines = _explain(world, ex)
    doc = Doc()
    explained_section(doc, {"explanations": out}, lines)
    md, html = doc.markdown(), doc.page("t")
    j = layer.latents[0]
    assert f'id="feature-0-crosscoder-{j}"' in html and "tuned-specific latent" in html
    assert "held-out rows (where Latent Scaling read it)" in html
    assert "related to the reward" in html and lines[0]["explanation"].split(" (")[0] in md
    assert "1 tuned-specific latents explained by offline" in md
    none = Doc()
    explained_section(none, {"explanations": {"not_tested": "no tuned-specific latent to explain"}}, [])
    assert "no tuned-specific latent to explain" in none.markdown() and "feature-0" not in none.page("t")
