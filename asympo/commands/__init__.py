"""One module per command (`asympo <command>`), each with a `run(cfg)` that builds its pieces and runs.

The command line (asympo.cli) imports a command's module only when that command runs, so `asympo --help`
and a bad key answer without loading torch.
"""

# command -> (its config class's name in asympo.config, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("TrainConfig", "RL post-training (default: tiny model, built-in task, asympo, async runtime)"),
    "sft": ("SFTConfig", "warm-start the tiny model by supervised fine-tuning on the built-in task"),
    "eval": ("EvalConfig", "held-out greedy accuracy, pass@1 and pass@k of a model"),
    "study": ("StudyConfig", "the staleness study: objectives x staleness k x seeds, a table and plots"),
    "serve": ("ServeConfig", "a model over an OpenAI-compatible HTTP API, with a weight-reload endpoint"),
    "bench": ("BenchConfig", "performance ratios measured side by side: engine, learner, runtime, precision"),
}
