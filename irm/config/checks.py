"""Every range check of a run's config, and what the stages about to run need from the environment: `check_all`,
which the CLI and the pipeline call before anything runs or is written."""

from __future__ import annotations

from irm.config.interpretation import ABLATION_MODES
from irm.config.problems import Problems, refuse
from irm.config.run import LOGGERS, RunConfig
from irm.config.training import PrefixSampling


def _check_run_and_model(ch: Problems, cfg: RunConfig) -> None:
    """Ranges of run-wide settings, the model and the corpus."""
    ch.at_least(cfg, "devices", 1)
    ch.at_least(cfg, "threads", 1, optional=True)
    ch.need(all(name in LOGGERS for name in cfg.loggers), "loggers", cfg.loggers, f"each must be one of {LOGGERS}")
    ch.at_least(cfg, "seed", 0)
    m = cfg.model
    ch.at_least(m, "tiny_layers", 1)
    ch.need(m.tiny_d_model >= 4 and m.tiny_d_model % 4 == 0, "model.tiny_d_model", m.tiny_d_model,
            "must be a positive multiple of 4 (the tiny models' attention heads)")
    ch.at_least(cfg.corpus, "n_documents", 1)


def _check_reward(ch: Problems, cfg: RunConfig) -> None:
    """Ranges of the reward."""
    r = cfg.reward
    ch.positive(r, "scale")
    ch.positive(r, "clip")
    ch.at_least(r, "positive_label", 0)
    ch.need(r.kind != "classifier" or bool(r.classifier), "reward.classifier", r.classifier,
            "reward.kind classifier needs a sequence classifier (hub id or local directory)")
    ch.need(r.lexicon is None or r.kind == "lexicon", "reward.lexicon", r.lexicon,
            "is read only by reward.kind lexicon; remove it or set reward.kind: lexicon")
    if r.lexicon is not None and r.kind == "lexicon":
        from irm.reward_lexicon import lexicon_problem

        problem = lexicon_problem(cfg.reward, cfg.triples, cfg.seed)
        if problem:
            ch.out.append(problem)


def _check_rlhf_and_evaluate_reward(ch: Problems, cfg: RunConfig) -> None:
    """Ranges of PPO, the reward evaluation, layer divergence."""
    h = cfg.rlhf
    for name in ("steps", "batch_size", "ppo_epochs", "response_length", "checkpoint_every"):
        ch.at_least(h, name, 1)
    ch.at_least(h, "mini_batch_size", 2)  # PPO whitens advantages within a mini-batch
    ch.need(h.mini_batch_size < 1 or h.batch_size % h.mini_batch_size == 0, "rlhf.batch_size", h.batch_size,
            f"must be a multiple of mini_batch_size ({h.mini_batch_size}; paper: 64 and 16)")
    ch.need(1 <= h.prompt_min_tokens <= h.prompt_max_tokens, "rlhf.prompt_min_tokens", h.prompt_min_tokens,
            f"need 1 <= prompt_min_tokens <= prompt_max_tokens ({h.prompt_max_tokens})")
    for name in ("learning_rate", "max_grad_norm", "temperature"):
        ch.positive(h, name)
    ch.at_least(h, "kl_coef", 0)
    ch.at_least(h, "lora_rank", 0)
    ch.positive(h, "lora_alpha")
    ch.fraction(h, "lora_dropout")
    ch.at_least(cfg.evaluate_reward, "n", 2)  # an interval needs two completions
    _check_prefix_sampling(ch, cfg.evaluate_reward)
    ch.at_least(cfg.divergence, "top_k", 1)


def _check_prefix_sampling(ch: Problems, section: PrefixSampling) -> None:
    """Ranges of the completions a section samples after corpus prefixes (evaluate_reward, ablate)."""
    for name in ("prefix_tokens", "new_tokens", "batch_size"):
        ch.at_least(section, name, 1)


def _check_cache(ch: Problems, cfg: RunConfig) -> None:
    """Ranges of the activation cache."""
    c = cfg.cache
    ch.need(c.layers is None or all(isinstance(x, int) and x >= 0 for x in c.layers), "cache.layers", c.layers,
            "must be null (the divergence stage's top-k) or layer indices >= 0")
    ch.need(c.layers is None or len(c.layers) > 0, "cache.layers", c.layers,
            "list layer indices or remove it to use the divergence top-k")
    ch.need(c.layers is None or len(set(c.layers)) == len(c.layers), "cache.layers", c.layers,
            "repeats a layer; list each layer once")
    for name in ("max_length", "batch_size", "shard_rows"):
        ch.at_least(c, name, 1)
    ch.at_least(c, "n_documents", 1, optional=True)


def _check_sae(ch: Problems, cfg: RunConfig) -> None:
    """Ranges of the SAEs and their comparison."""
    ch.out.extend(cfg.sae.check())
    ch.at_least(cfg.dictionaries, "top_k", 1)
    # MMCS's verdict: a t against the chance draws' spread, which needs a few of them to be estimated
    ch.at_least(cfg.dictionaries, "chance_draws", 10)


