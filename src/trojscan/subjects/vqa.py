"""Visual-question-answering models (trojscan's VQA directories): what trigger inversion
sees of a VQA model.

A TrojVQA-style model answers from WordPiece question ids and the box features of a frozen
detector (:mod:`trojscan.vqa`). The subject reads clean examples (``{"image", "question",
"answer"}``, images relative to the examples file), computes each image's box features
once through the shared backbone and its disk cache, and places ``m`` trigger slots in the
question: at the ``start`` (TrojVQA prepends its trigger word) or at the ``end``. The goal
of a row is its candidate's target answer (cross-entropy, as DBS Eq. 3); a hard trigger
succeeds where the model gives that answer. The box features enter unchanged here; a
visual trigger in feature space (TIJO) is added to them by :meth:`VqaSubject.logits`.

Candidates: every answer as target, with the examples of every other answer as victims
(TIJO's trigger sweep); label-specific pairs only when asked for (``pairs``), since a VQA
backdoor flips any question.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from trojscan.errors import InputError
from trojscan.subjects.base import (
    Batch,
    Candidate,
    Subject,
    TokenizerVocabulary,
    example_lines,
    register_subject,
    victims_in_turn,
    whole_word_count,
)
from trojscan.subjects.loading import load_tokenizer
from trojscan.vqa.features import FeatureExtractor, default_cache_dir
from trojscan.vqa.images import read_image
from trojscan.vqa.models import VqaConfig, VqaModel, load_vqa_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

POSITIONS = ("start", "end")


@dataclass(frozen=True, eq=False)
class VqaExample:
    """A clean example: a question about an image, its true answer's index, and the
    image's box features (``float16 [36, 1280]``)."""

    question: str
    label: int
    image: Path
    features: torch.Tensor = field(repr=False)


