"""``pedlightning synth NAME --root R [--seed S] [--size H W] [writer options]`` (also ``python -m
pedlightning.data.synthetic``).

Options are generated from the writer's keyword arguments (``num_train_ids`` -> ``--num-train-ids``),
so the command line always matches the Python API.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable

from pedlightning.data.synthetic import SYNTHETIC_WRITERS, synthesize

PROG = "pedlightning synth"


def _options(writer: Callable[..., str]) -> list[inspect.Parameter]:
    """The writer's keyword-only arguments, less those a ``functools.partial`` already fixes."""
    fixed = getattr(writer, "keywords", {})
    params = inspect.signature(writer).parameters.values()
    return [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in fixed]


def _summary(writer: Callable[..., str]) -> str:
    """The docstring's text before its first colon, plus the arguments a partial fixes."""
    summary = (inspect.getdoc(getattr(writer, "func", writer)) or "").split(":")[0]
    fixed = getattr(writer, "keywords", {})
    return summary + "".join(f" ({k}={v})" for k, v in fixed.items())


def _add_option(parser: argparse.ArgumentParser, param: inspect.Parameter) -> None:
    flag, default = "--" + param.name.replace("_", "-"), param.default
    help_text = f"default: {default}"
    if isinstance(default, bool):
        action = argparse.BooleanOptionalAction
        parser.add_argument(flag, dest=param.name, action=action, default=default, help=help_text)
    elif isinstance(default, tuple):
        metavar = ("H", "W") if param.name == "size" else None
        parser.add_argument(flag, dest=param.name, type=type(default[0]), nargs=len(default), default=default,
                            metavar=metavar, help=help_text)
    else:
        parser.add_argument(flag, dest=param.name, type=type(default), default=default, help=help_text)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """One sub-command per dataset in ``SYNTHETIC_WRITERS``, its options taken from the writer; ``prog`` is the
    command the usage lines name."""
    epilog = "\n".join(
        f"  {name:<16} " + " ".join("--" + p.name.replace("_", "-") for p in _options(writer))
        for name, writer in SYNTHETIC_WRITERS.items()
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a synthetic dataset in the real on-disk layout (deterministic for a seed).",
        epilog="datasets and their options:\n" + epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="NAME")
    for name, writer in SYNTHETIC_WRITERS.items():
        doc = inspect.getdoc(getattr(writer, "func", writer))
        sp = sub.add_parser(name, help=_summary(writer), description=doc)
        sp.add_argument("--root", required=True, help="folder to create (must not exist or be empty)")
        for param in _options(writer):
            _add_option(sp, param)
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``), write the dataset (progress on stderr), print its root."""
    args = vars(build_parser(prog).parse_args(argv))
    name = args.pop("dataset")
    root = args.pop("root")
    if "size" in args:
        args["size"] = tuple(args["size"])
    print(synthesize(name, root, **args))


if __name__ == "__main__":
    main(prog="python -m pedlightning.data.synthetic")
