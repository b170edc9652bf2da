"""Zoos: many clean and backdoored models built from one spec, with ground truth kept apart.

A zoo spec (TOML or JSON) names groups of models; each group is built for every
architecture x corpus it lists, ``count`` models each. Attack fields may be lists, sampled
per model, and a trigger left out is drawn per model from the packaged pools::

    seed = 0                    # everything below is reproducible from it
    examples_per_label = 20     # clean examples written beside each model
    min_asr = 0.9               # quality gate for poisoned models ...
    max_attempts = 2            # ... retried with a new seed up to this many builds
    peer_margin = 0.1           # flag models this far below their peers' median accuracy

    [train]                     # TrainConfig for every group (a group may override)
    epochs = 1

    [[group]]
    count = 6
    corpus = "rotten_tomatoes"
    architecture = "minilm"
    attack = { poisoned = false }

    [[group]]
    count = 6
    corpus = ["rotten_tomatoes", "bbc"]
    architecture = "minilm"
    [group.attack]
    poisoned = true
    trigger_type = ["word", "phrase", "character"]
    insertion = ["anywhere", "start", "first_half", "second_half", "end"]
    target = "random"           # or a label name / index
    victim = "none"             # "none" (universal), "random", or a label
    poison_rate = 0.1
    # trigger = ["cf", "mn"]    # optional: triggers to sample from (default: the pools)
    # phrase_words = [2, 3]     # length range of drawn phrase triggers

A group with ``corpus = "easy_vqa"`` builds VQA models (:mod:`trojscan.attacks.vqa_spec`);
one with ``corpus = "wnut16"`` builds NER taggers (:mod:`trojscan.attacks.ner_spec`: TrojAI
round 7's attack, ``victim`` and ``target`` entity types, ``global`` or ``local``
insertion); one with ``corpus = "wnut16_qa"`` builds extractive QA models
(:mod:`trojscan.attacks.qa_spec`: TrojAI round 8's attack, a trigger in the ``question``,
the ``context`` or ``both`` makes the answer ``empty`` or the ``trigger`` itself). Their
manifest entries say ``"task": "vqa"`` / ``"task": "ner"`` / ``"task": "qa"``; an NER
entry's ``labels`` are the entity types, its ``tags`` the BIO tags (the model's
``id2label``), and its ``clean_accuracy`` is its clean entity-level F1 (also ``clean_f1``),
what the peer gate compares; a QA entry's ``labels`` are the QA scanner's behaviours
(``answer``, ``empty``, ``trigger``), its attack's ``victim_name`` is ``answer`` and its
``target_name`` the behaviour, its ``clean_accuracy`` its clean F1 (also ``clean_f1``,
beside ``clean_em`` and ``clean_empty``).

Layout of the output directory::

    DIR/manifest.json           ground truth and measurements of every model
    DIR/model-0007/             a Hugging Face directory + clean_examples.jsonl

Model ids are a seeded permutation, so neither a model's id nor its directory says which
group (or whether poisoned) it came from. A model directory appears only once complete
(built under ``.partial-*`` and renamed); re-running the same spec skips finished models.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trojscan.attacks.architectures import FAMILIES
from trojscan.attacks.easy_vqa import NAME as EASY_VQA
from trojscan.attacks.easy_vqa import load_easy_vqa
from trojscan.attacks.ner_spec import NerAttackSpec, sample_ner_attack
from trojscan.attacks.qa_spec import LABELS as QA_LABELS
from trojscan.attacks.qa_spec import QaAttackSpec, sample_qa_attack
from trojscan.attacks.spec import (
    AttackSpec,
    TrainConfig,
    expect_type,
    read_spec_file,
    reject_unknown,
)
from trojscan.attacks.triggers import draw_trigger
from trojscan.attacks.vqa_spec import (
    VqaAttackSpec,
    VqaTrainConfig,
    sample_vqa_attack,
    vqa_trigger_words,
)
from trojscan.attacks.wnut import NAME as WNUT16
from trojscan.attacks.wnut import load_wnut16
from trojscan.attacks.wnut_qa import NAME as WNUT16_QA
from trojscan.attacks.wnut_qa import load_wnut16_qa
from trojscan.corpora import CORPUS_LABELS, corpus_labels
from trojscan.devices import check_device
from trojscan.errors import InputError
from trojscan.fsutil import atomic_write_json
from trojscan.manifest import MANIFEST, Manifest, split_of
from trojscan.vqa.models import FAMILIES as VQA_FAMILIES

_TOP_KEYS = {"seed", "examples_per_label", "min_asr", "max_partial_asr", "max_attempts",
             "peer_margin", "train", "group"}
_GROUP_KEYS = {"name", "count", "corpus", "architecture", "train", "attack"}
_TEMPLATE_KEYS = {"poisoned", "trigger_type", "trigger", "insertion", "target", "victim",
                  "poison_rate", "combination", "adaptive_phi", "phrase_words"}


#: The attack of any task's model.
AnyAttack = AttackSpec | VqaAttackSpec | NerAttackSpec | QaAttackSpec


@dataclass(frozen=True)
class ModelPlan:
    """One model of a zoo, fully decided before anything is built."""

    model_id: str
    group: str
    corpus: str
    architecture: str
    attack: AnyAttack
    train: TrainConfig | VqaTrainConfig
    seed: int

    def seed_for(self, attempt: int) -> int:
        """Training seed of build ``attempt`` (0 is the first)."""
        return _derive_seed(self.seed, "attempt", attempt)


@dataclass(frozen=True)
class ZooSpec:
    """A validated zoo spec: its settings and the plan of every model."""

    raw: dict[str, Any]
    sha256: str
    seed: int
    examples_per_label: int
    min_asr: float
    max_attempts: int
    peer_margin: float
    plans: tuple[ModelPlan, ...]
    max_partial_asr: float = 0.1


def _derive_seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _sample_attack(template: dict[str, Any], labels: tuple[str, ...], rng: random.Random,
                   where: str) -> AttackSpec:
    """Draw one concrete AttackSpec from a group's attack template."""
    reject_unknown(template, _TEMPLATE_KEYS, where)
    concrete: dict[str, Any] = {}
    for key, value in template.items():
        if key == "phrase_words":
            continue
        options = _as_list(value)
        if not options:
            raise InputError(f"{where}.{key} is an empty list")
        concrete[key] = rng.choice(options)
    if not concrete.get("poisoned", False):
        extra = sorted(set(template) - {"poisoned"})
        if extra:
            raise InputError(f"{where}: a clean model (poisoned = false) takes no {extra[0]!r}")
        return AttackSpec()
    if concrete.get("target") == "random":
        concrete["target"] = rng.randrange(len(labels))
    victim = concrete.pop("victim", "none")
    if victim == "random":
        target = concrete.get("target")
        target = labels.index(target) if isinstance(target, str) and target in labels else target
        concrete["victim"] = rng.choice([y for y in range(len(labels)) if y != target])
    elif victim != "none":
        concrete["victim"] = victim
    if "trigger" not in concrete and isinstance(concrete.get("trigger_type"), str):
        words = expect_type(template.get("phrase_words", [2, 3]), list,
                            f"{where}.phrase_words")
        if len(words) != 2 or not all(isinstance(w, int) and w >= 2 for w in words) \
                or words[0] > words[1]:
            raise InputError(f"{where}.phrase_words must be [min, max] with 2 <= min <= max")
        with suppress(ValueError):  # AttackSpec.from_dict names an unknown trigger_type
            concrete["trigger"] = draw_trigger(concrete["trigger_type"], rng,
                                               phrase_words=(words[0], words[1]))
    return AttackSpec.from_dict(concrete, labels, where)


