"""`arctic_vl`: the command line.

    arctic_vl CONFIG [--set k=v ...]           train (same as `arctic_vl train CONFIG`)
    arctic_vl validate CONFIG                  print the resolved config and model type; exit 0
    arctic_vl evaluate CONFIG [--base]         eval loss (+ exact match with eval.generate) on data.eval_sources
    arctic_vl inspect-data CONFIG              counts and the first training item's tokens, trained parts marked
    arctic_vl plugins | schema                 installed plugins / JSON Schema of the config
    arctic_vl make-tiny-model | make-synthetic-data | export ...

Exit codes: 0 success, 2 bad config or bad input (whenever found), 1 any other failure. Heavy
libraries are imported only by the verb that needs them, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from arctic_vl import plugins

USAGE = """usage: arctic_vl [VERB] ...

verbs:
  CONFIG | train CONFIG        train from a YAML config (resumes from the latest checkpoint)
  validate CONFIG              check a config and print it resolved, with the model type
  evaluate CONFIG [--base]     evaluate the run's newest weights (final/, or the latest checkpoint when it is
                               newer) on data.eval_sources; --base: the untrained base model
  inspect-data CONFIG [--n N]  counts and the first N training items' tokens (trained parts marked; default 1)
  plugins                      list installed plugins and what they registered (and their verbs)
  schema                       print the JSON Schema of the config
  make-tiny-model FAMILY DIR   write a tiny random VLM of a family, with tokenizer and processor
  make-synthetic-data DIR      write the synthetic shapes data set
  export RUN_DIR --out OUT [--merge-lora]   HF model of the run's newest weights (LoRA merged, adapter in
                               OUT/adapter; --checkpoint step-N for another checkpoint)

Config verbs take --set SECTION.KEY=VALUE (repeatable). Plugins may add verbs: see `arctic_vl plugins`.
Exit codes: 0 success, 2 bad config or input, 1 other failure.
"""


def _config_parser(prog: str, help_text: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"arctic_vl {prog}", description=help_text)
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set trainer.max_steps=10 (repeatable)")
    return p


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Accept `--local_rank N` / `--local_rank=N` from deepspeed and torch.distributed.launch."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def cmd_train(argv: list[str]) -> int:
    """`arctic_vl train CONFIG [--set K=V ...]`: train (resuming if the run has checkpoints); prints the summary."""
    args = _config_parser("train", "Train from a config; rerunning the same command resumes.").parse_args(argv)
    from arctic_vl.engine import Engine

    summary = Engine(args.config, args.overrides).train()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_validate(argv: list[str]) -> int:
    """`arctic_vl validate CONFIG`: check the config; prints it resolved with the model type (exit 2 if bad)."""
    parser = _config_parser("validate", "Validate a config (no weights, no network) and print it resolved.")
    args = parser.parse_args(argv)
    import yaml

    from arctic_vl.config.schema import where
    from arctic_vl.engine import Engine
    from arctic_vl.errors import ConfigError

    engine = Engine(args.config, args.overrides)
    try:
        model = engine.describe_model()
    except ConfigError as e:  # e.g. a name_or_path that is no local directory: point at the config line
        raise ConfigError(f"{where(engine.config, ('model', 'name_or_path'))}: model: {e}") from None
    print(yaml.safe_dump(engine.config.to_dict(), sort_keys=False).rstrip())
    print(f"# model: {model}")
    print(f"# config OK: {args.config}")
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    """`arctic_vl evaluate CONFIG [--base]`: evaluate the run's newest weights (or, with --base, the untrained
    base model) on data.eval_sources; prints which weights first (stderr), then the results."""
    p = _config_parser("evaluate", "Evaluate the run's newest weights (final/, or the latest checkpoint when it is "
                       "newer) on data.eval_sources.")
    p.add_argument("--base", action="store_true",
                   help="evaluate the configured base model, untrained (recorded at step 0), not the run's weights")
    args = p.parse_args(argv)
    from arctic_vl.engine import Engine

    results = Engine(args.config, args.overrides).evaluate(base=args.base)
    print(json.dumps(results, indent=1, default=str))
    return 0


def cmd_inspect_data(argv: list[str]) -> int:
    """`arctic_vl inspect-data CONFIG [--n N] [--epoch E]`: counts and the first N training items' tokens."""
    p = _config_parser(
        "inspect-data", "Build the run's data as training does (no weights, no process group): counts, skipped "
        "records, and the first items of an epoch in training order with their trained tokens marked."
    )
    p.add_argument("--n", type=int, default=1, metavar="N",
                   help="how many training items to show, in training order (default 1; 0 prints the counts only)")
    p.add_argument("--epoch", type=int, default=0, help="the epoch whose items (order, augmentation) to show")
    args = p.parse_args(argv)
    if args.n < 0:
        p.error("--n must be >= 0")
    from arctic_vl.commands.inspect_data import inspect_data

    print(inspect_data(args.config, args.overrides, n=args.n, epoch=args.epoch))
    return 0


