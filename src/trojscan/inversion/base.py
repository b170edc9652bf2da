"""What every inverter returns: the :class:`Inversion` record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Inversion:
    """One trigger inversion for one (victim labels -> target) candidate.

    Attributes:
        method: the inverter's name (``dbs``, ...).
        target: label index the trigger should flip inputs to.
        victims: label indices of the examples the trigger was inverted on.
        position: where the trigger slots sat (see :mod:`trojscan.subjects.text`).
        trigger_ids: token ids of the reported trigger (argmax of each slot).
        trigger_tokens: the same as vocabulary tokens.
        trigger_text: the tokens decoded to text.
        relaxed_loss: inversion loss (Eq. 3 of DBS) of the reported trigger in the convex
            hull, at the temperature it was found at.
        hard_loss: the same loss with the trigger's tokens put in as token ids.
        hard_asr: fraction of the victim examples the hard-token trigger flips to target.
        accepted: whether the trigger met DBS's acceptance test (near one-hot, loss under the
            bound); when false, the reported trigger is the final state's argmax.
        epochs: optimisation epochs run (fewer than configured when it stopped early).
        seconds: wall time of the inversion run (shared by the tasks batched together).
        trajectory: per-epoch ``loss`` and ``temperature`` (and ``event`` at checks).
    """

    method: str
    target: int
    victims: list[int]
    position: str
    trigger_ids: list[int]
    trigger_tokens: list[str]
    trigger_text: str
    relaxed_loss: float
    hard_loss: float
    hard_asr: float
    accepted: bool
    epochs: int
    seconds: float
    trajectory: list[dict[str, Any]] = field(default_factory=list)

    @property
    def loss(self) -> float:
        """The candidate's inversion loss as a scan ranks it: the relaxed loss of an accepted
        trigger; without one, the hard-token loss of the final trigger, since a relaxed loss
        that never became near one-hot is the loss of a mixture, not of a trigger."""
        return self.relaxed_loss if self.accepted else self.hard_loss

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, the ranking ``loss`` included."""
        return {**asdict(self), "loss": self.loss}
