"""`python -m irm ablate` (paper 5.2, table 5): mean reward of the tuned model's completions before and after
zero-ablating, inside each chosen layer's SAE, the features the explainer labelled "related to the reward", with the
controls the paper lacks: the SAE splice with nothing ablated, and as many random features ablated, each drawn to
match a labelled feature's firing frequency and its mean contribution (mean code times decoder row norm: a feature
that fires on every token, or writes a large vector, moves the reward more than one that does not, whatever it
means). The headline numbers are paired differences on the same prompts: ablated minus splice-only (paired t over
prompts), and ablated minus random. For the latter the question is whether the labelled set is an outlier among
random sets, so its interval is a t prediction interval over the random draws (issue 22): with per-draw mean
differences m_d (d = 1..D), mean(m) +- t(D-1) s_m sqrt(1 + 1/D), exact under normality when the labelled set is one
more draw of the random sets' distribution (the prompts are shared, so their noise cancels in m_d). Its width shrinks
as t(D-1) sqrt(1 + 1/D): 4.97 s_m at 3 draws, 2.51 at 8, 2.37 at 10. Each draw is one more generation pass over the
prompts (on the quickstart about 6 s).

Features are zeroed in the SAE's code space, never as dimensions of the reconstruction (the authors' mistake). Two
splice modes: `reconstruction` replaces the site output by the SAE's reconstruction (the paper's), `error` keeps
the SAE's error term so only the ablated features' decoder contribution is removed (nothing ablated = the model).

With `devices: N` (irm.parallel) each condition's prompts are split among N processes, each appending to its own
file; every prompt samples from its own seed, so which process draws it does not change its completion, and a rerun
with any number of processes picks up what any earlier run finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from irm.artifacts import RunDir, fingerprint, read_jsonl, write_json
from irm.config import ABLATION_MODES as MODES, RunConfig
from irm.errors import UserError
from irm.parallel import Ranks, launch
from irm.sampling import journalled_batches, sample_prompts
from irm.sampling import rule as sampling_rule
from irm.stats import difference_vs_draws, mean_ci, paired_difference
from irm.stages import relpath

def intervention(sae, features: list[int], mode: str) -> Callable:
    """The function `irm.models.splice` applies to a layer's site output: encode with `sae`, zero `features` in the
    codes, and return the reconstruction (`reconstruction`) or the output minus the zeroed features' decoder
    contribution (`error`). `ablate.modes` is checked by irm.config.check_all before any stage runs."""
    import torch

    if mode not in MODES:
        raise ValueError(f"unknown splice mode {mode!r}; one of {list(MODES)}")
    sae_dtype = next(sae.parameters()).dtype
    index = torch.as_tensor(features, dtype=torch.long)

    def fn(out_BSD):
        codes_BSF = sae.encode(out_BSD.to(sae_dtype))
        kept_BSF = codes_BSF.index_fill(-1, index.to(codes_BSF.device), 0.0)
        if mode == "reconstruction":
            return sae.decode(kept_BSF).to(out_BSD.dtype)
        # Both decodes run the same arithmetic, so with nothing zeroed the difference is exactly 0 and the model
        # is reproduced bit for bit; with features zeroed it is their decoder contribution (decode is affine).
        removed_BSD = sae.decode(codes_BSF) - sae.decode(kept_BSF)
        return out_BSD - removed_BSD.to(out_BSD.dtype)

    return fn


def feature_statistics(model, tokenizer, saes: dict, prompts: list[list[int]], site: str,
                       batch_size: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per layer and SAE feature, over the prompts' real (non-pad) token positions, read from the tuned model without
    any splice: (frequencies, magnitudes), the fraction of positions where the feature fires (code > 0) and its mean
    contribution to the site output, mean code times its decoder row's norm in the raw space."""
    import torch

    from irm.models import capture

    layers = sorted(saes)
    active: dict[int, np.ndarray] = {}
    total: dict[int, np.ndarray] = {}
    n = 0
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer.pad({"input_ids": prompts[start:start + batch_size]}, return_tensors="pt").to(model.device)
        keep_BT = batch["attention_mask"].bool()
        with torch.inference_mode(), capture(model, layers, site) as acts:
            model(**batch)
        for layer in layers:
            sae = saes[layer]
            with torch.inference_mode():
                codes_NF = sae.encode(acts[layer][keep_BT].to(next(sae.parameters()).dtype))
            active[layer] = active.get(layer, 0) + (codes_NF > 0).sum(dim=0).cpu().numpy().astype(np.int64)
            total[layer] = total.get(layer, 0) + codes_NF.double().sum(dim=0).cpu().numpy()
        n += int(keep_BT.sum())
    frequencies, magnitudes = {}, {}
    for layer in layers:
        sae = saes[layer]
        # decode(codes) = (codes W_dec + b_dec) / input_scale: feature i writes code_i W_dec[i] / input_scale
        norms = (sae.dictionary.double().norm(dim=1) / float(sae.input_scale)).cpu().numpy()
        frequencies[layer] = np.asarray(active[layer], dtype=np.float64) / max(n, 1)
        magnitudes[layer] = np.asarray(total[layer], dtype=np.float64) / max(n, 1) * norms
    return frequencies, magnitudes


