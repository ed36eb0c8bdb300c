"""`rlhf <command>`: run a pipeline, one stage, or a tool (data generation, preference collection).

Bad input exits with code 2 and one line on stderr; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from rlhf.errors import UserError

# stages with their own command (`collect` is a command group of its own: serve, export, ...)
CLI_STAGES = ("pretrain", "sft", "reward", "grpo", "ppo", "dpo", "eval", "loop")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a pipeline of stages (skips complete ones, resumes interrupted ones)")
    run.add_argument("pipeline", help="pipeline YAML, e.g. configs/demo/pipeline.yaml")
    run.add_argument("overrides", nargs="*", help="key=value; <stage>.<key>=value reaches one stage")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and every later one")
    run.add_argument("--only", metavar="STAGE", help="run only this stage (its inputs must be complete); with --from STAGE it reruns")
    run.add_argument("--overwrite", action="store_true",
                     help="replace another stage's or another kind's artifact found in a stage directory")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    from rlhf.pipeline import stage_help

    for kind in CLI_STAGES:
        stage = sub.add_parser(kind, help=stage_help(kind))
        stage.add_argument("config", nargs="?", help="stage YAML (omit for the defaults)")
        stage.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")
        stage.add_argument("--overwrite", action="store_true", help="replace another config's artifact in output_dir")
        stage.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    compare = sub.add_parser("compare", help="compare RL algorithms × seeds on one budget: runs, W&B group, report.html")
    compare.add_argument("config", help="comparison YAML, e.g. configs/compare/demo.yaml")
    compare.add_argument("overrides", nargs="*", help="dotted key=value, e.g. budget.samples=512 seeds=[0,1]")
    compare.add_argument("--report-only", action="store_true", help="run nothing: rebuild the report from what is on disk")
    compare.add_argument("--fail-fast", action="store_true", help="stop at the first failed run (default: report it, go on)")
    compare.add_argument("--overwrite", action="store_true", help="replace another config's artifact in a run directory")
    compare.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    collect = sub.add_parser("collect",
                             help="preference collection: serve, add-annotator, revoke-annotator, export, leaderboard, simulate, stats")
    collect.add_argument("args", nargs=argparse.REMAINDER, help="see `rlhf collect --help`")

    imp = sub.add_parser("import-model", help="write a GGUF file or a packaged model as a Hugging Face model directory")
    imp.add_argument("source", help="a .gguf file, or a packaged model name: " + ", ".join(_packaged_models()))
    imp.add_argument("output_dir", help="directory to write (config, safetensors, tokenizer, generation config)")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    imp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    world = sub.add_parser("world", help="the embedded demo world: regenerate its data files and tokenizer")
    world.add_argument("args", nargs=argparse.REMAINDER, help="arguments of `python -m rlhf.world.generate_data`")
    return parser


def _packaged_models() -> list[str]:
    from rlhf.model_import import PACKAGED_MODELS

    return list(PACKAGED_MODELS)


def _split_config_arg(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`rlhf sft train.max_steps=3` (no YAML) reads the first override as a config path otherwise."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, overrides


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from rlhf.generation import check_environment
        from rlhf.pipeline import run_pipeline

        check_environment()

        run_pipeline(args.pipeline, args.overrides, from_stage=args.from_stage, only=args.only, overwrite=args.overwrite,
                     debug=args.debug)
        return 0
    if args.command == "compare":
        from rlhf.compare.runner import run_comparison

        result = run_comparison(args.config, args.overrides, report_only=args.report_only, overwrite=args.overwrite,
                                fail_fast=args.fail_fast, debug=args.debug)
        if result["report"] is not None:
            print(result["table"])
            print(f"report: {result['report']}")
        if result["failed"]:
            print(f"not complete: {', '.join(result['failed'])} (rerun the same command to retry or resume)", file=sys.stderr)
        return 1 if result["failed"] else 0
    if args.command == "collect":
        from rlhf.collect.cli import main as collect

        return collect(args.args)
    if args.command == "import-model":
        from rlhf.model_import import import_model

        print(f"wrote {import_model(args.source, args.output_dir, overwrite=args.overwrite)}")
        return 0
    if args.command == "world":
        from rlhf.world.generate_data import main as generate

        return generate(args.args) or 0
    from rlhf.config import load_config, parse_overrides
    from rlhf.distributed import process_state
    from rlhf.generation import check_environment

    check_environment()  # a bad RLHF_* variable stops the stage before it loads anything
    from rlhf.pipeline import recipe, run_stage

    config, overrides = _split_config_arg(args.config, args.overrides)
    cfg = load_config(recipe(args.command).Config, config, parse_overrides(overrides))
    result = run_stage(args.command, cfg, overwrite=args.overwrite, debug=args.debug)
    if process_state().is_main_process:  # under `accelerate launch`, once
        print({k: round(v, 4) for k, v in result["metrics"].items()})
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, Slurm and Kubernetes send) unwinds like Ctrl-C: the stage stops resumable."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # key=value overrides may follow options (`rlhf run p.yaml --only sft sft.train.max_steps=3`)
    if argv[:1] == ["world"]:  # its own parser reads every argument, options included
        from rlhf.world.generate_data import main as generate

        return generate(argv[1:]) or 0
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars of tiny models are noise between our own bars
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    on_main_thread = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    if on_main_thread:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return dispatch(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM): rerun the same command to resume", file=sys.stderr)
        return 143  # 128 + 15, what a shell reports for a process SIGTERM ended
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
