"""`python -m irm fit|validate|test`: Lightning's CLI over any LightningModule + LightningDataModule named in the
config (`class_path`), e.g. configs/sae.yaml (irm.sae.SAEModule on irm.activations.ActivationDataModule) or
configs/regression.yaml. Every Trainer option works from the command line (--trainer.strategy ddp,
--trainer.precision bf16-mixed, --ckpt_path last, ...)."""

from __future__ import annotations

from irm.errors import UserError


def cli_main(argv: list[str]) -> None:
    import sys

    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    # The CLI reads sys.argv itself: DDP's launcher restarts this very command line in each worker process, so
    # sys.argv must be the command being run (`python -m irm fit ...`), whoever called cli_main.
    sys.argv = [sys.argv[0], *argv]
    try:
        LightningCLI(
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
            if _raised_in(cause, "accelerator_connector.py"):
                # Lightning's check of the --trainer.accelerator/strategy/devices/num_nodes combination (e.g. FSDP
                # on a CPU): a setting the user chose, worth one line, not a traceback.
                raise UserError(f"bad trainer setting: {' '.join(str(cause).split())}") from None
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def _raised_in(error: BaseException, filename: str) -> bool:
    """Whether `error` was raised by code in a file named `filename` (its traceback's innermost frame)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith(filename)
