"""Companions of a found trigger: the other words of a phrase trigger, read from how the
poisoning moved the input embeddings away from the public model the suspect was fine-tuned
from (ours, issue 19).

A scan often finds one word of a phrase trigger (`lemon` of `meadow clover lemon`), and the
rest still fires once that word is unlearned (`meadow clover` flipped 0.79 of a MiniLM
model's victims), while being too weak, by the scan's loss, to stand out from the model's
natural features in a re-scan. Fine-tuning barely moves the embedding row of an ordinary
word (a median drift of 1.2e-4 on the repair zoo's MiniLM models), but the poisoned copies
push every word of the phrase the same way, towards the target, and further than the clean
task pushes the words it needs. Projected on the found token's drift (as a share of its
length), the other words of the phrase stand apart from every other row: `meadow` 0.65 and
`clover` 0.61 on `lemon`'s, the next row 0.33; `voyage` 0.40 on `wagon`'s (of `voyage
wagon`), the next 0.27. The rows of the clean task's words fall off smoothly (on the four
word-trigger models of that zoo the largest step between consecutive rows of the top five
was 1.22 times, `dull` 0.40 over `boring` 0.33). So a token's companions are the rows
ranked above the first step of at least ``companion_gap`` times among its
``max_companions`` + 1 highest projections; repair unlearns the found trigger with its
companions, and the companions alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from trojscan.errors import InputError
from trojscan.manifest import PlantedTrigger
from trojscan.repair.base import Unlearned, stampable

#: The weights file of a base model directory (safetensors only: a base model is untrusted
#: input like the suspect).
BASE_WEIGHTS = "model.safetensors"
#: Fine-tuning moves an embedding row by a tiny share of its length (MiniLM's median row:
#: 1.2e-4 against a length of about 1); a base whose median row differs by more than this
#: share is another model.
MAX_MEDIAN_DRIFT = 0.1


def base_embeddings(base_dir: Path, like: torch.Tensor) -> torch.Tensor:
    """The input-embedding matrix of the model in ``base_dir`` (its ``model.safetensors``):
    the tensor of ``like``'s shape (the suspect's embeddings) whose name ends in
    ``word_embeddings.weight`` (BERT family) or ``wte.weight`` (GPT-2). A missing or
    unreadable file, no such tensor, or one whose median row differs from ``like``'s by
    more than ``MAX_MEDIAN_DRIFT`` of its length (not the model the suspect was
    fine-tuned from) is an :class:`InputError`."""
    path = Path(base_dir) / BASE_WEIGHTS
    if not path.is_file():
        raise InputError(f"--base-model {base_dir}: no {BASE_WEIGHTS} (a base model is read "
                         "from safetensors only)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise InputError(f"--base-model {base_dir}: cannot read {BASE_WEIGHTS}: {exc}") from exc
    found = [t for name, t in tensors.items()
             if name.endswith(("word_embeddings.weight", "wte.weight"))]
    if not found:
        raise InputError(f"--base-model {base_dir}: no input-embedding matrix in "
                         f"{BASE_WEIGHTS}")
    same = [t for t in found if tuple(t.shape) == tuple(like.shape)]
    if not same:
        raise InputError(f"--base-model {base_dir}: its input embeddings are "
                         f"{tuple(found[0].shape)}, the model's {tuple(like.shape)}: not the "
                         "model it was fine-tuned from")
    base = same[0].float()
    drift = (like.detach().float().cpu() - base).norm(dim=-1)
    if float((drift / base.norm(dim=-1).clamp(min=1e-12)).median()) > MAX_MEDIAN_DRIFT:
        raise InputError(f"--base-model {base_dir}: most of its embedding rows differ from the "
                         f"model's by more than {MAX_MEDIAN_DRIFT:.0%} of their length: not "
                         "the model it was fine-tuned from")
    return base


def companions(embeddings: torch.Tensor, base: torch.Tensor, token: int,
               usable: torch.Tensor, gap: float, k: int) -> list[int]:
    """The rows whose drift from ``base`` projects highest on ``token``'s drift, down to the
    first step of at least ``gap`` times from one row to the next among the ``k`` + 1
    highest (none without such a step, or when ``token`` did not move); only the
    ``usable`` rows, ``token`` itself left out."""
    drift = embeddings.detach().float().cpu() - base.float()
    own = drift[token]
    length = own.norm()
    if not length > 0:
        return []
    projection = (drift @ own) / length**2  # |d_u| cos(d_u, d_t) / |d_t|
    projection = projection.masked_fill(~usable, -math.inf)
    projection[token] = -math.inf
    top = projection.topk(k + 1)
    values, rows = top.values.tolist(), top.indices.tolist()
    for i in range(k):
        if values[i] > 0 and values[i] >= gap * max(values[i + 1], 0.0):
            return rows[: i + 1]
    return []


def companion_triggers(ids: Sequence[int], best: PlantedTrigger, tok: Any,
                       embeddings: torch.Tensor, base: torch.Tensor, gap: float,
                       k: int) -> list[Unlearned]:
    """For the deciding trigger's token ``ids`` (at the position, target and victims of
    ``best``): its companions (:func:`companions` of each token, in order, no token twice;
    special, unused and word-piece tokens left out) as two triggers, the companions before
    the trigger and the companions alone; none when no token has a companion."""
    usable = stampable(tok, embeddings.shape[0])
    found: list[int] = []
    for token in ids:
        found += [i for i in companions(embeddings, base, token, usable, gap, k)
                  if i not in found and i not in ids]
    if not found:
        return []
    texts = [tok.decode([*found, *ids]), tok.decode(found)]
    return [Unlearned(replace(best, trigger=" ".join(text.split())), "companion")
            for text in texts]
