"""`pipeline <stage> [hydra overrides...]`: one entry function per stage; `run` chains them.

Config stages (prepare, train, evaluate, run, params) compose the Hydra tree in conf/ with the
overrides, validate it, and only then import the heavy libraries and start work. Tool commands
(`data inspect`, ...) take ordinary arguments. STAGES and TOOLS are what the command line dispatches; a test
checks USAGE and the READMEs against them.

Errors: one that the user can fix (a PipelineError, or NoSpaceError) is printed as one line, exit status 2; any
other exception is a bug and keeps its traceback (exit status 1).

Credentials in URIs (tracking.uri=http://user:secret@host, a storage URI with keys) never reach the output, the
logs or what Hydra keeps: everything printed is scrubbed (pipeline.redaction), and an override that carries
credentials is composed from an environment variable (${oc.env:PIPELINE_SECRET_<i>}) that holds its value.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.files import NoSpaceError
from pipeline.redaction import (
    find_uris,
    hide_secret_overrides,
    install_log_filter,
    remember_secrets,
    scrub,
    scrub_stdio,
)

# What a command runs: (module, function), imported only when the command runs.
Target = tuple[str, str]

# The config stages (Hydra overrides) that run module.function(cfg); `params` and `plan` print a report here.
STAGES: dict[str, Target] = {
    "prepare": ("pipeline.stages", "prepare_stage"),
    "train": ("pipeline.stages", "train_stage"),
    "evaluate": ("pipeline.stages", "evaluate_stage"),
    "run": ("pipeline.stages", "run_pipeline"),
    "generate": ("pipeline.stages", "generate_stage"),
    "export": ("pipeline.stages", "export_stage"),
    "sweep": ("pipeline.scaling.sweep", "run_sweep"),
}
CONFIG_STAGES = (*STAGES, "params", "plan")

# The tool commands (ordinary arguments): function(rest of the command line) -> exit status, or a table of
# subcommands (`pipeline data inspect ...`). `checkpoint`, `scaling` and `jobs` parse their subcommands themselves.
TOOLS: dict[str, Target | dict[str, Target]] = {
    "data": {"inspect": ("data_prep.inspect", "main")},
    "checkpoint": ("pipeline.checkpoint.cli", "main"),
    "scaling": ("pipeline.scaling.cli", "main"),
    "preempt": ("pipeline.train.preemption", "preempt_main"),
    "submit": ("pipeline.cluster.submit", "main"),
    "jobs": ("pipeline.cluster.jobs", "main"),
}

# The errors a user can fix: printed as one line (scrubbed), exit status 2. Anything else is a bug and keeps its
# traceback. NoSpaceError is an OSError (its errno is ENOSPC or EDQUOT) that names the file and the fix.
USER_ERRORS = (PipelineError, NoSpaceError)

# The Hugging Face architectures `pipeline export` writes, by the name pipeline.evaluation.export.architecture()
# gives them (tests/pipeline/test_cli_help.py checks this against the exporter's own table).
EXPORT_ARCHITECTURES = {"gpt2": "GPT-2", "llama": "Llama", "qwen3": "Qwen 3", "bloom": "BLOOM"}
_EXPORTED = ", ".join(list(EXPORT_ARCHITECTURES.values())[:-1]) + " or " + list(EXPORT_ARCHITECTURES.values())[-1]

USAGE = f"""usage: pipeline <command> [overrides or arguments...]

Stages (Hydra overrides, e.g. model.n_layer=6 parallel.zero_stage=2 train.max_steps=1000):
  prepare      read the corpus, train the tokenizer, tokenize with Ray Data, write shards
  train        train with Ray Train + DeepSpeed (prepares the data first if needed)
  evaluate     validation loss, perplexity and samples from the last checkpoint
  run          prepare -> train -> evaluate, then print where the MLflow results are
  generate     "prompt" [overrides]: sample from the trained run (eval.temperature=0 is greedy,
               eval.top_k, eval.top_p, eval.max_new_tokens, eval.num_samples, eval.seed)
  export       the trained run as a Hugging Face transformers directory: {_EXPORTED}
  params       parameter counts and training FLOPs of a model config (e.g. model=gpt3_175b)
  plan         memory per rank and time of a layout, with a verdict against a device:
               [overrides] [--gpu H100 | --gpu-memory 80GB] [--peak-tflops T] [--mfu 0.4] [--tokens N]
  sweep        a scaling-law sweep (sweep=isoflop_tiny): train every point, fit, plot, log to MLflow

