"""Calibration of the crosscoder's "tuned-specific latents" (README "Model diffing", issue 27): paired worlds of sparse
activations, base and tuned, written as two activation caches and read by the real path (PairedDataModule, a
BatchTopK crosscoder trained through Lightning, Latent Scaling and the classification of irm.diff.scaling).

Every world draws a dictionary of `shared` unit directions that fire sparsely (probability FIRE, exponential
magnitudes) in both models with Gaussian noise. Null worlds: the tuned model holds the same latents, its directions
turned slightly and its magnitudes rescaled (what fine-tuning does to shared features), or additionally one latent
at a third of its tuned strength in the base (the world that makes an L1 crosscoder's base decoder shrink to zero).
Planted worlds: one direction fires in the tuned model only, at `effect` times a shared latent's mean magnitude.
The verdict is "supported" when at least one latent is called tuned-specific; in a planted world it must also be the
planted direction (cosine >= FOUND_COSINE with its tuned decoder), else the world counts as a miss."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from irm.calibration.core import Family, Sizes

FIRE = 0.05  # probability that a latent fires on a token
NOISE = 0.05  # sd of the per-dimension Gaussian noise, against unit-norm directions of magnitude ~1
TOKENS_PER_DOC = 16
FOUND_COSINE = 0.9
WEAK_FIRE = 0.2  # firing probability of the latent that is weak in the base: common enough that no crosscoder misses it
STEPS = 600  # optimizer steps of a world's crosscoder (batch 256): its planted latent's base decoder has decayed by then
LEARNING_RATE = 1e-2  # these worlds are 32 wide: a larger step than a 576-wide layer's 1e-3 trains them in seconds
EFFECTS = (0.5, 1.0, 2.0)
WEAK_NULL = 0.3  # the weak latent's base magnitude in the null family: above the 1/5 that would make it specific


class PairedWorld(NamedTuple):
    base: np.ndarray  # [rows, width]
    tuned: np.ndarray  # [rows, width]
    planted: np.ndarray  # [width]: the tuned-only direction (in the tuned activations when effect > 0)
    shared: np.ndarray  # [shared, width]: the base model's latent directions (latent 0 is the weak one)


def paired_world(rng: np.random.Generator, sizes: Sizes, effect: float = 0.0, turn: float = 0.0,
                 rescale: float = 0.0, weak_in_base: float = 0.0) -> PairedWorld:
    """The activations of one world.

    sizes: width (default 32), shared (latents in both, 48), rows (4096). turn: every shared direction is turned in the
    tuned model by adding a random vector of norm `turn` (renormalised: 0.2 is about 11 degrees); rescale: sd of the log of every shared latent's tuned
    magnitude factor; weak_in_base: when > 0, shared latent 0 fires in the base at this fraction of its tuned
    magnitude (at the same tokens); effect: magnitude of the planted tuned-only direction (0: none)."""
    width, n_shared, rows = int(sizes.get("width", 32)), int(sizes.get("shared", 48)), int(sizes.get("rows", 4096))
    u_KD = _unit(rng.normal(size=(n_shared, width)))
    u_tuned_KD = _unit(u_KD + turn * _unit(rng.normal(size=u_KD.shape)))
    factor_K = np.exp(rescale * rng.normal(size=n_shared))
    fire_K = np.full(n_shared, FIRE)
    if weak_in_base:
        fire_K[0] = WEAK_FIRE
    a_RK = (rng.random((rows, n_shared)) < fire_K) * rng.exponential(1.0, (rows, n_shared))
    base_a, tuned_a = a_RK.copy(), a_RK * factor_K
    if weak_in_base:
        base_a[:, 0] = weak_in_base * tuned_a[:, 0]
    planted_D = _unit(rng.normal(size=width))
    base = base_a @ u_KD + NOISE * rng.normal(size=(rows, width))
    tuned = tuned_a @ u_tuned_KD + NOISE * rng.normal(size=(rows, width))
    if effect:
        tuned += effect * ((rng.random(rows) < FIRE) * rng.exponential(1.0, rows))[:, None] * planted_D
    return PairedWorld(base, tuned, planted_D, u_KD)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def write_pair(root: str | os.PathLike, base: np.ndarray, tuned: np.ndarray, shard_rows: int = 2048) -> tuple[Path, Path]:
    """The two activation caches of a world (`root/base`, `root/tuned`), as the cache stage would write them: the
    same tokens, TOKENS_PER_DOC to a document."""
    from irm.activations.store import ShardWriter

    rows = base.shape[0]
    ids = torch.arange(rows)
    dirs = []
    for name, acts in (("base", base), ("tuned", tuned)):
        writer = ShardWriter(Path(root) / name, acts.shape[1], shard_rows=shard_rows)
        writer.add(torch.as_tensor(acts, dtype=torch.float32), ids % 50000, ids // TOKENS_PER_DOC,
                   ids % TOKENS_PER_DOC)
        writer.close(layer=0)
        dirs.append(Path(root) / name)
    return dirs[0], dirs[1]


def fit(base_dir: Path, tuned_dir: Path, *, steps: int, seed: int = 0, difference: bool = False,
        batch_size: int = 256, **hparams):
    """A crosscoder (or with `difference` an SAE module on tuned - base, `hparams` then SAEConfig's fields) trained
    `steps` optimizer steps on the pair, no logger, no checkpoints; (module, datamodule)."""
    import lightning as L

    from irm.diff.data import PairedDataModule
    from irm.runtime import seed_all

    seed_all(seed)
    data = PairedDataModule(str(base_dir), str(tuned_dir), batch_size=batch_size, val_fraction=0.25, seed=seed,
                            difference=difference)
    if difference:
        from irm.config import SAEConfig
        from irm.sae.module import SAEModule

        module = SAEModule(SAEConfig(**hparams))
    else:
        from irm.diff.config import DiffConfig
        from irm.diff.module import CrosscoderModule

        module = CrosscoderModule(DiffConfig(**hparams))
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    # A world this small trains fastest on one thread (600 steps: 2.7 s against 9-20 s on two busy cores, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(module, datamodule=data)
    finally:
        torch.set_num_threads(threads)
    return module, data


def held_out(data) -> list[torch.Tensor]:
    """The datamodule's held-out batches."""
    return list(data.val_dataloader())


def _fit_world(tmp: str, w: PairedWorld, sizes: Sizes, seed: int, **hparams):
    """`fit` on the world's pair written under `tmp`: BatchTopK with sizes' k (default 4) and expansion (2) for STEPS
    steps at LEARNING_RATE unless `hparams` say otherwise; (module, datamodule)."""
    hparams = {"activation": "batchtopk", "k": int(sizes.get("k", 4)), "expansion": int(sizes.get("expansion", 2)),
               "learning_rate": LEARNING_RATE, **hparams}
    return fit(*write_pair(tmp, w.base, w.tuned), steps=int(sizes.get("steps", STEPS)), seed=seed, **hparams)


def crosscode(w: PairedWorld, sizes: Sizes, seed: int, **hparams):
    """(trained CrosscoderModule, `read_crosscoder` of its held-out rows) of one world (`_fit_world`)."""
    from irm.diff.scaling import read_crosscoder

    with tempfile.TemporaryDirectory() as tmp:
        module, data = _fit_world(tmp, w, sizes, seed, **hparams)
        return module, read_crosscoder(module.crosscoder, held_out(data))


def crosscode_shares(w: PairedWorld, sizes: Sizes, seed: int, marks: np.ndarray):
    """(`read_crosscoder` of the held-out rows, every latent's share of activation on the rows `marks` flags over
    every row) of one world's crosscoder (`_fit_world`): what the diff stage reads for its enrichment tests."""
    from irm.diff.enrichment import marked_mass, shares
    from irm.diff.scaling import read_crosscoder

    with tempfile.TemporaryDirectory() as tmp:
        module, data = _fit_world(tmp, w, sizes, seed)
        result = read_crosscoder(module.crosscoder, held_out(data))
        m = marked_mass(module.crosscoder, data.every_row(), torch.arange(len(marks)), torch.as_tensor(marks))
    return result, shares(m["marked"], m["mass"])


def judge(rng: np.random.Generator, sizes: Sizes, effect: float = 0.0, **world) -> str:
    """One world judged by the real path: the verdict on "the tuned model holds latents the base does not"."""
    from irm.findings import NOT_DISTINGUISHABLE, SUPPORTED

    w = paired_world(rng, sizes, effect=effect, **world)
    module, result = crosscode(w, sizes, seed=int(rng.integers(2**31)))
    specific = result["classes"] == "tuned-specific"
    if not specific.any():
        return NOT_DISTINGUISHABLE
    if effect:
        return SUPPORTED if found_cosine(module.crosscoder, w.planted, specific) >= FOUND_COSINE else NOT_DISTINGUISHABLE
    return SUPPORTED


def found_cosine(cc, direction_D: np.ndarray, among_F: Optional[np.ndarray] = None) -> float:
    """The largest cosine between `direction_D` and a tuned decoder row (of the latents `among_F`, default all)."""
    from irm.diff.model import TUNED

    d_FD = cc.W_dec.detach()[:, TUNED].double()
    d_FD = d_FD / d_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos_F = (d_FD @ torch.as_tensor(direction_D, dtype=torch.float64)).numpy()
    if among_F is not None:
        cos_F = cos_F[np.asarray(among_F, dtype=bool)]
    return float(cos_F.max()) if cos_F.size else float("nan")


MARK_RATE = 0.1  # share of tokens that spell one of the reward's words
ENRICH_MAGNITUDE = 2.0  # the tuned-only latent's magnitude in the enrichment worlds: found in nearly every world
ENRICH_EFFECTS = (0.25, 0.5, 1.0)
ENRICH_PERMUTATIONS = 999
# Wider than the specificity worlds: with one tuned-specific latent among n shared ones a permutation p is at least
# 1 / (n + 1), so 48 shared latents (64 in all) could hardly reach 0.025; 96 in 128 latents can.
ENRICH_SIZES = {"shared": 96, "expansion": 4}


def judge_enrichment(rng: np.random.Generator, sizes: Sizes, on_marks: float = 0.0) -> str:
    """One world of the finding "the tuned-specific latents fire on the reward's words more than shared latents",
    judged by the real path (irm.diff.enrichment on a crosscoder trained through Lightning). Every world holds one
    tuned-only direction (ENRICH_MAGNITUDE) and marks MARK_RATE of its tokens as reward words, independently of
    every shared latent; `on_marks` of the tuned-only direction's firings are moved onto marked tokens (0: it fires
    on them at their base rate, the null). A world where no latent is called tuned-specific is "not tested"."""
    from irm.diff.enrichment import enrichment_test
    from irm.findings import NOT_TESTED, verdict_from_p

    sizes = {**ENRICH_SIZES, **sizes}
    w = paired_world(rng, sizes, turn=0.2, rescale=0.2)
    rows = w.tuned.shape[0]
    marks = rng.random(rows) < MARK_RATE
    fires = (rng.random(rows) < FIRE) & ~marks
    moved = fires & (rng.random(rows) < on_marks)
    marked_rows = np.flatnonzero(marks)
    fires[moved] = False
    fires[rng.choice(marked_rows, size=int(moved.sum()), replace=False)] = True  # moved firings, on marked tokens
    firing_marked = (rng.random(rows) < FIRE) & marks & (rng.random(rows) >= on_marks)  # base-rate firings on marks
    fires |= firing_marked
    tuned = w.tuned + ENRICH_MAGNITUDE * (fires * rng.exponential(1.0, rows))[:, None] * w.planted
    result, share = crosscode_shares(w._replace(tuned=tuned), sizes, int(rng.integers(2**31)), marks)
    e = enrichment_test([(share, result["classes"])], ENRICH_PERMUTATIONS, int(rng.integers(2**31)))
    if e["difference"] is None:
        return NOT_TESTED
    return verdict_from_p(e["p_greater"], e["p_less"])


REWARD_LATENTS = 10  # shared latents that fire only on the reward's words in the lean worlds
LEAN_EFFECTS = (0.25, 0.5, 1.0)


def judge_lean(rng: np.random.Generator, sizes: Sizes, stronger: float = 0.0, on_marks_fire: float = 0.5) -> str:
    """One world of the finding "the latents that lean toward the tuned model fire more on the reward's words"
    (irm.diff.enrichment.lean_test on a crosscoder trained through Lightning). Every latent is in both models, turned
    and rescaled at random by fine-tuning (as `paired_world`); REWARD_LATENTS of them fire only on the marked tokens
    (MARK_RATE of all), with probability `on_marks_fire` there (0.5: as often overall as the others). Planted:
    those latents' tuned magnitude times 1 + `stronger` on top of the random rescaling (RLHF strengthened the
    reward's features without creating new ones)."""
    from irm.diff.enrichment import lean_test
    from irm.findings import verdict_from_p

    sizes = {**ENRICH_SIZES, **sizes}
    width, n_shared, rows = int(sizes.get("width", 32)), int(sizes["shared"]), int(sizes.get("rows", 4096))
    u_KD = _unit(rng.normal(size=(n_shared, width)))
    u_tuned_KD = _unit(u_KD + 0.2 * _unit(rng.normal(size=u_KD.shape)))
    factor_K = np.exp(0.2 * rng.normal(size=n_shared))
    factor_K[:REWARD_LATENTS] *= 1.0 + stronger
    marks = rng.random(rows) < MARK_RATE
    fire_RK = rng.random((rows, n_shared)) < FIRE
    fire_RK[:, :REWARD_LATENTS] = marks[:, None] & (rng.random((rows, REWARD_LATENTS)) < on_marks_fire)
    a_RK = fire_RK * rng.exponential(1.0, (rows, n_shared))
    base = a_RK @ u_KD + NOISE * rng.normal(size=(rows, width))
    tuned = (a_RK * factor_K) @ u_tuned_KD + NOISE * rng.normal(size=(rows, width))
    result, share = crosscode_shares(PairedWorld(base, tuned, None, u_KD), sizes, int(rng.integers(2**31)), marks)
    t = lean_test([(result["delta"], share)], ENRICH_PERMUTATIONS, int(rng.integers(2**31)))
    return verdict_from_p(t["p_greater"], t["p_less"])


# Measured (20 worlds each, seed 0, 2 cores, ~2 s a world): nulls 0/20 and 0/20 called a latent tuned-specific
# (Clopper-Pearson upper end 0.17: too few worlds to certify the 5% limit); planted 0.5: 5/20, 1.0: 18/20.
UNIT = "planted tuned-only latent's magnitude, in shared latents' mean magnitudes"
FAMILIES: list[Family] = [
    Family("diff_specific", "tuned holds the same latents, turned and rescaled", 0.0,
           lambda rng, s: judge(rng, s, turn=0.2, rescale=0.2), UNIT, cost="slow"),
    Family("diff_specific", "one latent weak (0.3 of its tuned magnitude) in the base", 0.0,
           lambda rng, s: judge(rng, s, turn=0.2, rescale=0.2, weak_in_base=WEAK_NULL), UNIT, cost="slow"),
    *(Family("diff_specific", "one direction fires in the tuned model only", e,
             lambda rng, s, e=e: judge(rng, s, effect=e, turn=0.2, rescale=0.2), UNIT, cost="slow") for e in EFFECTS),
]
ENRICH_UNIT = "share of the tuned-only latent's firings moved onto the reward's words (base rate 0.1)"
FAMILIES += [
    Family("diff_enrichment", "a tuned-only latent blind to the reward's words", 0.0,
           lambda rng, s: judge_enrichment(rng, s), ENRICH_UNIT, cost="slow"),
    *(Family("diff_enrichment", "a tuned-only latent on the reward's words", e,
             lambda rng, s, e=e: judge_enrichment(rng, s, on_marks=e), ENRICH_UNIT, cost="slow")
      for e in ENRICH_EFFECTS),
]
LEAN_UNIT = "extra tuned magnitude of the latents on the reward's words (0.5: 1.5x)"
FAMILIES += [
    Family("diff_lean", "latents on the reward's words rescaled at random like the others", 0.0,
           lambda rng, s: judge_lean(rng, s), LEAN_UNIT, cost="slow"),
    Family("diff_lean", "latents on the reward's words, twice as frequent, rescaled at random", 0.0,
           lambda rng, s: judge_lean(rng, s, on_marks_fire=1.0), LEAN_UNIT, cost="slow"),
    *(Family("diff_lean", "latents on the reward's words strengthened in the tuned model", e,
             lambda rng, s, e=e: judge_lean(rng, s, stronger=e), LEAN_UNIT, cost="slow") for e in LEAN_EFFECTS),
]
