"""Hugging Face token classifiers (``*ForTokenClassification``, named-entity taggers): what
trigger inversion sees of an NER model.

An NER backdoor (TrojAI round 7, DBS Section 4 / Appendix A) is label-specific: a trigger
word or phrase in the sentence makes every entity of a *victim* type be tagged as a *target*
type (``B-victim`` -> ``B-target``, ``I-victim`` -> ``I-target``), the other words keep their
tags. So a candidate is an ordered (victim type, target type) pair, the subject's ``labels``
are the entity types of the model's BIO tags (``id2label``), and the goal loss of a row is
the cross-entropy of the victim entities' words towards their target tags only (the other
words are not part of the goal): the mean over those words, so that a sentence with one
victim word weighs as much as one with five. A hard trigger succeeds on a row when every
victim word gets its target tag.

Words are tokenised one by one; a word's tag is read at its first sub-token (the usual
alignment of token classifiers, and how the zoo's taggers are trained). ``m`` trigger slots
are spliced in at a token position, as for sequence classifiers
(:mod:`trojscan.subjects.text_classification`), and the model runs from input embeddings.

Trigger positions: ``start`` (right after [CLS]) and ``end`` (right before [SEP]) stand for
round 7's *global* triggers (anywhere in the sentence), ``local`` puts the slots right
before the first victim entity (round 7's *local* triggers, next to the entity). A sentence
longer than ``max_length`` keeps a window of its tokens around its first victim entity.

Clean examples: one JSON object per line, ``{"tokens": [word, ...], "tags": [tag, ...]}``
with tag names of the model's ``id2label`` (CoNLL's word and BIO tag columns). A scan
searches them as the tagger sees them (:meth:`TokenClassificationSubject.as_seen`): the
victims of a pair are the entity words of the victim type that the tagger itself tags with
that type on the clean sentence, since a backdoor turns the entities a tagger finds, and a
word it misses or already tags as another type (the target, say) is no evidence of one.
"""

from __future__ import annotations

from collections import Counter
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
    whole_word_count,
)
from trojscan.subjects.huggingface import HuggingFaceSubject, fill_slots

POSITIONS = ("start", "local", "end")
#: The tag of words outside every entity.
OUTSIDE = "O"
#: What the loss ignores (no goal at this token).
IGNORE = -100
#: Sentences per forward pass when reading the clean examples (:meth:`as_seen`).
SEEN_BATCH = 64


def tag_type(tag: str) -> tuple[str, str]:
    """(prefix, entity type) of a tag: ``B-person`` -> ("B-", "person"); an IO-scheme tag
    without prefix is its own type (``person`` -> ("", "person")); ``O`` -> ("", "")."""
    if tag == OUTSIDE:
        return "", ""
    if tag[:2] in ("B-", "I-"):
        return tag[:2], tag[2:]
    return "", tag


