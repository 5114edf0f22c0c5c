"""The command line: help lists every stage, config errors end in one line with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from irm.cli import LIGHTNING, STAGES
from irm.errors import UserError

RESERVED = ["rlhf", "evaluate-reward", "divergence", "cache", "dictionaries", "explain", "triples", "lexicon",
            "ablate", "report", "pipeline"]


def irm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "irm", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_every_subcommand():
    out = irm("--help")
    assert out.returncode == 0
    for name in [*LIGHTNING, *RESERVED]:
        assert f" {name} " in out.stdout, name
    assert set(RESERVED) <= set(STAGES)
    # stages numbered once each, 1..n in pipeline order (the pipeline command itself unnumbered)
    from irm.stages import ORDER

    for i, name in enumerate(ORDER, 1):
        assert f"{i:>2}. {name} " in out.stdout, (i, name)


def test_help_does_not_import_torch():
    code = "import sys; from irm.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("False")


@pytest.mark.parametrize("args, needle", [
    (["--rlhf.stepz", "3"], "stepz"),                       # misspelled key
    (["--rlhf.steps", "many"], "steps"),                    # wrong type
    (["--config", "no/such/file.yaml"], "no/such/file.yaml"),  # missing config file
    (["--explain.backend", "gpt5"], "backend"),             # value outside the allowed set
])
def test_config_errors_are_one_line_exit_2(args, needle, tmp_path):
    out = irm("rlhf", *args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]
    assert "Traceback" not in out.stderr


def test_misspelled_key_in_yaml_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("run_dir: r\nsae:\n  epocs: 3\n")
    out = irm("sae", "--config", "c.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "unknown option `sae.epocs`; did you mean `sae.epochs`?" in out.stderr


def sections():
    import dataclasses

    from irm.config import RunConfig

    return [f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(getattr(RunConfig(), f.name))]


def a_field(section: str, want_type=None):
    """The first field of `section` whose default is of `want_type` (any field when None)."""
    import dataclasses

    from irm.config import RunConfig

    obj = getattr(RunConfig(), section)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if want_type is None or (type(value) is want_type):
            return f.name, value
    return None, None


@pytest.mark.parametrize("section", sections())
def test_every_section_misspelling_gets_the_closest_key_and_wrong_type_the_valid_one(section):
    """For every section: a key with two letters swapped is answered with the real key; a word where a number
    belongs is answered with the field's type and default. Both `<problem>; <fix>`, in one line."""
    from irm.cli import parse_config

    name, _ = a_field(section)
    typo = name[:-2] + name[-1] + name[-2] if len(name) > 3 else name + "x"
    with pytest.raises(UserError) as e:
        parse_config("cache", [f"--{section}.{typo}", "3"])
    assert f"unknown option `{section}.{typo}`; did you mean `{section}.{name}`?" in str(e.value)
    number, default = a_field(section, int)
    if number is None:
        number, default = a_field(section, float)
    if number is not None:
        with pytest.raises(UserError) as e:
            parse_config("cache", [f"--{section}.{number}", "lots"])
        message = str(e.value)
        assert f"{section}.{number} got 'lots'" in message and "; set " in message
        assert f"(default: {default!r})" in message and "\n" not in message


def test_help_shows_each_fields_comment_from_its_dataclass():
    """The comment beside a field in its dataclass (irm/config/) is its help text (one place for it)."""
    import inspect

    from irm.config import CacheConfig
    from irm.config_docs import field_docs

    source = inspect.getsource(CacheConfig)
    docs = field_docs(CacheConfig)
    assert docs["max_length"] == source.split("max_length: int = 64  # ")[1].splitlines()[0].strip()
    out = irm("cache", "--help")
    assert out.returncode == 0
    flat = " ".join(out.stdout.split())
    assert f"--cache.max_length MAX_LENGTH {docs['max_length']}" in flat
    assert "--force" in flat


def test_a_shared_fields_comment_is_written_once_and_shown_for_each_section_that_extends_it():
    """evaluate_reward and ablate both extend PrefixSampling: the comments written there document both sections'
    keys, beside each section's own."""
    from irm.config import AblateConfig, EvaluateRewardConfig, PrefixSampling
    from irm.config_docs import field_docs

    shared = field_docs(PrefixSampling)
    assert set(shared) == {"prefix_tokens", "new_tokens", "batch_size"}
    for cls, own in ((EvaluateRewardConfig, "n"), (AblateConfig, "random_draws")):
        docs = field_docs(cls)
        assert {k: docs.get(k) for k in shared} == shared and own in docs
    flat = " ".join(irm("ablate", "--help").stdout.split())
    for section in ("evaluate_reward", "ablate"):
        assert f"--{section}.new_tokens NEW_TOKENS {shared['new_tokens']}" in flat


