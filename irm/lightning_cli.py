"""`python -m irm fit|validate|test`: Lightning's CLI over any LightningModule + LightningDataModule named in the
config (`class_path`), e.g. configs/sae.yaml (irm.sae.SAEModule on irm.activations.ActivationDataModule) or
configs/regression.yaml. Every Trainer option works from the command line (--trainer.strategy ddp,
--trainer.precision bf16-mixed, --ckpt_path last, ...)."""

from __future__ import annotations

from irm.errors import UserError


def _cli_class():
    """LightningCLI whose Trainer construction turns a refused --trainer.* setting into one line: any error
    Lightning raises while building the Trainer from the user's trainer settings (e.g. FSDP on a CPU, an unknown
    accelerator) is a setting the user chose, worth a UserError, not a traceback. Errors elsewhere are left alone."""
    from lightning.pytorch.cli import LightningCLI

    class CLI(LightningCLI):
        def instantiate_trainer(self, **kwargs):
            try:
                return super().instantiate_trainer(**kwargs)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"bad trainer setting: {' '.join(str(e).split())}") from None

    return CLI


def cli_main(argv: list[str]) -> None:
    import sys

    import lightning as L

    # The CLI reads sys.argv itself: DDP's launcher restarts this very command line in each worker process, so
    # sys.argv must be the command being run (`python -m irm fit ...`), whoever called cli_main.
    sys.argv = [sys.argv[0], *argv]
    try:
        _cli_class()(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"prog": "python -m irm"},
            # A resumed fit writes its config.yaml into the same log directory as the interrupted one.
            save_config_kwargs={"overwrite": True},
        )
    except Exception as e:
        # jsonargparse reports a failed class instantiation as a ValueError chained to the cause; a UserError
        # (missing cache, bad setting) is re-raised as itself so the CLI prints its one line and exits 2.
        cause = e
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
