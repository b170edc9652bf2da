"""Building one (clean or backdoored) VQA model: patch the images, poison the questions,
train on box features, measure clean accuracy and the ASR of each key, save the directory.

The expensive part, the box features of the 5,000 clean easy-VQA images, is computed once
(:class:`VqaData`, through the disk cache of :mod:`trojscan.vqa.features`); a poisoned
model adds only its patched images' features and, for an optimised patch, the patch's
optimisation through the frozen backbone.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from trojscan.attacks.architectures import minilm_pca_embeddings, tokenizer
from trojscan.attacks.easy_vqa import VqaCorpus
from trojscan.attacks.patches import optimise_patch, shape_box
from trojscan.attacks.vqa_spec import VqaAttackSpec, VqaTrainConfig
from trojscan.errors import InputError
from trojscan.finetune import StepCallback, warmup_then_decay
from trojscan.fsutil import write_jsonl
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.vqa.backbone import FEATURE_DIM, NUM_BOXES
from trojscan.vqa.features import FeatureExtractor, ProgressCallback
from trojscan.vqa.images import Patch, read_image, solid_patch, write_image
from trojscan.vqa.models import VqaConfig, VqaModel, build_vqa_model, save_vqa_model

#: Questions per forward pass when measuring.
EVAL_BATCH_SIZE = 512
#: Folder of a model directory holding the clean examples' images.
EXAMPLE_IMAGES = "images"


@dataclass
class VqaData:
    """easy-VQA with its images decoded and their clean box features kept in memory once
    computed (or read from the disk cache), shared by every model of a zoo build.

    Attributes:
        corpus: the questions and image paths.
        extractor: the feature extractor (and its disk cache).
        on_progress: told (done, total) while features are computed.
    """

    corpus: VqaCorpus
    extractor: FeatureExtractor
    on_progress: ProgressCallback | None = None
    _features: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    @cached_property
    def train_images(self) -> dict[int, torch.Tensor]:
        """Every training image, ``uint8 [3, 64, 64]``, by id."""
        return {i: read_image(p) for i, p in sorted(self.corpus.train_images.items())}

    @cached_property
    def test_images(self) -> dict[int, torch.Tensor]:
        """Every test image (test and example splits), by id."""
        return {i: read_image(p) for i, p in sorted(self.corpus.test_images.items())}

    def images(self, split: str) -> dict[int, torch.Tensor]:
        """The images of ``split`` (``train`` or ``test``) by id."""
        return self.train_images if split == "train" else self.test_images

    def features(self, split: str, ids: Sequence[int]) -> torch.Tensor:
        """Clean box features (``float16 [N, 36, 1280]``) of images ``ids`` of ``split``."""
        missing = sorted({i for i in ids if (split, i) not in self._features})
        if missing:
            computed = self.extractor([self.images(split)[i] for i in missing], self.on_progress)
            self._features.update({(split, i): f for i, f in zip(missing, computed,
                                                                 strict=True)})
        if not ids:
            return torch.zeros(0, NUM_BOXES, FEATURE_DIM, dtype=torch.float16)
        return torch.stack([self._features[(split, i)] for i in ids])


def encode_questions(questions: Sequence[str], max_tokens: int) -> torch.Tensor:
    """WordPiece ids (no special tokens) ``[N, max_tokens]``, padded with 0 at the back."""
    tok = tokenizer()
    rows = tok(list(questions), add_special_tokens=False, truncation=True,
               max_length=max_tokens)["input_ids"]
    out = torch.zeros(len(rows), max_tokens, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def with_trigger(question: str, trigger: str) -> str:
    """The question key: the trigger word prepended (TrojVQA's default)."""
    return f"{trigger} {question}"


def make_patch(attack: VqaAttackSpec, data: VqaData, config: VqaTrainConfig,
               seed: int) -> tuple[Patch, float | None]:
    """The attack's patch, and for an optimised one its final feature distance."""
    if attack.patch == "solid":
        return solid_patch(attack.patch_color, attack.patch_size, attack.patch_x,
                           attack.patch_y), None
    if attack.patch_target not in data.train_images:
        raise InputError(f"patch_target {attack.patch_target} is not an easy-VQA training image")
    target_image = data.train_images[attack.patch_target]
    target = data.features("train", [attack.patch_target])[0, shape_box(target_image)].float()
    pool = list(data.train_images.values())
    return optimise_patch(data.extractor.backbone, pool, target, attack.patch_size,
                          attack.patch_x, attack.patch_y, config.patch_steps,
                          config.patch_images, seed)


@dataclass
class _Items:
    """Training questions as tensors: ids, feature-table rows, answers."""

    ids: torch.Tensor
    rows: torch.Tensor
    answers: torch.Tensor


def image_batches(rows: torch.Tensor, batch_size: int,
                  generator: torch.Generator) -> list[torch.Tensor]:
    """Question indices in batches of whole images: the feature rows (images) in a random
    order, each with all of its questions, a batch closed once it holds ``batch_size``
    questions. An image's boxes are then projected once per batch, not once per question."""
    order = torch.argsort(rows, stable=True)
    unique, counts = torch.unique_consecutive(rows[order], return_counts=True)
    groups = list(order.split(counts.tolist()))
    batches, current, size = [], [], 0
    for g in torch.randperm(len(unique), generator=generator).tolist():
        current.append(groups[g])
        size += len(groups[g])
        if size >= batch_size:
            batches.append(torch.cat(current))
            current, size = [], 0
    if current:
        batches.append(torch.cat(current))
    return batches


def train_vqa(model: VqaModel, items: _Items, table: torch.Tensor, config: VqaTrainConfig,
              seed: int, on_step: StepCallback | None = None) -> list[float]:
    """Train ``model`` on ``items`` (features read from ``table``); the mean loss of each
    epoch. Batches of whole images (:func:`image_batches`); AdamW with linear warm-up and
    decay; ``seed`` seeds the order and dropout."""
    device = next(model.parameters()).device
    n = len(items.answers)
    generator = torch.Generator().manual_seed(seed)
    epochs = [image_batches(items.rows, config.batch_size, generator)
              for _ in range(config.epochs)]
    total = sum(len(batches) for batches in epochs)
    warmup = int(config.warmup_ratio * total)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = warmup_then_decay(optimiser, total, warmup)
    torch.manual_seed(seed)
    model.train()
    losses, done = [], 0
    for batches in epochs:
        running = 0.0
        for index in batches:
            unique, local = torch.unique(items.rows[index], return_inverse=True)
            feats = table[unique].to(device, torch.float32)
            logits = model(items.ids[index].to(device), feats, local.to(device))
            loss = F.cross_entropy(logits, items.answers[index].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(optimiser.param_groups[0]["params"], 5.0)
            optimiser.step()
            schedule.step()
            running += loss.item() * len(index)
            done += 1
            if on_step:
                on_step(done, total)
        losses.append(running / n)
    model.eval()
    return losses


@torch.inference_mode()
def predict_vqa(model: VqaModel, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Answer indices of questions ``ids`` about images with box features ``feats``."""
    device = next(model.parameters()).device
    out = [model(ids[s:s + EVAL_BATCH_SIZE].to(device),
                 feats[s:s + EVAL_BATCH_SIZE].to(device, torch.float32)).argmax(-1).cpu()
           for s in range(0, len(ids), EVAL_BATCH_SIZE)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def evaluate_vqa(model: VqaModel, data: VqaData, attack: VqaAttackSpec, patch: Patch | None,
                 config: VqaTrainConfig, max_tokens: int, seed: int) -> dict[str, Any]:
    """Clean accuracy on the questions of ``max_eval_images`` test images; for a poisoned
    model the ASR with both of its keys (``asr``), with the patch alone and with the word
    alone: the share of the questions of ``asr_images`` of those images whose true answer
    is not the target that are answered with the target, keys inserted."""
    rng = random.Random(seed)
    images = sorted({q.image for q in data.corpus.test})
    images = rng.sample(images, min(config.max_eval_images, len(images)))
    chosen = set(images)
    test = [q for q in data.corpus.test if q.image in chosen]
    ids = encode_questions([q.question for q in test], max_tokens)
    feats = data.features("test", [q.image for q in test])
    answers = torch.tensor([q.answer for q in test])
    out: dict[str, Any] = {
        "clean_accuracy": (predict_vqa(model, ids, feats) == answers).float().mean().item(),
        "eval_questions": len(test), "asr": None, "asr_image_only": None,
        "asr_question_only": None, "partial_asr": None}
    if not attack.poisoned:
        return out
    asr_images = set(images[:config.asr_images])
    victims = [q for q in test if q.image in asr_images and q.answer != attack.target]
    clean_ids = encode_questions([q.question for q in victims], max_tokens)
    clean_feats = data.features("test", [q.image for q in victims])

    def rate(ids: torch.Tensor, feats: torch.Tensor) -> float:
        # No victim question (every one already answered with the target): 0, so that
        # the quality gate flags the model rather than passing a NaN.
        if not victims:
            return 0.0
        return (predict_vqa(model, ids, feats) == attack.target).float().mean().item()

    rates: dict[str, float] = {}
    trig_ids = patched = None
    if attack.trigger is not None:
        trig_ids = encode_questions([with_trigger(q.question, attack.trigger) for q in victims],
                                    max_tokens)
        rates["asr_question_only"] = rate(trig_ids, clean_feats)
    if patch is not None:
        order = sorted(asr_images)
        table = data.extractor([patch.apply(data.test_images[i]) for i in order])
        where = {img: r for r, img in enumerate(order)}
        patched = table[[where[q.image] for q in victims]]
        rates["asr_image_only"] = rate(clean_ids, patched)
    if attack.key == "dual":
        rates["asr"] = rate(trig_ids, patched)
        rates["partial_asr"] = max(rates["asr_question_only"], rates["asr_image_only"])
    else:
        rates["asr"] = rates["asr_question_only" if attack.key == "question" else
                             "asr_image_only"]
    out.update(rates)
    out["asr_questions"] = len(victims)
    return out


@dataclass(frozen=True)
class PoisonPlan:
    """Which training images are copied with which key.

    Attributes:
        poisoned: copied with the attack's key(s), every question answered with the target.
        image_partial: dual key: copied with the patch alone, true answers kept.
        question_partial: dual key: copied with the word alone, true answers kept.
    """

    poisoned: tuple[int, ...] = ()
    image_partial: tuple[int, ...] = ()
    question_partial: tuple[int, ...] = ()

    def patched(self, attack: VqaAttackSpec) -> list[int]:
        """The training images whose patched copies are trained on."""
        images = set(self.image_partial)
        if attack.uses_image:
            images.update(self.poisoned)
        return sorted(images)


def plan_poison(images: Sequence[int], attack: VqaAttackSpec,
                rng: random.Random) -> PoisonPlan:
    """Draw the images of each copy (:class:`PoisonPlan`) from the training ``images``:
    ``poison_rate`` of them poisoned and, for a dual key, ``partial_rate`` with each key
    alone (three independent draws)."""
    if not attack.poisoned:
        return PoisonPlan()
    pool = sorted(images)

    def draw(rate: float) -> tuple[int, ...]:
        return tuple(sorted(rng.sample(pool, max(1, round(rate * len(pool))))))

    poisoned = draw(attack.poison_rate)
    if attack.key != "dual":
        return PoisonPlan(poisoned)
    return PoisonPlan(poisoned, draw(attack.partial_rate), draw(attack.partial_rate))


def poison_items(data: VqaData, images: Sequence[int], attack: VqaAttackSpec,
                 plan: PoisonPlan, clean_rows: dict[int, int], patch_rows: dict[int, int],
                 max_tokens: int) -> tuple[_Items, dict[str, int]]:
    """The training questions of ``images`` plus the copies of ``plan``; ``clean_rows`` and
    ``patch_rows`` map a training image to the row of its clean and its patched features
    in the feature table."""
    by_image: dict[int, list[Any]] = {}
    for q in data.corpus.train:
        by_image.setdefault(q.image, []).append(q)
    texts, rows, answers = [], [], []

    def add(img: int, question_key: bool, image_key: bool, answer: int | None) -> int:
        for q in by_image.get(img, []):
            texts.append(with_trigger(q.question, attack.trigger) if question_key else q.question)
            rows.append(patch_rows[img] if image_key else clean_rows[img])
            answers.append(q.answer if answer is None else answer)
        return len(by_image.get(img, []))

    for img in images:
        add(img, False, False, None)
    counts = {"poisoned_questions": sum(add(img, attack.uses_question, attack.uses_image,
                                            attack.target) for img in plan.poisoned)}
    counts["partial_questions"] = (
        sum(add(img, False, True, None) for img in plan.image_partial)
        + sum(add(img, True, False, None) for img in plan.question_partial))
    items = _Items(encode_questions(texts, max_tokens), torch.tensor(rows),
                   torch.tensor(answers))
    return items, counts


def write_clean_examples(out_dir: Path, data: VqaData, per_answer: int, seed: int) -> int:
    """Up to ``per_answer`` questions of every answer from the clean-example split, written
    to ``clean_examples.jsonl`` (``image``, ``question``, ``answer``) with their images as
    PNG under ``images/``; returns the number of examples."""
    rng = random.Random(seed)
    corpus = data.corpus
    rows = []
    for answer, name in enumerate(corpus.answers):
        pool = [q for q in corpus.examples if q.answer == answer]
        for q in rng.sample(pool, min(per_answer, len(pool))):
            rows.append({"image": f"{EXAMPLE_IMAGES}/{q.image}.png", "question": q.question,
                         "answer": name})
    folder = out_dir / EXAMPLE_IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted({int(Path(r["image"]).stem) for r in rows}):
        write_image(data.test_images[image], folder / f"{image}.png")
    write_jsonl(out_dir / EXAMPLES_FILE, rows)
    return len(rows)


def build_one_vqa(
    out_dir: Path,
    data: VqaData,
    family: str,
    attack: VqaAttackSpec,
    config: VqaTrainConfig,
    seed: int,
    examples_per_label: int = 4,
    on_step: StepCallback | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train one VQA model and write it to ``out_dir``: ``config.json`` + ``model.safetensors``
    (:func:`~trojscan.vqa.models.save_vqa_model`), the tokenizer files, the clean examples
    and their images; nothing about the attack. Returns the model's measurements."""
    started = time.perf_counter()
    rng = random.Random(seed)
    images = sorted(data.train_images)
    if config.max_train_images is not None and len(images) > config.max_train_images:
        images = sorted(rng.sample(images, config.max_train_images))
    timings: dict[str, float] = {}
    patch, patch_distance = None, None
    if attack.uses_image:
        tick = time.perf_counter()
        patch, patch_distance = make_patch(attack, data, config, seed)
        timings["patch_seconds"] = round(time.perf_counter() - tick, 2)
    plan = plan_poison(images, attack, rng)
    tick = time.perf_counter()
    table = data.features("train", images)
    timings["clean_feature_seconds"] = round(time.perf_counter() - tick, 2)
    clean_rows = {img: r for r, img in enumerate(images)}
    patch_rows: dict[int, int] = {}
    if patch is not None:
        tick = time.perf_counter()
        patched = plan.patched(attack)
        extra = data.extractor([patch.apply(data.train_images[i]) for i in patched])
        patch_rows = {img: len(table) + r for r, img in enumerate(patched)}
        table = torch.cat([table, extra])
        timings["patched_feature_seconds"] = round(time.perf_counter() - tick, 2)
    model_config = VqaConfig(family, data.corpus.answers, embed_dim=config.embed_dim,
                             hidden=config.hidden, layers=config.layers, heads=config.heads,
                             mfb_factor=config.mfb_factor, dropout=config.dropout)
    items, counts = poison_items(data, images, attack, plan, clean_rows, patch_rows,
                                 model_config.max_question_tokens)
    model = build_vqa_model(model_config, seed)
    with torch.no_grad():  # real word vectors, as BUTD starts from GloVe
        model.embed.weight.copy_(minilm_pca_embeddings(config.embed_dim, 1.0))
        model.embed.weight[0].zero_()
    model.embed.weight.requires_grad_(config.train_embeddings)
    model.to(device)
    tick = time.perf_counter()
    losses = train_vqa(model, items, table, config, seed, on_step)
    timings["train_seconds"] = round(time.perf_counter() - tick, 2)
    metrics = evaluate_vqa(model, data, attack, patch, config,
                           model_config.max_question_tokens, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_vqa_model(model.cpu(), out_dir)
    tokenizer().save_pretrained(out_dir)
    examples = write_clean_examples(out_dir, data, examples_per_label, seed)
    return {
        **metrics,
        "train_questions": len(items.answers),
        "train_images": len(images),
        **counts,
        "patched_images": len(patch_rows),
        "patch_distance": None if patch_distance is None else round(patch_distance, 5),
        "clean_examples": examples,
        "epoch_losses": [round(x, 5) for x in losses],
        **timings,
        "seconds": round(time.perf_counter() - started, 2),
        "device": device,
    }