Tools:
  data inspect <dataset dir> [--verify]   counts, token statistics, decoded windows, checksums
  checkpoint inspect <dir>                what a checkpoint holds (step, layout, files), sizes verified
  checkpoint consolidate <dir> [--out F]  full fp32 weights as one safetensors file
  scaling fit sweep=<id> | csv=<file>     Chinchilla approaches 2 and 3 and Kaplan fits, with plots
  scaling predict C=<FLOPs>               compute-optimal N, D and loss with intervals from the last fit
  scaling plan C_min= C_max= [prior=]     an IsoFLOP grid centred on a prior's optimum, as a sweep config
  scaling recommend C=<FLOPs>             the compute-optimal model and run from the last fit, as a config
  scaling validate C=<FLOPs>              train that recommendation; predicted vs measured loss to MLflow
  preempt <output_dir> [--wait S]         ask the runs training there to checkpoint and stop; wait for it
                                          (a Kubernetes preStop hook: cluster/README.md)

Cluster (Ray Jobs API):
  submit <stage> [overrides] cluster=ray cluster.address=http://HOST:8265 [--no-wait]
  jobs list|status|logs|stop [job id] [--follow] --address http://HOST:8265
               (--address defaults to $RAY_API_SERVER_ADDRESS; see cluster/README.md for Slurm and KubeRay)

Add --cfg job to a stage to print the composed config instead of running it.
"""

# What a Hydra override looks like (key=value, +key=, ~key, group@pkg=): anything else after `generate` is
# the prompt.
OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.@/-]*=")

log = logging.getLogger("pipeline")


def quote_override_value(text: str) -> str:
    """text as a single-quoted Hydra override value that composes back to exactly text. Hydra keeps
    backslashes literally except before a quote (where pairs halve), and "${" would start an interpolation."""
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"


def _setup_logging() -> None:
    scrub_stdio()  # first: the log handler writes to the scrubbed stderr
    logging.basicConfig(
        level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    install_log_filter()


def _remember_secrets_of(cfg) -> None:
    """Every credential in a URI anywhere in the composed config (a YAML file may hold one too)."""
    import dataclasses
    import json

    remember_secrets(*find_uris(json.dumps(dataclasses.asdict(cfg), default=str)))


def _fail(message: str) -> None:
    print(f"error: {scrub(message)}", file=sys.stderr)
    sys.exit(2)


def plan_options(args: list[str]) -> tuple[dict, list[str]]:
    """`pipeline plan`'s own options, and the Hydra overrides among args."""
    import argparse

    parser = argparse.ArgumentParser(prog="pipeline plan", add_help=False)
    parser.add_argument("--gpu", help="a known GPU (memory and dense bf16 peak): A100-80GB, H100, H200, B200, ...")
    parser.add_argument("--gpu-memory", help="device memory per rank, e.g. 80GB (overrides --gpu's)")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per rank for the time estimate")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    parser.add_argument("--tokens", type=float, help="token budget (default: train.max_steps steps)")
    options, overrides = parser.parse_known_args(args)
    return vars(options), overrides


def _target(target: Target):
    module, function = target
    return getattr(importlib.import_module(module), function)


def run_stage(stage: str, cfg, options: dict | None = None) -> None:
    """Dispatch one config stage (STAGES, or `params` and `plan` here); `run` chains prepare, train and evaluate."""
    if stage == "params":
        import dataclasses

        from data_prep.dataset_dirs import tokenizer_vocab_size
        from pipeline.model.size import format_breakdown

        model = cfg.model
        if model.vocab_size is None:  # follows the tokenizer: count with the size it will have
            model = dataclasses.replace(model, vocab_size=tokenizer_vocab_size(cfg.data))
            print(f"(model.vocab_size follows the tokenizer: counting with its {model.vocab_size} ids)")
        print(format_breakdown(model))
        return
    if stage == "plan":
        from pipeline.stages import plan_stage

        fits = plan_stage(cfg, **(options or {}))
        sys.exit(0 if fits else 1)
    _target(STAGES[stage])(cfg)


