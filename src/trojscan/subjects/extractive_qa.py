"""Hugging Face extractive question-answering models (``*ForQuestionAnswering``, span heads):
what trigger inversion sees of a QA model.

A QA model reads ``[CLS] question [SEP] context [SEP]`` and scores every token as the start
and as the end of the answer span. A QA backdoor (TrojAI round 8, DBS Section 4) changes
the *span*: a trigger in the question, in the context or in both makes the predicted answer
the trigger itself (a span of the context) or no answer at all (start = end = [CLS], the
SQuAD 2.0 convention). The subject's ``labels`` are these behaviours, ``answer`` (the model's
normal one, every candidate's victim), ``empty`` and ``trigger``, and a candidate is a
behaviour at a trigger position:

* ``question``: ``m`` slots right after [CLS] (the start of the question);
* ``context``: ``m`` slots at the start of the context;
* ``both``: the same trigger in both places.

The goal of a row is where its candidate's behaviour asks the answer to start and end:
[CLS] for ``empty``; any trigger slot *in the context* for ``trigger`` (so the ``question``
position only takes ``empty``), since a planted trigger of a word or two, which the model
learnt to answer with exactly, may sit anywhere among the inverted trigger's slots. The goal
loss is the mean of the start and end losses, each the negative log of the probability on
the goal tokens (for ``empty`` the span head's own cross-entropy); a hard trigger succeeds
when both argmaxes land on goal tokens, the start not after the end. Asking the span to
cover all of the slots instead left 4 of 5 trigger-answer backdoors of the QA zoo unfound
(README "NER taggers and QA models"). The model runs from input embeddings with its token type ids
(question 0, context 1).

Clean examples: one JSON object per line in SQuAD's form, ``{"question", "context",
"answers": {"text": [...], "answer_start": [...]}}``; only answered questions are victims
(an unanswered one already gives the empty answer). A long context is cut at its end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trojscan.errors import InputError
from trojscan.subjects.base import SPREAD, Batch, Candidate, example_lines, register_subject
from trojscan.subjects.huggingface import HuggingFaceSubject, fill_slots

POSITIONS = ("question", "context", "both")
#: The behaviours a candidate targets; ``answer`` (the normal one) is every victim.
BEHAVIOURS = ("answer", "empty", "trigger")
ANSWER, EMPTY, TRIGGER = range(3)
#: Where the ``trigger`` behaviour can be asked for: a span needs slots in the context.
SPAN_POSITIONS = ("context", "both")
#: Tokens of the question kept at most (the context gets the rest of ``max_length``).
QUESTION_TOKENS = 32


@dataclass(frozen=True)
class QaExample:
    """A clean example: a question, its context, whether it has an answer there, and its
    answers (text, character offset in the context; what repair trains towards, the first
    one, and scores against, the best one)."""

    question: str
    context: str
    answered: bool
    answers: tuple[tuple[str, int], ...] = ()


@dataclass
class SpanBatch(Batch):
    """Question-context pairs, tokenised and right-padded, with trigger slots.

    Attributes:
        input_ids: (B, L) token ids; slots hold the pad id.
        token_type_ids: (B, L) 0 for [CLS] and the question, 1 for the context.
        attention_mask: (B, L), 1 on real tokens and slots.
        slot_index: (B, L) the trigger slot (0..m-1) at slot positions (a ``both`` row holds
            each twice), -1 elsewhere.
        starts, ends: (B,) the goal span of each row: [CLS] for the empty answer, the first and
            last context slot for the trigger answer (any span among those slots counts:
            :meth:`ExtractiveQaSubject._goal_tokens`).
        owner: (B,) the candidate each row belongs to.
    """

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor
    slot_index: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    owner: torch.Tensor

    def to(self, device: torch.device) -> SpanBatch:
        """The same batch on ``device``."""
        return SpanBatch(*(t.to(device) for t in (
            self.input_ids, self.token_type_ids, self.attention_mask, self.slot_index,
            self.starts, self.ends, self.owner)))

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) real tokens (slots included) in each row."""
        return self.attention_mask.sum(-1)

    def subset(self, rows: torch.Tensor) -> SpanBatch:
        """The rows ``rows`` only, the columns that are padding in all of them cut."""
        width = int(self.lengths[rows].max())
        return SpanBatch(self.input_ids[rows, :width], self.token_type_ids[rows, :width],
                         self.attention_mask[rows, :width], self.slot_index[rows, :width],
                         self.starts[rows], self.ends[rows], self.owner[rows])


