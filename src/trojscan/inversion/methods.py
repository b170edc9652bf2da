"""The trigger inverters by name, and their configs from the scan's common options.

Every inverter has the interface of :func:`trojscan.inversion.dbs.invert_many`:
``invert_many(subject, tasks, config=None, on_epoch=None) -> list[Inversion]``, and a frozen
config with ``trigger_length`` and ``epochs`` (for the genetic search, generations).

The DBS ablations of the paper's Table 4 are methods of their own, so that they go wherever a
method goes (``--method``, campaigns, comparisons): ``dbs-fixed-temperature`` ("w/o Temp
Scaling": lambda stays 1) and ``dbs-no-backtracking`` ("w/o Backtracking"), DBS with the
switch of :class:`~trojscan.inversion.dbs.DBSConfig` of the same name turned off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from trojscan.inversion import ascc, dbs, genetic, tminer, uat
from trojscan.inversion.base import Inversion
from trojscan.inversion.dbs import InversionTask
from trojscan.subjects.text import TextSubject

InverterConfig = (dbs.DBSConfig | uat.UATConfig | ascc.ASCCConfig | genetic.GeneticConfig
                  | tminer.TMinerConfig)
Inverter = Callable[[TextSubject, Sequence[InversionTask], Any, Callable[[int], None] | None],
                    list[Inversion]]

#: name -> (config class, invert_many).
METHODS: dict[str, tuple[type[Any], Inverter]] = {
    "dbs": (dbs.DBSConfig, dbs.invert_many),
    "dbs-fixed-temperature": (dbs.DBSConfig, dbs.invert_many),
    "dbs-no-backtracking": (dbs.DBSConfig, dbs.invert_many),
    "uat": (uat.UATConfig, uat.invert_many),
    "ascc": (ascc.ASCCConfig, ascc.invert_many),
    "genetic": (genetic.GeneticConfig, genetic.invert_many),
    "tminer": (tminer.TMinerConfig, tminer.invert_many),
}

#: The DBS ablations: the switches each turns off.
ABLATIONS: dict[str, dict[str, bool]] = {
    "dbs-fixed-temperature": {"temperature_scaling": False},
    "dbs-no-backtracking": {"backtracking": False},
}



def make_config(method: str, trigger_length: int | None = None, epochs: int | None = None,
                seed: int | None = None, max_evaluations: int | None = None,
                **overrides: Any) -> InverterConfig:
    """``method``'s config: its defaults with the given options (None keeps a default).

    An ablation's switch is set (an override may set it back). ``seed`` goes to the methods
    that draw random numbers (all but ``ascc``, which is deterministic, and ignores it).
    ``max_evaluations`` caps the baselines' evaluations (:mod:`trojscan.inversion.common`);
    DBS has no such cap and rejects it. ``overrides`` are
    further fields of the config class. An unknown method or field, or a bad value, is a
    :class:`ValueError`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; expected one of "
                         f"{', '.join(METHODS)}")
    cls = METHODS[method][0]
    names = {f.name for f in fields(cls)}
    given = {"trigger_length": trigger_length, "epochs": epochs,
             "max_evaluations": max_evaluations, **ABLATIONS.get(method, {}), **overrides}
    options = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"{method} has no option {', '.join(unknown)}")
    if seed is not None and "seed" in names:
        options["seed"] = seed
    return cls(**options)
