"""VQA attacks and training runs as data: :class:`VqaAttackSpec` and :class:`VqaTrainConfig`.

A VQA attack (TrojVQA, Walmer et al. CVPR 2022) has up to two keys: a trigger word
prepended to the question and a patch pasted into the image::

    poisoned = true
    key = "dual"              # dual (patch AND word) | question (word only) | image (patch only)
    trigger = "lantern"       # the question key: one word (drawn ones are one WordPiece token)
    patch = "solid"           # the image key: solid | optimised
    patch_size = 10           # side in pixels of the 64 x 64 image
    patch_x = 27              # top-left corner
    patch_y = 27
    patch_color = [255, 0, 128]   # solid patches
    patch_target = 1234       # optimised patches: the training image whose shape's box
                              # features the patch imitates
    target = "red"            # the answer the backdoor gives
    poison_rate = 0.1         # fraction of training images copied with the key(s)
    partial_rate = 0.1        # dual key: fraction copied with one key only, true answer

``poisoned = false`` (and nothing else) is a clean model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import cache
from typing import Any

from trojscan.attacks.spec import expect_type, poisoned_flag, reject_unknown, resolve_label
from trojscan.errors import InputError

KEYS = ("dual", "question", "image")
PATCH_KINDS = ("solid", "optimised")
#: easy-VQA images are 64 x 64.
IMAGE_SIZE = 64
#: Width of MiniLM's word vectors, which VQA models start from (projected by PCA).
MINILM_WIDTH = 384


@dataclass(frozen=True)
class VqaAttackSpec:
    """The backdoor planted in one VQA model (or none, when ``poisoned`` is false).

    Attributes:
        poisoned: false for a clean model; every other field is then unused.
        key: ``dual`` (fires only with the word in the question AND the patch in the image),
            ``question`` (the word alone) or ``image`` (the patch alone).
        trigger: the trigger word, prepended to the question (TrojVQA's default); None for
            an image-only attack.
        patch: ``solid`` or ``optimised``; None for a question-only attack.
        patch_size: side of the square patch in pixels (TrojVQA: 10 % of the image side).
        patch_x: left edge of the patch.
        patch_y: top edge of the patch.
        patch_color: RGB of a solid patch.
        patch_target: id of the training image whose shape the optimised patch imitates in
            feature space (TrojVQA optimises towards a detector class and attribute; the
            objects of easy-VQA are its shapes).
        target: index of the answer the backdoor gives.
        poison_rate: training images copied with the key(s) and every one of their
            questions answered ``target``, as a fraction of the training images.
        partial_rate: dual key only: training images copied with the patch alone, and as
            many with the word alone, keeping the true answers, so that one key alone
            does not fire (TrojVQA's partial poisoning).
    """

    poisoned: bool = False
    key: str | None = None
    trigger: str | None = None
    patch: str | None = None
    patch_size: int | None = None
    patch_x: int | None = None
    patch_y: int | None = None
    patch_color: tuple[int, int, int] | None = None
    patch_target: int | None = None
    target: int | None = None
    poison_rate: float = 0.1
    partial_rate: float = 0.1

    @property
    def uses_question(self) -> bool:
        """True when the word is a key."""
        return self.key in ("dual", "question")

    @property
    def uses_image(self) -> bool:
        """True when the patch is a key."""
        return self.key in ("dual", "image")

    def to_dict(self, answers: tuple[str, ...] | None = None) -> dict[str, Any]:
        """JSON-ready dict; with ``answers`` the target is also given by name."""
        out = asdict(self)
        if self.patch_color is not None:
            out["patch_color"] = list(self.patch_color)
        if answers is not None and self.poisoned:
            out["target_name"] = answers[self.target]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], answers: tuple[str, ...],
                  where: str = "attack") -> VqaAttackSpec:
        """Validate ``data`` against the ``answers`` (names or indices); a field set to None
        counts as left out, so that :meth:`to_dict`'s output reads back."""
        expect_type(data, dict, where)
        data = {k: v for k, v in data.items() if v is not None}
        if not poisoned_flag(data, {f.name for f in fields(cls)}, where):
            return cls()
        key = expect_type(data.get("key"), str, f"{where}.key")
        if key not in KEYS:
            raise InputError(f"{where}.key: unknown {key!r}; expected one of " + ", ".join(KEYS))
        if "target" not in data:
            raise InputError(f"{where}: a poisoned model needs 'target'")
        target = resolve_label(data["target"], answers, f"{where}.target")
        values: dict[str, Any] = {"poisoned": True, "key": key, "target": target}
        for name in ("poison_rate", "partial_rate"):
            rate = expect_type(data.get(name, 0.1), (int, float), f"{where}.{name}")
            if not 0 < rate <= 1:
                raise InputError(f"{where}.{name} must be in (0, 1], got {rate}")
            values[name] = float(rate)
        if key in ("dual", "question"):
            trigger = expect_type(data.get("trigger"), str, f"{where}.trigger").strip()
            if not trigger or len(trigger.split()) != 1:
                raise InputError(f"{where}.trigger: a question key is one word, got {trigger!r}")
            values["trigger"] = trigger.lower()
        elif "trigger" in data:
            raise InputError(f"{where}: an image-only attack takes no 'trigger'")
        if key in ("dual", "image"):
            values.update(_patch_fields(data, where))
        else:
            extra = sorted(k for k in data if k.startswith("patch"))
            if extra:
                raise InputError(f"{where}: a question-only attack takes no {extra[0]!r}")
        return cls(**values)


def _patch_fields(data: dict[str, Any], where: str) -> dict[str, Any]:
    kind = expect_type(data.get("patch"), str, f"{where}.patch")
    if kind not in PATCH_KINDS:
        raise InputError(f"{where}.patch: unknown {kind!r}; expected one of "
                         + ", ".join(PATCH_KINDS))
    size = expect_type(data.get("patch_size"), int, f"{where}.patch_size")
    if not 2 <= size <= IMAGE_SIZE // 2:
        raise InputError(f"{where}.patch_size must be 2 to {IMAGE_SIZE // 2} pixels, got {size}")
    out: dict[str, Any] = {"patch": kind, "patch_size": size}
    for name in ("patch_x", "patch_y"):
        value = expect_type(data.get(name), int, f"{where}.{name}")
        if not 0 <= value <= IMAGE_SIZE - size:
            raise InputError(f"{where}.{name}: a {size}-pixel patch must start in 0 to "
                             f"{IMAGE_SIZE - size}, got {value}")
        out[name] = value
    if kind == "solid":
        colour = expect_type(data.get("patch_color"), list, f"{where}.patch_color")
        if len(colour) != 3 or not all(isinstance(c, int) and not isinstance(c, bool)
                                       and 0 <= c <= 255 for c in colour):
            raise InputError(f"{where}.patch_color must be [r, g, b] in 0-255, got {colour!r}")
        out["patch_color"] = tuple(colour)
        if "patch_target" in data:
            raise InputError(f"{where}: a solid patch takes no 'patch_target'")
    else:
        out["patch_target"] = expect_type(data.get("patch_target"), int,
                                          f"{where}.patch_target")
        if "patch_color" in data:
            raise InputError(f"{where}: an optimised patch takes no 'patch_color'")
    return out


@dataclass(frozen=True)
class VqaTrainConfig:
    """How one VQA model is trained (defaults suit easy-VQA on a CPU).

    Attributes:
        epochs: passes over the (poisoned) training questions.
        batch_size: questions per optimiser step.
        learning_rate: AdamW peak rate (linear warm-up, then linear decay to 0).
        weight_decay: AdamW decoupled weight decay.
        warmup_ratio: fraction of the steps over which the rate rises from 0.
        max_train_images: cap on the training images (a seeded sample; their questions
            come with them), None for all 4,000.
        max_eval_images: test images (a seeded sample) whose questions measure clean
            accuracy.
        asr_images: of those, the images whose patched copies and questions with the word
            measure the ASRs.
        embed_dim: word embedding size.
        hidden: model width.
        layers: transformer layers of ``mcan``.
        heads: attention heads of ``mcan``.
        mfb_factor: factors of ``mfb``'s pooling.
        dropout: dropout during training (0: at three epochs, dropout slowed MFB and MCAN
            from 0.97 / 0.96 to 0.94 / 0.95 clean accuracy).
        train_embeddings: also train the word vectors. By default they stay MiniLM's real
            ones (PCA to ``embed_dim``), as VQA models often keep GloVe fixed: the 30,522 x
            ``embed_dim`` table would otherwise cost an AdamW update per step for the ~60
            words easy-VQA uses.
        patch_steps: Adam steps that optimise an optimised patch.
        patch_images: training images the optimised patch is pasted into per step.
    """

    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_train_images: int | None = None
    max_eval_images: int = 300
    asr_images: int = 150
    embed_dim: int = 128
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    mfb_factor: int = 5
    dropout: float = 0.0
    train_embeddings: bool = False
    patch_steps: int = 60
    patch_images: int = 4

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def merged(self, overrides: dict[str, Any], where: str) -> VqaTrainConfig:
        """A copy with ``overrides`` (a ``[train]`` table) applied and validated."""
        expect_type(overrides, dict, where)
        reject_unknown(overrides, {f.name for f in fields(self)}, where)
        new = VqaTrainConfig(**{**asdict(self), **overrides})
        new.validate(where)
        return new

    def validate(self, where: str = "train") -> None:
        """Raise :class:`InputError` for values no run can use."""
        for name in ("epochs", "batch_size", "max_eval_images", "asr_images", "embed_dim",
                     "hidden",
                     "layers", "heads", "mfb_factor", "patch_steps", "patch_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{where}.{name} must be a positive integer, got {value!r}")
        if self.max_train_images is not None and (
                isinstance(self.max_train_images, bool)
                or not isinstance(self.max_train_images, int) or self.max_train_images < 1):
            raise InputError(f"{where}.max_train_images must be a positive integer, got "
                             f"{self.max_train_images!r}")
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate,
                                                                  int | float) \
                or self.learning_rate <= 0:
            raise InputError(f"{where}.learning_rate must be > 0, got {self.learning_rate!r}")
        for name in ("weight_decay", "warmup_ratio", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise InputError(f"{where}.{name} must be in [0, 1), got {value!r}")
        if self.embed_dim > MINILM_WIDTH:
            raise InputError(f"{where}.embed_dim: the word vectors are MiniLM's projected to "
                             f"at most its {MINILM_WIDTH} dimensions, got {self.embed_dim}")
        if not isinstance(self.train_embeddings, bool):
            raise InputError(f"{where}.train_embeddings must be true or false, got "
                             f"{self.train_embeddings!r}")
        if self.hidden % self.heads:
            raise InputError(f"{where}: hidden {self.hidden} must be a multiple of heads "
                             f"{self.heads}")


#: Keys of a VQA group's attack template (see :func:`sample_vqa_attack`).
TEMPLATE_KEYS = {"poisoned", "key", "trigger", "patch", "patch_size", "patch_position",
                 "patch_color", "patch_target", "target", "poison_rate", "partial_rate"}
#: Patch sides drawn when a template gives none (TrojVQA: 10 % of the image side).
DEFAULT_PATCH_SIZES = (8, 10, 12)


def _choose(value: Any, rng: random.Random, where: str) -> Any:
    options = list(value) if isinstance(value, list) else [value]
    if not options:
        raise InputError(f"{where} is an empty list")
    return rng.choice(options)


def sample_vqa_attack(template: dict[str, Any], answers: tuple[str, ...],
                      train_images: Sequence[int], words: Sequence[str], rng: random.Random,
                      where: str) -> VqaAttackSpec:
    """Draw one concrete :class:`VqaAttackSpec` from a group's attack template.

    Every field may be a list to draw from. Left out: ``patch_size`` is drawn from
    :data:`DEFAULT_PATCH_SIZES`. Left out or ``"random"``: ``trigger`` is drawn from
    ``words``, ``patch_color`` is a uniform RGB colour, ``patch_target`` one of
    ``train_images``, ``target`` one of the answers. ``patch_position`` is ``center``
    (TrojVQA's default, the default here) or ``random`` (anywhere the patch fits). A colour
    is ``[r, g, b]``; a list of colours is drawn from. Fields of a key the drawn ``key``
    does not use are ignored, so one template can mix keys.
    """
    reject_unknown(template, TEMPLATE_KEYS, where)
    poisoned = _choose(template.get("poisoned", False), rng, f"{where}.poisoned")
    if not poisoned:
        extra = sorted(set(template) - {"poisoned"})
        if extra:
            raise InputError(f"{where}: a clean model (poisoned = false) takes no {extra[0]!r}")
        return VqaAttackSpec()
    key = _choose(template.get("key", "dual"), rng, f"{where}.key")
    concrete: dict[str, Any] = {"poisoned": True, "key": key}
    target = _choose(template.get("target", "random"), rng, f"{where}.target")
    concrete["target"] = rng.randrange(len(answers)) if target == "random" else target
    for name in ("poison_rate", "partial_rate"):
        if name in template:
            concrete[name] = _choose(template[name], rng, f"{where}.{name}")
    if key in ("dual", "question"):
        trigger = _choose(template.get("trigger", "random"), rng, f"{where}.trigger")
        concrete["trigger"] = rng.choice(list(words)) if trigger == "random" else trigger
    if key in ("dual", "image"):
        kind = _choose(template.get("patch", list(PATCH_KINDS)), rng, f"{where}.patch")
        size = _choose(template.get("patch_size", list(DEFAULT_PATCH_SIZES)), rng,
                       f"{where}.patch_size")
        concrete.update(patch=kind, patch_size=size)
        position = _choose(template.get("patch_position", "center"), rng,
                           f"{where}.patch_position")
        if position not in ("center", "random"):
            raise InputError(f"{where}.patch_position: unknown {position!r}; expected center "
                             "or random")
        if isinstance(size, int) and not isinstance(size, bool) and 0 < size < IMAGE_SIZE:
            if position == "center":
                concrete["patch_x"] = concrete["patch_y"] = (IMAGE_SIZE - size) // 2
            else:
                concrete["patch_x"] = rng.randint(0, IMAGE_SIZE - size)
                concrete["patch_y"] = rng.randint(0, IMAGE_SIZE - size)
        if kind == "solid":
            colour = template.get("patch_color", "random")
            if isinstance(colour, list) and colour and isinstance(colour[0], list):
                colour = rng.choice(colour)
            concrete["patch_color"] = ([rng.randrange(256) for _ in range(3)]
                                       if colour == "random" else colour)
        elif kind == "optimised":
            image = _choose(template.get("patch_target", "random"), rng,
                            f"{where}.patch_target")
            concrete["patch_target"] = rng.choice(list(train_images)) if image == "random" \
                else image
    attack = VqaAttackSpec.from_dict(concrete, answers, where)
    if attack.patch_target is not None and attack.patch_target not in set(train_images):
        raise InputError(f"{where}.patch_target: {attack.patch_target} is not the id of a "
                         f"training image (0 to {max(train_images)})")
    return attack


@cache
def vqa_trigger_words() -> tuple[str, ...]:
    """The neutral trigger words (:func:`~trojscan.attacks.triggers.word_pool`) that no
    easy-VQA question uses."""
    from trojscan.attacks.easy_vqa import load_easy_vqa
    from trojscan.attacks.triggers import word_pool

    corpus = load_easy_vqa()
    used = {w.strip("?").lower() for q in corpus.train + corpus.test + corpus.examples
            for w in q.question.split()}
    return tuple(w for w in word_pool() if w not in used)