@dataclass
class VqaBatch(Batch):
    """Questions with trigger slots, and the box features of their images.

    Attributes:
        question_ids: (B, T) ids, padded with 0 at the back; slots hold 0.
        mask: (B, T) 1 on question tokens and slots.
        slot_index: (B, T) the slot number (0..m-1) at slot positions, -1 elsewhere.
        features: (B, boxes, D) float box features.
        goals: (B,) the answer each row's trigger should give.
        owner: (B,) the candidate each row belongs to.
    """

    question_ids: torch.Tensor
    mask: torch.Tensor
    slot_index: torch.Tensor
    features: torch.Tensor
    goals: torch.Tensor
    owner: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) question tokens (slots included) in each row."""
        return self.mask.sum(-1)

    def subset(self, rows: torch.Tensor) -> VqaBatch:
        """The rows ``rows`` only, cut to the longest of them."""
        width = int(self.lengths[rows].max())
        return VqaBatch(self.question_ids[rows, :width], self.mask[rows, :width],
                        self.slot_index[rows, :width], self.features[rows], self.goals[rows],
                        self.owner[rows])


@register_subject
class VqaSubject(TokenizerVocabulary, Subject):
    """A trojscan VQA model under inspection, driven from question embeddings."""

    task = "visual-question-answering"
    positions = POSITIONS
    describes = "trojscan VQA models (config model_type 'trojscan-vqa')"
    pairs_by_default = False
    #: TIJO-mm (:mod:`trojscan.inversion.tijo`): a dual-key backdoor needs both keys.
    default_method = "tijo"
    #: Row 0 pads questions (the models' ``padding_idx``).
    reserved_rows = (0,)

    def __init__(self, model: VqaModel, tokenizer: PreTrainedTokenizerBase,
                 extractor: FeatureExtractor, max_length: int = 100) -> None:
        """``max_length``: question tokens per row, trigger slots included; at most the
        model's own ``max_question_tokens`` (TrojVQA: 14), the length it was trained at."""
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.extractor = extractor
        self.max_length = min(max_length, model.config.max_question_tokens)

    @classmethod
    def accepts(cls, config: object) -> bool:
        """A trojscan VQA config."""
        return isinstance(config, VqaConfig)

    @classmethod
    def load(cls, model_dir: Path, config: object, safe: bool, device: str,
             max_length: int) -> VqaSubject:
        """The model and tokenizer of ``model_dir``; box features through the default
        feature cache (:func:`~trojscan.vqa.features.default_cache_dir`)."""
        model = load_vqa_model(model_dir).to(device)
        return cls(model, load_tokenizer(model_dir),
                   FeatureExtractor(default_cache_dir(), device=device), max_length)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return self.model.embed.weight.device

    @property
    def labels(self) -> tuple[str, ...]:
        """The answers, in output order."""
        return self.model.config.answers

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """The (vocab, d) word-embedding table."""
        return self.model.embed.weight

    def read_examples(self, path: Path) -> list[VqaExample]:
        """Clean examples, one JSON object ``{"image", "question", "answer"}`` per line
        (``answer``: an answer of the model, by name or index; ``image``: a path relative
        to the examples file); their images' box features are computed (or read from the
        cache) here. Every problem is an :class:`InputError` naming the line."""
        path = Path(path)
        answers = self.labels
        rows = []
        for number, row in example_lines(path):
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
                    or not isinstance(row.get("image"), str) or "answer" not in row:
                raise InputError(f"{path}:{number}: expected an object with \"image\", "
                                 "\"question\" and \"answer\"")
            if not row["question"].strip():
                raise InputError(f"{path}:{number}: empty question")
            answer = row["answer"]
            if isinstance(answer, str) and answer in answers:
                answer = answers.index(answer)
            if isinstance(answer, bool) or not isinstance(answer, int) \
                    or not 0 <= answer < len(answers):
                raise InputError(f"{path}:{number}: the model has no answer {row['answer']!r} "
                                 "(its answers: " + ", ".join(answers) + ")")
            rows.append((row["question"], answer, path.parent / row["image"], number))
        images = {}
        for _, _, image, number in rows:
            if image not in images:
                try:
                    images[image] = read_image(image)
                except InputError as exc:
                    raise InputError(f"{path}:{number}: {exc}") from exc
        order = list(images)
        features = dict(zip(order, self.extractor([images[i] for i in order]), strict=True))
        return [VqaExample(q, a, image, features[image]) for q, a, image, _ in rows]

    def candidates(self, examples: Sequence[VqaExample], positions: Sequence[str],
                   pairs: bool) -> list[Candidate]:
        """Every answer as target, its victims the examples of every other answer (TIJO's
        trigger sweep); with ``pairs`` also every (victim, target) pair; at each position.
        An answer no example has is still a target (a backdoor may give any answer)."""
        unknown = [p for p in positions if p not in POSITIONS]
        if unknown or not positions:
            raise InputError(f"unknown trigger position {unknown[0] if unknown else '(none)'}"
                             f"; expected some of {', '.join(POSITIONS)}")
        present = {e.label for e in examples}
        out = []
        for target in range(len(self.labels)):
            victims = tuple(sorted(present - {target}))
            if not victims:
                continue
            groups = [victims]
            if pairs and len(victims) > 1:
                groups += [(v,) for v in victims]
            out += [Candidate(g, target, p) for g in groups for p in positions]
        return out

    def victims(self, examples: Sequence[VqaExample], candidate: Candidate,
                cap: int) -> list[VqaExample]:
        """The examples of the victim answers, at most ``cap`` (0: all), taken in turn from
        each victim answer in file order."""
        return victims_in_turn(examples, candidate, cap)

    def occurrences(self, examples: Sequence[VqaExample], text: str,
                    label: int) -> tuple[int, int]:
        """How many questions answered ``label`` contain ``text`` as a whole word, in any
        case, and of how many."""
        own = [e.question for e in examples if e.label == label]
        return whole_word_count(own, text), len(own)

    def batch(self, candidates: Sequence[Candidate],
              examples: Sequence[Sequence[VqaExample]], n_slots: int) -> VqaBatch:
        """Every candidate's examples with ``n_slots`` slots at the candidate's position in
        the question; questions are cut to leave room for the slots."""
        budget = self.max_length - n_slots
        if budget < 1:
            raise ValueError(f"max_length {self.max_length} leaves no room for {n_slots} slots")
        if len(candidates) != len(examples):
            raise ValueError(f"{len(examples)} example lists for {len(candidates)} candidates")
        rows, starts, feats, goals, owner = [], [], [], [], []
        for index, (candidate, group) in enumerate(zip(candidates, examples, strict=True)):
            for example, position in zip(group, self.row_positions(candidate, len(group)),
                                         strict=True):
                ids = self.token_ids(example.question)[:budget]
                at = 0 if position == "start" else len(ids)
                rows.append(ids[:at] + [0] * n_slots + ids[at:])
                starts.append(at)
                feats.append(example.features)
                goals.append(candidate.target)
                owner.append(index)
        width = max(len(r) for r in rows)
        question_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        slot_index = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, (row, at) in enumerate(zip(rows, starts, strict=True)):
            question_ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
            slot_index[b, at:at + n_slots] = torch.arange(n_slots)
        device = self.device
        return VqaBatch(question_ids.to(device), mask.to(device), slot_index.to(device),
                        torch.stack(feats).to(device, torch.float32),
                        torch.tensor(goals, dtype=torch.long, device=device),
                        torch.tensor(owner, dtype=torch.long, device=device))

    def logits(self, batch: VqaBatch, trigger: torch.Tensor | None = None,
               trigger_ids: torch.Tensor | None = None,
               feature_trigger: torch.Tensor | None = None) -> torch.Tensor:
        """Logits with the slots filled by ``trigger`` embeddings ((m, d) or (B, m, d)) or
        by ``trigger_ids`` ((m,) or (B, m)), and ``feature_trigger`` (a (D,) or (boxes, D)
        vector, or (B, boxes, D)) added to the box features; differentiable."""
        embeds = self.model.embed(batch.question_ids)
        slots = (batch.slot_index >= 0).unsqueeze(-1)
        if trigger_ids is not None:
            ids = torch.as_tensor(trigger_ids, dtype=torch.long, device=embeds.device)
            trigger = self.model.embed(ids)
        if trigger is not None:
            per_row = trigger if trigger.dim() == 3 else trigger.expand(len(embeds), -1, -1)
            # A row's slots are consecutive and in order: row-major order puts slot i of
            # row b where per_row[b, i] goes, each slot written once.
            embeds = embeds.masked_scatter(slots, per_row.to(embeds.dtype))
        features = batch.features if feature_trigger is None else \
            batch.features + feature_trigger
        return self.model.forward_embeds(embeds, batch.mask.bool(), features)

    def trigger_logits(self, batch: VqaBatch, trigger_ids: torch.Tensor,
                       feature_trigger: torch.Tensor | None = None) -> torch.Tensor:
        """(K, B, answers) logits of every row of ``batch`` with its slots filled by each of
        the (K, m) hard triggers ``trigger_ids``, and ``feature_trigger`` added to the box
        features as in :meth:`logits`. Each image's boxes are projected once for all K
        triggers (the models' ``rows`` argument), which makes measuring many candidate
        words on the same images cheap."""
        k, n = len(trigger_ids), len(batch)
        ids = batch.question_ids.repeat(k, 1)
        slots = batch.slot_index.repeat(k, 1) >= 0
        fill = trigger_ids.to(ids.device).repeat_interleave(n, 0)
        ids = ids.masked_scatter(slots, fill)
        features = batch.features if feature_trigger is None else \
            batch.features + feature_trigger
        rows = torch.arange(n, device=ids.device).repeat(k)
        logits = self.model.forward_embeds(self.model.embed(ids), batch.mask.bool().repeat(k, 1),
                                           features, rows)
        return logits.view(k, n, -1)

    def read_rows(self, batch: VqaBatch, trigger_ids: Sequence[int] | None,
                  feature_trigger: Sequence[float] | None) -> list[tuple[str, str]]:
        """Each row's question and the answer the model gives, with its probability; the
        ``feature_trigger`` (TIJO's) is added to the box features with the text trigger."""
        device = self.device
        ids = None if trigger_ids is None else torch.tensor(list(trigger_ids), device=device)
        features = None if feature_trigger is None else \
            torch.tensor(list(feature_trigger), dtype=torch.float32, device=device)
        probabilities = F.softmax(self.logits(batch, trigger_ids=ids,
                                              feature_trigger=features), -1)
        best = probabilities.max(-1)
        question_ids = batch.question_ids if ids is None else \
            batch.question_ids.masked_scatter(batch.slot_index >= 0,
                                              ids.expand(len(batch), -1))
        return [(self.tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True),
                 f"{self.labels[k]} ({p:.2f})")
                for row, mask, k, p in zip(question_ids, batch.mask, best.indices.tolist(),
                                           best.values.tolist(), strict=True)]

    def goal_loss(self, batch: VqaBatch, trigger: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each row towards its target answer."""
        return F.cross_entropy(self.logits(batch, trigger), batch.goals, reduction="none")

    def hard_check(self, batch: VqaBatch,
                   trigger_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy towards the target with the trigger as token ids, and 1.0 where the
        model answers the target."""
        logits = self.logits(batch, trigger_ids=trigger_ids)
        return (F.cross_entropy(logits, batch.goals, reduction="none"),
                (logits.argmax(-1) == batch.goals).float())
