"""Property-based tests (hypothesis) of what the other suites check only by example: the activation discretisation
shown to the explainer, and the config loader (a run's own config dump reloads to the same config; an unknown key is
always refused). The reward and MMCS properties live in tests/test_reward.py and tests/test_dictionaries.py."""

from __future__ import annotations

import dataclasses
import string

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from irm.cli import parse_config
from irm.config import RunConfig
from irm.errors import UserError
from irm.stages import dump_config
from irm.explain.records import SCALE, discretise

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
records = st.lists(st.lists(finite, min_size=0, max_size=12).map(lambda v: np.array(v, dtype=np.float32)),
                   min_size=1, max_size=5)


@given(records, st.floats(1e-6, 1e6, allow_nan=False))
def test_discretise_is_the_nearest_tenth_of_the_shared_maximum(acts, max_act):
    out = discretise(acts, max_act)
    assert [len(d) for d in out] == [len(a) for a in acts]
    for a, d in zip(acts, out):
        for value, level in zip(a.tolist(), d):
            assert isinstance(level, int) and 0 <= level <= SCALE
            exact = SCALE * max(value, 0.0) / max_act
            if exact <= SCALE:
                assert abs(level - exact) <= 0.5 + 1e-9  # nearest level
            else:
                assert level == SCALE  # above the maximum: clipped


@given(records, st.floats(1e-3, 1e3, allow_nan=False), st.integers(-20, 20))
def test_discretise_is_monotone_and_scale_free(acts, max_act, k):
    out = discretise(acts, max_act)
    flat = [(v, d) for a, ds in zip(acts, out) for v, d in zip(a.tolist(), ds)]
    for (v1, d1), (v2, d2) in zip(sorted(flat), sorted(flat)[1:]):
        assert d1 <= d2  # a larger activation never gets a lower level
    # Scaling activations and maximum by a power of two is exact in floating point: the levels cannot change.
    c = 2.0 ** k
    assert discretise([a.astype(np.float64) * c for a in acts], max_act * c) == out


@given(records, st.floats(-1e6, 0.0, allow_nan=False))
def test_a_feature_that_never_fires_is_all_zero(acts, max_act):
    assert discretise(acts, max_act) == [[0] * len(a) for a in acts]


# Values the config loader must carry through a YAML dump unchanged, including strings YAML would otherwise read as
# numbers, booleans or null, and strings it cannot read as one scalar at all (":" once broke the dump).
tricky_text = st.one_of(
    st.text(string.ascii_letters + string.digits + " -_./:", min_size=1, max_size=20).filter(lambda s: s.strip() == s),
    st.sampled_from(["null", "true", "no", "1", "1e3", "0x10", "~", "on", ":", "a: b", "- x", "[x"]),
)
# jsonargparse reads the string "null" (quoted or not) as None for an Optional field: such a value cannot round trip
# there (a known limitation, harmless for URLs, revisions and file names).
optional_text = st.none() | tricky_text.filter(lambda s: s.lower() not in ("null", "~", "none"))
configs = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "run_dir": tricky_text,
    "model": st.fixed_dictionaries({
        "name": tricky_text,
        "dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
        "tiny_layers": st.integers(1, 64),
        "revision": optional_text,
    }),
    "corpus": st.fixed_dictionaries({
        "source": tricky_text,
        "n_documents": st.integers(1, 10**7),
        "data_files": st.none() | st.lists(tricky_text, min_size=1, max_size=3),
    }),
    "cache": st.fixed_dictionaries({
        "layers": st.none() | st.lists(st.integers(0, 100), min_size=1, max_size=4),
        "site": st.sampled_from(["mlp_out", "mlp_hidden"]),
        "n_documents": st.none() | st.integers(1, 10**6),
    }),
    "sae": st.fixed_dictionaries({
        "expansions": st.lists(st.integers(1, 64), min_size=1, max_size=4),
        "l1_coefficient": st.floats(0, 10, allow_nan=False),
        "learning_rate": st.floats(1e-9, 1.0, allow_nan=False),
        "tied": st.booleans(),
    }),
    "explain": st.fixed_dictionaries({
        "backend": st.sampled_from(["offline", "local", "openai"]),
        "base_url": optional_text,
        "max_features": st.none() | st.integers(1, 1000),
        "retry_backoff": st.floats(0, 100, allow_nan=False),
    }),
    "lexicon": st.fixed_dictionaries({
        "percentiles": st.lists(st.floats(0, 100, allow_nan=False), min_size=2, max_size=2),
    }),
})


def expected(values: dict) -> RunConfig:
    """The RunConfig `values` describe, built directly from the dataclasses (independently of the loader)."""
    cfg = RunConfig()
    for key, value in values.items():
        if isinstance(value, dict):
            section = getattr(cfg, key)
            setattr(cfg, key, dataclasses.replace(section, **value))
        else:
            setattr(cfg, key, value)
    return cfg


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(configs)
def test_config_dump_reloads_to_the_same_config(tmp_path, values):
    cfg = expected(values)
    # What open_run_dir writes as <run_dir>/config.yaml must reload to the very same run.
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert parse_config("pipeline", ["--config", str(path)]) == cfg


section_names = [f.name for f in dataclasses.fields(RunConfig)
                 if dataclasses.is_dataclass(getattr(RunConfig(), f.name))]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(section_names), st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True))
def test_an_unknown_key_is_always_refused_by_name(tmp_path, section, key):
    known = {f.name for f in dataclasses.fields(getattr(RunConfig(), section))}
    assume(key not in known)  # a drawn known key is discarded and redrawn, not counted as a pass
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({section: {key: 1}}))
    with pytest.raises(UserError, match=key):
        parse_config("pipeline", ["--config", str(path)])
