"""Composites of what the scans found (``RepairConfig.composites``, ours): a trigger of two
characters or words of which a scan found one part.

A scan decides on the shortest trigger that still fires (:mod:`trojscan.inversion.shorten`,
the lone-token screen), so it may report one part of a planted composite: ``^`` of ``^}``,
``$`` of ``%$``. Unlearning that part alone can bring its own ASR to the goal while the
whole still fires (the parts together push harder than either), and the stop, which reads
the unlearned triggers, cannot see it. Two composites are unlearned with it:

* **extensions**: the deciding trigger grown by one token of the inversion it was cut from,
  on either side (``^`` in the inversion ``^ } nitrogen ...`` gives ``^ }``);
* **compounds**: after the first round, the deciding trigger joined, in both orders, with
  each earlier round's deciding trigger at the same target (``$`` in round 1, ``%`` in
  round 2 give ``$ %`` and ``% $``): a re-scan that finds a new trigger at a target already
  unlearned has likely found the other part.

Only tokens that text reproduces are joined (no word pieces, special or unused tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from trojscan.manifest import PlantedTrigger
from trojscan.repair.base import Unlearned


def _text(tok: Any, ids: Sequence[int]) -> str:
    return " ".join(tok.decode(list(ids)).split())


def extensions(deciding: Sequence[int], inversion: Sequence[int], best: PlantedTrigger,
               tok: Any, usable: torch.Tensor) -> list[Unlearned]:
    """The ``deciding`` token ids grown by the token before and by the token after them in
    ``inversion`` (where they stand in it contiguously), at the position, target and
    victims of ``best``; none when they are not in it, or a token is not ``usable``."""
    n, found = len(deciding), []
    for i in range(len(inversion) - n + 1):
        if list(inversion[i:i + n]) == list(deciding):
            for a, b in ((i - 1, i + n), (i, i + n + 1)):
                if a >= 0 and b <= len(inversion) and all(bool(usable[t])
                                                          for t in inversion[a:b]):
                    found.append(Unlearned(replace(best, trigger=_text(tok, inversion[a:b])),
                                           "extension"))
            break
    return found


def compounds(deciding: Sequence[int], earlier: Sequence[tuple[Sequence[int], int]],
              best: PlantedTrigger, tok: Any, usable: torch.Tensor) -> list[Unlearned]:
    """The ``deciding`` token ids joined, before and after, with each of the ``earlier``
    rounds' deciding triggers (ids, target) at ``best``'s target, at the position, target
    and victims of ``best``; none with a token that is not ``usable``."""
    if not all(bool(usable[t]) for t in deciding):
        return []
    found = []
    for ids, target in earlier:
        if target != best.target or list(ids) == list(deciding) \
                or not all(bool(usable[t]) for t in ids):
            continue
        for joined in ([*ids, *deciding], [*deciding, *ids]):
            found.append(Unlearned(replace(best, trigger=_text(tok, joined)), "compound"))
    return found