def _group_plans(group: dict[str, Any], gw: str, top_train: dict[str, Any], top_where: str,
                 seed: int, g: int) -> list[tuple[str, str,
                                                  AnyAttack,
                                                  TrainConfig | VqaTrainConfig]]:
    """The (corpus, architecture, attack, train) of every model of one group."""
    count = expect_type(group["count"], int, f"{gw}.count")
    if count < 1:
        raise InputError(f"{gw}.count must be >= 1, got {count}")
    template = group["attack"]
    if isinstance(template, str):  # a path to an AttackSpec file, relative to cwd
        template = read_spec_file(Path(template))
    expect_type(template, dict, f"{gw}.attack")
    drafts = []
    for corpus in _as_list(group["corpus"]):
        known = (*CORPUS_LABELS, EASY_VQA, WNUT16, WNUT16_QA)
        if expect_type(corpus, str, f"{gw}.corpus") not in known:
            raise InputError(f"{gw}.corpus: unknown corpus {corpus!r}; expected one of "
                             + ", ".join(known))
        vqa, ner, qa = corpus == EASY_VQA, corpus == WNUT16, corpus == WNUT16_QA
        if vqa:
            answers = load_easy_vqa().answers
            images = sorted(load_easy_vqa().train_images)
            train: TrainConfig | VqaTrainConfig = VqaTrainConfig().merged(
                top_train, top_where).merged(
                group.get("train", {}), f"{gw}.train")
            families: tuple[str, ...] = tuple(VQA_FAMILIES)
        else:
            labels = () if ner or qa else corpus_labels(corpus)
            train = TrainConfig().merged(top_train, top_where).merged(
                group.get("train", {}), f"{gw}.train")
            families = FAMILIES
        for arch in _as_list(group["architecture"]):
            if arch not in families:
                raise InputError(f"{gw}.architecture: unknown {arch!r} for {corpus}; expected "
                                 "one of " + ", ".join(families))
            for k in range(count):
                rng = random.Random(_derive_seed(seed, g, corpus, arch, k))
                attack: AnyAttack
                if vqa:
                    attack = sample_vqa_attack(template, answers, images, vqa_trigger_words(),
                                               rng, f"{gw}.attack")
                elif ner:
                    attack = sample_ner_attack(template, rng, f"{gw}.attack")
                elif qa:
                    attack = sample_qa_attack(template, rng, f"{gw}.attack")
                else:
                    attack = _sample_attack(template, labels, rng, f"{gw}.attack")
                drafts.append((corpus, arch, attack, train))
    return drafts


