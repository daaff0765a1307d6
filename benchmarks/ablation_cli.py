"""Command line shared by the seeded ablation benchmarks: ``--quick`` (a smoke run) and ``--seeds``, per-size
presets for the options left unset, and quiet logs (the printed tables are the output)."""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

SMOKE_RUN = "2 seeds, tiny data, 1 epoch each (a smoke run)"


def ablation_parser(description: str, quick_help: str = SMOKE_RUN) -> argparse.ArgumentParser:
    """A parser holding ``--quick`` (described by ``quick_help``) and ``--seeds``; each benchmark adds its own
    options, those with a per-size preset defaulting to None."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    return parser


def parse_with_presets(parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: Mapping[str, Any],
                       full: Mapping[str, Any]) -> argparse.Namespace:
    """``parser``'s arguments from ``argv``; each preset option not given (None) takes its ``quick`` value under
    ``--quick``, else its ``full`` one."""
    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def quiet_logs() -> None:
    """Lightning logs errors only, pedlightning warnings and up; Python warnings are off."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("pedlightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
