"""Command-line options generated from typed config dataclasses, so the CLI cannot drift from
the configs: one ``--flag`` per field, its type, choices and help taken from the field.

Bools take ``--flag`` (true) or ``--flag false``; ``tuple[int, ...]`` takes ``8,8,8``; a field
that may be None takes ``none`` (``--lookup-dim none``: a preset's value unset); a field's
``metadata`` may rename its flag (``flag``) or hide it (``cli=False``).
"""

from __future__ import annotations

import argparse
import types
from dataclasses import MISSING, fields
from typing import Any, Literal, Sequence, Union, get_args, get_origin, get_type_hints


def _bool(text: str) -> bool:
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if text.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def _parser_type(annotation: Any) -> tuple[Any, Sequence[str] | None]:
    """(argparse type, choices) for a field annotation such as ``int``, ``float | None``,
    ``bool`` (true/false) or ``tuple[int, ...]`` (comma-separated)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return str, get_args(annotation)
    if annotation is bool:
        return _bool, None
    if origin is tuple:
        return _int_tuple, None
    if origin in (Union, types.UnionType):
        kind, choices = _parser_type([a for a in get_args(annotation) if a is not type(None)][0])
        return (_or_none(kind), None) if choices is None else (kind, choices)
    return annotation, None


NONE = object()  # what ``none`` parses to: given() turns it into None


def _or_none(kind: Any) -> Any:
    def parse(text: str) -> Any:
        return NONE if text.strip().lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names it in its errors
    return parse


def add_options(parser: argparse.ArgumentParser, cls: type, title: str, prefix: str,
                show_default: bool = True, skip: Sequence[str] = ()) -> None:
    """One option per field of ``cls`` but ``skip`` (``--flag`` alone sets a bool to true)."""
    group = parser.add_argument_group(title)
    hints = get_type_hints(cls)
    for f in fields(cls):
        if not f.metadata.get("cli", True) or f.name in skip:
            continue
        kind, choices = _parser_type(hints[f.name])
        default = "" if not show_default or f.default is MISSING else f" (default: {f.default})"
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        extra = {"nargs": "?", "const": True} if kind is _bool else {}
        group.add_argument(flag, dest=f"{prefix}.{f.name}", type=kind, choices=choices,
                           default=None, metavar=None if choices else f.name.upper(),
                           help=f.metadata.get("help", "") + default, **extra)


def given(args: argparse.Namespace, *prefixes: str) -> dict[str, Any]:
    """The options of these groups that were given, by field name."""
    return {k.split(".", 1)[1]: None if v is NONE else v for k, v in vars(args).items()
            if k.split(".", 1)[0] in prefixes and "." in k and v is not None}


class _PresetAction(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        namespace.preset, namespace.preset_given = values, True


def command(sub: Any, name: str, func: Any, help: str, run: str = "", grid: int = 0,
            **kwargs: Any) -> argparse.ArgumentParser:
    """A sub-command calling ``func``; with ``run`` ("stage-1" or "prior") its RUN_DIR and
    --device (and a stage-1 run's --data), with ``grid`` the options of an n x n picture."""
    p = sub.add_parser(name, help=help, description=kwargs.pop("description", help), **kwargs)
    p.set_defaults(func=func, preset_given=False)
    if run:
        p.add_argument("run", metavar="RUN_DIR", help=f"a {run} run folder or checkpoint folder")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    if run == "stage-1":
        p.add_argument("--data", help="another data source (default: the run's own)")
    if grid:
        p.add_argument("--split", choices=("test", "train"), default="test", help="(default: test)")
        p.add_argument("--n", type=int, default=grid, help=f"grid size (default: {grid})")
        p.add_argument("--seed", type=int, default=0, help="which images are drawn (default: 0)")
    return p


def training_options(p: argparse.ArgumentParser, presets: dict, help: str) -> None:
    """--out, --resume and --preset of a training command."""
    p.add_argument("--out", metavar="RUN_DIR", help="new run folder to write")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--preset", choices=sorted(presets), default="default", action=_PresetAction,
                   help=help)
