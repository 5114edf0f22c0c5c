"""Sharing SAEs through a Hugging Face Hub repository layout (issue 24.3): `irm push` writes one SAELens-style folder
per SAE with a model card, `irm pull` reads it back (here from a local folder in the same layout: no network)."""

import os
import subprocess
import sys

import pytest
import torch

from irm.errors import UserError


def exported_run(tmp_path):
    """A run directory with two layers' x1/x2 SAEs exported as the sae stage exports them (random weights)."""
    from irm.sae import save_sae, sae_dir
    from irm.sae.export import write_sparsity
    from irm.sae.model import SparseAutoencoder

    run = tmp_path / "run"
    torch.manual_seed(0)
    saes = {}
    for layer in (3, 7):
        for e in (1, 2):
            sae = SparseAutoencoder(16, 16 * e, tied=e == 1)
            save_sae(sae, sae_dir(run, layer, e), layer=layer, model_name="EleutherAI/pythia-70m",
                     irm={"activations_from": "tuned"})
            write_sparsity(sae_dir(run, layer, e), torch.rand(16 * e).tolist())
            saes[(layer, e)] = sae
    return run, saes


def test_layout_round_trip_loads_every_sae_with_its_card(tmp_path):
    from irm.sae import load_sae
    from irm.sae.hub import pull, write_layout

    run, saes = exported_run(tmp_path)
    folder = write_layout(run, tmp_path / "repo")
    card = (folder / "README.md").read_text()
    assert "library_name: saelens" in card and "EleutherAI/pythia-70m" in card
    found = pull(str(folder))
    assert sorted(found) == sorted(saes)
    x = torch.randn(32, 16)
    for key, directory in found.items():
        assert {p.name for p in directory.iterdir()} == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}
        again = load_sae(directory)
        assert again.tied == saes[key].tied
        torch.testing.assert_close(again.decode(again.encode(x)), saes[key].decode(saes[key].encode(x)))


def test_pull_of_a_folder_without_saes_and_push_without_a_hub_are_one_line(tmp_path):
    from irm.sae.hub import pull

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no SAE"):
        pull(str(tmp_path / "empty"))
    run, _ = exported_run(tmp_path)
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test"}  # nothing listens on port 9
    out = subprocess.run([sys.executable, "-m", "irm", "push", str(run), "someone/saes"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot publish to the hub repository someone/saes" in lines[0]
    listed = subprocess.run([sys.executable, "-m", "irm", "pull", str(run / "sae")], capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0 and listed.stdout.count("layer ") == 4