@dataclass(frozen=True)
class NerExample:
    """A clean sentence: its words, their tag names, and the entity types it holds."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]

    @property
    def types(self) -> frozenset[str]:
        """The entity types of its words."""
        return frozenset(t for _, t in map(tag_type, self.tags) if t)


@dataclass
class TagBatch(Batch):
    """Sentences, tokenised and right-padded, with trigger slots and per-token goals.

    Attributes:
        input_ids: (B, L) token ids; slots hold the pad id.
        attention_mask: (B, L), 1 on real tokens and slots.
        slot_index: (B, L), the slot number (0..m-1) at slot positions, -1 elsewhere.
        goal_tags: (B, L) the target tag id at the first sub-token of each victim-entity
            word, :data:`IGNORE` elsewhere.
        owner: (B,) the candidate each row belongs to.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    slot_index: torch.Tensor
    goal_tags: torch.Tensor
    owner: torch.Tensor

    def to(self, device: torch.device) -> TagBatch:
        """The same batch on ``device``."""
        return TagBatch(self.input_ids.to(device), self.attention_mask.to(device),
                        self.slot_index.to(device), self.goal_tags.to(device),
                        self.owner.to(device))

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) real tokens (slots included) in each row."""
        return self.attention_mask.sum(-1)

    def subset(self, rows: torch.Tensor) -> TagBatch:
        """The rows ``rows`` only, the columns that are padding in all of them cut."""
        width = int(self.lengths[rows].max())
        return TagBatch(self.input_ids[rows, :width], self.attention_mask[rows, :width],
                        self.slot_index[rows, :width], self.goal_tags[rows, :width],
                        self.owner[rows])


@register_subject
class TokenClassificationSubject(HuggingFaceSubject):
    """A named-entity tagger under inspection, driven from input embeddings."""

    task = "ner"
    positions = POSITIONS
    #: The paper's K-Arm pre-selection for NER: "20 epochs for each victim-target label
    #: pair" (DBS Appendix A), over up to 90 pairs.
    prerun_epochs = 20
    #: A token alone says nothing about another word's tag, so the screen ranks tokens in
    #: context, measured on each victim entity alone (:meth:`compact_victims`).
    context_screen = True
    describes = "Hugging Face token classifiers (*ForTokenClassification, NER taggers)"

    architecture_suffix = "ForTokenClassification"
    auto_class = "AutoModelForTokenClassification"
    head_hint = "is the token-classification head saved?"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_length: int = 100) -> None:
        """``max_length``: tokens per sentence, trigger included; capped at the model's
        position embeddings. A tagger without an ``O`` tag or with fewer than two entity
        types is an :class:`InputError`."""
        super().__init__(model, tokenizer, max_length)
        self.unk_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None \
            else self.pad_id
        config = model.config
        self.tags = tuple(str(config.id2label[i]) for i in range(config.num_labels))
        if OUTSIDE not in self.tags:
            raise InputError(f"the tagger's labels {list(self.tags)} have no {OUTSIDE!r} tag "
                             "for words outside entities: not a BIO / IO entity tagger")
        self.types = tuple(dict.fromkeys(t for _, t in map(tag_type, self.tags) if t))
        if len(self.types) < 2:
            raise InputError(f"the tagger's labels {list(self.tags)} name fewer than two "
                             "entity types: no backdoor can flip one type to another")

    @property
    def labels(self) -> tuple[str, ...]:
        """The entity types of the model's tags (what victims and targets index), in the
        order their first tag appears in ``id2label``."""
        return self.types

    def read_examples(self, path: Path) -> list[NerExample]:
        """Clean sentences, one JSON object ``{"tokens", "tags"}`` per line: as many tags as
        words, each a tag name of the model. Every problem is an :class:`InputError` naming
        the line."""
        known = set(self.tags)
        rows = []
        for number, row in example_lines(path):
            tokens, tags = (row.get("tokens"), row.get("tags")) if isinstance(row, dict) \
                else (None, None)
            if not isinstance(tokens, list) or not isinstance(tags, list) \
                    or not all(isinstance(t, str) for t in tokens + tags):
                raise InputError(f"{path}:{number}: expected an object with \"tokens\" and "
                                 "\"tags\", two lists of strings")
            if not tokens or not any(t.strip() for t in tokens):
                raise InputError(f"{path}:{number}: empty sentence")
            if len(tokens) != len(tags):
                raise InputError(f"{path}:{number}: {len(tokens)} tokens but {len(tags)} tags")
            unknown = sorted(set(tags) - known)
            if unknown:
                raise InputError(f"{path}:{number}: the model has no tag {unknown[0]!r} (its "
                                 f"tags: {', '.join(self.tags)})")
            rows.append(NerExample(tuple(tokens), tuple(tags)))
        return rows

    @torch.no_grad()
    def as_seen(self, examples: Sequence[NerExample]) -> list[NerExample]:
        """The examples with each entity word's tag kept only where the model, reading the
        clean sentence, tags the word (its first sub-token) with the same entity type; ``O``
        elsewhere, and for a word past ``max_length`` tokens, which it does not read.

        Why: on a tiny WNUT-16 tagger (tests/test_ner_zoo.py) that tags a fifth of the
        example pool's entity words with their type, the one musicartist example's entity,
        which the tagger already tags as ``other``, made musicartist -> other a 'backdoor'
        that any word fires (loss 0.002-0.17 on clean and poisoned taggers alike), and the
        person entities it misses hid a planted person -> company trigger (loss 4.4; 2.0 on
        the persons it finds).
        """
        out: list[NerExample] = []
        for start in range(0, len(examples), SEEN_BATCH):
            chunk = examples[start : start + SEEN_BATCH]
            rows, firsts = [], []
            for example in chunk:
                ids, first = [self.cls_id], []
                for word in self.tokenizer(list(example.tokens),
                                           add_special_tokens=False)["input_ids"]:
                    first.append(len(ids))
                    ids += word or [self.unk_id]
                rows.append([*ids[: self.max_length - 1], self.sep_id])
                firsts.append(first)
            input_ids = torch.full((len(rows), max(map(len, rows))), self.pad_id,
                                   dtype=torch.long)
            for b, row in enumerate(rows):
                input_ids[b, : len(row)] = torch.tensor(row)
            mask = (torch.arange(input_ids.shape[1]) < torch.tensor(
                [len(r) for r in rows]).unsqueeze(1)).long()
            best = self.model(input_ids=input_ids.to(self.device),
                              attention_mask=mask.to(self.device)).logits.argmax(-1).cpu()
            for b, (example, first) in enumerate(zip(chunk, firsts, strict=True)):
                read = [tag_type(self.tags[int(best[b, k])])[1] if k < len(rows[b]) - 1
                        else "" for k in first]
                tags = tuple(tag if tag_type(tag)[1] and tag_type(tag)[1] == kind else OUTSIDE
                             for tag, kind in zip(example.tags, read, strict=True))
                out.append(NerExample(example.tokens, tags))
        return out

    def unseen(self, examples: Sequence[NerExample],
               seen: Sequence[NerExample]) -> dict[str, int]:
        """The entity types of ``examples`` the tagger tags on none of their entities, with
        how many sentences hold them. On the WNUT-16 zoo two global backdoors went unsearched
        this way (README "NER taggers and QA models"): a 2-layer BERT tagged none of the 5
        example companies as companies, a MiniLM none of the 5 ``other`` entities."""
        found = set().union(*(e.types for e in seen))
        held = Counter(t for e in examples for t in e.types)
        return {t: held[t] for t in self.types if held[t] and t not in found}

    def candidates(self, examples: Sequence[NerExample], positions: Sequence[str],
                   pairs: bool) -> list[Candidate]:
        """Every ordered (victim type, target type) pair whose victim type has entities in
        the examples, at each position (an NER backdoor is label-specific, so ``pairs`` is
        moot)."""
        unknown = [p for p in positions if p not in POSITIONS]
        if unknown or not positions:
            raise InputError(f"unknown trigger position {unknown[0] if unknown else '(none)'}"
                             f" for a token classifier; expected some of "
                             f"{', '.join(POSITIONS)}")
        present = set().union(*(e.types for e in examples))
        victims = [i for i, t in enumerate(self.types) if t in present]
        if not victims:
            raise InputError("no entity in the clean examples (or none that the tagger tags "
                             "with its type): an NER backdoor flips the entities of a victim "
                             "type, so the examples need some")
        return [Candidate((v,), target, p) for v in victims
                for target in range(len(self.types)) if target != v for p in positions]

    def victims(self, examples: Sequence[NerExample], candidate: Candidate,
                cap: int) -> list[NerExample]:
        """The sentences holding an entity of the victim type, at most ``cap`` (0: all), in
        file order."""
        wanted = {self.types[v] for v in candidate.victims}
        chosen = [e for e in examples if e.types & wanted]
        return chosen[:cap] if cap else chosen

    def compact_victims(self, examples: Sequence[NerExample],
                        candidate: Candidate) -> list[NerExample]:
        """Each sentence cut to its first entity of a victim type, alone: about 6 tokens
        with a trigger slot where the sentence has 20-60, and the backdoor still has its
        victim to move. On the WNUT-16 zoo's taggers the planted token ranked first of the
        vocabulary on the first victim entity alone on 4 of the 5 word backdoors measured
        (the fifth 144th; README "NER taggers and QA models")."""
        wanted = {self.types[v] for v in candidate.victims}
        out = []
        for example in examples:
            types = [tag_type(t)[1] for t in example.tags]
            first = next(k for k, t in enumerate(types) if t in wanted)
            end = next((k for k in range(first + 1, len(types))
                        if types[k] != types[first] or example.tags[k].startswith("B-")),
                       len(types))
            out.append(NerExample(example.tokens[first:end], example.tags[first:end]))
        return out

    def occurrences(self, examples: Sequence[NerExample], text: str,
                    label: int) -> tuple[int, int]:
        """How many sentences holding an entity of type ``label`` contain ``text`` as a whole
        word (or words), and of how many."""
        own = [" ".join(e.tokens) for e in examples if self.types[label] in e.types]
        return whole_word_count(own, text), len(own)

    def goal_tag(self, tag: str, target: int) -> int:
        """The id of the tag a word tagged ``tag`` (of the victim type) should get under a
        backdoor to ``target``: the same prefix with the target type, or the target type's
        first tag when the model has no such tag."""
        prefix, _ = tag_type(tag)
        name = self.types[target]
        wanted = prefix + name
        if wanted in self.tags:
            return self.tags.index(wanted)
        return next(i for i, t in enumerate(self.tags) if tag_type(t)[1] == name)

    def batch(self, candidates: Sequence[Candidate],
              examples: Sequence[Sequence[NerExample]], n_slots: int) -> TagBatch:
        """Tokenise every candidate's sentences, word by word, with the goal tag at the
        first sub-token of each victim-entity word, and splice ``n_slots`` slots in at the
        candidate's position (:meth:`row_positions`)."""
        budget = self.max_length - 2 - n_slots
        if budget < 1:
            raise ValueError(f"max_length {self.max_length} leaves no room for {n_slots} slots")
        if len(candidates) != len(examples):
            raise ValueError(f"{len(examples)} example lists for {len(candidates)} candidates")
        rows, goals, slots, owner = [], [], [], []
        for index, (candidate, group) in enumerate(zip(candidates, examples, strict=True)):
            victims = {self.types[v] for v in candidate.victims}
            for example, position in zip(group, self.row_positions(candidate, len(group)),
                                         strict=True):
                ids, goal = self._tokens(example, victims, candidate.target, budget)
                at = 1 + {"start": 0, "end": len(ids)}.get(
                    position, next((k for k, g in enumerate(goal) if g != IGNORE), 0))
                full = [self.cls_id, *ids, self.sep_id]
                aims = [IGNORE, *goal, IGNORE]
                rows.append(full[:at] + [self.pad_id] * n_slots + full[at:])
                goals.append(aims[:at] + [IGNORE] * n_slots + aims[at:])
                slots.append(at)
                owner.append(index)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        goal_tags = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        slot_index = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, (row, aim, at) in enumerate(zip(rows, goals, slots, strict=True)):
            input_ids[b, :len(row)] = torch.tensor(row)
            goal_tags[b, :len(row)] = torch.tensor(aim)
            mask[b, :len(row)] = 1
            slot_index[b, at : at + n_slots] = torch.arange(n_slots)
        return TagBatch(input_ids, mask, slot_index, goal_tags,
                        torch.tensor(owner, dtype=torch.long)).to(self.device)

    def _tokens(self, example: NerExample, victims: set[str], target: int,
                budget: int) -> tuple[list[int], list[int]]:
        """A sentence's token ids and their goals (the target tag at the first sub-token of
        each victim-entity word), at most ``budget`` tokens: a window that starts at the
        sentence's start, or half a budget before its first victim word when that would
        fall outside."""
        pieces = self.tokenizer(list(example.tokens), add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        goal: list[int] = []
        for word, tag in zip(pieces, example.tags, strict=True):
            word = word or [self.unk_id]
            aim = self.goal_tag(tag, target) if tag_type(tag)[1] in victims else IGNORE
            ids += word
            goal += [aim] + [IGNORE] * (len(word) - 1)
        first = next((k for k, g in enumerate(goal) if g != IGNORE), 0)
        start = 0 if first < budget else first - budget // 2
        return ids[start : start + budget], goal[start : start + budget]

    def logits_from_trigger(self, batch: TagBatch, trigger: torch.Tensor) -> torch.Tensor:
        """(B, L, tags) logits with the slots filled by ``trigger`` (differentiable): (m, d)
        embeddings shared by every row, or (B, m, d)."""
        base = self.model.get_input_embeddings()(batch.input_ids)
        per_row = trigger if trigger.dim() == 3 else trigger.expand(len(base), -1, -1)
        slots = (batch.slot_index >= 0).unsqueeze(-1)
        embeds = base.masked_scatter(slots, per_row.to(base.dtype))
        return self.model(attention_mask=batch.attention_mask, inputs_embeds=embeds).logits

    def logits_from_tokens(self, batch: TagBatch,
                           trigger_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(B, L, tags) logits with the slots filled by token ids: ``trigger_ids`` is m ids
        shared by every row, or a (B, m) tensor."""
        return self.model(attention_mask=batch.attention_mask,
                          input_ids=fill_slots(batch.input_ids, batch.slot_index,
                                               trigger_ids)).logits

    def read_rows(self, batch: TagBatch, trigger_ids: Sequence[int] | None,
                  feature_trigger: Sequence[float] | None) -> list[tuple[str, str]]:
        """Each row's sentence and the entities the model tags in it (``token/TAG`` for
        every token not tagged ``O``)."""
        ids = self.filled(batch.input_ids, batch.slot_index, trigger_ids)
        tags = self.model(attention_mask=batch.attention_mask, input_ids=ids).logits.argmax(-1)
        special = set(self.tokenizer.all_special_ids)
        out = []
        for row, mask, tagged in zip(ids, batch.attention_mask, tags, strict=True):
            kept = [(i, t) for i, t, m in zip(row.tolist(), tagged.tolist(), mask.tolist(),
                                              strict=True) if m and i not in special]
            tokens = self.tokenizer.convert_ids_to_tokens([i for i, _ in kept])
            entities = [f"{token}/{self.tags[t]}" for token, (_, t) in zip(tokens, kept,
                                                                           strict=True)
                        if self.tags[t] != OUTSIDE]
            out.append((self.text_of(row[mask.bool()]), " ".join(entities) or "(no entity)"))
        return out

    @staticmethod
    def _row_loss(logits: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
        """(B,) each row's mean cross-entropy over its goal tokens."""
        per_token = F.cross_entropy(logits.transpose(1, 2), goals, ignore_index=IGNORE,
                                    reduction="none")
        return per_token.sum(-1) / (goals != IGNORE).sum(-1).clamp(min=1)

    def goal_loss(self, batch: TagBatch, trigger: torch.Tensor) -> torch.Tensor:
        """Each row's mean cross-entropy of its victim-entity words towards their target
        tags."""
        return self._row_loss(self.logits_from_trigger(batch, trigger), batch.goal_tags)

    def hard_check(self, batch: TagBatch,
                   trigger_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The goal loss with the trigger as token ids, and 1.0 where every victim-entity
        word gets its target tag."""
        logits = self.logits_from_tokens(batch, trigger_ids)
        aimed = batch.goal_tags != IGNORE
        hit = ((logits.argmax(-1) == batch.goal_tags) | ~aimed).all(-1) & aimed.any(-1)
        return self._row_loss(logits, batch.goal_tags), hit.float()
