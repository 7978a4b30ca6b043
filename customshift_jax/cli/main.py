"""`customshift`: one entry point, one subcommand per job; user errors print one paragraph, no traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from customshift_jax.cli import (
    bench_generate_cmd,
    convert_cmd,
    crosscheck_cmd,
    demo_cmd,
    encode_cmd,
    eval_cmd,
    export_cmd,
    generate_cmd,
    plan_cmd,
    prepare_cmd,
    train_cmd,
)
from customshift_jax.cli.faults import DEBUG_ENV, debug_requested, fault_message, quiet_background_noise
from customshift_jax.cli.platforms import quiet_absent_tpu

# name -> (module with `add_arguments(parser)` and `run(args) -> int`)
SUBCOMMANDS = {
    "demo": demo_cmd,
    "crosscheck": crosscheck_cmd,
    "convert": convert_cmd,
    "export": export_cmd,
    "encode": encode_cmd,
    "generate": generate_cmd,
    "prepare": prepare_cmd,
    "train": train_cmd,
    "bench-generate": bench_generate_cmd,
    "plan": plan_cmd,
    "eval": eval_cmd,
}

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, IsADirectoryError, PermissionError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and every option's default in its help line (unless the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default == argparse.SUPPRESS)  # 0 is shown
        if "default" not in text and shown and action.option_strings and action.nargs != 0:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: argument --gamma: invalid float value: 'high'`), as every other
    error of the CLI; an unknown flag still shows the subcommand's usage (what the flags are)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        if message.startswith("unrecognized arguments"):
            super().error(message)
        self.exit(2, f"error: {message}\n")


def version() -> str:
    """The installed package's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("customshift-jax")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="customshift",
        description="CustomShift on Stable Diffusion 3, in JAX: cross-check against diffusers, convert, generate.",
    )
    parser.add_argument("--version", action="version", version=f"customshift {version()}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback behind an error (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.subcommands = {}
    for name, module in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        parser.subcommands[name] = p
    return parser


def run_guarded(fn: Callable[[], int], debug: bool = False) -> int:
    """Run a command; a user error (bad path, bad file, bad shape) or a fault of the machine (full disk, no
    permission) prints one `error: ...` line and returns 2. With `debug`, they raise with their traceback."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - sorted below: ours and the machine's are one line, bugs keep the trace
        said = fault_message(e)
        if debug or (said is None and not isinstance(e, USER_ERRORS)):
            raise
        print(f"error: {said or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # its text, when any, says what was cleaned up ("removed partial DST")
        print("interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    quiet_absent_tpu()  # before the parser: building it imports jax
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top-level one
        (parser.subcommands.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    debug = debug_requested(args.debug)
    if not debug:
        quiet_background_noise()
    return run_guarded(lambda: args._run(args), debug)


if __name__ == "__main__":
    sys.exit(main())