def draw_matched_features(features: dict[int, list[int]], frequencies: dict[int, np.ndarray], draws: int,
                          seed: int, pool: int,
                          magnitudes: dict[int, np.ndarray] | None = None) -> list[dict[int, list[int]]]:
    """`draws` control sets matched on firing frequency and, with `magnitudes`, on mean contribution (mean code
    times decoder norm): per layer and labelled feature, one feature drawn at random from the `pool` live
    (frequency > 0), unlabelled, not yet drawn features nearest to it in (log frequency, log magnitude), each
    coordinate in units of its spread over the layer's candidates. Dead features are never drawn (a labelled feature
    that never fires is matched with the rarest, weakest live ones). Draw d depends only on (seed, d), so adding
    draws keeps the old."""
    out = []
    for d in range(draws):
        rng = np.random.default_rng([seed, d])
        drawn = {}
        for layer in sorted(features):
            freq = np.asarray(frequencies[layer], dtype=np.float64)
            labelled = sorted(set(features[layer]))
            live = np.flatnonzero(freq > 0)
            candidates = np.setdiff1d(live, labelled)
            if len(labelled) > len(candidates):
                raise UserError(
                    f"layer {layer}: {len(labelled)} features are labelled related but only {len(candidates)} other "
                    f"features fire on the ablation prompts, too few for a frequency-matched random control; label "
                    f"fewer features (explain.max_features) or use more prompts (ablate.n_prompts)")
            coords = [freq] if magnitudes is None else [freq, np.abs(np.asarray(magnitudes[layer], np.float64))]
            scaled = []
            for values in coords:
                positive = values[live][values[live] > 0]
                floor = positive.min() if len(positive) else 1.0
                logs = np.log(np.maximum(values, floor))
                spread = logs[candidates].std() if len(coords) > 1 and len(candidates) > 1 else 0.0
                scaled.append(logs / (spread if spread > 0 else 1.0))
            point = np.stack(scaled, axis=1)  # features x coordinates
            taken = np.zeros(len(candidates), dtype=bool)
            chosen = []
            for i in labelled:
                gap = np.sqrt(((point[candidates] - point[i]) ** 2).sum(axis=1))
                gap[taken] = np.inf
                nearest = np.argsort(gap, kind="stable")[: min(pool, int((~taken).sum()))]
                pick = int(rng.choice(nearest))
                taken[pick] = True
                chosen.append(int(candidates[pick]))
            drawn[layer] = sorted(chosen)
        out.append(drawn)
    return out


def result_files(directory: Path, stem: str) -> list[Path]:
    """Every file holding finished prompts of the condition `stem`: the single-process file `<stem>.jsonl` and the
    per-rank files `<stem>.rank-R.jsonl` of runs with any number of processes."""
    return sorted(p for p in (directory / f"{stem}.jsonl", *directory.glob(f"{stem}.rank-*.jsonl")) if p.is_file())


def own_file(directory: Path, stem: str, ranks: Ranks) -> Path:
    """The file this process appends to: one per rank, so no two processes ever append to the same file."""
    return directory / (f"{stem}.jsonl" if ranks.world_size == 1 else f"{stem}.rank-{ranks.rank}.jsonl")