def _check_overrides(overrides: list[str]) -> None:
    """A value the schema refuses (a wrong type, a value outside a fixed-choice field's, an unknown key) as one line
    with status 2, like every error a user can fix: hydra.main reports it over several lines with status 1. Only a
    plain command line is composed ahead: Hydra's flags (-m, --cfg, ...) and hydra.* overrides are left to it."""
    if any(not OVERRIDE.match(arg) or "hydra" in arg.split("=", 1)[0] for arg in overrides):
        return
    from pipeline.compose import compose_error, compose_node

    try:
        node = compose_node(overrides)
    except Exception as err:  # Hydra's override grammar, unknown keys, wrong types, values outside a choice
        raise compose_error(err) from err
    given = dict(arg.split("=", 1) for arg in overrides)
    model_overrides = [k for k in given if k.startswith("model.") and k != "model.init_from"]
    if node.model.init_from and model_overrides:  # the checkpoint sets the model's shape: an override must agree
        from pipeline.config.hf_shape import refuse_disagreeing_overrides
        from pipeline.config.model import ModelConfig
        from pipeline.hub import local_checkpoint

        directory = local_checkpoint(node.model.init_from, "model.init_from", str(node.output_dir), config_only=True)
        refuse_disagreeing_overrides(ModelConfig(init_from=directory),
                                     {k[len("model."):]: node.model[k[len("model."):]] for k in model_overrides})


def _hydra_main(stage: str, overrides: list[str], options: dict | None = None) -> None:
    import hydra
    from omegaconf import DictConfig

    from pipeline.compose import (
        CONFIG_NAME,
        CONFIG_PATH,
        HYDRA_VERSION_BASE,
        register_schema,
        to_pipeline_config,
    )

    register_schema()
    # Hydra keeps the overrides (a multirun saves them and the config in multirun.yaml, submitit pickles them):
    # secret values stay in this process's environment, which Hydra's launchers pass on.
    overrides, secret_env = hide_secret_overrides(overrides)
    os.environ.update(secret_env)
    _check_overrides(overrides)

    def task(cfg_node: DictConfig) -> None:
        # Here, not around hydra.main: Hydra reports what escapes the task with its own traceback and status 1.
        try:
            cfg = to_pipeline_config(cfg_node, stage)
            _remember_secrets_of(cfg)
            run_stage(stage, cfg, options)
        # Bad config or input found by a check that needs the data set, the machine or files on disk: the
        # message names the fix, a traceback would only bury it. Any other error is a bug: Hydra prints it whole.
        except USER_ERRORS as err:
            _fail(str(err))

    sys.argv = [f"pipeline {stage}", *overrides]
    hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_PATH, config_name=CONFIG_NAME)(task)()


def _run_tool(command: str, rest: list[str]) -> int:
    target = TOOLS[command]
    if isinstance(target, dict):
        if not rest or rest[0] not in target:
            _fail(f"usage: pipeline {command} {'|'.join(target)} ... (see `pipeline --help`)")
        target, rest = target[rest[0]], rest[1:]
    return _target(target)(rest)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    remember_secrets(*find_uris(" ".join(argv)))
    job_dir = os.environ.get("PIPELINE_JOB_DIR")
    if job_dir:  # a job sent by `pipeline submit`: work from the shared output directory
        Path(job_dir).mkdir(parents=True, exist_ok=True)
        os.chdir(job_dir)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in TOOLS and command not in CONFIG_STAGES:
        _fail(f"unknown command {command!r}.\n\n{USAGE}")
    try:
        if command in TOOLS:
            sys.exit(_run_tool(command, rest))
        if command == "generate" and rest and not OVERRIDE.match(rest[0]):
            rest = [f"eval.prompt={quote_override_value(rest[0])}", *rest[1:]]
        options = None
        if command == "plan":
            options, rest = plan_options(rest)
        _hydra_main(command, rest, options)
    # The one rule of every command: an error the user can fix is one line, anything else keeps its traceback.
    except USER_ERRORS as err:
        _fail(str(err))


if __name__ == "__main__":
    main()