def cmd_plugins(argv: list[str]) -> int:
    """`arctic_vl plugins`: the installed plugins and what each registered."""
    argparse.ArgumentParser(
        prog="arctic_vl plugins", description="List plugins and what they registered."
    ).parse_args(argv)
    print(plugins.describe())
    return 0


def cmd_schema(argv: list[str]) -> int:
    """`arctic_vl schema`: the config's JSON Schema, on stdout."""
    argparse.ArgumentParser(prog="arctic_vl schema", description="Print the config's JSON Schema.").parse_args(argv)
    from arctic_vl.config.schema import json_schema

    print(json.dumps(json_schema(), indent=1))
    return 0


def cmd_make_tiny_model(argv: list[str]) -> int:
    """`arctic_vl make-tiny-model FAMILY DIR`: write a tiny random VLM with tokenizer and processor."""
    from arctic_vl.models.tiny import make_tiny_model_cli

    return make_tiny_model_cli(argv)


def cmd_export(argv: list[str]) -> int:
    """`arctic_vl export RUN_DIR --out OUT [--merge-lora]`: an HF model of the run's newest weights
    (`commands.export`)."""
    from arctic_vl.commands.export import main

    return main(argv)


def cmd_make_synthetic_data(argv: list[str]) -> int:
    """`arctic_vl make-synthetic-data DIR`: write the synthetic shapes data set (`arctic_vl.data.synthetic.main`)."""
    from arctic_vl.data.synthetic import main

    return main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train, "validate": cmd_validate, "evaluate": cmd_evaluate, "inspect-data": cmd_inspect_data,
    "plugins": cmd_plugins, "schema": cmd_schema, "make-tiny-model": cmd_make_tiny_model,
    "make-synthetic-data": cmd_make_synthetic_data, "export": cmd_export,
}


# The core's verbs always win the dispatch: a plugin may not register one of them.
plugins.reserve_cli_verbs(COMMANDS)


def dispatch(argv: list[str]) -> int:
    """Run the verb `argv[0]` (a core verb, a config file to train, or a plugin's verb); returns the exit code."""
    argv = _strip_launcher_args(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from arctic_vl import __version__

        print(__version__)
        return 0
    verb = argv[0]
    if verb in COMMANDS:
        return COMMANDS[verb](argv[1:])
    if verb.endswith((".yaml", ".yml")) or os.path.isfile(verb):
        return cmd_train(argv)
    plugins.load_plugins()
    if verb in plugins.CLI_VERBS:
        return plugins.CLI_VERBS[verb].run(argv[1:])
    known = ", ".join(list(COMMANDS) + sorted(plugins.CLI_VERBS))
    print(f"arctic_vl: unknown verb or config file '{verb}'. Verbs: {known}", file=sys.stderr)
    return 2


def _clean(message: str) -> str:
    # DataLoader workers re-raise with the worker's traceback folded into the message: keep the user's part.
    if "Original Traceback" in message:
        lines = [ln for ln in message.strip().splitlines() if ln.strip()]
        last = lines[-1]
        return last.split(": ", 1)[1] if last.startswith(("arctic_vl.errors.", "DataError", "ConfigError")) else last
    return message


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `arctic_vl` console script; returns (and exits with) the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = dispatch(argv)
    except SystemExit as e:  # argparse: usage errors are bad input
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print("arctic_vl: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:
        from arctic_vl.errors import RunFailed, UserError

        if isinstance(e, UserError):
            print(f"arctic_vl: error: {_clean(str(e))}", file=sys.stderr)
            code = 2
        elif isinstance(e, RunFailed):
            print(f"arctic_vl: failed: {_clean(str(e))}", file=sys.stderr)
            code = 1
        else:
            import traceback

            traceback.print_exc()
            print(f"arctic_vl: failed: {type(e).__name__}: {e}", file=sys.stderr)
            code = 1
    sys.stdout.flush()
    return code


def entry() -> None:
    """The console script: `main()` on sys.argv, exiting with its code.

    A process of a multi-process run (a launcher set WORLD_SIZE > 1) runs the interpreter's exit handlers,
    flushes its output and ends with `os._exit`, skipping the interpreter's finalization. PyTorch's DDP keeps
    the gloo process group and its worker threads alive past `destroy_process_group` (a C++ reference), and a
    worker that frees a finished collective's Python tensors while the interpreter finalizes cannot take the
    GIL: the thread is unwound through C++ and the process aborts ("terminate called without an active
    exception") after a complete run: about 1 run in 12 of 2-process DDP on CPU (docs/distributed.md).
    """
    code = main()
    if _world_size() > 1:
        import atexit
        import logging

        atexit._run_exitfuncs()  # the exit handlers still run (trackers, loggers, temporary files)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


if __name__ == "__main__":
    entry()