def _finished(directory: Path, stem: str) -> dict[int, float]:
    done: dict[int, float] = {}
    for path in result_files(directory, stem):
        for rec in read_jsonl(path):
            done.update(zip(rec["prompts"], rec["rewards"]))
    return done


def condition_rewards(ranks: Ranks, directory: Path, stem: str, n_prompts: int, batch_size: int,
                      score_batch: Callable, desc: str) -> np.ndarray:
    """Rewards of prompts 0..n_prompts-1 under one condition, returned on every rank.

    Rank 0 reads what earlier runs finished (every file of the condition, whatever their process count) and tells
    the others, so all ranks split the same remainder; each rank takes its contiguous share and appends finished
    batches ({"prompts", "rewards", "texts"}) to its own file, so a killed run never redoes a batch and a rerun may
    use another number of processes. `score_batch(indices) -> (texts, rewards)`."""
    done = ranks.broadcast(_finished(directory, stem) if ranks.is_main else None)
    todo = [i for i in range(n_prompts) if i not in done]

    def step(indices: list[int]) -> dict:
        texts, rewards = score_batch(indices)
        return {"prompts": indices, "rewards": [float(r) for r in rewards], "texts": texts}

    for indices, record in journalled_batches(ranks, own_file(directory, stem, ranks), todo, n_prompts, batch_size,
                                              step, desc):
        done.update(zip(indices, record["rewards"]))
    return np.array([done[i] for i in range(n_prompts)], dtype=np.float64)


def _paired(rewards: np.ndarray, before: np.ndarray) -> dict:
    return {**mean_ci(rewards), "diff_vs_before": mean_ci(rewards - before)}


def _random_summary(draw_rewards: np.ndarray, draws: list[dict], before: np.ndarray,
                    frequencies: dict[int, np.ndarray] | None = None,
                    magnitudes: dict[int, np.ndarray] | None = None) -> dict:
    """draw_rewards [draws, prompts]: pooled over all samples, over per-draw means, and paired per prompt (the
    prompt's mean over draws minus its reward before); each draw with its features' firing frequencies and mean
    contributions (when given)."""
    def freqs(f: dict) -> dict:
        return {key: {str(layer): [float(values[layer][i]) for i in ix] for layer, ix in sorted(f.items())}
                for key, values in (("frequencies", frequencies), ("magnitudes", magnitudes)) if values is not None}

    return {
        **mean_ci(draw_rewards),
        "per_draw_means": mean_ci(draw_rewards.mean(axis=1)),
        "diff_vs_before": mean_ci(draw_rewards.mean(axis=0) - before),
        "draws": [{"features": _json_features(f), **freqs(f), **mean_ci(r)} for f, r in zip(draws, draw_rewards)],
    }


def _json_features(features: dict[int, list[int]]) -> dict[str, list[int]]:
    return {str(layer): list(ix) for layer, ix in sorted(features.items())}


def _fmt(s: dict) -> str:
    ci = s["ci95"]
    return f"{s['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


@dataclass
class _Setup:
    """What each rank loads and checks before generating; the same on every rank (same config, same files)."""

    model: Any
    tokenizer: Any
    layers: list[int]
    related: dict[int, list[int]]
    saes: dict[int, Any]
    features: dict[int, list[int]]
    random_sets: list[dict[int, list[int]]]
    frequencies: dict[int, np.ndarray]
    magnitudes: dict[int, np.ndarray]
    prompts: list[list[int]]
    reward: Callable
    common: tuple  # what every condition's results depend on besides the intervention