def _check_explain_and_triples(ch: Problems, cfg: RunConfig) -> None:
    """Ranges of the explainer and the contrastive triples."""
    x = cfg.explain
    for name in ("concurrency", "window", "n_top", "n_score", "max_new_tokens"):
        ch.at_least(x, name, 1)
    for name in ("max_retries", "retry_backoff", "n_quantile"):
        ch.at_least(x, name, 0)
    ch.positive(x, "timeout")
    ch.at_least(x, "max_features", 1, optional=True)
    t = cfg.triples
    ch.at_least(t, "n", 1)
    ch.at_least(t, "max_length", 2)
    ch.fraction(t, "heldout_fraction")
    ch.need(all(isinstance(w, str) and w.strip() for w in t.heldout_words), "triples.heldout_words",
            t.heldout_words, "must be a list of non-empty words")
    ch.at_least(t, "context_texts", 0)


def _check_regression_and_lexicon(ch: Problems, cfg: RunConfig) -> None:
    """Ranges of the IRM regression and the lexicon reconstruction."""
    ch.out.extend(cfg.regression.check())
    lx = cfg.lexicon
    words = "lexicon.contexts_per_word must be >= 1, lexicon.bootstrap >= 0 and lexicon.max_words >= 2 (or null)"
    ch.at_least(lx, "contexts_per_word", 1, rule=words)
    ch.at_least(lx, "bootstrap", 0, rule=words)
    ch.at_least(lx, "sample_size", 0)
    ch.at_least(lx, "max_words", 2, optional=True, rule=words)
    p = list(lx.percentiles)
    ch.need(len(p) == 2 and 0.0 <= p[0] < p[1] <= 100.0, "lexicon.percentiles", p,
            "must be two increasing numbers in [0, 100]")


def _check_control(ch: Problems, cfg: RunConfig) -> None:
    """Ranges of the base-model control and its nulls."""
    c = cfg.control
    ch.at_least(c, "permutations", 1)
    ch.at_least(c, "bootstrap", 0)
    ch.at_least(c, "max_words", 3, optional=True)
    ch.at_least(c, "top_words", 0)
    ch.positive(c, "move_z")
    ch.need(bool(c.ridge_alphas) and all(isinstance(a, (int, float)) and a > 0 for a in c.ridge_alphas),
            "control.ridge_alphas", list(c.ridge_alphas), "must be a non-empty list of positive numbers")


def _check_calibrate(ch: Problems, cfg: RunConfig) -> None:
    c = cfg.calibrate
    ch.at_least(c, "worlds", 1)
    ch.at_least(c, "bootstrap", 20)
    ch.at_least(c, "permutations", 39)  # a one-sided p below 0.025 needs at least 40 draws
    ch.at_least(c, "max_words", 20)
    ch.at_least(c, "max_triples", 20)


def _check_diff(ch: Problems, cfg: RunConfig) -> None:
    ch.out.extend(cfg.diff.check())  # DiffConfig keeps its own ranges beside its fields


def _check_validate_features_and_ablate(ch: Problems, cfg: RunConfig) -> None:
    """Ranges of validation and ablation."""
    v = cfg.validate_features
    ch.at_least(v, "n_inputs", 1)
    ch.need(-4.0 < v.threshold < 4.0, "validate_features.threshold", v.threshold,
            "must be inside (-4, 4) (the lexicon scale)")
    a = cfg.ablate
    _check_prefix_sampling(ch, a)
    for name in ("n_prompts", "match_pool"):
        ch.at_least(a, name, 1)
    ch.at_least(a, "random_draws", 0)
    ch.need(bool(a.modes) and set(a.modes) <= set(ABLATION_MODES), "ablate.modes", list(a.modes),
            f"must be a non-empty subset of {list(ABLATION_MODES)}")


def _problems(cfg: RunConfig) -> list[str]:
    """Every range problem in `cfg`, each as `section.field=value is not valid; what a valid value is`."""
    ch = Problems(cfg)
    for check in (_check_run_and_model, _check_reward, _check_rlhf_and_evaluate_reward, _check_cache, _check_sae,
                  _check_explain_and_triples, _check_regression_and_lexicon, _check_control, _check_calibrate,
                  _check_diff, _check_validate_features_and_ablate):
        check(ch, cfg)
    return ch.out


def _environment_problems(cfg: RunConfig, stages) -> list[str]:
    """What the stages about to run need from the environment, checked before the first of them starts."""
    import os

    uses_explainer = "explain" in stages or ("triples" in stages and cfg.triples.substitution == "llm")
    out = []
    if uses_explainer and cfg.explain.backend == "openai":
        if not cfg.explain.model:
            out.append("explain.model is empty; name the chat model for explain.backend openai (e.g. gpt-4o-mini, or "
                       "the model your vLLM/Ollama/llama.cpp server serves)")
        if not os.environ.get(cfg.explain.api_key_env):
            out.append(f"environment variable {cfg.explain.api_key_env} (explain.api_key_env) is not set; put the API "
                       "key for explain.backend openai in it (any non-empty value for a server that needs no key)")
    if "triples" in stages and cfg.triples.substitution == "llm" and cfg.explain.backend == "offline":
        out.append("triples.substitution llm needs an LLM explainer; set explain.backend to local or openai")
    return out


def check_all(cfg: RunConfig, stages=()) -> None:
    """Refuse a config with a bad value in any section, or missing what one of `stages` (the stages about to run)
    needs from the environment, in one line (UserError) before anything runs or is written."""
    refuse(_problems(cfg) + _environment_problems(cfg, set(stages)))
