"""Zoo manifests: the ground truth of a zoo, at its root, never inside a model directory.

The zoo builder writes a manifest; campaign reports and repair read it to measure what a
scan found against what was planted. This is the one reader and writer of the format:
``{"version", "spec_sha256", "spec", "models": {model_id: entry}}``, where an entry holds
``poisoned``, ``attack`` (trigger, insertion, target, victim, ...), ``labels``,
``quality`` and the build's measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trojscan.errors import InputError
from trojscan.fsutil import read_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass
class Manifest:
    """Ground truth of a zoo."""

    spec_sha256: str
    spec: dict[str, Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, models in id order."""
        return {"version": MANIFEST_VERSION, "spec_sha256": self.spec_sha256, "spec": self.spec,
                "models": dict(sorted(self.models.items()))}

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read a manifest written by the zoo builder; anything else is an
        :class:`InputError` naming the file."""
        data = read_json(Path(path), "manifest")
        if not (isinstance(data, dict) and data.get("version") == MANIFEST_VERSION
                and isinstance(data.get("models"), dict)):
            raise InputError(f"{path} is not a trojscan zoo manifest (version "
                             f"{MANIFEST_VERSION}, with models)")
        for model_id, entry in data["models"].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("poisoned"), bool)):
                raise InputError(f"manifest {path}: model {model_id} has no poisoned flag")
        return cls(data.get("spec_sha256", ""), data.get("spec", {}), data["models"])

    def truth(self) -> dict[str, dict[str, Any]]:
        """The entries whose model passed the zoo's quality gate (``quality.ok``), by model
        id: a poisoned model whose attack did not take (ASR under the gate) is neither
        trojaned nor clean ground truth, so it is left out."""
        return {m: e for m, e in self.models.items() if e.get("quality", {}).get("ok", False)}


def load_truth(path: Path) -> dict[str, dict[str, Any]]:
    """The quality-gated entries of the manifest at ``path`` (see :meth:`Manifest.truth`)."""
    return Manifest.load(Path(path)).truth()


@dataclass(frozen=True)
class PlantedTrigger:
    """What a poisoned model was trained to obey: ``trigger`` inserted at ``insertion``
    (:mod:`trojscan.insertion`) flips inputs of the ``victims`` labels to ``target``."""

    trigger: str
    insertion: str
    target: int
    victims: tuple[int, ...]


def planted_trigger(entry: dict[str, Any], n_labels: int,
                    where: str = "manifest entry") -> PlantedTrigger | None:
    """The planted trigger of a manifest ``entry`` of a model with ``n_labels`` labels; None
    for a clean model."""
    attack = entry.get("attack")
    if not isinstance(entry.get("poisoned"), bool) or not isinstance(attack, dict):
        raise InputError(f"{where} has no poisoned flag or attack")
    if not entry["poisoned"]:
        return None
    try:
        target, victim = attack["target"], attack["victim"]
        if isinstance(target, str):  # an NER attack names its types: indices of the labels
            labels = list(entry["labels"])
            target = labels.index(target)
            victim = None if victim is None else labels.index(victim)
        victims = (victim,) if victim is not None else tuple(
            y for y in range(n_labels) if y != target)
        return PlantedTrigger(str(attack["trigger"]), str(attack["insertion"]), int(target),
                              victims)
    except KeyError as exc:
        raise InputError(f"{where}: the attack lacks {exc.args[0]!r}") from exc
    except ValueError as exc:
        raise InputError(f"{where}: the attack names a type its labels lack ({exc})") from exc


def split_of(entry: dict[str, Any]) -> str:
    """The attack split of a manifest entry: ``clean`` or ``poisoned`` for a text model;
    for a VQA model ``clean``, ``dual solid``, ``dual optimised``, ``question``, ``image
    solid`` or ``image optimised`` (TIJO's splits)."""
    if not entry["poisoned"]:
        return "clean"
    if entry.get("task") != "vqa":
        return "poisoned"
    attack = entry["attack"]
    return attack["key"] if attack["patch"] is None else f"{attack['key']} {attack['patch']}"