def _setup(cfg: RunConfig, device) -> _Setup:
    """Load the tuned model, the SAEs, the prompts and the reward on `device`; UserError for inconsistent inputs."""
    from irm.data import load_texts, prefixes
    from irm.layers import chosen_layers
    from irm.explain import related_features
    from irm.models import load_tuned, n_layers, site_width
    from irm.reward import build_reward
    from irm.sae import load_sae, sae_dir

    a = cfg.ablate
    model, tokenizer = load_tuned(cfg, device)
    layers = sorted(chosen_layers(cfg, n_layers(model)))
    related = {int(layer): sorted({int(i) for i in ix}) for layer, ix in related_features(cfg.run_dir).items() if ix}
    stray = sorted(set(related) - set(layers))
    if stray:
        raise UserError(
            f"features are labelled related at layer(s) {stray}, which are not among the chosen layers {layers}; "
            f"rerun `python -m irm explain` with this config"
        )
    width = site_width(model, cfg.cache.site)
    saes = {layer: load_sae(sae_dir(cfg.run_dir, layer, cfg.sae.dictionary_pair()[0]), d_in=width, device=device) for layer in layers}
    widths = {layer: int(sae.dictionary.shape[0]) for layer, sae in saes.items()}
    for layer, ix in related.items():
        if ix[-1] >= widths[layer]:
            raise UserError(
                f"feature {ix[-1]} is labelled at layer {layer} but its SAE has {widths[layer]} features; "
                f"rerun `python -m irm explain` after `python -m irm sae`"
            )
    features = {layer: related.get(layer, []) for layer in layers}

    # The whole split, not n_prompts texts: prefixes() drops texts shorter than prefix_tokens.
    texts = load_texts(cfg.corpus, cfg.corpus.eval_split, seed=cfg.seed)
    prompts = prefixes(texts, tokenizer, a.prefix_tokens)[: a.n_prompts]
    if len(prompts) < a.n_prompts:
        raise UserError(
            f"ablate.n_prompts is {a.n_prompts} but the {cfg.corpus.eval_split!r} split gives only {len(prompts)} "
            f"prefixes of {a.prefix_tokens} tokens; lower ablate.n_prompts or ablate.prefix_tokens, or raise "
            f"corpus.n_documents"
        )
    frequencies, magnitudes = feature_statistics(model, tokenizer, saes, prompts, cfg.cache.site, a.batch_size)
    random_sets = draw_matched_features(features, frequencies, a.random_draws, cfg.seed, a.match_pool, magnitudes)
    reward = build_reward(cfg.reward, device)
    rd = RunDir(cfg.run_dir)
    stamps = {s: (rd.stage_record(s) or {}).get("completed_at") for s in ("rlhf", "sae")}
    common = (cfg.seed, cfg.corpus, cfg.reward, cfg.cache.site, a.prefix_tokens, sampling_rule(cfg.rlhf, a.new_tokens),
              stamps)
    return _Setup(model, tokenizer, layers, related, saes, features, random_sets, frequencies, magnitudes, prompts,
                  reward, common)


def _summary(cfg: RunConfig, s: _Setup, modes: dict, before: np.ndarray) -> dict:
    """The content of ablation.json from every condition's paired rewards."""
    a = cfg.ablate
    n_features = sum(len(ix) for ix in s.features.values())
    before_s = mean_ci(before)
    after_mode = "reconstruction" if "reconstruction" in modes else a.modes[0]
    after = modes[after_mode]["ablated"]
    result = {
        "n_prompts": len(s.prompts),
        "new_tokens": a.new_tokens,
        "prefix_tokens": a.prefix_tokens,
        "layers": s.layers,
        "site": cfg.cache.site,
        "features": _json_features(s.features),
        "n_features": n_features,
        "random_draws": len(s.random_sets),
        "random_control": (f"per labelled feature, one of the {a.match_pool} live unlabelled features nearest in (log "
                           f"firing frequency, log mean contribution), each in units of its spread over the layer: "
                           f"frequency = fraction of the prompts' tokens where the code > 0, contribution = mean code "
                           f"times decoder row norm (raw space), tuned model, no splice; dead features never drawn"),
        "feature_frequencies": {str(layer): [float(s.frequencies[layer][i]) for i in ix]
                                for layer, ix in sorted(s.features.items())},
        "feature_magnitudes": {str(layer): [float(s.magnitudes[layer][i]) for i in ix]
                               for layer, ix in sorted(s.features.items())},
        "model": before_s,
        "modes": modes,
        "before": {"mean": before_s["mean"], "ci95": before_s["ci95"]},
        "after": {"mean": after["mean"], "ci95": after["ci95"], "mode": after_mode},
    }
    if n_features == 0:
        result["note"] = "no feature is labelled related: 'ablated' and 'random' are the splice with nothing ablated"
    return result


