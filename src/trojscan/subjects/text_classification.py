"""Hugging Face sequence classifiers (``*ForSequenceClassification``): what trigger inversion
sees of a text classifier.

Inversion optimises trigger *embeddings*, so the subject runs the model from input
embeddings (``get_input_embeddings()`` + ``inputs_embeds``; the model adds its own position
embeddings). A batch of clean examples is tokenised once; ``m`` trigger slots are spliced
into every example at a token position, and each forward pass fills the slots with the
current trigger embeddings. The same splice with token ids gives the hard-token check. The
goal of a row is its candidate's target label: the goal loss is the cross-entropy towards
it (DBS Eq. 3), and a hard trigger succeeds on a row when the model predicts it.

Families and their quirks:

* BERT, DistilBERT, RoBERTa, ELECTRA, MobileBERT (and MiniLM, a BERT) pool the first token
  and are right-padded.
* GPT-2 pools the *last* token. With ``inputs_embeds`` it cannot find padding, so it is
  left-padded with explicit ``position_ids`` that number the real tokens from 0, exactly as
  they are numbered in a right-padded forward from token ids.

Trigger positions, in tokens, for an example with ``n`` tokens between [CLS] and [SEP]:
``start`` right after [CLS], ``end`` right before [SEP], ``first_half`` after token
``n // 4`` and ``second_half`` after token ``3n // 4`` (the middle of each half).

Candidates (DBS Section 3.2): every label as target with the other labels' examples as
victims (universal); with ``pairs``, also every ordered (victim, target) pair
(label-specific); each at every position asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trojscan.errors import InputError
from trojscan.subjects.base import (
    Batch,
    Candidate,
    example_lines,
    register_subject,
    victims_in_turn,
    whole_word_count,
)
from trojscan.subjects.huggingface import HuggingFaceSubject, fill_slots

POSITIONS = ("start", "end", "first_half", "second_half")
LAST_TOKEN_FAMILIES = frozenset({"gpt2"})


@dataclass(frozen=True)
class TextExample:
    """A clean example: a text and its true label index."""

    text: str
    label: int


@dataclass
class SlotBatch(Batch):
    """Clean examples, tokenised and padded, with trigger slots in each.

    Attributes:
        input_ids: (B, L) token ids; slots hold the pad id.
        attention_mask: (B, L), 1 on real tokens and slots.
        slot_index: (B, L), the slot number (0..m-1) at slot positions, -1 elsewhere.
        position_ids: (B, L) for left-padded families, else None (the model numbers them).
        goals: (B,) the label each row's trigger should flip it to.
        owner: (B,) the candidate each row belongs to.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    slot_index: torch.Tensor
    position_ids: torch.Tensor | None
    goals: torch.Tensor
    owner: torch.Tensor

    def to(self, device: torch.device) -> SlotBatch:
        """The same batch on ``device``."""
        return SlotBatch(self.input_ids.to(device), self.attention_mask.to(device),
                         self.slot_index.to(device),
                         None if self.position_ids is None else self.position_ids.to(device),
                         self.goals.to(device), self.owner.to(device))

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) real tokens (slots included) in each row."""
        return self.attention_mask.sum(-1)

    def subset(self, rows: torch.Tensor) -> SlotBatch:
        """The rows ``rows`` only, with the columns that are padding in all of them cut
        (on the right, or on the left for a left-padded batch)."""
        width = int(self.lengths[rows].max())
        cut = slice(-width, None) if self.position_ids is not None else slice(0, width)
        return SlotBatch(self.input_ids[rows, cut], self.attention_mask[rows, cut],
                         self.slot_index[rows, cut],
                         None if self.position_ids is None else self.position_ids[rows, cut],
                         self.goals[rows], self.owner[rows])


def slot_offset(n_tokens: int, position: str) -> int:
    """Index, counted from [CLS] = 0, of the first trigger slot in an example whose text has
    ``n_tokens`` tokens."""
    if position == "start":
        return 1
    if position == "end":
        return 1 + n_tokens
    if position == "first_half":
        return 1 + n_tokens // 4
    if position == "second_half":
        return 1 + (3 * n_tokens) // 4
    raise ValueError(f"unknown trigger position {position!r}; expected one of {POSITIONS}")


@register_subject
class TextClassificationSubject(HuggingFaceSubject):
    """A sequence classifier under inspection, driven from input embeddings."""

    task = "text-classification"
    positions = POSITIONS
    describes = "Hugging Face sequence classifiers (*ForSequenceClassification)"

    architecture_suffix = "ForSequenceClassification"
    auto_class = "AutoModelForSequenceClassification"
    head_hint = "is the classification head saved?"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_length: int = 100) -> None:
        """``max_length``: tokens per example, trigger included; capped at the model's
        position embeddings."""
        super().__init__(model, tokenizer, max_length)
        self.family = model.config.model_type
        self.left_padded = self.family in LAST_TOKEN_FAMILIES

    @property
    def labels(self) -> tuple[str, ...]:
        """Label names, in output order."""
        config = self.model.config
        return tuple(str(config.id2label[i]) for i in range(config.num_labels))

    def read_examples(self, path: Path) -> list[TextExample]:
        """Clean examples, one JSON object ``{"text", "label"}`` per line; ``label`` is a
        label index or name of the model. Every problem is an :class:`InputError` naming
        the line."""
        labels = self.labels
        rows = []
        for number, row in example_lines(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) \
                    or "label" not in row:
                raise InputError(f"{path}:{number}: expected an object with \"text\" and "
                                 "\"label\"")
            if not row["text"].strip():
                raise InputError(f"{path}:{number}: empty text")
            label = row["label"]
            if isinstance(label, str) and label in labels:
                label = labels.index(label)
            if isinstance(label, bool) or not isinstance(label, int) \
                    or not 0 <= label < len(labels):
                raise InputError(f"{path}:{number}: the model has no label {row['label']!r} "
                                 "(its labels: " + ", ".join(f"{i}={n}" for i, n in
                                                             enumerate(labels)) + ")")
            rows.append(TextExample(row["text"], label))
        return rows

    def candidates(self, examples: Sequence[TextExample], positions: Sequence[str],
                   pairs: bool) -> list[Candidate]:
        """Every label as target (victims: every other label), and with ``pairs`` every
        (victim, target) pair, at each position; every label needs examples, since each is
        the victim of some candidate."""
        unknown = [p for p in positions if p not in POSITIONS]
        if unknown or not positions:
            raise InputError(f"unknown trigger position {unknown[0] if unknown else '(none)'}"
                             f"; expected some of {', '.join(POSITIONS)}")
        labels = self.labels
        present = {e.label for e in examples}
        missing = [f"{i}={name}" for i, name in enumerate(labels) if i not in present]
        if missing:
            raise InputError(f"no clean example of label {', '.join(missing)}: every label is "
                             "the victim of some candidate target, so each needs examples")
        out = []
        for target in range(len(labels)):
            victims = tuple(sorted(present - {target}))
            groups = [victims] if victims else []
            if pairs and len(victims) > 1:
                groups += [(v,) for v in victims]
            out += [Candidate(g, target, p) for g in groups for p in positions]
        return out

    def victims(self, examples: Sequence[TextExample], candidate: Candidate,
                cap: int) -> list[TextExample]:
        """The examples of the victim labels, at most ``cap`` (0: all), taken in turn from
        each victim label in file order (an even share of each)."""
        return victims_in_turn(examples, candidate, cap)

    def occurrences(self, examples: Sequence[TextExample], text: str,
                    label: int) -> tuple[int, int]:
        """How many examples of ``label`` contain ``text`` as a whole word (or words), in
        any case, and of how many: "Secretary" and "secretary," count for "secretary",
        "secretaryship" does not."""
        own = [e.text for e in examples if e.label == label]
        return whole_word_count(own, text), len(own)

    def batch(self, candidates: Sequence[Candidate],
              examples: Sequence[Sequence[TextExample]], n_slots: int) -> SlotBatch:
        """Tokenise every candidate's examples and splice ``n_slots`` trigger slots into each
        at the candidate's position.

        Texts are cut so that text + slots + [CLS]/[SEP] fit ``max_length``.
        """
        budget = self.max_length - 2 - n_slots
        if budget < 1:
            raise ValueError(f"max_length {self.max_length} leaves no room for {n_slots} slots")
        if len(candidates) != len(examples):
            raise ValueError(f"{len(examples)} example lists for {len(candidates)} candidates")
        rows, slots, goals, owner = [], [], [], []
        for index, (candidate, group) in enumerate(zip(candidates, examples, strict=True)):
            for example, position in zip(group, self.row_positions(candidate, len(group)),
                                         strict=True):
                ids = self.token_ids(example.text)[:budget]
                at = slot_offset(len(ids), position)
                full = [self.cls_id, *ids, self.sep_id]
                rows.append(full[:at] + [self.pad_id] * n_slots + full[at:])
                slots.append(at)
                goals.append(candidate.target)
                owner.append(index)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        slot_index = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, (row, at) in enumerate(zip(rows, slots, strict=True)):
            start = width - len(row) if self.left_padded else 0
            input_ids[b, start : start + len(row)] = torch.tensor(row)
            mask[b, start : start + len(row)] = 1
            slot_index[b, start + at : start + at + n_slots] = torch.arange(n_slots)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0) if self.left_padded else None
        return SlotBatch(input_ids, mask, slot_index, position_ids,
                         torch.tensor(goals, dtype=torch.long),
                         torch.tensor(owner, dtype=torch.long)).to(self.device)

    def logits_from_trigger(self, batch: SlotBatch, trigger: torch.Tensor) -> torch.Tensor:
        """Logits with the slots filled by ``trigger`` (differentiable): (m, d) embeddings
        shared by every row, or (B, m, d), one trigger per row."""
        base = self.model.get_input_embeddings()(batch.input_ids)
        per_row = trigger if trigger.dim() == 3 else trigger.expand(len(base), -1, -1)
        # A row's m slots are consecutive and in order, so row-major order puts slot i of
        # row b where per_row[b, i] goes. Each slot is written once: the backward pass only
        # gathers, with no accumulation whose order could vary between runs.
        slots = (batch.slot_index >= 0).unsqueeze(-1)
        embeds = base.masked_scatter(slots, per_row.to(base.dtype))
        return self._forward(batch, inputs_embeds=embeds)

    def logits_from_tokens(self, batch: SlotBatch,
                           trigger_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits with the slots filled by token ids (a forward from ids): ``trigger_ids`` is
        m ids shared by every row, or a (B, m) tensor, one trigger per row."""
        return self._forward(batch, input_ids=fill_slots(batch.input_ids, batch.slot_index,
                                                         trigger_ids))

    def goal_loss(self, batch: SlotBatch, trigger: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each row towards its target label (DBS Eq. 3, per row)."""
        return F.cross_entropy(self.logits_from_trigger(batch, trigger), batch.goals,
                               reduction="none")

    def hard_check(self, batch: SlotBatch,
                   trigger_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy towards the target with the trigger as token ids, and 1.0 where the
        model predicts the target."""
        logits = self.logits_from_tokens(batch, trigger_ids)
        return (F.cross_entropy(logits, batch.goals, reduction="none"),
                (logits.argmax(-1) == batch.goals).float())

    @torch.no_grad()
    def lone_token_losses(self, ids: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        """Cross-entropy towards every label of each token alone between [CLS] and [SEP]
        (for GPT-2, alone): minus the log-probabilities of the labels."""
        lone = self.batch([Candidate((0,), 0, "start")], [[TextExample("", 0)]], 1)
        out = []
        for part in ids.to(self.device).split(chunk_rows):
            rows = lone.subset(torch.zeros(len(part), dtype=torch.long, device=self.device))
            out.append(-F.log_softmax(self.logits_from_tokens(rows, part.view(-1, 1)), -1))
        return torch.cat(out)

    def read_rows(self, batch: SlotBatch, trigger_ids: Sequence[int] | None,
                  feature_trigger: Sequence[float] | None) -> list[tuple[str, str]]:
        """Each row's text and the label the model predicts, with its probability."""
        ids = self.filled(batch.input_ids, batch.slot_index, trigger_ids)
        probabilities = F.softmax(self._forward(batch, input_ids=ids), -1)
        best = probabilities.max(-1)
        return [(self.text_of(row[mask.bool()]), f"{self.labels[k]} ({p:.2f})")
                for row, mask, k, p in zip(ids, batch.attention_mask, best.indices.tolist(),
                                           best.values.tolist(), strict=True)]

    def _forward(self, batch: SlotBatch, **inputs: torch.Tensor) -> torch.Tensor:
        if batch.position_ids is not None:
            inputs["position_ids"] = batch.position_ids
        return self.model(attention_mask=batch.attention_mask, **inputs).logits
