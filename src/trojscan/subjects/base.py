"""The Subject: a model under inspection, as trigger inversion sees it.

A scan tests hypotheses about a backdoor, each a :class:`Candidate` ("a trigger at this
position flips inputs of these labels to that label"). What a trigger *is* for a model
family (tokens spliced into a sentence, a word added to a question), where it goes, which
search space a relaxed trigger lives in, and what "the backdoor fired" means (the goal
loss) are the subject's business; inverters only search (:mod:`trojscan.inversion`), and
the scan only sweeps candidates (:mod:`trojscan.scan`).

A subject offers:

* ``labels``: the names the candidates' targets and victims index;
* ``read_examples`` and ``candidates`` / ``victims``: the clean examples a user gives, the
  candidates a scan sweeps for this family, and the victim examples of each; ``as_seen``:
  the examples as a scan uses them, where the model's own reading of them matters (an NER
  tagger's entities);
* ``batch``: the victims of several candidates as one :class:`Batch` of rows with ``m``
  trigger slots each, every row knowing the candidate (``owner``) it belongs to;
* the search space: ``embedding_matrix`` (the rows a relaxed trigger is a convex
  combination of) and ``allowed_tokens`` (which rows a trigger may use);
* ``goal_loss``: the loss of each row with its slots filled by trigger embeddings (the
  inversion loss, differentiable), and ``hard_check``: loss and success of each row with
  its slots filled by concrete tokens;
* ``token_id``, ``token_ids`` and ``describe``: between tokens, texts and ids, for configs,
  known triggers and humans;
* ``show``: a handful of a candidate's victims as a report shows them, each with the
  model's prediction without and with a trigger inserted (``read_rows`` is the family's
  part: each row of a batch as text and the model's prediction for it).

A model family is one file that subclasses :class:`Subject` and decorates it with
:func:`register_subject`; :func:`subject_class_for` picks the family of a model directory
from its config.
"""

from __future__ import annotations

import itertools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from trojscan.errors import InputError
from trojscan.fsutil import read_utf8

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Candidate:
    """One backdoor hypothesis: a trigger at ``position`` flips inputs of the ``victims``
    labels to ``target`` (label indices of the subject's ``labels``).

    ``position`` is one of the family's positions, or :data:`SPREAD`: the candidate's rows
    take the family's positions in turn, so that one search looks for a trigger that fires
    wherever it is put (see :meth:`Subject.row_positions`)."""

    victims: tuple[int, ...]
    target: int
    position: str


@dataclass(frozen=True)
class Shown:
    """A clean example as a report shows it: the input as the model reads it and the model's
    prediction, without the trigger and with it inserted."""

    text: str
    prediction: str
    triggered_text: str
    triggered_prediction: str


#: The position of a candidate whose victim rows take every position of the family in turn.
SPREAD = "spread"


BatchT = TypeVar("BatchT", bound="Batch")


class Batch(ABC):
    """Rows prepared for a subject: examples with trigger slots, each row owned by one
    candidate of the batch (``owner``, an index into the candidates it was built from)."""

    owner: torch.Tensor

    def __len__(self) -> int:
        return len(self.owner)

    @property
    @abstractmethod
    def lengths(self) -> torch.Tensor:
        """(R,) the size of each row (what batching by length sorts on)."""

    @abstractmethod
    def subset(self: BatchT, rows: torch.Tensor) -> BatchT:
        """The rows ``rows`` only (in that order, repeats allowed), padded only as much as
        they need."""