def test_version_and_print_config_without_stray_keys(tmp_path):
    from importlib.metadata import version

    out = irm("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"irm {version('irm')}"
    printed = irm("cache", "--print_config", cwd=tmp_path)
    assert printed.returncode == 0 and "force" not in printed.stdout


def test_print_config_round_trips(tmp_path):
    out = irm("cache", "--config", "configs/tiny.yaml".replace("configs", str(__import__("pathlib").Path(__file__)
                                                                               .parents[1] / "configs")),
              "--cache.max_length", "17", "--print_config", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (tmp_path / "printed.yaml").write_text(out.stdout)
    from irm.cli import parse_config

    cfg = parse_config("cache", ["--config", str(tmp_path / "printed.yaml")])
    assert cfg.cache.max_length == 17
    assert cfg.model.name == "tiny-gpt-neox"


def test_unknown_command_exit_2():
    out = irm("frobnicate")
    assert out.returncode == 2 and "frobnicate" in out.stderr


def test_a_trainer_setting_lightning_refuses_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """FSDP on a CPU: Lightning's accelerator check refuses it; irm says so in one line, not a traceback (in this
    process through irm.cli.main; test_sae's missing-cache refusal runs as a process of its own)."""
    from test_sae import fit_config, planted_cache, refused_in_process

    layer_dir = tmp_path / "cache" / "layer-00"
    planted_cache(layer_dir, d=8, k=6, n=200, shard_rows=100)
    config = fit_config(tmp_path, layer_dir, max_epochs=1)
    monkeypatch.chdir(tmp_path)
    last = refused_in_process(monkeypatch, capsys, "fit", "--config", str(config), "--trainer.strategy", "fsdp")
    assert "bad trainer setting" in last and "fsdp" in last and "GPU" in last and "Traceback" not in last


def test_threads_knob_caps_torch_threads():
    import torch

    from irm.cli import parse_config
    from irm.runtime import set_threads

    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = parse_config("cache", ["--config", str(tiny), "--threads", "1", "--devices", "2"])
    assert (cfg.threads, cfg.devices) == (1, 2)
    before = torch.get_num_threads()
    try:
        # start from another count than the one asked for (test modules pin torch to one thread at import, so a
        # set_threads that did nothing would pass a check that only asks for 1)
        torch.set_num_threads(3)
        set_threads(cfg.threads)
        assert torch.get_num_threads() == 1
        set_threads(2)
        assert torch.get_num_threads() == 2
        set_threads(None)  # the default leaves torch alone
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_renamed_sections_are_read_under_their_old_names_with_a_warning(tmp_path, capsys):
    """`evaluate` and `validate` became `evaluate_reward` and `validate_features` (stage = section): a YAML and a
    command line with the old names give the same RunConfig as the new names, one warning per old name; a file that
    uses both names for one section is refused in one line."""
    import yaml

    from irm.cli import parse_config
    from irm.config import RENAMED_SECTIONS

    assert RENAMED_SECTIONS == {"evaluate": "evaluate_reward", "validate": "validate_features"}
    body = {"run_dir": str(tmp_path / "run"), "seed": 3}
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(yaml.safe_dump({**body, "evaluate": {"n": 7}, "validate": {"n_inputs": 5}}))
    new.write_text(yaml.safe_dump({**body, "evaluate_reward": {"n": 7}, "validate_features": {"n_inputs": 5}}))
    capsys.readouterr()
    from_new = parse_config("report", ["--config", str(new), "--evaluate_reward.batch_size", "3"])
    assert capsys.readouterr().err == ""
    from_old = parse_config("report", [f"--config={old}", "--evaluate.batch_size", "3"])
    warnings = capsys.readouterr().err.splitlines()
    assert from_old == from_new
    assert (from_new.evaluate_reward.n, from_new.evaluate_reward.batch_size, from_new.validate_features.n_inputs,
            from_new.seed) == (7, 3, 5, 3)
    assert len(warnings) == 3 and all("irm 0.3" in w for w in warnings)
    assert "`evaluate` is now `evaluate_reward`" in warnings[0] and str(old) in warnings[0]
    assert "`validate` is now `validate_features`" in warnings[1] and "--evaluate.batch_size" in warnings[2]

    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({**body, "evaluate": {"n": 7}, "evaluate_reward": {"n": 8}}))
    with pytest.raises(UserError, match="sets both `evaluate` and `evaluate_reward`"):
        parse_config("report", ["--config", str(both)])


@pytest.mark.parametrize("config", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_use_no_renamed_section(config, capsys):
    """The configs we ship use the current section names: no deprecation warning when a run reads them."""
    import yaml

    from irm.config import RENAMED_SECTIONS

    data = yaml.safe_load(config.read_text())
    assert not set(RENAMED_SECTIONS) & set(data)
    if "class_path" not in config.read_text():  # the Lightning fit configs are not run configs
        from irm.cli import parse_config

        parse_config("report", ["--config", str(config)])
        assert "warning" not in capsys.readouterr().err
