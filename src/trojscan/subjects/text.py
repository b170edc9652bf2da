"""The subject adapter for Hugging Face sequence classifiers: what trigger inversion sees.

Inversion optimises trigger *embeddings*, so the adapter runs the model from input
embeddings (``get_input_embeddings()`` + ``inputs_embeds``; the model adds its own position
embeddings). A batch of clean examples is tokenised once; ``m`` trigger slots are spliced
into every example at a token position, and each forward pass fills the slots with the
current trigger embeddings. The same splice with token ids gives the hard-token check.

Families and their quirks:

* BERT, DistilBERT, RoBERTa, ELECTRA, MobileBERT (and MiniLM, a BERT) pool the first token
  and are right-padded.
* GPT-2 pools the *last* token. With ``inputs_embeds`` it cannot find padding, so it is
  left-padded with explicit ``position_ids`` that number the real tokens from 0, exactly as
  they are numbered in a right-padded forward from token ids.

Trigger positions, in tokens, for an example with ``n`` tokens between [CLS] and [SEP]:
``start`` right after [CLS], ``end`` right before [SEP], ``first_half`` after token
``n // 4`` and ``second_half`` after token ``3n // 4`` (the middle of each half).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

POSITIONS = ("start", "end", "first_half", "second_half")
LAST_TOKEN_FAMILIES = frozenset({"gpt2"})


@dataclass
class SlotBatch:
    """Clean examples, tokenised and padded, with trigger slots in each.

    Attributes:
        input_ids: (B, L) token ids; slots hold the pad id.
        attention_mask: (B, L), 1 on real tokens and slots.
        slot_index: (B, L), the slot number (0..m-1) at slot positions, -1 elsewhere.
        position_ids: (B, L) for left-padded families, else None (the model numbers them).
        labels: (B,) the examples' true labels.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    slot_index: torch.Tensor
    position_ids: torch.Tensor | None
    labels: torch.Tensor

    def to(self, device: torch.device) -> SlotBatch:
        """The same batch on ``device``."""
        return SlotBatch(self.input_ids.to(device), self.attention_mask.to(device),
                         self.slot_index.to(device),
                         None if self.position_ids is None else self.position_ids.to(device),
                         self.labels.to(device))

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
                         self.labels[rows])


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


class TextSubject:
    """A sequence classifier under inspection, driven from input embeddings."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_length: int = 100) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.family = model.config.model_type
        self.left_padded = self.family in LAST_TOKEN_FAMILIES
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return self.model.device

    @property
    def labels(self) -> tuple[str, ...]:
        """Label names, in output order."""
        config = self.model.config
        return tuple(str(config.id2label[i]) for i in range(config.num_labels))

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """The (vocab, d) input-embedding table."""
        return self.model.get_input_embeddings().weight

    def special_token_ids(self) -> list[int]:
        """Ids a trigger may not use ([CLS], [SEP], [PAD], [MASK], [UNK], ...)."""
        return sorted(set(self.tokenizer.all_special_ids))

    def batch(self, texts: Sequence[str], labels: Sequence[int], n_slots: int,
              position: str | Sequence[str]) -> SlotBatch:
        """Tokenise ``texts`` and splice ``n_slots`` trigger slots into each at ``position``
        (one position for all, or one per text).

        Texts are cut so that text + slots + [CLS]/[SEP] fit ``max_length``.
        """
        budget = self.max_length - 2 - n_slots
        if budget < 1:
            raise ValueError(f"max_length {self.max_length} leaves no room for {n_slots} slots")
        positions = [position] * len(texts) if isinstance(position, str) else list(position)
        if len(positions) != len(texts):
            raise ValueError(f"{len(positions)} positions for {len(texts)} texts")
        rows, slots = [], []
        for text, where in zip(texts, positions, strict=True):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:budget]
            at = slot_offset(len(ids), where)
            full = [self.cls_id, *ids, self.sep_id]
            rows.append(full[:at] + [self.pad_id] * n_slots + full[at:])
            slots.append(at)
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
                         torch.tensor(list(labels), dtype=torch.long))

    def logits_from_trigger(self, batch: SlotBatch, trigger: torch.Tensor) -> torch.Tensor:
        """Logits with the slots filled by ``trigger`` (differentiable): (m, d) embeddings
        shared by every row, or (B, m, d), one trigger per row."""
        base = self.model.get_input_embeddings()(batch.input_ids)
        per_row = trigger if trigger.dim() == 3 else trigger.expand(len(base), -1, -1)
        rows = torch.arange(len(base), device=base.device).unsqueeze(-1)
        filled = per_row.to(base.dtype)[rows, batch.slot_index.clamp(min=0)]
        embeds = torch.where((batch.slot_index >= 0).unsqueeze(-1), filled, base)
        return self._forward(batch, inputs_embeds=embeds)

    def logits_from_tokens(self, batch: SlotBatch,
                           trigger_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits with the slots filled by token ids (a forward from ids): ``trigger_ids`` is
        m ids shared by every row, or a (B, m) tensor, one trigger per row."""
        ids = torch.as_tensor(trigger_ids, dtype=torch.long, device=batch.input_ids.device)
        per_row = ids if ids.dim() == 2 else ids.expand(len(batch.input_ids), -1)
        rows = torch.arange(len(per_row), device=ids.device).unsqueeze(-1)
        input_ids = torch.where(batch.slot_index >= 0, per_row[rows, batch.slot_index.clamp(min=0)],
                                batch.input_ids)
        return self._forward(batch, input_ids=input_ids)

    def _forward(self, batch: SlotBatch, **inputs: torch.Tensor) -> torch.Tensor:
        if batch.position_ids is not None:
            inputs["position_ids"] = batch.position_ids
        return self.model(attention_mask=batch.attention_mask, **inputs).logits