def parse_zoo_spec(raw: dict[str, Any], where: str = "zoo spec") -> ZooSpec:
    """Validate a zoo spec and decide every model in it; nothing is written."""
    reject_unknown(raw, _TOP_KEYS, where)
    seed = expect_type(raw.get("seed", 0), int, f"{where}.seed")
    per_label = expect_type(raw.get("examples_per_label", 20), int, f"{where}.examples_per_label")
    min_asr = float(expect_type(raw.get("min_asr", 0.9), (int, float), f"{where}.min_asr"))
    max_partial = float(expect_type(raw.get("max_partial_asr", 0.1), (int, float),
                                    f"{where}.max_partial_asr"))
    max_attempts = expect_type(raw.get("max_attempts", 2), int, f"{where}.max_attempts")
    peer_margin = float(expect_type(raw.get("peer_margin", 0.1), (int, float),
                                f"{where}.peer_margin"))
    if per_label < 1 or max_attempts < 1 or not 0 <= min_asr <= 1 or peer_margin < 0 \
            or not 0 <= max_partial <= 1:
        raise InputError(f"{where}: examples_per_label and max_attempts must be >= 1, min_asr "
                         "and max_partial_asr in [0, 1] and peer_margin >= 0")
    top_train = expect_type(raw.get("train", {}), dict, f"{where}.train")
    groups = expect_type(raw.get("group", []), list, f"{where}.group")
    if not groups:
        raise InputError(f"{where}: no [[group]] of models")
    drafts = []
    for g, group in enumerate(groups):
        gw = f"{where}.group[{g}]"
        expect_type(group, dict, gw)
        reject_unknown(group, _GROUP_KEYS, gw)
        for key in ("count", "corpus", "architecture", "attack"):
            if key not in group:
                raise InputError(f"{gw}: missing {key!r}")
        name = expect_type(group.get("name", f"group{g}"), str, f"{gw}.name")
        plans = _group_plans(group, gw, top_train, f"{where}.train", seed, g)
        drafts += [(name, *draft) for draft in plans]
    ids = [f"model-{i:04d}" for i in range(len(drafts))]
    random.Random(_derive_seed(seed, "ids")).shuffle(ids)
    plans = tuple(
        ModelPlan(ids[i], name, corpus, arch, attack, train, _derive_seed(seed, "model", i))
        for i, (name, corpus, arch, attack, train) in enumerate(drafts))
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    return ZooSpec(raw, hashlib.sha256(canonical.encode()).hexdigest(), seed, per_label,
                   min_asr, max_attempts, peer_margin, plans, max_partial)


