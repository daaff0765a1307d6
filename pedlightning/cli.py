"""The ``pedlightning`` command: fit/validate/test/predict (LightningCLI), plus data and export tools.

This module imports neither Lightning nor torch: the tools, ``--version``, ``--help`` and config-file errors
answer at once, and the Lightning side (:mod:`pedlightning.lightning_cli`) loads only for a Lightning run.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pedlightning import __version__
from pedlightning.errors import ConfigError, PedLightningError

__all__ = ["TOOLS", "main", "run_cli"]

#: ``pedlightning <tool> ...`` sub-commands that are not Lightning runs: name -> "module:function(argv)".
TOOLS: dict[str, str] = {
    "synth": "pedlightning.data.synthetic.__main__:main",
    "make-shards": "pedlightning.tools.make_shards:main",
    "export-encoder": "pedlightning.tools.export_encoder:main",
    "export-onnx": "pedlightning.tools.export_onnx:main",
    "extract": "pedlightning.tools.extract:main",
}

#: The Lightning sub-commands and what they run.
RUNS: dict[str, str] = {
    "fit": "train (and validate) a model; --ckpt_path last resumes the run in trainer.default_root_dir",
    "validate": "one pass over the validation split with a checkpoint (--ckpt_path)",
    "test": "evaluate a checkpoint on the test split (--ckpt_path FILE or last)",
    "predict": "write features of a checkpoint (--ckpt_path) for the prediction split",
}

_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def __getattr__(name: str) -> Any:
    """``from pedlightning.cli import PedLightningCLI`` still works, loading Lightning only then."""
    if name in ("PedLightningCLI", "RunConfigSaver"):
        return getattr(importlib.import_module("pedlightning.lightning_cli"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _source(module: str) -> str:
    """The source of a pedlightning module, found without importing it (importlib would import its packages)."""
    root = os.path.dirname(os.path.abspath(__file__))
    parts = module.split(".")[1:]
    for path in (os.path.join(root, *parts) + ".py", os.path.join(root, *parts, "__init__.py")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as file:
                return file.read()
    return ""


def _summary(target: str) -> str:
    """What a tool does, from its source: the docstring's ````pedlightning x``: ...`` line, else the literal
    ``description=`` of its argument parser."""
    try:
        tree = ast.parse(_source(target.split(":")[0]))
    except SyntaxError:
        return ""
    first = (ast.get_docstring(tree) or "").strip().split("\n\n")[0].replace("\n", " ")
    if first.startswith("``") and "``: " in first:
        return first.split("``: ", 1)[1]
    for node in ast.walk(tree):
        for keyword in getattr(node, "keywords", ()):
            if keyword.arg == "description" and isinstance(keyword.value, ast.Constant):
                return str(keyword.value.value)
    return first


def _help() -> str:
    width = max(map(len, [*RUNS, *TOOLS])) + 2
    lines = [f"usage: pedlightning [-h] [--version] {{{','.join([*RUNS, *TOOLS])}}} ...", "",
             "Pedestrian analysis with PyTorch Lightning: person reID, attribute recognition, text-to-image "
             "person search and their pre-training.", "", "Lightning runs (--config FILE, repeatable, merged left to "
             "right; any --key value overrides; `pedlightning fit --help` lists every option):"]
    lines += [f"  {name:<{width}}{text}" for name, text in RUNS.items()]
    lines += ["", "Tools (`pedlightning <tool> --help` for its options):"]
    lines += [f"  {name:<{width}}{_summary(target)}" for name, target in TOOLS.items()]
    lines += ["", "options:", f"  {'-h, --help':<{width}}show this message and exit",
              f"  {'--version':<{width}}print the versions of pedlightning, Lightning and torch, and exit"]
    return "\n".join(lines)


def _versions() -> str:
    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return f"pedlightning {__version__} (lightning {installed('lightning')}, torch {installed('torch')})"


def _config_files(argv: Sequence[str]) -> list[str]:
    """The values of ``--config`` / ``-c`` in ``argv`` (before ``--``)."""
    files, take = [], False
    for arg in argv:
        if arg == "--":
            break
        if take:
            files.append(arg)
            take = False
        elif arg in ("--config", "-c"):
            take = True
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_files(argv: Sequence[str]) -> None:
    """Every ``--config`` file exists and is well-formed YAML; else a :class:`ConfigError` naming the file.

    jsonargparse reports a YAML syntax error without the file's name, which matters when several configs merge.
    A ``--config`` value that is not a ``.yaml`` / ``.yml`` / ``.json`` path is left to jsonargparse (it also
    takes inline YAML).
    """
    import yaml

    for path in _config_files(argv):
        if not path.lower().endswith(_CONFIG_SUFFIXES) and not os.path.isfile(path):
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: no such file")
        try:
            with open(path, encoding="utf-8") as file:
                yaml.safe_load(file)
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
            raise ConfigError(f"--config {path}: malformed YAML{at}: {problem}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"--config {path}: not a text file ({err.reason})") from None


def _user_error(err: BaseException) -> PedLightningError | None:
    """The PedLightningError behind ``err``: jsonargparse wraps errors of a model / datamodule constructor in its
    own ValueError ("Does not validate against any of the Union subtypes"), with the real one as the cause."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, PedLightningError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``pedlightning`` console script. Returns None (a returned CLI object would exit 1).

    User errors (:class:`~pedlightning.errors.PedLightningError`, also when raised inside a constructor that
    jsonargparse calls) print one line, ``pedlightning: error: ...``, and exit with status 2.
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in TOOLS:
            module, func = TOOLS[argv[0]].split(":")
            tool: Callable[[list[str]], None] = getattr(importlib.import_module(module), func)
            tool(argv[1:])
            return
        if argv in ([], ["-h"], ["--help"]):
            print(_help(), file=sys.stdout if argv else sys.stderr)
            sys.exit(0 if argv else 2)
        if argv in (["--version"], ["-V"]):
            print(_versions())
            return
        check_config_files(argv)
        from pedlightning.lightning_cli import run

        run(None if args is None else argv)
    except Exception as err:  # noqa: BLE001 - only user errors are reported; anything else is re-raised
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"pedlightning: error: {user_error}", file=sys.stderr)
        sys.exit(2)


def run_cli(argv: Sequence[str]) -> int:
    """Run ``pedlightning <argv>`` in this process and return its exit status (for tests and notebooks)."""
    try:
        main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    main()
