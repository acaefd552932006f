"""Command line: `asympo train|sft|eval|study|serve|bench [--config FILE] [key=value ...]`.

Bad input of any kind (config, data, files) ends with one line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from asympo.errors import UserError

COMMANDS = {
    "train": "run RL post-training (default: tiny model, built-in task, asympo, async runtime)",
    "sft": "warm-start the tiny model by supervised fine-tuning on the built-in task",
    "eval": "held-out greedy accuracy, pass@1 and pass@k of a model",
    "study": "the staleness study: objectives x staleness k x seeds, with a table and plots",
    "serve": "serve a model over an OpenAI-compatible HTTP API, with a weight-reload endpoint",
    "bench": "performance ratios measured side by side: engine, learner, FLOP/s vs peak, async vs sync",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="asympo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", help="YAML config file")
        p.add_argument(
            "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4"
        )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from transformers.utils import logging as hf_logging

    from asympo.config import EvalConfig, SFTConfig, StudyConfig, TrainConfig, build_config

    hf_logging.disable_progress_bar()
    if args.command == "train":
        from asympo.distributed.group import world_size
        from asympo.train import train

        cfg = build_config(TrainConfig, args.config, args.overrides)
        if cfg.learner.processes > 1 and world_size() == 1:
            from asympo.distributed.ray_ranks import train_ray_ranks, uses_ray

            if uses_ray(cfg):
                train_ray_ranks(cfg)
            else:
                launch_ranks(cfg, args)
        else:
            train(cfg)
    elif args.command == "sft":
        from asympo.sft import run_sft

        run_sft(build_config(SFTConfig, args.config, args.overrides))
    elif args.command == "eval":
        from asympo.eval_cli import run_eval

        print(json.dumps(run_eval(build_config(EvalConfig, args.config, args.overrides)), indent=2))
    elif args.command == "study":
        from asympo.study.run import run_study

        run_study(build_config(StudyConfig, args.config, args.overrides))
    elif args.command == "serve":
        from asympo.config import ServeConfig
        from asympo.serve import run_serve

        run_serve(build_config(ServeConfig, args.config, args.overrides))
    elif args.command == "bench":
        from asympo.bench import BenchConfig, run_bench

        run_bench(build_config(BenchConfig, args.config, args.overrides))


def launch_ranks(cfg, args: argparse.Namespace) -> None:
    """`learner.processes=N`: the same command as N ranks under torchrun; a failed rank ends the run."""
    from asympo.distributed.group import launch
    from asympo.distributed.run import check_supported
    from asympo.faults import RunAborted

    check_supported(cfg)
    argv = ["train", *(["--config", args.config] if args.config else []), *args.overrides]
    status = launch(cfg.learner.processes, argv)
    if status:
        raise RunAborted(
            f"a learner rank failed (torchrun exit status {status}); checkpoints already written in "
            f"{cfg.out}/checkpoints are intact: continue with resume=true"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from asympo.faults import Interrupted, RunAborted
    from asympo.heap import keep_freed_memory

    keep_freed_memory()

    try:
        run(args)
    except UserError as e:
        print(f"asympo: error: {e}", file=sys.stderr)
        return 2
    except RunAborted as e:
        print(f"asympo: run stopped: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"asympo: interrupted by {e}", file=sys.stderr)
        return 143 if e.signal_name == "SIGTERM" else 130
    except KeyboardInterrupt:
        print("asympo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
