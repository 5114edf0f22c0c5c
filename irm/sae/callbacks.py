"""What a fit of SAEModule hands to the later stages (paper 4.2): the callback that exports its SAEs when the fit
ends."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L

from irm.errors import UserError


class ExportSAEs(L.Callback):
    """When a fit ends, write every SAE of the module as cfg.json + sae_weights.safetensors under `dirpath/x<e>`
    (rank 0 only). Without `dirpath`, a datamodule reading `<run_dir>/cache/layer-NN` exports to
    `<run_dir>/sae/layer-NN`, where the later stages look."""

    def __init__(self, dirpath: Optional[str] = None):
        self.dirpath = dirpath

    def target(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        cache = getattr(trainer.datamodule, "cache", None)
        if cache is None or cache.dir.parent.name != "cache" or cache.layer is None:
            raise UserError("ExportSAEs needs dirpath unless the data is an ActivationDataModule reading "
                            "<run_dir>/cache/layer-NN; set trainer.callbacks' ExportSAEs dirpath")
        from irm.sae.export import layer_dir

        return layer_dir(cache.dir.parent.parent, cache.layer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """`pl_module`: an irm.sae.module.SAEModule."""
        if not trainer.is_global_zero:
            return
        from irm.sae.export import loadable_model_name, save_sae

        manifest = getattr(trainer.datamodule, "manifest", None) or {}
        root = self.target(trainer)
        cfg = pl_module.cfg
        mm = pl_module.init_mmcs.tolist()
        init_mmcs = None if mm[0] != mm[0] else {"max": mm[0], "hungarian": mm[1]}  # NaN: one dictionary only
        for name, sae in pl_module.saes.items():
            save_sae(sae, root / name, layer=manifest.get("layer"), site=manifest.get("site", "mlp_out"),
                     model_name=loadable_model_name(manifest.get("model")), context_size=manifest.get("max_length"),
                     # SAEs are trained on the tuned policy's activations: `model_name` is the base model's id (what
                     # other tools load), the checkpoint whose activations they encode is named here.
                     irm={"activations_from": "tuned" if manifest.get("policy") else "model_name",
                          "tuned_checkpoint": manifest.get("policy"), "base_model": manifest.get("model"),
                          "expansion": int(name[1:]), "l1_coefficient": cfg.l1_coefficient,
                          "learning_rate": cfg.learning_rate, "global_step": trainer.global_step,
                          "normalize": cfg.normalize, "revive": pl_module.revive, "dead_window": cfg.dead_window,
                          "init_mmcs": init_mmcs, "cache_rows": manifest.get("rows"),
                          "corpus_fingerprint": manifest.get("corpus_fingerprint")})