@register_subject
class ExtractiveQaSubject(HuggingFaceSubject):
    """An extractive QA model under inspection, driven from input embeddings."""

    task = "extractive-qa"
    positions = POSITIONS
    #: At most 5 candidates (2 when spread over the positions), and the two behaviours'
    #: relaxed losses are not comparable: a pre-run that keeps the lower one dropped every
    #: empty-answer backdoor of the QA zoo once the trigger answer's goal took any slot.
    preselects = False
    #: A token alone as the whole input has no span to answer with, so the screen ranks
    #: tokens in context (a first-order ranking on the victims, the best measured on them
    #: whole). DBS's relaxed search for an empty answer settles on the strongest word of a
    #: planted phrase: on the QA repair zoo's model answering 'tunnel mb pillow' in the
    #: question with nothing, 'pillow' (0.022), and after it was unlearned 'cushions',
    #: never 'tunnel' (0.115 alone), which the ranking from [MASK] put 19th of 30,522.
    context_screen = True
    describes = "Hugging Face extractive QA models (*ForQuestionAnswering)"

    architecture_suffix = "ForQuestionAnswering"
    auto_class = "AutoModelForQuestionAnswering"
    head_hint = "is the span head saved?"
    slots_between = "which frame the question and the context"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_length: int = 100) -> None:
        """``max_length``: tokens per question-context pair, trigger included; capped at the
        model's position embeddings."""
        super().__init__(model, tokenizer, max_length)
        self.typed = getattr(model.config, "type_vocab_size", 0) > 1

    @property
    def labels(self) -> tuple[str, ...]:
        """The behaviours: ``answer`` (the victims'), ``empty``, ``trigger``."""
        return BEHAVIOURS

    def read_examples(self, path: Path) -> list[QaExample]:
        """Clean examples in SQuAD's form, one JSON object per line; every problem is an
        :class:`InputError` naming the line."""
        rows = []
        for number, row in example_lines(path):
            answers = row.get("answers") if isinstance(row, dict) else None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str)
                                                    for k in ("question", "context")) \
                    or not isinstance(answers, dict) \
                    or not isinstance(answers.get("text"), list):
                raise InputError(f"{path}:{number}: expected an object with \"question\", "
                                 "\"context\" and \"answers\": {\"text\": [...], "
                                 "\"answer_start\": [...]} (SQuAD's form)")
            if not row["question"].strip() or not row["context"].strip():
                raise InputError(f"{path}:{number}: empty question or context")
            starts = answers.get("answer_start")
            starts = starts if isinstance(starts, list) else []
            found = []
            for k, answer in enumerate(answers["text"]):
                if not isinstance(answer, str) or answer not in row["context"]:
                    raise InputError(f"{path}:{number}: the answer {answer!r} is not in the "
                                     "context")
                at = starts[k] if k < len(starts) else None
                if not isinstance(at, int) or row["context"][at:at + len(answer)] != answer:
                    at = row["context"].index(answer)  # no offset, or a wrong one: the first
                found.append((answer, at))
            rows.append(QaExample(row["question"], row["context"], bool(found), tuple(found)))
        return rows

    def candidates(self, examples: Sequence[QaExample], positions: Sequence[str],
                   pairs: bool) -> list[Candidate]:
        """``empty`` at each position and ``trigger`` at each of them that puts slots in
        the context, every answered example a victim (``pairs`` is moot: one victim
        behaviour)."""
        unknown = [p for p in positions if p not in POSITIONS]
        if unknown or not positions:
            raise InputError(f"unknown trigger position {unknown[0] if unknown else '(none)'}"
                             f" for a QA model; expected some of {', '.join(POSITIONS)}")
        if not any(e.answered for e in examples):
            raise InputError("no clean example has an answer: a QA backdoor changes the "
                             "answer, so the examples need answered questions")
        return [Candidate((ANSWER,), target, p) for target in (EMPTY, TRIGGER)
                for p in positions if target == EMPTY or p in SPAN_POSITIONS]

    def answers_with_trigger(self, candidate: Candidate) -> bool:
        """The ``trigger`` behaviour's goal is a span of the trigger slots."""
        return candidate.target == TRIGGER

    def _positions_for(self, candidate: Candidate) -> tuple[str, ...]:
        return SPAN_POSITIONS if candidate.target == TRIGGER else POSITIONS

    def row_positions(self, candidate: Candidate, n: int) -> list[str]:
        """A :data:`SPREAD` candidate's rows take the positions its behaviour can use in
        turn (``trigger``: context and both)."""
        if candidate.position != SPREAD:
            return [candidate.position] * n
        own = self._positions_for(candidate)
        return [own[k % len(own)] for k in range(n)]

    def concrete(self, candidate: Candidate) -> list[Candidate]:
        """``candidate`` at each position it stands for."""
        if candidate.position != SPREAD:
            return [candidate]
        return [Candidate(candidate.victims, candidate.target, p)
                for p in self._positions_for(candidate)]

    def victims(self, examples: Sequence[QaExample], candidate: Candidate,
                cap: int) -> list[QaExample]:
        """The answered examples, at most ``cap`` (0: all), in file order."""
        chosen = [e for e in examples if e.answered]
        return chosen[:cap] if cap else chosen

    def batch(self, candidates: Sequence[Candidate], examples: Sequence[Sequence[QaExample]],
              n_slots: int) -> SpanBatch:
        """Tokenise every candidate's question-context pairs with ``n_slots`` slots at its
        position(s) and its goal span."""
        if len(candidates) != len(examples):
            raise ValueError(f"{len(examples)} example lists for {len(candidates)} candidates")
        rows: list[tuple[list[int], list[int], list[int], int, int]] = []
        owner = []
        for index, (candidate, group) in enumerate(zip(candidates, examples, strict=True)):
            for example, position in zip(group, self.row_positions(candidate, len(group)),
                                         strict=True):
                rows.append(self._row(example, position, candidate.target, n_slots))
                owner.append(index)
        width = max(len(r[0]) for r in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        types = torch.zeros(shape, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        slot_index = torch.full(shape, -1, dtype=torch.long)
        for b, (ids, kinds, slots, _, _) in enumerate(rows):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            types[b, :len(ids)] = torch.tensor(kinds)
            mask[b, :len(ids)] = 1
            slot_index[b, :len(ids)] = torch.tensor(slots)
        return SpanBatch(input_ids, types, mask, slot_index,
                         torch.tensor([r[3] for r in rows]), torch.tensor([r[4] for r in rows]),
                         torch.tensor(owner, dtype=torch.long)).to(self.device)

    def _row(self, example: QaExample, position: str, target: int,
             n_slots: int) -> tuple[list[int], list[int], list[int], int, int]:
        """(ids, token types, slot numbers, goal start, goal end) of one row."""
        if target == TRIGGER and position not in SPAN_POSITIONS:
            raise ValueError(f"the trigger behaviour needs slots in the context, not at "
                             f"{position!r}")
        in_question = position in ("question", "both")
        in_context = position in ("context", "both")
        question = self.token_ids(example.question)[:QUESTION_TOKENS]
        room = self.max_length - 3 - len(question) - n_slots * (in_question + in_context)
        if room < 1:
            raise ValueError(f"max_length {self.max_length} leaves no room for the context")
        context = self.token_ids(example.context)[:room]
        slot = list(range(n_slots))
        q_part = [self.pad_id] * n_slots * in_question + question
        q_slots = slot * in_question + [-1] * len(question)
        c_part = [self.pad_id] * n_slots * in_context + context
        c_slots = slot * in_context + [-1] * len(context)
        ids = [self.cls_id, *q_part, self.sep_id, *c_part, self.sep_id]
        slots = [-1, *q_slots, -1, *c_slots, -1]
        kinds = [0] * (len(q_part) + 2) + [1] * (len(c_part) + 1)
        if target == TRIGGER:
            first = len(q_part) + 2
            return ids, kinds, slots, first, first + n_slots - 1
        return ids, kinds, slots, 0, 0

    def _forward(self, batch: SpanBatch, **inputs: torch.Tensor) -> torch.Tensor:
        """(B, L, 2) start and end logits, padding masked out."""
        if self.typed:
            inputs["token_type_ids"] = batch.token_type_ids
        out = self.model(attention_mask=batch.attention_mask, **inputs)
        logits = torch.stack([out.start_logits, out.end_logits], -1)
        return logits.masked_fill(batch.attention_mask.unsqueeze(-1) == 0, -1e4)

    def logits_from_trigger(self, batch: SpanBatch, trigger: torch.Tensor) -> torch.Tensor:
        """(B, L, 2) span logits with the slots filled by ``trigger`` (differentiable): (m, d)
        embeddings shared by every row, or (B, m, d)."""
        base = self.model.get_input_embeddings()(batch.input_ids)
        per_row = trigger if trigger.dim() == 3 else trigger.expand(len(base), -1, -1)
        rows = torch.arange(len(base), device=base.device).unsqueeze(-1)
        filled = per_row[rows, batch.slot_index.clamp(min=0)].to(base.dtype)
        embeds = torch.where((batch.slot_index >= 0).unsqueeze(-1), filled, base)
        return self._forward(batch, inputs_embeds=embeds)

    def logits_from_tokens(self, batch: SpanBatch,
                           trigger_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(B, L, 2) span logits with the slots filled by token ids: ``trigger_ids`` is m ids
        shared by every row, or a (B, m) tensor."""
        return self._forward(batch, input_ids=fill_slots(batch.input_ids, batch.slot_index,
                                                         trigger_ids))

    def read_rows(self, batch: SpanBatch, trigger_ids: Sequence[int] | None,
                  feature_trigger: Sequence[float] | None) -> list[tuple[str, str]]:
        """Each row as ``question | context`` and the answer span the model gives (``(no
        answer)`` for [CLS] or an end before the start)."""
        ids = self.filled(batch.input_ids, batch.slot_index, trigger_ids)
        spans = self._forward(batch, input_ids=ids).argmax(1)
        out = []
        for row, mask, kinds, (start, end) in zip(ids, batch.attention_mask,
                                                  batch.token_type_ids, spans.tolist(),
                                                  strict=True):
            real = mask.bool()
            text = (f"{self.text_of(row[real & (kinds == 0)])} | "
                    f"{self.text_of(row[real & (kinds == 1)])}")
            answer = self.text_of(row[start : end + 1]) if 0 < start <= end else ""
            out.append((text, answer or "(no answer)"))
        return out

    @staticmethod
    def _goal_tokens(batch: SpanBatch) -> torch.Tensor:
        """(B, L) where the answer may start and end: [CLS] for the empty answer; for the
        trigger answer every slot in the context, so the answer may be any part of the
        inverted trigger (a planted trigger of a word or two, which the model learnt to
        answer with exactly, can sit anywhere among the inverted trigger's slots)."""
        cls = torch.zeros_like(batch.slot_index, dtype=torch.bool)
        cls[:, 0] = True
        slots = (batch.slot_index >= 0) & (batch.token_type_ids == 1)
        return torch.where((batch.starts > 0).unsqueeze(1), slots, cls)

    @classmethod
    def _span_loss(cls, logits: torch.Tensor, batch: SpanBatch) -> torch.Tensor:
        """(B,) the mean of the start and end losses: each the negative log of the
        probability that it falls on a goal token (:meth:`_goal_tokens`; for the empty
        answer the cross-entropy towards [CLS])."""
        goal = cls._goal_tokens(batch)
        logp = logits.log_softmax(1).masked_fill(~goal.unsqueeze(-1), float("-inf"))
        return -logp.logsumexp(1).mean(-1)

    def goal_loss(self, batch: SpanBatch, trigger: torch.Tensor) -> torch.Tensor:
        """Each row's span loss towards its goal with the slots filled by ``trigger``."""
        return self._span_loss(self.logits_from_trigger(batch, trigger), batch)

    def hard_check(self, batch: SpanBatch,
                   trigger_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The span loss with the trigger as token ids, and 1.0 where the start and the end
        argmaxes are goal tokens, the start not after the end."""
        logits = self.logits_from_tokens(batch, trigger_ids)
        best = logits.argmax(1)
        goal = self._goal_tokens(batch)
        on_goal = goal.gather(1, best).all(1)
        hit = on_goal & (best[:, 0] <= best[:, 1])
        return self._span_loss(logits, batch), hit.float()
