"""Publishing and fetching a run's SAEs through a Hugging Face Hub repository (`irm push` / `irm pull`).

Layout (one folder per SAE, as SAELens's hub releases keep theirs): `layer-NN/x<expansion>/` holding `cfg.json`,
`sae_weights.safetensors` and `sparsity.safetensors` when measured, plus a `README.md` model card listing them. Each
folder loads with `irm.sae.load_sae(folder)` and with SAELens's `SAE.load_from_disk(folder)`. `pull` takes a repo
id (through `huggingface_hub.snapshot_download`) or a local folder already in this layout.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from irm.errors import UserError
from irm.sae.export import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, read_cfg

SAE_FOLDER = re.compile(r"layer-(\d+)/x(\d+)$")


def exported_saes(root: str | os.PathLike) -> dict[tuple[int, int], Path]:
    """{(layer, expansion): folder} of every SAE under `root` in the layout above (a run's `sae/` folder is one)."""
    root = Path(root)
    found = {}
    for cfg in sorted(root.glob(f"layer-*/x*/{CFG_FILE}")):
        m = SAE_FOLDER.search(cfg.parent.relative_to(root).as_posix())
        if m and (cfg.parent / WEIGHTS_FILE).is_file():
            found[(int(m.group(1)), int(m.group(2)))] = cfg.parent
    return found


def write_layout(run_dir: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Copy the run's exported SAEs into `folder` in the hub layout, with a model card; returns `folder`."""
    from irm.artifacts import atomic_dir, write_text
    from irm.stages import artifact

    saes = exported_saes(artifact(run_dir, "sae"))
    if not saes:
        raise UserError(f"no exported SAE under {artifact(run_dir, 'sae')}; run `irm sae` for this run first")
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        rows = []
        for (layer, expansion), src in saes.items():
            dst = tmp / f"layer-{layer:02d}" / f"x{expansion}"
            dst.mkdir(parents=True)
            for name in (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE):
                if (src / name).is_file():
                    shutil.copy2(src / name, dst / name)
            cfg = read_cfg(src)
            own = cfg.get("irm") or {}
            rows.append(f"| `layer-{layer:02d}/x{expansion}` | {cfg.get('hook_name')} | {cfg['d_in']} | {cfg['d_sae']} "
                        f"| {cfg.get('architecture')} | {own.get('activations_from', 'n/a')} |")
        model = read_cfg(next(iter(saes.values()))).get("model_name")
        write_text(tmp / "README.md", "\n".join([
            "---", "library_name: saelens", "tags: [sparse-autoencoder, irm]", "---", "",
            f"# Sparse autoencoders of {model}, trained by irm", "",
            "Each folder is one SAE (SAELens layout: cfg.json + sae_weights.safetensors, log10 feature density in "
            "sparsity.safetensors). The activations came from the RLHF-tuned checkpoint named in each cfg.json "
            "(`irm.tuned_checkpoint`); `model_name` is the base model.", "",
            "| folder | hook | d_in | d_sae | architecture | activations |", "|---|---|---|---|---|---|", *rows, "",
            "Load one with `irm.sae.load_sae(folder)` or `sae_lens.SAE.load_from_disk(folder)`.", ""]))
    return folder


def push(run_dir: str | os.PathLike, repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Upload the run's SAEs to the hub repository `repo_id` (created if missing); returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_layout(run_dir, Path(tmp) / "saes")
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                     commit_message=f"irm SAEs from {Path(run_dir).name}")
        except Exception as e:  # the network boundary: HTTP errors, the transport's own (httpx) errors, OS errors
            raise UserError(f"cannot publish to the hub repository {repo_id} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); check the network, the repo id and HF_TOKEN") from None
    return str(getattr(info, "commit_url", info))


def pull(source: str, local_dir: Optional[str | os.PathLike] = None) -> dict[tuple[int, int], Path]:
    """The SAEs of a hub repository (downloaded into `local_dir`, or the hub cache) or of a local folder in the layout
    above, as {(layer, expansion): folder}."""
    if Path(source).expanduser().is_dir():
        root = Path(source).expanduser()
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError

        try:
            root = Path(snapshot_download(source, local_dir=None if local_dir is None else str(local_dir)))
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise UserError(f"cannot fetch SAEs from {source!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                            "give a hub repo id you can reach or a local folder in irm's layout") from None
    found = exported_saes(root)
    if not found:
        raise UserError(f"{source} holds no SAE in the layout layer-NN/x<expansion>/{CFG_FILE}; was it made by "
                        "`irm push`?")
    return found
