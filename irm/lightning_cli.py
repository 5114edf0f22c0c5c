"""`python -m irm fit|validate|test`: Lightning's CLI over any LightningModule + LightningDataModule named in the
config (`class_path`), e.g. configs/sae.yaml (irm.sae.SAEModule on irm.activations.ActivationDataModule) or
configs/regression.yaml. Every Trainer option works from the command line (--trainer.strategy ddp,
--trainer.precision bf16-mixed, --ckpt_path last, ...). `--run_dir` and `--layer` place the fit inside a run
directory where the stage that trains the same classes puts it (`run_paths`): they are the only paths to say."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Optional

from irm.errors import UserError

RUN_ARGUMENTS = ("--run_dir", "--layer")


def _class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def section_of(spec):
    """The run-config section (irm.config's SAEConfig, RegressionConfig, ...) that the model or data class named by
    the parsed `spec` (class_path + init_args) takes as `cfg`, built from its parsed values; None when it takes none."""
    import typing

    init = spec.get("init_args") if spec is not None else None
    values = init.get("cfg") if init is not None else None
    if values is None:
        return None
    section = typing.get_type_hints(_class(spec.class_path).__init__)["cfg"]
    return section(**values.as_dict())


def run_paths(data: type, run_dir: str, layer: Optional[int]) -> list[tuple[tuple[type, ...], dict]]:
    """Where a fit whose data module is a `data` reads and writes inside `run_dir`, as the stage that trains the same
    classes does (`python -m irm sae` for layer `layer`, `python -m irm regression`): (classes, {init argument:
    value}) pairs. The data module reads the layer's cache or the run's deltas; the ModelCheckpoint writes to
    <stage folder>/checkpoints, the export callback to the stage folder; TensorBoard and CSV loggers take the run's
    name and the stage folder as version, irm.loggers' <log_dir>/<run name>/<stage>. Without `layer`, an SAE fit
    gets only the loggers' name, and None for the cache: only --layer can name it."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from irm.activations import ActivationDataModule, cache_layer_dir
    from irm.loggers import run_name
    from irm.readers import IRM_EXPORT
    from irm.regression import DeltaDataModule, ExportRegression
    from irm.sae import ExportSAEs
    from irm.sae.export import layer_dir
    from irm.artifacts import CHECKPOINTS
    from irm.stages import artifact

    loggers = (TensorBoardLogger, CSVLogger)
    if issubclass(data, ActivationDataModule):
        if layer is None:
            return [((data,), {"layer_dir": None}), (loggers, {"name": run_name(run_dir)})]
        stage = layer_dir(run_dir, layer)
        paths = [((data,), {"layer_dir": cache_layer_dir(run_dir, layer)}), ((ExportSAEs,), {"dirpath": stage})]
    elif issubclass(data, DeltaDataModule):
        if layer is not None:
            raise UserError(f"--layer does not apply to {data.__name__}: the deltas hold every chosen layer's codes; "
                            "give --run_dir only")
        stage = artifact(run_dir, "regression")
        paths = [((data,), {"deltas_dir": artifact(run_dir, "deltas")}),
                 ((ExportRegression,), {"path": stage / IRM_EXPORT})]
    else:
        raise UserError(f"--run_dir places the paths of an ActivationDataModule or DeltaDataModule fit, not of "
                        f"{data.__module__}.{data.__name__}; drop --run_dir/--layer and set its paths")
    return [*paths, ((ModelCheckpoint,), {"dirpath": stage / CHECKPOINTS}),
            (loggers, {"name": run_name(run_dir), "version": stage.relative_to(run_dir).as_posix()})]


def _components(config):
    """(where, class, init_args) of the data module, every callback and every logger in one subcommand's config."""
    from jsonargparse import Namespace

    trainer = config.get("trainer") or Namespace()
    parts = [("data", config.get("data"))]
    for key in ("callbacks", "logger"):
        value = trainer.get(key)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        parts += [(f"trainer.{key}" if i is None else f"trainer.{key}[{i}] ({item.class_path})", item)
                  for i, item in items if isinstance(item, Namespace)]
    for where, spec in parts:
        if isinstance(spec, Namespace) and spec.get("class_path"):
            if spec.get("init_args") is None:
                spec.init_args = Namespace()
            yield where, _class(spec.class_path), spec.init_args


def place(config, binding: bool) -> list[str]:
    """Fill in, in place, the paths of one subcommand's `config` that --run_dir/--layer decide (`run_paths`) and the
    config leaves unset (None or the class's own default). A path the config sets is kept, unless `binding` (the run
    or layer was said on the command line) and it differs: returned as a problem. Raises UserError for a run or
    layer that cannot place this fit."""
    run_dir, layer = config.get("run_dir"), config.get("layer")
    if run_dir is None:
        if layer is not None:
            raise UserError("--layer needs --run_dir, the run whose layer it is (e.g. --run_dir runs/tiny --layer 3)")
        return []
    components = list(_components(config))
    data = next((cls for where, cls, _ in components if where == "data"), None)
    if data is None:  # jsonargparse says what is missing
        return []
    said = f"--run_dir {run_dir}" + (f" --layer {layer}" if layer is not None else "")
    problems = []
    for classes, values in run_paths(data, run_dir, layer):
        for where, cls, init in components:
            if not issubclass(cls, classes):
                continue
            for arg, value in values.items():
                current = init.get(arg)
                default = inspect.signature(cls.__init__).parameters[arg].default
                if current is None or current == default:
                    if value is None:
                        raise UserError(f"{where}.init_args.{arg} is unset and {said} cannot name it: give --layer, "
                                        f"e.g. --run_dir {run_dir} --layer 3")
                    init[arg] = str(value)
                elif binding and value is not None and Path(current).resolve() != Path(value).resolve():
                    problems.append(f"{where}.init_args.{arg}={current} contradicts {said}, which puts it at "
                                    f"{value}; drop one of the two")
    return problems


def _cli_class():
    """LightningCLI with --run_dir and --layer (`place`), that checks the config sections it is given before building
    anything, and whose Trainer construction turns a refused --trainer.* setting into one line: any error Lightning
    raises while building the Trainer from the user's trainer settings (e.g. FSDP on a CPU, an unknown accelerator)
    is a setting the user chose, worth a UserError, not a traceback. Errors elsewhere are left alone. Returns the
    CLI class and its parser class."""
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from irm.config import refuse

    class Parser(LightningArgumentParser):
        def validate(self, namespace, *args, **kwargs):
            """jsonargparse checks a config as soon as it is parsed, and the data's path is required there: the
            check sees the paths --run_dir/--layer fill in (the CLI fills the config itself before building)."""
            namespace = namespace.clone()
            subcommand = namespace.get("subcommand")
            config = namespace.get(subcommand) if subcommand else namespace
            if config is not None and "run_dir" in config:
                place(config, binding=False)
            return super().validate(namespace, *args, **kwargs)

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument("--run_dir", type=Optional[str], default=None,
                                help="the run directory: the data, checkpoints, export and logs go where the stage "
                                     "training these classes puts them (python -m irm sae / regression)")
            parser.add_argument("--layer", type=Optional[int], default=None,
                                help="the layer an SAE fit trains (its cache <run_dir>/cache/layer-NN)")

        def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
            # --run_dir/--layer said on the command line decide the paths; in a config file they only fill what the
            # file leaves unset, so a config that spells its own paths keeps them.
            argv = sys.argv[1:] if args is None else args
            self.binding = isinstance(argv, list) and any(a.split("=")[0] in RUN_ARGUMENTS for a in argv)
            super().parse_arguments(parser, args)

        def before_instantiate_classes(self) -> None:
            """The paths --run_dir/--layer place (`place`), then the model's and the data's `cfg` (one section, given
            to both: the YAML's anchor) through the section's own range checks (`check`, what irm.config.check_all
            runs for the stages)."""
            config = self.config[self.subcommand] if self.subcommand else self.config
            problems = place(config, self.binding)
            sections = [s for s in (section_of(config.get("model")), section_of(config.get("data"))) if s is not None]
            problems += list(dict.fromkeys(p for s in sections for p in s.check()))
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

    return CLI, Parser


def cli_main(argv: list[str]) -> None:
    import lightning as L

    from irm.config import RunConfig
    from irm.config_docs import document

    document(RunConfig)  # every section's field comments, shown by --help (e.g. --model.help irm.sae.SAEModule)
    # The CLI reads sys.argv itself: DDP's launcher restarts this very command line in each worker process, so
    # sys.argv must be the command being run (`python -m irm fit ...`), whoever called cli_main.
    sys.argv = [sys.argv[0], *argv]
    cli, parser = _cli_class()
    try:
        cli(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"prog": "python -m irm"},
            parser_class=parser,
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
