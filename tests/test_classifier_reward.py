"""The classifier reward (paper appendix F, `reward.kind: classifier`) with a tiny local sequence classifier built
here: a GPT-NeoX classifier whose blocks add nothing (attention and MLP outputs zeroed), so its positive logit for a
text is a function of the text's last token alone, which numpy computes from the saved weights. Checked directly,
then through the stages that score completions with it: rlhf, evaluate-reward and ablate (the tiny pipeline)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import proc
import pytest
import torch

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"
OFFSET = 40.0  # every positive logit is about this: far outside the lexicon reward's [-10, 10]


def last_token_classifier(path: Path) -> np.ndarray:
    """Save the classifier and its tokenizer in `path`; return its positive-label logit for each token id as last
    token, computed in numpy: score . LayerNorm(embedding)."""
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    from irm.models import tiny_tokenizer

    tok = tiny_tokenizer()
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=128, num_labels=2,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = GPTNeoXForSequenceClassification(config).eval()
    with torch.no_grad():
        for layer in model.gpt_neox.layers:  # residual stream = token embedding at every position
            for linear in (layer.attention.dense, layer.mlp.dense_4h_to_h):
                linear.weight.zero_()
                linear.bias.zero_()
        ln = model.gpt_neox.final_layer_norm
        ln.bias.copy_(torch.full((16,), 1.0))
        model.score.weight[1] = model.score.weight[1] * 0.5 + OFFSET / 16  # positive logit ~ OFFSET +- a little
    model.save_pretrained(path)
    tok.save_pretrained(path)
    e = model.gpt_neox.embed_in.weight.detach().double().numpy()
    normed = (e - e.mean(1, keepdims=True)) / np.sqrt(e.var(1, keepdims=True) + config.layer_norm_eps)
    normed = normed * ln.weight.detach().double().numpy() + ln.bias.detach().double().numpy()
    return normed @ model.score.weight[1].detach().double().numpy()


def expected(table: np.ndarray, tokenizer, text: str) -> float:
    return float(table[tokenizer(text)["input_ids"][-1]])


def test_the_reward_is_the_positive_logit_at_each_texts_own_last_token(tmp_path):
    from irm.config import RewardConfig
    from irm.models import tiny_tokenizer
    from irm.reward import build_reward

    table = last_token_classifier(tmp_path / "clf")
    assert table.min() > OFFSET / 2 and np.ptp(table) > 0.1  # far from the lexicon reward, and not constant
    reward = build_reward(RewardConfig(kind="classifier", classifier=str(tmp_path / "clf")), device="cpu")
    texts = ["good", "the plot was bad and the acting awful", "great film", "boring"]  # padded to one width
    tok = tiny_tokenizer()
    assert reward(texts) == pytest.approx([expected(table, tok, t) for t in texts], abs=1e-4)
    other = build_reward(RewardConfig(kind="classifier", classifier=str(tmp_path / "clf"), positive_label=0),
                         device="cpu")
    assert other(texts) != pytest.approx(reward(texts), abs=1e-2)  # positive_label picks the logit


def journal_rows(paths) -> list[tuple[str, float]]:
    rows = []
    for path in paths:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            rows += list(zip(rec["texts"], rec["rewards"]))
    return rows


@pytest.mark.slow
def test_rlhf_evaluate_and_ablate_score_with_the_classifier(tmp_path):
    from irm.models import tiny_tokenizer

    table = last_token_classifier(tmp_path / "clf")
    run_dir = tmp_path / "run"
    out = proc.run([sys.executable, "-m", "irm", "pipeline", "--config", str(CONFIG), "--run_dir", str(run_dir),
                    "--log_dir", str(tmp_path / "tb"), "--reward.kind", "classifier",
                    "--reward.classifier", str(tmp_path / "clf")], timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    tok = tiny_tokenizer()
    # rlhf: PPO's rewards are the classifier's (the lexicon reward never exceeds 10)
    metrics = [json.loads(line) for line in (run_dir / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(table.min() - 1e-3 <= m["rlhf/reward_mean"] <= table.max() + 1e-3 for m in metrics)
    # evaluate-reward: each journalled completion's reward is the logit at its last token
    evaluated = 0
    for label in ("base", "tuned"):
        for line in (run_dir / "evaluate" / f"{label}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            for completion, r in zip(rec["completions"], rec["rewards"]):
                if tok(completion)["input_ids"]:  # an empty completion ends on the prompt, which is not journalled
                    assert r == pytest.approx(expected(table, tok, completion), abs=1e-4)
                    evaluated += 1
    assert evaluated > 0
    assert json.loads((run_dir / "reward_eval.json").read_text())["base"]["mean"] > OFFSET / 2
    # ablate: every scored text of every condition
    rows = journal_rows(sorted((run_dir / "ablate").rglob("*.jsonl")))
    assert rows
    for text, r in rows:
        assert r == pytest.approx(expected(table, tok, text), abs=1e-4)
    ablation = json.loads((run_dir / "ablation.json").read_text())
    assert ablation["before"]["mean"] > OFFSET / 2


def test_the_explainer_is_told_the_classifiers_own_name_for_the_rewarded_label(tmp_path):
    from irm.config import RewardConfig
    from irm.reward import reward_description

    last_token_classifier(tmp_path / "clf")
    cfg = RewardConfig(kind="classifier", classifier=str(tmp_path / "clf"))
    assert "positive (#1) label" in reward_description(cfg)  # transformers' placeholder LABEL_1 is not a name
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    config["id2label"] = {"0": "NEGATIVE", "1": "POSITIVE"}
    (tmp_path / "clf" / "config.json").write_text(json.dumps(config))
    assert "'POSITIVE' label" in reward_description(cfg)
    assert "'NEGATIVE' label" in reward_description(RewardConfig(kind="classifier", classifier=cfg.classifier,
                                                                 positive_label=0))
    assert "positive (#2) label" in reward_description(RewardConfig(kind="classifier", classifier=cfg.classifier,
                                                                    positive_label=2))  # no such entry: no crash