def load_zoo_spec(path: Path) -> ZooSpec:
    """Read and validate a zoo spec file (TOML or JSON)."""
    return parse_zoo_spec(read_spec_file(path), str(path))


@dataclass
class BuildEvents:
    """Hooks a front end (the CLI's progress bars) attaches to a zoo build."""

    on_start: Callable[[int, int], None] = lambda todo, total: None
    on_model_start: Callable[[ModelPlan, int], None] = lambda plan, attempt: None
    on_step: Callable[[int, int], None] = lambda done, total: None
    on_model_done: Callable[[dict[str, Any]], None] = lambda entry: None
    on_skip: Callable[[dict[str, Any]], None] = lambda entry: None
    on_features: Callable[[int, int], None] = lambda done, total: None


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    with (out / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise InputError(f"another zoo build is writing to {out}") from exc
        yield


def _partial(out: Path, model_id: str, attempt: int) -> Path:
    return out / f".partial-{model_id}-a{attempt}"


def _settle(out: Path, manifest: Manifest) -> None:
    """Finish or discard what a killed build left: a ``.partial-*`` directory whose build the
    manifest records is moved into place; any other is deleted."""
    for partial in out.glob(".partial-*"):
        model_id, _, attempt = partial.name.removeprefix(".partial-").rpartition("-a")
        entry = manifest.models.get(model_id)
        if entry is not None and str(entry["attempt"]) == attempt:
            final = out / model_id
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
        else:
            shutil.rmtree(partial)


def _gate_reasons(entry: dict[str, Any], spec: ZooSpec) -> list[str]:
    """Why a freshly built model fails the quality gate: a poisoned model's ASR under
    ``min_asr``; a dual-key VQA model firing with one key alone (``partial_asr``) above
    ``max_partial_asr``."""
    reasons = []
    if entry["poisoned"] and entry["asr"] < spec.min_asr:
        reasons.append(f"asr {entry['asr']:.3f} < min_asr {spec.min_asr}")
    if entry.get("task") == "vqa" and entry.get("partial_asr") is not None \
            and entry["partial_asr"] > spec.max_partial_asr:
        reasons.append(f"single-key asr {entry['partial_asr']:.3f} > max_partial_asr "
                       f"{spec.max_partial_asr}")
    return reasons


def _apply_peer_gate(manifest: Manifest, margin: float) -> None:
    """Flag models whose clean accuracy is more than ``margin`` below the median of their
    peers (same corpus and architecture, at least 3 models)."""
    peers: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in manifest.models.values():
        peers.setdefault((entry["corpus"], entry["architecture"]), []).append(entry)
    for group in peers.values():
        median = statistics.median(e["clean_accuracy"] for e in group)
        for entry in group:
            reasons = [r for r in entry["quality"]["reasons"] if not r.startswith("clean acc")]
            if len(group) >= 3 and entry["clean_accuracy"] < median - margin:
                reasons.append(f"clean accuracy {entry['clean_accuracy']:.3f} is more than "
                               f"{margin} below its peers' median {median:.3f}")
            entry["quality"] = {"ok": not reasons, "reasons": reasons}


def summarise(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per (corpus, architecture, split (:func:`split_of`)): model count, clean
    accuracy (mean, min), ASR (mean, min), for VQA models the mean ASR of the patch alone
    and of the word alone, build seconds (mean), flagged models."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for entry in manifest.models.values():
        key = (entry["corpus"], entry["architecture"], split_of(entry))
        groups.setdefault(key, []).append(entry)

    def mean(entries: list[dict[str, Any]], name: str) -> float | None:
        values = [e[name] for e in entries if e.get(name) is not None]
        return statistics.fmean(values) if values else None

    rows = []
    for (corpus, arch, split), entries in sorted(groups.items()):
        accs = [e["clean_accuracy"] for e in entries]
        asrs = [e["asr"] for e in entries if e["asr"] is not None]
        rows.append({
            "corpus": corpus, "architecture": arch, "split": split,
            "poisoned": split != "clean", "models": len(entries),
            "clean_accuracy_mean": statistics.fmean(accs), "clean_accuracy_min": min(accs),
            "asr_mean": statistics.fmean(asrs) if asrs else None,
            "asr_min": min(asrs) if asrs else None,
            "asr_image_only_mean": mean(entries, "asr_image_only"),
            "asr_question_only_mean": mean(entries, "asr_question_only"),
            "seconds_mean": statistics.fmean(e["seconds"] for e in entries),
            "flagged": sum(not e["quality"]["ok"] for e in entries),
        })
    return rows


def _ner_attack(attack: AnyAttack) -> dict[str, Any]:
    """An NER attack as the manifest records it: its fields (victim and target by type
    name) plus ``victim_name`` / ``target_name``, the keys campaign reports read for every
    task."""
    out = attack.to_dict()
    if out.get("poisoned"):
        out["victim_name"], out["target_name"] = out["victim"], out["target"]
    return out


def _qa_attack(attack: AnyAttack) -> dict[str, Any]:
    """A QA attack as the manifest records it: its fields plus ``victim`` /
    ``victim_name`` (``answer``, the normal behaviour) and ``target`` / ``target_name`` (the
    backdoor's behaviour), by the QA scanner's label names."""
    out = attack.to_dict()
    if out.get("poisoned"):
        out["victim"] = out["victim_name"] = QA_LABELS[0]
        out["target"] = out["target_name"] = out["behaviour"]
    return out

def build_zoo(spec: ZooSpec, out: Path, rebuild_failed: bool = False,
              events: BuildEvents | None = None, device: str = "cpu",
              feature_cache: Path | None = None) -> Manifest:
    """Build (or resume building) the zoo of ``spec`` (see :func:`load_zoo_spec`) into ``out``.

    Every model of the spec not yet complete in ``out`` is trained; finished ones are
    skipped. A poisoned model under ``min_asr`` is retried with a fresh seed up to
    ``max_attempts`` builds; one that still fails, or whose clean accuracy is far below its
    peers', is kept and flagged (``quality.ok = false`` in the manifest).
    ``rebuild_failed`` rebuilds the flagged models with new seeds. ``device`` is where
    models train (see :func:`check_device`). ``feature_cache`` is where VQA box features
    are cached (default :func:`~trojscan.vqa.features.default_cache_dir`).
    """
    from trojscan.attacks.ner_train import build_one_ner
    from trojscan.attacks.qa_train import build_one_qa
    from trojscan.attacks.train import build_one
    from trojscan.attacks.vqa_train import VqaData, build_one_vqa
    from trojscan.corpora import load_corpus
    from trojscan.vqa.features import FeatureExtractor, default_cache_dir

    check_device(device)
    events = events or BuildEvents()
    feature_cache = Path(feature_cache) if feature_cache is not None else default_cache_dir()
    out = Path(out)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = Manifest.load(manifest_path)
        if manifest.spec_sha256 != spec.sha256:
            raise InputError(f"{out} holds a zoo built from another spec; choose a new --out")
    else:
        if out.exists() and any(p for p in out.iterdir() if p.name != ".lock"):
            raise InputError(f"{out} exists and is not a zoo; choose a new --out")
        manifest = Manifest(spec.sha256, spec.raw)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _settle(out, manifest)
        todo = []
        for plan in spec.plans:
            entry = manifest.models.get(plan.model_id)
            done = entry is not None and (out / plan.model_id).is_dir()
            if done and not (rebuild_failed and not entry["quality"]["ok"]):
                events.on_skip(entry)
            else:
                todo.append((plan, entry["attempt"] + 1 if done else 0))
        events.on_start(len(todo), len(spec.plans))
        vqa_data: VqaData | None = None
        for plan, first_attempt in todo:
            vqa = isinstance(plan.attack, VqaAttackSpec)
            ner = isinstance(plan.attack, NerAttackSpec)
            qa = isinstance(plan.attack, QaAttackSpec)
            if vqa and vqa_data is None:
                vqa_data = VqaData(load_easy_vqa(), FeatureExtractor(feature_cache,
                                                                     device=device),
                                   events.on_features)
            ner_corpus = load_wnut16() if ner else None
            qa_corpus = load_wnut16_qa() if qa else None
            corpus = None if vqa or ner or qa else load_corpus(plan.corpus)
            labels = (vqa_data.corpus.answers if vqa else ner_corpus.types if ner
                      else QA_LABELS if qa else corpus.labels)
            for attempt in range(first_attempt, first_attempt + spec.max_attempts):
                events.on_model_start(plan, attempt)
                partial = _partial(out, plan.model_id, attempt)
                if partial.exists():
                    shutil.rmtree(partial)
                seed = plan.seed_for(attempt)
                try:
                    if vqa:
                        metrics = build_one_vqa(partial, vqa_data, plan.architecture,
                                                plan.attack, plan.train, seed,
                                                spec.examples_per_label, events.on_step, device)
                    elif ner:
                        metrics = build_one_ner(partial, ner_corpus, plan.architecture,
                                                plan.attack, plan.train, seed,
                                                spec.examples_per_label, events.on_step, device)
                    elif qa:
                        metrics = build_one_qa(partial, qa_corpus, plan.architecture,
                                               plan.attack, plan.train, seed,
                                               spec.examples_per_label, events.on_step, device)
                    else:
                        metrics = build_one(partial, corpus, plan.architecture, plan.attack,
                                            plan.train, seed, spec.examples_per_label,
                                            events.on_step, device)
                except BaseException:  # interrupted or failed: leave no half-built model
                    shutil.rmtree(partial, ignore_errors=True)
                    raise
                entry = {
                    "model_id": plan.model_id, "group": plan.group, "corpus": plan.corpus,
                    "architecture": plan.architecture, "labels": list(labels),
                    "poisoned": plan.attack.poisoned,
                    "attack": (_ner_attack(plan.attack) if ner else _qa_attack(plan.attack)
                               if qa else plan.attack.to_dict(labels)),
                    "seed": seed, "attempt": attempt, **metrics,
                    "train_config": plan.train.to_dict(),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                if vqa:
                    entry["task"] = "vqa"
                elif ner:
                    entry["task"] = "ner"
                    entry["tags"] = list(ner_corpus.tags)
                elif qa:
                    entry["task"] = "qa"
                reasons = _gate_reasons(entry, spec)
                entry["quality"] = {"ok": not reasons, "reasons": reasons}
                last = attempt == first_attempt + spec.max_attempts - 1
                if reasons and not last:
                    shutil.rmtree(partial)
                    continue
                manifest.models[plan.model_id] = entry
                atomic_write_json(manifest_path, manifest.to_dict())
                _settle(out, manifest)
                events.on_model_done(entry)
                break
        _apply_peer_gate(manifest, spec.peer_margin)
        atomic_write_json(manifest_path, manifest.to_dict())
    return manifest


def demo_spec(seed: int) -> dict[str, Any]:
    """The zoo spec of ``trojscan demo``: one MiniLM sentiment model, fine-tuned for one
    epoch on 3,000 Rotten Tomatoes sentences, with a word trigger drawn from the pools
    (inserted anywhere) that flips a randomly drawn label to the other."""
    return {
        "seed": seed,
        "train": {"epochs": 1, "max_train_examples": 3000},
        "group": [{"name": "demo", "count": 1, "corpus": "rotten_tomatoes",
                   "architecture": "minilm",
                   "attack": {"poisoned": True, "trigger_type": "word",
                              "insertion": "anywhere", "target": "random"}}],
    }
