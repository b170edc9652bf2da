"""TIJO: trigger inversion using joint optimisation (Sur et al., ICCV 2023), for VQA models.

A dual-key backdoor fires only when a trigger word is in the question *and* a patch is in the
image. The model never sees the image, only the box features of a frozen detector, so TIJO
inverts the visual key in that feature space (its key idea, Section 3.3): an additive feature
trigger ``f_adv`` (one vector of the detector's feature size) is overlaid on the box features
(the policy B) while the text trigger ``t_adv`` is searched over the vocabulary as UAT does,
both against the same loss (Eq. 5)::

    min_{t_adv, f_adv}  E_{(t, x) in S} [ CE(y~, f(A(t_adv, t), B(D(x), f_adv))) ]

Each of the ``epochs`` steps (Section 3.3, "we optimize Eq. 5 iteratively ... updating the
visual and textual inputs ... at every step") is one forward and backward pass over the
support set ``S`` (the candidate's victims) giving both gradients; ``f_adv`` takes an Adam step,
and each text slot takes the token that minimises the first-order estimate of the loss
(Eq. 2, HotFlip: the lowest ``e_v . g`` over the vocabulary, the gradient averaged over the
batch): its ``top_k`` best tokens are then measured as hard tokens with the updated ``f_adv``
and the best change is kept (the UAT beam search's step; no change when none is better).

Beyond the paper, ``word_search = "relaxed"`` searches the text trigger as DBS does: each slot
is a point in the convex hull of the token embeddings (``softmax(w / lambda) @ E``), ``w``
takes an Adam step with ``f_adv`` on the same loss, the temperature ``lambda`` is divided by
``focus_factor`` after a step whose loss is under ``loss_bound`` and, once lowered, multiplied
back by ``rollback_factor`` with uniform noise on ``w`` when the loss is above it (DBS's
Algorithm 1 with a check at every step, as TIJO's budget is 15 steps); every step the
``top_k`` tokens of each slot's weights are measured as hard tokens with the current
``f_adv``, and the best hard trigger seen is the result.

The variants of the paper's Table 2 are configurations: TIJO-mm (``tijo``, text and feature
jointly), TIJO-nlp (``tijo-nlp``: the text trigger only, which is UAT with TIJO's budget) and
TIJO-vis (``tijo-vis``: the feature trigger only, no word). The overlay ``B`` is ``all`` (the
vector added to every box, B_all, the paper's default: Table 4) or ``one`` (B_one: only the top
box; the paper's detector ranks boxes by objectness, our grid detector has none, so the top
box of an image is its box of the largest feature norm, its most activated cell).

The scan sweeps every answer as target (Figure 2b). The inversion loss of a candidate is the
mean cross-entropy with the final word as a hard token and the final ``f_adv``; its Inv-ASR
(the ``hard_asr``) is the share of the support questions that give the target with both
triggers planted (Section 3.5). Both are the detector's features (Table 3).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trojscan.inversion.base import Inversion, InversionTask, register, register_variant
from trojscan.inversion.common import (
    OneByOne,
    flip_scores,
    initial_trigger,
    rollback_noise,
    victim_batch,
)
from trojscan.subjects.base import Subject
from trojscan.subjects.vqa import VqaBatch, VqaSubject

#: Where the feature trigger may be overlaid (``TIJOConfig.overlay``): every box (B_all),
#: the top box only (B_one), or nowhere (TIJO-nlp).
OVERLAYS = ("all", "one", "none")

#: How the text trigger is searched (``TIJOConfig.word_search``): the paper's first-order
#: token selection (Eq. 2), or a DBS-style relaxation over the convex hull of the embeddings.
WORD_SEARCHES = ("first-order", "relaxed")


@dataclass(frozen=True)
class TIJOConfig:
    """TIJO's knobs, each beside the paper's sentence it follows.

    Attributes:
        trigger_length: words in the text trigger (TrojVQA's triggers are one word, and so
            is the paper's ``t_adv`` in its figures). Ignored without ``text``.
        epochs: optimisation steps T ("We have chosen T to be 15 as a decent balance between
            run-time and performance", Section 4.3; more steps detect better, Figure 4).
        text: invert a text trigger (TIJO-mm and TIJO-nlp); False: the feature trigger only
            (TIJO-vis).
        overlay: the overlay policy B of the feature trigger: ``all`` (B_all, the default:
            "B_all clearly outperform B_one in all cases", Table 4), ``one`` (B_one) or
            ``none`` (no feature trigger: TIJO-nlp).
        feature_lr: Adam's learning rate for ``f_adv`` (the paper gives none). Measured on
            the VQA zoo (README "TIJO"): at 0.1 the feature trigger paints any colour and
            clean BUTD models reach loss 0.04-0.36 with a colour word; at 0.03 dual-key
            models (solid and optimised patches) still reach 0.000-0.004 in 15 steps and
            clean ones stay at 1.2-2.8; at 0.01 an optimised-patch model is no longer
            found (2.55).
        l2: weight of an L2 penalty on ``f_adv`` (Table 5; "stronger regularization tends
            to hurt performance, and thus we did not use regularization": 0).
        top_k: tokens per slot from the first-order estimate that are measured as hard
            tokens each step (UAT's candidates; DBS Appendix A uses 1 for UAT, which makes a
            one-word trigger's search a single guess per step).
        initial_token: the token every slot starts as (UAT's "the").
        skip_question_words: leave the words of the support questions out of the text
            search (ours, beyond the paper). On a clean easy-VQA model the joint search
            otherwise reaches loss 0 with 'color' and a feature trigger that paints the
            image green: the question word makes every question a colour question and the
            feature trigger answers it; a planted trigger word is rare in clean questions
            (README "TIJO").
        skip_neighbours: also leave out, for every support question word, this many
            tokens nearest to it in the model's word-embedding space (cosine): the
            paraphrases of a question word ('colour' for 'color') change the question, not
            the image. 0: only the words themselves. At 10 a clean BUTD model that reached
            0.036 with 'colour' rose to 0.503, and a dual-key MFB model kept 0.030 with its
            word (README "TIJO").
        word_search: ``first-order`` (the paper's Eq. 2) or ``relaxed`` (DBS's convex-hull
            relaxation of each slot, ours; the knobs below apply to it only).
        word_lr: Adam's learning rate for the relaxed slots' weights ``w`` (DBS Appendix A:
            "the Adam optimizer with the initial learning rate 0.5").
        temperature: the relaxation's initial and largest temperature lambda (DBS's code:
            2, its upper bound u = 2).
        loss_bound: beta', the loss under which the temperature is lowered (DBS's code
            0.1).
        focus_factor: c, lambda is divided by it after a step under the bound (DBS: 2).
        rollback_factor: d, lambda is multiplied by it (up to ``temperature``) after a step
            above the bound once focusing has started (DBS's code: 2).
        noise_scale: delta, the rollback adds U(0, delta) to ``w`` (DBS: 10).
        chunk_rows: at most this many rows per forward pass when measuring candidates.
        seed: seeds the relaxed search's rollback noise (each candidate its own stream);
            the first-order search is deterministic (every step uses the whole support set
            and ``f_adv`` starts at zero).
    """

    trigger_length: int = 1
    epochs: int = 15
    text: bool = True
    overlay: str = "all"
    feature_lr: float = 0.03
    l2: float = 0.0
    top_k: int = 8
    initial_token: str = "the"
    skip_question_words: bool = True
    skip_neighbours: int = 10
    word_search: str = "first-order"
    word_lr: float = 0.5
    temperature: float = 2.0
    loss_bound: float = 0.1
    focus_factor: float = 2.0
    rollback_factor: float = 2.0
    noise_scale: float = 10.0
    chunk_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.trigger_length, self.epochs, self.top_k, self.chunk_rows) < 1:
            raise ValueError("trigger_length, epochs, top_k and chunk_rows must be >= 1")
        if self.skip_neighbours < 0:
            raise ValueError("skip_neighbours must be >= 0")
        if self.overlay not in OVERLAYS:
            raise ValueError(f"overlay must be one of {', '.join(OVERLAYS)}, not "
                             f"{self.overlay!r}")
        if not self.text and self.overlay == "none":
            raise ValueError("TIJO needs a text trigger, a feature trigger or both")
        if self.feature_lr <= 0 or self.l2 < 0:
            raise ValueError("feature_lr must be > 0 and l2 >= 0")
        if self.word_search not in WORD_SEARCHES:
            raise ValueError(f"word_search must be one of {', '.join(WORD_SEARCHES)}, not "
                             f"{self.word_search!r}")
        if min(self.word_lr, self.temperature, self.loss_bound) <= 0 or \
                min(self.focus_factor, self.rollback_factor) < 1 or self.noise_scale < 0:
            raise ValueError("word_lr, temperature and loss_bound must be > 0, focus_factor "
                             "and rollback_factor >= 1, noise_scale >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @property
    def slots(self) -> int:
        """Text trigger slots in each question (0 for TIJO-vis)."""
        return self.trigger_length if self.text else 0


def top_box(features: torch.Tensor) -> torch.Tensor:
    """(B, boxes, 1) one-hot masks of each row's top box: the box of the largest feature
    norm (our grid detector's stand-in for the paper's objectness ranking, B_one)."""
    top = features.norm(dim=-1).argmax(-1)
    return F.one_hot(top, features.shape[1]).unsqueeze(-1).to(features.dtype)


def overlay(features: torch.Tensor, vector: torch.Tensor, policy: str) -> torch.Tensor | None:
    """What policy B adds to the box features ``features`` (B, boxes, D) for the feature
    trigger ``vector`` (D,): the vector on every box (``all``), on the top box only
    (``one``), or nothing (``none``: None)."""
    if policy == "all":
        return vector
    if policy == "one":
        return top_box(features) * vector
    return None


def _losses(subject: VqaSubject, batch: VqaBatch, ids: torch.Tensor, vector: torch.Tensor,
            policy: str, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy towards the goals and share of rows giving the goal, of each of the
    (K, m) hard triggers ``ids`` with the feature trigger ``vector``: two (K,) tensors."""
    n = len(batch)
    added = overlay(batch.features, vector, policy)
    losses, hits = [], []
    for part in ids.split(max(1, chunk_rows // n)):
        logits = subject.trigger_logits(batch, part, added)
        goals = batch.goals.expand(len(part), -1)
        losses.append(F.cross_entropy(logits.transpose(1, 2), goals, reduction="none"))
        hits.append((logits.argmax(-1) == goals).float())
    return torch.cat(losses).mean(1), torch.cat(hits).mean(1)


@register("tijo")
class TIJO(OneByOne):
    """Joint text + feature trigger inversion over VQA models, one candidate after another
    (TIJO-mm at the defaults)."""

    config_class = TIJOConfig
    subject_classes = (VqaSubject,)
    token_only = False

    def invert_one(self, subject: Subject, task: InversionTask, generator: torch.Generator,
                   tick: Callable[[int], None]) -> Inversion:
        """TIJO on one candidate (``generator``: the relaxed search's rollback noise)."""
        assert isinstance(subject, VqaSubject)
        config = self.config
        started = time.perf_counter()
        batch = victim_batch(subject, task, config.slots)
        assert isinstance(batch, VqaBatch)
        embeddings = subject.embedding_matrix.detach()
        allowed = self._allowed(subject, task, embeddings)
        trigger = initial_trigger(subject, config.initial_token, config.slots) \
            if config.slots else torch.zeros(0, dtype=torch.long, device=subject.device)
        vector = torch.zeros(batch.features.shape[-1], device=subject.device,
                             requires_grad=config.overlay != "none")
        optimiser = torch.optim.Adam([vector], lr=config.feature_lr) \
            if config.overlay != "none" else None
        relaxed = _Relaxation(config, config.slots, allowed, generator) \
            if config.text and config.word_search == "relaxed" else None
        best: tuple[float, torch.Tensor] | None = None  # the relaxed search's best hard one
        trajectory: list[dict[str, Any]] = []
        for epoch in range(config.epochs):
            if relaxed is not None:
                embeds = relaxed.weights() @ embeddings
            else:
                embeds = embeddings[trigger].clone().requires_grad_(config.text)
            logits = subject.logits(batch, embeds,
                                    feature_trigger=overlay(batch.features, vector,
                                                            config.overlay))
            loss = F.cross_entropy(logits, batch.goals)
            objective = loss + config.l2 * vector.pow(2).sum()
            word = relaxed.w if relaxed is not None else embeds
            wanted = [t for t in (word, vector) if t.requires_grad]
            grads = torch.autograd.grad(objective, wanted)
            if optimiser is not None:
                vector.grad = grads[-1]
                optimiser.step()
            step: dict[str, Any] = {"epoch": epoch, "loss": loss.item()}
            if relaxed is not None:
                step["temperature"] = relaxed.temperature
                with torch.no_grad():
                    tried = relaxed.candidates()
                    losses, _ = _losses(subject, batch, tried, vector.detach(),
                                        config.overlay, config.chunk_rows)
                low = int(losses.argmin())
                step["token_loss"] = losses[low].item()
                if best is None or step["token_loss"] < best[0]:
                    best = (step["token_loss"], tried[low])
                trigger = best[1]
                event = relaxed.step(grads[0], loss.item())
                if event:
                    step["event"] = event
            elif config.text:
                with torch.no_grad():
                    trigger, step["token_loss"] = self._token_step(
                        subject, batch, trigger, grads[0], embeddings, allowed,
                        vector.detach())
            trajectory.append(step)
            tick(epoch)
        with torch.no_grad():
            final = vector.detach()
            loss_t, asr_t = _losses(subject, batch, trigger.view(1, -1), final, config.overlay,
                                    config.chunk_rows)
        hard_loss = loss_t.item()
        trajectory.append({"epoch": config.epochs, "loss": hard_loss, "event": "final"})
        ids = trigger.tolist()
        tokens, text = subject.describe(ids) if ids else ([], "")
        feature = final.tolist() if config.overlay != "none" else None
        return Inversion(
            method=self.name, candidate=task.candidate, trigger_ids=ids, trigger_tokens=tokens,
            trigger_text=text, relaxed_loss=hard_loss, hard_loss=hard_loss,
            hard_asr=asr_t.item(), accepted=True, epochs=config.epochs,
            seconds=time.perf_counter() - started, trajectory=trajectory,
            feature_trigger=feature,
            overlay=config.overlay if feature is not None else None)

    def _allowed(self, subject: VqaSubject, task: InversionTask,
                 embeddings: torch.Tensor) -> torch.Tensor:
        """The tokens the text search may use: the subject's, less the support questions'
        words and their ``skip_neighbours`` nearest tokens when ``skip_question_words``."""
        config = self.config
        allowed = subject.allowed_tokens().clone()
        if config.skip_question_words:
            words = sorted({i for e in task.examples for i in subject.token_ids(e.question)})
            allowed[words] = False
            if config.skip_neighbours:
                unit = F.normalize(embeddings, dim=-1)
                near = (unit[words] @ unit.T).topk(config.skip_neighbours + 1, dim=1).indices
                allowed[near.flatten()] = False
        return allowed

    def _token_step(self, subject: VqaSubject, batch: VqaBatch, trigger: torch.Tensor,
                    grad: torch.Tensor, embeddings: torch.Tensor, allowed: torch.Tensor,
                    vector: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Eq. 2: each slot's ``top_k`` tokens by the first-order estimate, every single
        change measured as hard tokens with the feature trigger ``vector``; the best of them
        and the unchanged trigger, with its loss."""
        config = self.config
        candidates = flip_scores(grad, embeddings, trigger, allowed).topk(
            config.top_k, dim=1).indices
        tried = _single_changes(trigger, candidates)
        losses, _ = _losses(subject, batch, tried, vector, config.overlay, config.chunk_rows)
        best = int(losses.argmin())
        return tried[best], losses[best].item()


def _single_changes(trigger: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(1 + m * k, m): ``trigger`` and every trigger that differs from it in one slot ``i``,
    taking one of that slot's ``k`` ``candidates[i]``."""
    tried = [trigger]
    for slot in range(len(trigger)):
        for token in candidates[slot]:
            changed = trigger.clone()
            changed[slot] = token
            tried.append(changed)
    return torch.stack(tried)


class _Relaxation:
    """The DBS-style relaxed text trigger (``word_search = "relaxed"``): slot weights ``w``
    over the allowed tokens, their temperature, and DBS's focus / rollback rule checked after
    every step."""

    def __init__(self, config: TIJOConfig, slots: int, allowed: torch.Tensor,
                 generator: torch.Generator) -> None:
        self.config = config
        self.temperature = config.temperature
        self.generator = generator
        self.excluded = torch.where(allowed, 0.0, -torch.inf)
        self.w = torch.zeros(slots, len(allowed), device=allowed.device,
                             requires_grad=True)
        self.optimiser = torch.optim.Adam([self.w], lr=config.word_lr)

    def weights(self) -> torch.Tensor:
        """(m, vocab) each slot's softmax weights at the current temperature."""
        return torch.softmax((self.w + self.excluded) / self.temperature, dim=-1)

    def candidates(self) -> torch.Tensor:
        """The hard triggers to measure: the slots' heaviest tokens, and every change of one
        slot to one of its ``top_k`` heaviest."""
        top = self.weights().topk(self.config.top_k, dim=-1).indices
        return _single_changes(top[:, 0], top[:, 1:])

    def step(self, grad: torch.Tensor, loss: float) -> str | None:
        """Adam on ``w`` with ``grad``, then DBS's temperature rule for ``loss``; the event
        (``focus`` / ``rollback``) or None."""
        config = self.config
        self.w.grad = grad
        self.optimiser.step()
        if loss < config.loss_bound:
            self.temperature /= config.focus_factor
            return "focus"
        if self.temperature < config.temperature:
            self.temperature = min(self.temperature * config.rollback_factor,
                                   config.temperature)
            with torch.no_grad():
                self.w.add_(rollback_noise(self.w, "uniform", config.noise_scale,
                                           self.generator))
            return "rollback"
        return None


register_variant("tijo-nlp", "tijo", overlay="none")
register_variant("tijo-vis", "tijo", text=False)
register_variant("tijo-one", "tijo", overlay="one")
register_variant("tijo-relaxed", "tijo", word_search="relaxed")
