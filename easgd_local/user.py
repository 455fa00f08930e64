"""Your own model, data, loss and metric, named ``module:attr`` (as uvicorn and gunicorn take
an app). Workers are spawned processes: they import each callable by that name, so it must be
importable by it; a lambda, a closure or a function of ``__main__`` is refused in one line,
before any process starts, with what to do instead.

The module is found on the current directory and on PYTHONPATH.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from .config import ConfigError


class FactoryExit(ConfigError):
    """A factory called sys.exit(): its error, in one line (never an exit of the run)."""


def is_spec(name: str) -> bool:
    """``module:attr`` (a user's callable); ``torchvision:NAME`` is a model of torchvision."""
    return ":" in name


def _importable_from_cwd() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def import_spec(spec: str, flag: str) -> Callable[..., Any]:
    """The callable ``module:attr`` names; ConfigError (one line) for whatever is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in (*module_name.split("."), *attr.split("."))):
        raise ConfigError(f"{flag} {spec!r} is not module:attr (e.g. mypkg.nets:make_net)")
    _importable_from_cwd()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"{flag} {spec}: module {module_name} not found (looked in the "
                              "current directory and on PYTHONPATH)") from None
        raise ConfigError(f"{flag} {spec}: importing {module_name} failed: {_brief(e)}") from None
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(f"{flag} {spec}: importing {module_name} failed: {_brief(e)}") from None
    except SystemExit as e:  # the module called sys.exit() while importing: its error, not ours
        raise ConfigError(f"{flag} {spec}: importing {module_name} called {_exit_text(e)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{flag} {spec}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{flag} {spec}: {attr} is a {type(obj).__name__}, not callable")
    return obj


def spec_of(obj: Any, flag: str) -> str:
    """``module:qualname`` of a callable given in Python, refusing what the spawned workers
    could not import by that name. A string is taken as a spec (or a built-in name) as it is."""
    if isinstance(obj, str):
        return obj
    if not callable(obj):
        raise ConfigError(f"{flag} must be a callable or 'module:attr' (got {type(obj).__name__})")
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    how = ("define it at the top level of a module file and pass it (or 'module:function'), so "
           "that the spawned workers can import it")
    if name is None or module is None:
        raise ConfigError(f"{flag}: {obj!r} has no importable name; {how}")
    if name.endswith("<lambda>") or "<locals>" in name:
        kind = "a lambda" if name.endswith("<lambda>") else "a function defined inside another function"
        raise ConfigError(f"{flag}: {kind} cannot be imported by the workers (spawned processes); {how}")
    if module == "__main__":
        raise ConfigError(f"{flag}: {name} is defined in __main__ (an interactive session or the "
                          f"running script), which the workers cannot import; {how}")
    spec = f"{module}:{name}"
    if import_spec(spec, flag) is not obj:
        raise ConfigError(f"{flag}: {spec} does not import back to the object given; {how}")
    return spec


def call_with_known(factory: Callable[..., Any], flag: str, **known: Any) -> Any:
    """Call ``factory`` with those of ``known`` it takes; its error becomes one line."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in known.items() if takes_all or k in params}
    try:
        return factory(**kwargs)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{flag}: {getattr(factory, '__name__', factory)} raised {_brief(e)}") from None
    except SystemExit as e:  # sys.exit() in a factory is an error of the factory, not an exit
        raise FactoryExit(f"{flag}: {getattr(factory, '__name__', factory)} called "
                          f"{_exit_text(e)}; a factory returns its object") from None


def _exit_text(e: SystemExit) -> str:
    return f"sys.exit({e.code!r})" if e.code is not None else "sys.exit()"


def _brief(e: BaseException, limit: int = 240) -> str:
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
