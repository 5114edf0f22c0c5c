"""`python -m irm fit|validate|test`: Lightning's CLI over any LightningModule + LightningDataModule named in the
config (`class_path`), e.g. configs/sae.yaml (irm.sae.SAEModule on irm.activations.ActivationDataModule) or
configs/regression.yaml. Every Trainer option works from the command line (--trainer.strategy ddp,
--trainer.precision bf16-mixed, --ckpt_path last, ...)."""

from __future__ import annotations

from irm.errors import UserError


def section_of(spec):
    """The run-config section (irm.config's SAEConfig, RegressionConfig, ...) that the model or data class named by
    the parsed `spec` (class_path + init_args) takes as `cfg`, built from its parsed values; None when it takes none."""
    import importlib
    import typing

    init = spec.get("init_args") if spec is not None else None
    values = init.get("cfg") if init is not None else None
    if values is None:
        return None
    module, _, name = spec.class_path.rpartition(".")
    section = typing.get_type_hints(getattr(importlib.import_module(module), name).__init__)["cfg"]
    return section(**values.as_dict())


def _cli_class():
    """LightningCLI that checks the config sections it is given before building anything, and whose Trainer
    construction turns a refused --trainer.* setting into one line: any error Lightning raises while building the
    Trainer from the user's trainer settings (e.g. FSDP on a CPU, an unknown accelerator) is a setting the user
    chose, worth a UserError, not a traceback. Errors elsewhere are left alone."""
    from lightning.pytorch.cli import LightningCLI

    from irm.config import refuse

    class CLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            """The model's and the data's `cfg` (one section, given to both: the YAML's anchor) through the
            section's own range checks (`check`, what irm.config.check_all runs for the stages)."""
            config = self.config[self.subcommand] if self.subcommand else self.config
            sections = [s for s in (section_of(config.get("model")), section_of(config.get("data"))) if s is not None]
            problems = list(dict.fromkeys(p for s in sections for p in s.check()))
            if len(sections) == 2 and sections[0] != sections[1]:
                problems.append("model.init_args.cfg and data.init_args.cfg differ; they are one config section: "
                                "set both to the same values (configs/*.yaml give both one YAML anchor)")
            refuse(problems)

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

    from irm.config import RunConfig
    from irm.config_docs import document

    document(RunConfig)  # every section's field comments, shown by --help (e.g. --model.help irm.sae.SAEModule)
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
