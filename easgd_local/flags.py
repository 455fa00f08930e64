"""Command-line flags generated from the declarations: one Typer parameter per setting
(settings.py) and per algorithm option (algorithms/base.py: Option), with the help that
``--help`` shows. cli.py builds its commands from these; nothing here imports PyTorch, so that
``--help`` and every usage error answer at once.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer
import typer.core

from . import settings
from .algorithms import ALGORITHMS, all_options
from .settings import Setting

ALGO_OPTIONS_PANEL = "Algorithm options"
CHOICE_METAVAR = "<choice>"  # the choices themselves are listed whole in the help text


def help_facts(readme: bool = False) -> dict[str, str]:
    """What help sentences say about the registry ({algorithms}, {lr_defaults}, {tau_defaults},
    {momentum_algos} in a declaration's help), as the registry is now."""
    algorithms = ("one of the table of algorithms below" if readme else
                  "; ".join(f"{a.name}: {a.summary}" for a in ALGORITHMS.values()))
    lr_defaults = ", ".join(
        f"{a.name} {a.default_step:g}" + (" * (1 - momentum)" if a.uses_momentum else "")
        for a in ALGORITHMS.values())
    momentum_algos = ", ".join(a.name for a in ALGORITHMS.values() if a.uses_momentum)
    return {"algorithms": algorithms, "lr_defaults": lr_defaults, "tau_defaults": tau_defaults(),
            "momentum_algos": momentum_algos}


def tau_defaults() -> str:
    """The default --tau in words: the most common one, and each algorithm's that differs."""
    taus = [a.default_tau for a in ALGORITHMS.values()]
    common = max(set(taus), key=taus.count)
    others = [f"{a.name} {a.default_tau}" for a in ALGORITHMS.values() if a.default_tau != common]
    return f"{common}" + (f" ({', '.join(others)})" if others else "")


def _choices(name: str, declared: Setting) -> tuple[str, ...]:
    return tuple(ALGORITHMS) if name == "algo" else declared.choices


def _cli_type(name: str, declared: Setting) -> tuple[Any, Any]:
    """(annotation type, default) of a setting's parameter: a list is one comma-separated
    string, choices an Enum (--algo's are the registry's)."""
    default = declared.default
    if declared.kind is bool:
        return bool, default
    if declared.kind is list:
        text = None if default is None else ",".join(str(v) for v in default)
        return (str if text is not None else Optional[str]), text
    choices = _choices(name, declared)
    kind: Any = declared.kind
    if choices:
        kind = enum.Enum(name, {c: c for c in choices}, type=str)
        default = None if default is None else kind(default)
    return (kind if default is not None else Optional[kind]), default


def shown_default(declared: Setting) -> str:
    """The default as --help says it, in one style for every flag: the value, or the
    declaration's words for one resolved later; "" where there is none to say (a switch is
    off unless given)."""
    if declared.kind is bool:
        if "/" not in declared.flag:
            return ""
        on, off = declared.flag.split("/")
        return on if declared.default else off
    if declared.default is None and not declared.default_text:
        return ""
    return settings.default_text(declared)


def help_markup(text: str, default: str = "") -> str:
    """Help text as Typer renders it: literal (rich markup would take "[min, max]" for a tag
    and drop it), with the default on a line of its own."""
    suffix = f"[default: {default}]" if default else ""
    if not typer.core.HAS_RICH:  # TYPER_USE_RICH=0: plain help, nothing is markup
        return f"{text}  {suffix}".rstrip()
    from rich.markup import escape

    return escape(text) + (f"\n\n[dim]{escape(suffix)}[/dim]" if suffix else "")


def _parameter(name: str, declared: Setting, panel: str, help_text: str,
               users: tuple[str, ...] = ()) -> inspect.Parameter:
    kind, default = _cli_type(name, declared)
    choices = _choices(name, declared)
    if choices and name != "algo":  # --algo's help lists the registry, each with its summary
        help_text = f"{help_text} One of: {', '.join(choices)}."
    if users:  # an algorithm option: the algorithms that take it
        help_text = f"{help_text} [{', '.join(users)}]"
    extra: dict[str, Any] = {"show_choices": False, "metavar": CHOICE_METAVAR} if choices else {}
    info = typer.Option(declared.flag, *declared.aliases, rich_help_panel=panel,
                        help=help_markup(help_text, shown_default(declared)), show_default=False,
                        **extra)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, info])


def parameters(named: dict[str, Setting], panels: dict[str, str],
               facts: dict[str, str]) -> list[inspect.Parameter]:
    """One parameter per declared setting, then one per algorithm option of the registry
    (algorithms/base.py: Option, each declared in its algorithm's module)."""
    order = list(dict.fromkeys(panels.values()))
    panel = {name: panels.get(name) or panels[s.concern] for name, s in named.items()}
    params = [_parameter(name, s, panel[name], settings.help_text(s, facts))
              for name, s in sorted(named.items(), key=lambda item: order.index(panel[item[0]]))]
    for name, (option, users) in all_options().items():
        if name in named:
            raise TypeError(f"algorithm option {name} has the name of a setting")
        declared = option.setting
        # An option not given is None: its default is resolved with the run (resolve_options)
        # and shown in words.
        shown = shown_default(declared)
        declared = dataclasses.replace(declared, default=None, default_text=shown)
        params.append(_parameter(name, declared, ALGO_OPTIONS_PANEL,
                                 settings.help_text(declared), tuple(users)))
    return params


def command(run: Callable[[dict[str, Any], dict[str, Any]], Any], named: dict[str, Setting],
            panels: dict[str, str], facts: dict[str, str]) -> Callable[..., Any]:
    """A Typer command with one flag per setting in ``named`` and per algorithm option:
    ``run(values, algorithm_options)`` receives the settings' values by name (an Enum as its
    value) and the options' (None where not given)."""
    params = parameters(named, panels, facts)
    option_names = [p.name for p in params if p.name not in named]

    def wrapper(**kwargs: Any) -> Any:
        values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in kwargs.items()}
        options = {name: values.pop(name) for name in option_names}
        return run(values, options)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    wrapper.__name__, wrapper.__doc__ = run.__name__, run.__doc__
    return wrapper


def one_paragraph_help(doc: str | None) -> str:
    """A docstring as a command's help: its paragraphs kept, the line breaks inside each
    dropped (rich help keeps them, and they break lines short at any width)."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


class _Switches:
    """Shows every switch (--help, --version, --quiet, ...) as a switch: Typer gives each the
    value type <bool>, though it takes no value."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class Command(_Switches, typer.core.TyperCommand):
    pass


class Group(_Switches, typer.core.TyperGroup):
    pass