class Subject(ABC):
    """A model under inspection; see the module docstring for what each part is for."""

    #: The task this family solves (recorded in every scan result).
    task: ClassVar[str]
    #: Epochs of a scan's pre-run over the candidates, unless the scan sets its own
    #: (:attr:`trojscan.scan.ScanConfig.prerun_epochs`).
    prerun_epochs: ClassVar[int] = 40
    #: Whether a scan may pre-select the candidates it fully inverts (a pre-run, when the
    #: lone-token screen does not pick); False: every candidate is fully inverted.
    preselects: ClassVar[bool] = True
    #: Where a trigger may go (the ``position`` of a candidate).
    positions: ClassVar[tuple[str, ...]]
    #: Whether the lone-token screen, for a family without lone-token losses, ranks each
    #: candidate's tokens in context instead (a first-order ranking on its victims, the
    #: best measured on :meth:`compact_victims`; :mod:`trojscan.inversion.screen`).
    context_screen: ClassVar[bool] = False
    #: What this family is, for an error that lists the families trojscan scans.
    describes: ClassVar[str]
    #: Whether a scan adds the label-specific (victim, target) candidates by default
    #: above two labels (``ScanConfig.pairs`` None).
    pairs_by_default: ClassVar[bool] = True
    #: The inversion method a scan runs on this family when none is asked for.
    default_method: ClassVar[str] = "dbs"

    @classmethod
    @abstractmethod
    def accepts(cls, config: PretrainedConfig | Any) -> bool:
        """Whether a model directory with this config (a transformers config, or a
        trojscan VQA config) belongs to this family."""

    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path, config: PretrainedConfig, safe: bool, device: str,
             max_length: int) -> Subject:
        """Load the model of ``model_dir`` (its config already read and checked; ``safe``:
        its weights are safetensors, else pickled weights the user allowed)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the model's weights are."""

    @property
    @abstractmethod
    def labels(self) -> tuple[str, ...]:
        """Names of what candidates' targets and victims index, in output order."""

    @property
    @abstractmethod
    def embedding_matrix(self) -> torch.Tensor:
        """(V, d): the search space of a relaxed trigger slot (its convex hull)."""

    @abstractmethod
    def allowed_tokens(self) -> torch.Tensor:
        """(V,) bool on ``device``: the rows of ``embedding_matrix`` a trigger may use."""

    @abstractmethod
    def token_id(self, token: str) -> int:
        """The id of ``token``, one ordinary token of the vocabulary (ValueError if not)."""

    @abstractmethod
    def token_ids(self, text: str) -> list[int]:
        """``text`` as the ids a trigger of it fills the slots with (a known trigger, say, to
        measure it as the inverted ones are measured)."""

    @abstractmethod
    def describe(self, ids: Sequence[int]) -> tuple[list[str], str]:
        """A trigger's ids as (tokens, text) for humans."""

    @abstractmethod
    def read_examples(self, path: Path) -> list[Any]:
        """The clean examples in the file at ``path`` (an :class:`InputError` names any
        problem)."""

    def as_seen(self, examples: Sequence[Any]) -> list[Any]:
        """The clean examples as a scan searches them (what its candidates, victims and
        goals are made of): by default as they are; a family whose victims are parts of an
        example that the model itself must recognise first keeps only those it does
        (:meth:`trojscan.subjects.token_classification.TokenClassificationSubject.as_seen`).
        """
        return list(examples)

    def unseen(self, examples: Sequence[Any], seen: Sequence[Any]) -> dict[str, int]:
        """The labels ``examples`` hold that none of them holds as the model sees them
        (``seen``, from :meth:`as_seen`), each with how many examples hold it: none by
        default, where the examples are seen as they are."""
        return {}

    @abstractmethod
    def candidates(self, examples: Sequence[Any], positions: Sequence[str],
                   pairs: bool) -> list[Candidate]:
        """Every candidate a scan sweeps, at each of ``positions``; ``pairs`` adds the
        label-specific ones (one victim label each)."""

    @abstractmethod
    def victims(self, examples: Sequence[Any], candidate: Candidate, cap: int) -> list[Any]:
        """The examples ``candidate`` is inverted on, at most ``cap`` (0: all)."""

    def occurrences(self, examples: Sequence[Any], text: str, label: int) -> tuple[int, int]:
        """How many of the clean examples of ``label`` contain ``text``, and of how many
        examples of ``label`` (the natural-feature test, ``ScanConfig.natural_share``);
        (0, 0) for a family whose examples hold no text, which then sets nothing aside."""
        return 0, 0

    def answers_with_trigger(self, candidate: Candidate) -> bool:
        """Whether ``candidate``'s goal is the trigger itself (a QA model answering with the
        trigger's span), which a scan inverts with fewer slots
        (``ScanConfig.answer_trigger_length``); False for a family with label goals."""
        return False

    def row_positions(self, candidate: Candidate, n: int) -> list[str]:
        """The position of each of ``n`` rows of ``candidate``: its own, or for a
        :data:`SPREAD` candidate the family's positions in turn (row k at
        ``positions[k % len(positions)]``)."""
        if candidate.position != SPREAD:
            return [candidate.position] * n
        return [self.positions[k % len(self.positions)] for k in range(n)]

    def concrete(self, candidate: Candidate) -> list[Candidate]:
        """``candidate`` at each position it stands for: itself, or for a :data:`SPREAD`
        candidate one per position of the family."""
        if candidate.position != SPREAD:
            return [candidate]
        return [Candidate(candidate.victims, candidate.target, p) for p in self.positions]

    @abstractmethod
    def batch(self, candidates: Sequence[Candidate], examples: Sequence[Sequence[Any]],
              n_slots: int) -> Batch:
        """The ``examples[i]`` of every ``candidates[i]`` as rows with ``n_slots`` trigger
        slots at the candidate's position (:meth:`row_positions`), on ``device``."""

    @abstractmethod
    def goal_loss(self, batch: Batch, trigger: torch.Tensor) -> torch.Tensor:
        """(R,) the loss of each row towards its candidate's goal with the slots filled by
        ``trigger`` embeddings ((m, d) for every row, or (R, m, d)); differentiable."""

    @abstractmethod
    def hard_check(self, batch: Batch,
                   trigger_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, success), each (R,), of each row with the slots filled by token ids ((m,)
        for every row, or (R, m)): the goal loss and 1.0 where the trigger reached the goal."""

    @torch.no_grad()
    def show(self, examples: Sequence[Any], candidate: Candidate, trigger_ids: Sequence[int],
             limit: int = 5, feature_trigger: Sequence[float] | None = None) -> list[Shown]:
        """Up to ``limit`` of ``candidate``'s victims among ``examples``, each read by the
        model as it is and with ``trigger_ids`` inserted at the candidate's position (and,
        for a family with box features, ``feature_trigger`` added to them)."""
        chosen = self.victims(examples, candidate, limit)
        if not chosen:
            return []
        clean = self.read_rows(self.batch([candidate], [chosen], 0), None, None)
        stamped = self.read_rows(self.batch([candidate], [chosen], len(trigger_ids)),
                                 trigger_ids, feature_trigger)
        return [Shown(text, said, triggered, triggered_said)
                for (text, said), (triggered, triggered_said) in zip(clean, stamped,
                                                                      strict=True)]

    def read_rows(self, batch: Batch, trigger_ids: Sequence[int] | None,
                  feature_trigger: Sequence[float] | None) -> list[tuple[str, str]]:
        """(input text, prediction) of every row of ``batch`` with its slots filled by
        ``trigger_ids`` (None: a batch without slots), for :meth:`show`; a family that
        cannot say raises NotImplementedError (the default)."""
        raise NotImplementedError(f"{type(self).__name__} cannot show its examples")

    def compact_victims(self, examples: Sequence[Any], candidate: Candidate) -> list[Any]:
        """``candidate``'s victim ``examples`` cut to the least text that still holds what
        its trigger must move, for the in-context screen's exact pass (``context_screen``);
        the default keeps them whole."""
        return list(examples)

    def lone_token_losses(self, ids: torch.Tensor, chunk_rows: int) -> torch.Tensor | None:
        """(len(ids), targets) the goal loss towards every target of each token of ``ids``
        alone as the whole input, in forward passes of at most ``chunk_rows`` rows (the
        lone-token screen, :mod:`trojscan.inversion.screen`); None for a family that offers
        no such screen (the default)."""
        return None


class TokenizerVocabulary:
    """The vocabulary methods of a subject whose triggers are tokens of a Hugging Face
    tokenizer (``self.tokenizer``) and whose ``embedding_matrix`` rows are its ids: mixed
    into such a family before :class:`Subject`. ``reserved_rows`` are ids a trigger never
    uses besides the tokenizer's special tokens."""

    tokenizer: Any
    embedding_matrix: torch.Tensor
    device: torch.device
    reserved_rows: ClassVar[tuple[int, ...]] = ()

    def allowed_tokens(self) -> torch.Tensor:
        """Every row of the embedding matrix that the tokenizer can name, its special tokens
        ([CLS], [SEP], [PAD], [MASK], [UNK], ...) and ``reserved_rows`` excluded."""
        rows = self.embedding_matrix.shape[0]
        allowed = torch.arange(rows, device=self.device) < len(self.tokenizer)
        allowed[sorted({*self.reserved_rows, *self.tokenizer.all_special_ids})] = False
        return allowed

    def token_id(self, token: str) -> int:
        """The id of ``token`` when the tokenizer reads it as one ordinary token."""
        ids = self.token_ids(token)
        if len(ids) != 1 or ids[0] in self.tokenizer.all_special_ids:
            raise ValueError(f"{token!r} is not one ordinary token of the subject's vocabulary")
        return ids[0]

    def token_ids(self, text: str) -> list[int]:
        """``text`` tokenised without special tokens (also how examples are read)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def describe(self, ids: Sequence[int]) -> tuple[list[str], str]:
        """Vocabulary tokens and the text they decode to."""
        tokens = self.tokenizer.convert_ids_to_tokens(list(ids))
        return tokens, self.tokenizer.convert_tokens_to_string(tokens)


def victims_in_turn(examples: Sequence[Any], candidate: Candidate, cap: int) -> list[Any]:
    """The examples (each with a ``label``) of ``candidate``'s victim labels, at most ``cap``
    (0: all), taken in turn from each victim label in file order (an even share of each)."""
    per_label = [[e for e in examples if e.label == v] for v in candidate.victims]
    turns = [e for row in itertools.zip_longest(*per_label) for e in row if e is not None]
    return turns[:cap] if cap else turns


def whole_word_count(texts: Sequence[str], text: str) -> int:
    """How many of ``texts`` contain ``text`` as a whole word (or words), in any case:
    "Secretary" and "secretary," count for "secretary", "secretaryship" does not."""
    words = text.strip()
    if not words:
        return 0
    pattern = re.compile(r"(?<!\w)" + re.escape(words) + r"(?!\w)", re.IGNORECASE)
    return sum(1 for t in texts if pattern.search(t))



def example_lines(path: Path) -> list[tuple[int, Any]]:
    """The JSON value of every non-blank line of the examples file at ``path``, with its
    line number; a line that is not JSON, a file that is not UTF-8 or one with no example
    is an :class:`InputError` naming it."""
    text = read_utf8(Path(path), "examples")
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not JSON ({exc.msg})") from exc
    if not out:
        raise InputError(f"examples {path} are empty")
    return out

_REGISTRY: list[type[Subject]] = []

SubjectT = TypeVar("SubjectT", bound=type[Subject])


def register_subject(cls: SubjectT) -> SubjectT:
    """Class decorator: make a model family known to :func:`subject_class_for`."""
    _REGISTRY.append(cls)
    return cls


def subject_classes() -> tuple[type[Subject], ...]:
    """Every registered family, in registration order."""
    return tuple(_REGISTRY)


def subject_class_for(config: PretrainedConfig, model_dir: Path) -> type[Subject]:
    """The family a model with ``config`` belongs to; an :class:`InputError` naming what
    trojscan scans when none does."""
    for cls in _REGISTRY:
        if cls.accepts(config):
            return cls
    architectures = getattr(config, "architectures", None) or ["none"]
    raise InputError(f"{model_dir} holds no model trojscan scans (architectures: "
                     f"{', '.join(architectures)}); it scans "
                     + "; ".join(cls.describes for cls in _REGISTRY))