def _print_summary(result: dict, s: _Setup) -> None:
    n_features, before_s, modes = result["n_features"], result["model"], result["modes"]
    print(f"irm ablate: mean reward over {len(s.prompts)} prompts, 95% CI; {n_features} labelled feature(s) "
          f"at layers {sorted(s.related)}" + (" (none labelled: controls only)" if n_features == 0 else ""))
    print(f"  before (tuned model)        {_fmt(before_s)}")
    for mode, conds in modes.items():
        for name in ("splice", "ablated", "random"):
            if name in conds:
                c = conds[name]
                print(f"  {mode + ' ' + name:<27} {_fmt(c)}   vs before {_fmt(c['diff_vs_before'])}")
        for name, text in (("ablated_minus_splice", "ablated - splice"), ("ablated_minus_random", "ablated - random")):
            if name in conds:
                print(f"  {mode + ' ' + text:<27} {_fmt(conds[name])}   (paired on prompts)")


def _ablate(ranks: Ranks, cfg: RunConfig) -> dict | None:
    """One rank's part of the stage (irm.parallel): every rank generates its share of each condition's prompts;
    rank 0 summarises, writes ablation.json, records the stage and returns the summary."""
    from irm.models import splice
    from irm.runtime import start
    from irm.stages import mark_done

    device = start(cfg.seed, ranks=ranks)
    try:
        s, error = _setup(cfg, device), None
    except UserError as e:
        s, error = None, str(e)
    # The ranks agree before anyone generates: a rank that stopped alone would leave the others waiting at the
    # first collective.
    errors = [e for e in ranks.gather(error) if e is not None]
    if errors:
        raise UserError(errors[0])

    a = cfg.ablate
    rd = RunDir(cfg.run_dir)
    directory = rd.path("ablate")
    used: list[Path] = []

    def rewards_of(desc: str, mode: str | None, ablate: dict[int, list[int]] | None) -> np.ndarray:
        # A condition's results are keyed by what they depend on, not by its name: conditions that are the same
        # intervention (e.g. "ablated" and "splice" when nothing is labelled) share files and run once, and a
        # changed policy, SAE, corpus or sampling setting never reuses stale rewards.
        stem = f"{mode or 'model'}-{fingerprint(s.common, mode, None if ablate is None else _json_features(ablate))}"
        fns = {} if ablate is None else {layer: intervention(s.saes[layer], ablate[layer], mode) for layer in s.layers}

        def score_batch(indices: list[int]):
            # Prompt i is drawn with its own seed (irm.sampling.prompt_seed): the same noise in every condition,
            # batch, resume and process (common random numbers: conditions differ only by the intervention).
            with splice(s.model, fns, site=cfg.cache.site):
                out = sample_prompts(s.model, s.tokenizer, s.prompts, indices, sampling_rule(cfg.rlhf, a.new_tokens),
                                     cfg.seed).texts
            return out, s.reward(out)

        rewards = condition_rewards(ranks, directory, stem, len(s.prompts), a.batch_size, score_batch,
                                    f"ablate {desc}")
        used.extend(result_files(directory, stem))
        return rewards

    before = rewards_of("model", None, None)
    nothing = {layer: [] for layer in s.layers}
    modes = {}
    for mode in a.modes:
        splice_r = rewards_of(f"{mode} splice", mode, nothing)
        ablated_r = rewards_of(f"{mode} ablated", mode, s.features)
        modes[mode] = {"splice": _paired(splice_r, before), "ablated": _paired(ablated_r, before),
                       "ablated_minus_splice": paired_difference(ablated_r, splice_r)}
        if s.random_sets:
            draw_r = np.stack([rewards_of(f"{mode} random {d + 1}/{len(s.random_sets)}", mode, f)
                               for d, f in enumerate(s.random_sets)])
            modes[mode]["random"] = _random_summary(draw_r, s.random_sets, before, s.frequencies, s.magnitudes)
            modes[mode]["ablated_minus_random"] = difference_vs_draws(ablated_r, draw_r)
    if not ranks.is_main:
        return None

    result = _summary(cfg, s, modes, before)
    write_json(rd.path(relpath("ablation")), result)
    mark_done(cfg, "ablate", [relpath("ablation"), *sorted(set(used))])

    _print_summary(result, s)
    return result


def run(cfg: RunConfig) -> dict:
    """Generate under every condition on `cfg.devices` processes (irm.parallel), score, and write
    `<run_dir>/ablation.json`; returns its content."""
    return launch(cfg, _ablate)
