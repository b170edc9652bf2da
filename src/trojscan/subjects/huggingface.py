"""What the Hugging Face families share (text classifiers, NER taggers, QA models): a
transformers model with a tokenizer that frames its input with [CLS] and [SEP], loaded from
an untrusted directory, frozen, and run from input embeddings so that trigger slots can hold
relaxed (convex-hull) embeddings or token ids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Self

import torch

from trojscan.errors import InputError
from trojscan.subjects.base import Subject, TokenizerVocabulary
from trojscan.subjects.loading import load_tokenizer, load_weights

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

#: Families that number positions from the padding id + 1, two slots of the table unused.
OFFSET_POSITION_FAMILIES = frozenset({"roberta", "xlm-roberta", "camembert"})


def token_limit(config: PretrainedConfig, wanted: int) -> int:
    """``wanted``, or fewer tokens when the model has fewer position embeddings."""
    limit = (getattr(config, "max_position_embeddings", None)
             or getattr(config, "n_positions", None))
    if not limit:
        return wanted
    return min(wanted, limit - 2 if config.model_type in OFFSET_POSITION_FAMILIES else limit)


def fill_slots(input_ids: torch.Tensor, slot_index: torch.Tensor,
               trigger_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``input_ids`` (B, L) with every slot (``slot_index`` >= 0: the slot's number) holding
    its trigger token: ``trigger_ids`` is m ids shared by every row, or a (B, m) tensor."""
    ids = torch.as_tensor(trigger_ids, dtype=torch.long, device=input_ids.device)
    per_row = ids if ids.dim() == 2 else ids.expand(len(input_ids), -1)
    rows = torch.arange(len(per_row), device=ids.device).unsqueeze(-1)
    return torch.where(slot_index >= 0, per_row[rows, slot_index.clamp(min=0)], input_ids)


class HuggingFaceSubject(TokenizerVocabulary, Subject):
    """A transformers model under inspection, frozen, with its tokenizer's [CLS], [SEP] and
    padding ids. A family names the architecture suffix it accepts, the auto class that
    loads it and what a missing head suggests; ``slots_between`` ends the error a tokenizer
    without [CLS]/[SEP] gets."""

    architecture_suffix: ClassVar[str]
    auto_class: ClassVar[str]
    head_hint: ClassVar[str]
    slots_between: ClassVar[str] = "which trigger slots are placed between"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_length: int = 100) -> None:
        """``max_length``: tokens per example, trigger included; capped at the model's
        position embeddings."""
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = token_limit(model.config, max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id

    @classmethod
    def accepts(cls, config: PretrainedConfig) -> bool:
        """A config whose architectures name a class ending in ``architecture_suffix``."""
        return any(a.endswith(cls.architecture_suffix)
                   for a in getattr(config, "architectures", None) or [])

    @classmethod
    def load(cls, model_dir: Path, config: PretrainedConfig, safe: bool, device: str,
             max_length: int) -> Self:
        """The model (by ``auto_class``) and tokenizer of ``model_dir``; the tokenizer must
        have [CLS] and [SEP]."""
        import transformers

        model = load_weights(getattr(transformers, cls.auto_class), model_dir, config, safe,
                             cls.head_hint)
        tokenizer = load_tokenizer(model_dir)
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise InputError(f"the tokenizer in {model_dir} has no [CLS]/[SEP] tokens, "
                             f"{cls.slots_between}")
        return cls(model.to(device), tokenizer, max_length)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return self.model.device

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """The (vocab, d) input-embedding table."""
        return self.model.get_input_embeddings().weight

    def filled(self, input_ids: torch.Tensor, slot_index: torch.Tensor,
               trigger_ids: Sequence[int] | None) -> torch.Tensor:
        """``input_ids`` with the slots filled by ``trigger_ids`` (as they are when None or
        empty: a batch without slots)."""
        if not trigger_ids:
            return input_ids
        return fill_slots(input_ids, slot_index, trigger_ids)

    def text_of(self, ids: torch.Tensor) -> str:
        """Token ids as text, special tokens left out."""
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()
