"""The registry of algorithms: name -> an :class:`~.base.Algorithm` (see base.py for what one
owns). Adding an algorithm is a module with its class and one line here."""

from __future__ import annotations

from .base import Algorithm, Communicator, Option, WorkerContext
from .ddp import DDP
from .downpour import ADOWNPOUR, DOWNPOUR, MDOWNPOUR, MVADOWNPOUR
from .elastic import EAMSGD, EASGD
from .gossip import ElasticGossip, GossipSGD
from .hogwild import Hogwild
from .leader import LSGD
from .reference import MSGD, SGD
from .sync import SyncEASGD
from .tree import EASGDTree

__all__ = ["ALGORITHMS", "Algorithm", "Communicator", "Option", "WorkerContext", "get",
           "all_options"]

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    EASGD(), EAMSGD(), SyncEASGD(), EASGDTree(), LSGD(), ElasticGossip(), GossipSGD(),
    DOWNPOUR(), MDOWNPOUR(), ADOWNPOUR(), MVADOWNPOUR(),
    DDP(), SGD(), MSGD(), Hogwild(),
)}


def get(name: str) -> Algorithm:
    return ALGORITHMS[name]


def all_options() -> dict[str, tuple[Option, list[str]]]:
    """Every algorithm option by name, with the algorithms that take it (one definition each:
    algorithms that share an option share its declaration)."""
    found: dict[str, tuple[Option, list[str]]] = {}
    for algo in ALGORITHMS.values():
        for option in algo.options:
            if option.name in found:
                known, users = found[option.name]
                if known != option:
                    raise TypeError(f"option {option.name} is declared differently by {users[0]} and {algo.name}")
                users.append(algo.name)
            else:
                found[option.name] = (option, [algo.name])
    return found
