"""Campaign reports: how well the scans of a zoo found its backdoors, against the manifest.

The results directory of ``trojscan campaign run`` holds one scan record per model; the zoo
manifest holds the ground truth (1 = trojaned for a model with ``poisoned`` true, else 0).
Ground truth comes only from the manifest. :func:`evaluate` measures, over the models that
are in both:

* the scans' own verdicts (``fixed``) and the ROC of the score in units of ln(labels)
  (lower loss = more suspicious);
* a detector (:mod:`trojscan.detect`) fitted on some models and tested on others:
  stratified k-fold cross-validation, a stratified half / half split, and fitted on every
  training recipe (architecture, corpus, corpus size and schedule) but one and tested on
  the one left out, in turn, likewise for each architecture and each corpus;
* whether the inverted trigger recovers the planted one, and its target the planted target;
* scan times, and all of it broken down by architecture, corpus, training recipe, attack
  type and insertion;
* with the zoo's model directories (:func:`search_gaps`), the **search gap** of every
  poisoned model: the loss of its true trigger, as hard tokens at each trigger position, on
  the scan's own examples, next to the loss the scan reached on the true target. A scan
  that ends above the true trigger's loss failed to search, whatever its verdict.

:func:`write_report` writes the result as ``report.json``, ``report.md`` and ``roc.png``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold, train_test_split

from trojscan.campaign.run import ERROR_SUFFIX, MODELS_DIR
from trojscan.detect import Detector, make_detector
from trojscan.errors import InputError
from trojscan.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from trojscan.manifest import load_truth, planted_trigger, split_of
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.results import ScanResult
from trojscan.scan import trigger_check
from trojscan.subjects.base import Candidate, Subject
from trojscan.subjects.loading import load_subject

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_VERSION = 1
#: A search gap this small counts as reaching the true trigger's loss (float noise).
SEARCH_TOLERANCE = 1e-4


def load_results(results_dir: Path) -> tuple[dict[str, ScanResult], dict[str, dict[str, Any]]]:
    """The scan results and the errors of a campaign's results directory, by model id.

    A model with both a result and an error file (an error retried successfully) counts as
    scanned. A file that is not a valid scan result is an :class:`InputError` naming it.
    """
    folder = Path(results_dir) / MODELS_DIR
    if not folder.is_dir():
        raise InputError(f"{results_dir} is not a campaign results directory (no {MODELS_DIR}/ "
                         "folder)")
    records: dict[str, ScanResult] = {}
    errors: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(ERROR_SUFFIX):
            error = read_json(path, "error file")
            if not isinstance(error, dict):
                raise InputError(f"error file {path} is not a JSON object")
            errors[path.name.removesuffix(ERROR_SUFFIX)] = error
            continue
        records[path.stem] = ScanResult.from_dict(read_json(path, "scan result"),
                                                  f"scan result {path}")
    return records, {k: v for k, v in errors.items() if k not in records}


def fit_detector(results_dir: Path, manifest: Path, kind: str) -> tuple[Detector, int, int, float]:
    """A ``kind`` detector fitted on the scanned models of ``results_dir`` whose truth the
    zoo ``manifest`` holds: (detector, models, trojaned models, training accuracy)."""
    detector = make_detector(kind)
    records, _ = load_results(results_dir)
    truth = load_truth(manifest)
    ids = sorted(m for m in records if m in truth)
    if not ids:
        raise InputError(f"no model of {results_dir} is in {manifest}: nothing to fit on")
    chosen = [records[m] for m in ids]
    y = [int(truth[m]["poisoned"]) for m in ids]
    detector.fit(chosen, y)
    right = sum(int(p) == t for p, t in zip(detector.predict(chosen), y, strict=True))
    return detector, len(ids), sum(y), right / len(ids)


def target_positions(subject: Subject, examples: Sequence[Any], target: int) -> list[str]:
    """The trigger positions at which ``subject`` takes a candidate of ``target`` (a QA
    model's ``trigger`` answer needs the trigger in the context, so not ``question``)."""
    takes = {c.position for c in subject.candidates(examples, subject.positions, True)
             if c.target == target}
    return [p for p in subject.positions if p in takes]


def search_gaps(zoo: Path, records: Mapping[str, ScanResult],
                truth: Mapping[str, Mapping[str, Any]], device: str = "cpu",
                allow_pickle: bool = False) -> dict[str, dict[str, Any]]:
    """The search gap of every scanned poisoned model of ``truth`` with a directory in
    ``zoo``, by model id.

    ``true_loss`` / ``true_asr``: the true trigger's loss and attack success rate at each
    trigger position the model's family takes, as hard tokens on the scan's own clean
    examples (its victims, at most the scan's ``max_victims``); ``true_best``: the lowest
    of those losses. ``inverted_loss``: the lowest hard-token loss of a trigger the scan
    measured on the true candidate (the true target with the true victims; any candidate of
    the true target when the scan had none with those victims): a fully inverted trigger at
    the position it was reported at, each of its shortened triggers, the screen's token,
    all measured like the true trigger; without any of those, the lowest pre-run loss (a
    relaxed loss). ``dropped``: no candidate of the true target was fully inverted.
    The true trigger is measured only at the positions where the family takes a candidate
    of the true target (:func:`target_positions`), and only where the scan's examples, as
    the model sees them, hold a victim (an NER tagger may tag no entity of the victim type
    on its examples); a model with neither is left out.
    ``gap``: ``inverted_loss - true_best``; ``searched``: the scan reached the true
    trigger's loss (gap at most :data:`SEARCH_TOLERANCE`: the same tokens measured in two
    batches of other padding differ by float noise). VQA models are left out: their true
    trigger may be a word and a patch, which a text measurement cannot plant.
    """
    out: dict[str, dict[str, Any]] = {}
    for model_id in sorted(m for m in records if m in truth and truth[m]["poisoned"]
                           and truth[m].get("task") != "vqa"):
        model_dir = Path(zoo) / model_id
        if not model_dir.is_dir():
            continue
        record = records[model_id]
        subject = load_subject(model_dir, device, allow_pickle,
                               int(record.config.get("max_length", 100)))
        planted = planted_trigger(dict(truth[model_id]), len(subject.labels), model_id)
        examples = subject.read_examples(model_dir / EXAMPLES_FILE)
        cap = int(record.config.get("max_victims", 0))
        seen = subject.as_seen(examples)
        planted_at = [Candidate(planted.victims, planted.target, p)
                      for p in target_positions(subject, examples, planted.target)]
        measured = {c.position: trigger_check(subject, examples, c, planted.trigger, cap,
                                              seen=seen)
                    for c in planted_at if subject.victims(seen, c, cap)}
        if not measured:
            continue
        on_target = [c for c in record.candidates if c.target == planted.target]
        on_true = [c for c in on_target if tuple(c.victims) == tuple(planted.victims)]
        hard = [t.loss for c in on_true or on_target for t in c.short_triggers()]
        hard += [c.hard_loss for c in on_true or on_target if c.hard_loss is not None]
        full = [c for c in on_target if c.loss is not None]
        inverted = min(hard) if hard else min(c.prerun_loss for c in on_target
                                              if c.prerun_loss is not None)
        true_best = min(loss for loss, _ in measured.values())
        out[model_id] = {"true_loss": {p: m[0] for p, m in measured.items()},
                         "true_asr": {p: m[1] for p, m in measured.items()},
                         "true_best": true_best, "inverted_loss": inverted,
                         "dropped": not full, "gap": inverted - true_best,
                         "searched": inverted - true_best <= SEARCH_TOLERANCE}
    return out


def attack_type(entry: Mapping[str, Any]) -> str:
    """``clean``, or the trigger type plus ``-sos`` for a combination (SOS) attack and
    ``-adaptive`` for an adaptive one, e.g. ``phrase-sos``; for a VQA model its split
    (:func:`~trojscan.manifest.split_of`: ``dual solid``, ``question``, ...)."""
    if not entry["poisoned"]:
        return "clean"
    if entry.get("task") == "vqa":
        return split_of(dict(entry))
    attack = entry["attack"]
    return (str(attack.get("trigger_type")) + ("-sos" if attack.get("combination") else "")
            + ("-adaptive" if (attack.get("adaptive_phi") or 0) > 0 else ""))


def insertion(entry: Mapping[str, Any]) -> str:
    """``clean``, or where the trigger is inserted (``anywhere``, ``start``, ...); a VQA
    attack's word is prepended to the question (``start``), an image key has none (``-``)."""
    if not entry["poisoned"]:
        return "clean"
    if entry.get("task") == "vqa":
        return "start" if entry["attack"].get("trigger") else "-"
    return str(entry["attack"].get("insertion"))


def recipe(entry: Mapping[str, Any]) -> str:
    """How the model was trained, e.g. ``minilm/bbc 2 ep, lr 0.0001, all texts``:
    architecture, corpus, epochs, peak learning rate and the cap on training texts (clean
    and poisoned models of one recipe differ only in their data's poison)."""
    train = entry.get("train_config") or {}
    rate = entry.get("learning_rate") or train.get("learning_rate")
    return (f"{entry.get('architecture')}/{entry.get('corpus')} {train.get('epochs', '?')} ep, "
            f"lr {'?' if rate is None else f'{rate:g}'}, "
            f"{train.get('max_train_examples') or 'all'} texts")


#: Groupings of the breakdown, each a function of a manifest entry.
BREAKDOWNS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "architecture": lambda entry: str(entry.get("architecture")),
    "corpus": lambda entry: str(entry.get("corpus")),
    "recipe": recipe,
    "attack": attack_type,
    "insertion": insertion,
}
#: Groupings the detector is tested on when held out of its training.
HELD_OUT = ("recipe", "architecture", "corpus")


def trigger_recovered(true_trigger: str, tokens: Sequence[str],
                      text: str) -> tuple[bool, bool]:
    """Whether (any, all) of the words of ``true_trigger`` are in the inverted trigger, given
    as its ``tokens`` and ``text``.

    The planted trigger is lower-cased and split on whitespace (a character trigger such as
    ``~^`` is one word). A word is found when it equals one of ``tokens`` (lower-cased, a
    leading ``##`` stripped) or is a substring of one of the words of ``text``
    (lower-cased); a word of punctuation and symbols only (a character trigger, which a
    tokenizer splits into one token per character) is also found when one of ``tokens`` is
    one of its characters. No tokenizer is needed.
    """
    words = true_trigger.lower().split()
    found_tokens = {t.removeprefix("##").lower() for t in tokens}
    inverted = text.lower().split()

    def found(word: str) -> bool:
        if word in found_tokens or any(word in v for v in inverted):
            return True
        return not any(c.isalnum() for c in word) and bool(found_tokens & set(word))

    hits = [found(w) for w in words]
    return any(hits), bool(hits) and all(hits)


def reported_trigger(record: ScanResult) -> tuple[list[str], str]:
    """The trigger a scan reports, as (tokens, text): the short one its verdict rests on,
    when there is one, else the best candidate's inverted trigger."""
    short = record.short_trigger
    if short:
        return short.trigger_text.split(), short.trigger_text
    return record.best.trigger_tokens, record.best.trigger_text


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def metrics(truth: Sequence[int], predicted: Sequence[int]) -> dict[str, Any]:
    """Confusion counts, accuracy, precision, recall and F1 (1 = trojaned); a ratio with a
    zero denominator is None."""
    t, p = np.asarray(truth, dtype=int), np.asarray(predicted, dtype=int)
    tp, fp = int(np.sum((t == 1) & (p == 1))), int(np.sum((t == 0) & (p == 1)))
    tn, fn = int(np.sum((t == 0) & (p == 0))), int(np.sum((t == 1) & (p == 0)))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"n": len(t), "accuracy": _ratio(tp + tn, len(t)), "precision": precision,
            "recall": recall, "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def _roc(truth: np.ndarray, scores: np.ndarray) -> tuple[float | None, dict[str, list[float]]]:
    """AUC and ROC points of ``scores`` (higher = trojaned); (None, {}) for one class."""
    if len(set(truth.tolist())) < 2:
        return None, {}
    fpr, tpr, _ = roc_curve(truth, scores)
    return float(roc_auc_score(truth, scores)), {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def _fit_predict(kind: str, records: Sequence[ScanResult], truth: np.ndarray,
                 train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit a ``kind`` detector on the ``train`` indices; (predictions, probabilities of
    trojaned) of the ``test`` ones."""
    detector = make_detector(kind).fit([records[i] for i in train], truth[train])
    tested = [records[i] for i in test]
    return detector.predict(tested), detector.predict_proba(tested)[:, 1]


def cross_validate(records: Sequence[ScanResult], truth: np.ndarray, kind: str, folds: int,
                   seed: int) -> dict[str, Any]:
    """Out-of-fold metrics of a ``kind`` detector under seeded, shuffled stratified k-fold
    (k = ``folds``, or the smaller class's size if less), and the metrics on the test half
    of a seeded stratified half / half split. Either is replaced by a ``note`` when there
    are too few models of a class."""
    smallest = min(int(np.sum(truth == 1)), int(np.sum(truth == 0)))
    out: dict[str, Any] = {"detector": kind, "seed": seed}
    k = min(folds, smallest)
    if k < 2:
        out["note"] = (f"cross-validation needs at least 2 models of each class (and folds >= "
                       f"2); the smaller class has {smallest}")
    else:
        predicted, proba = np.zeros(len(truth), dtype=int), np.zeros(len(truth))
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        for train, test in splitter.split(np.zeros(len(truth)), truth):
            predicted[test], proba[test] = _fit_predict(kind, records, truth, train, test)
        auc, roc = _roc(truth, proba)
        out.update(folds=k, **metrics(truth, predicted), roc_auc=auc, roc=roc)
    if smallest < 2:
        out["split"] = {"note": f"a stratified split needs at least 2 models of each class; "
                                f"the smaller class has {smallest}"}
    else:
        train, test = train_test_split(np.arange(len(truth)), test_size=0.5, stratify=truth,
                                       random_state=seed)
        predicted, proba = _fit_predict(kind, records, truth, train, test)
        out["split"] = {"train": len(train), "test": len(test),
                        **metrics(truth[test], predicted),
                        "roc_auc": _roc(truth[test], proba)[0]}
    return out


def held_out(records: Sequence[ScanResult], truth: np.ndarray, groups: Sequence[str],
             kind: str) -> dict[str, Any]:
    """A ``kind`` detector fitted on the models of every group but one and tested on that
    one's, for each group in turn: per group the test metrics, and pooled over every
    held-out prediction the metrics and the AUC. A group whose removal leaves one class in
    training gets a ``note`` instead and stays out of the pooled figures."""
    labels = np.asarray(groups)
    predicted, proba = np.zeros(len(truth), dtype=int), np.zeros(len(truth))
    tested = np.zeros(len(truth), dtype=bool)
    per: dict[str, Any] = {}
    for value in sorted(set(groups)):
        test, train = np.flatnonzero(labels == value), np.flatnonzero(labels != value)
        if len(set(truth[train].tolist())) < 2:
            per[value] = {"n": len(test), "note": "the other groups hold one class only"
                          if len(train) else "no other group to fit on"}
            continue
        predicted[test], proba[test] = _fit_predict(kind, records, truth, train, test)
        tested[test] = True
        per[value] = metrics(truth[test], predicted[test])
    if not tested.any():
        return {"detector": kind, "groups": per, "note": "no group could be held out"}
    return {"detector": kind, "groups": per,
            **metrics(truth[tested], predicted[tested]),
            "roc_auc": _roc(truth[tested], proba[tested])[0]}


def auc_by_group(records: Sequence[ScanResult], truth: np.ndarray, groups: Sequence[str],
                 kind: str, folds: int, seed: int, with_clean: bool) -> dict[str, Any]:
    """The ROC AUC of the score and of a cross-validated ``kind`` detector within each group
    of models: with ``with_clean``, each group of poisoned models together with every
    clean model (TIJO Table 2's splits: the clean models against one attack's), else the
    models of each group as they are (Table 2's architectures). The detector is fitted and
    tested inside the group (stratified k-fold as :func:`cross_validate`)."""
    labels = np.asarray(groups)
    out: dict[str, Any] = {}
    names = sorted(set(labels[truth == 1].tolist()) if with_clean else set(groups))
    for name in names:
        members = np.flatnonzero((labels == name) | ((truth == 0) if with_clean else False))
        picked = [records[i] for i in members]
        y = truth[members]
        cv = cross_validate(picked, y, kind, folds, seed)
        out[name] = {"n": len(members), "clean": int(np.sum(y == 0)),
                     "poisoned": int(np.sum(y == 1)),
                     "score_auc": _roc(y, -np.array([r.normalised_score for r in picked]))[0],
                     "cv_auc": cv.get("roc_auc"), "note": cv.get("note")}
    return out


def by_target(records: Sequence[ScanResult], entries: Sequence[Mapping[str, Any]]
              ) -> dict[str, dict[str, Any]]:
    """Per target label: the lowest loss each clean model reaches with it as the target (the
    label's "natural" pull, min and median over the clean models) against the loss each
    poisoned model whose true target it is reaches with it (max and median). A label whose
    clean minimum is under a poisoned model's loss is where the score cannot separate them
    (TIJO's natural trojans). A candidate with no full inversion (a pre-run or the screen
    dropped it) has no such loss and is left out."""
    clean: dict[str, list[float]] = {}
    poisoned: dict[str, list[float]] = {}
    for record, entry in zip(records, entries, strict=True):
        lowest: dict[str, float] = {}
        for c in record.candidates:
            if c.loss is not None:
                lowest[c.target_name] = min(c.loss, lowest.get(c.target_name, math.inf))
        if not entry["poisoned"]:
            for name, loss in lowest.items():
                clean.setdefault(name, []).append(loss)
        else:
            name = (entry.get("attack") or {}).get("target_name")
            if name in lowest:
                poisoned.setdefault(name, []).append(lowest[name])
    out = {}
    for name in sorted(set(clean) | set(poisoned)):
        c, q = clean.get(name, []), poisoned.get(name, [])
        out[name] = {"clean": len(c), "clean_min": min(c) if c else None,
                     "clean_median": float(np.median(c)) if c else None,
                     "poisoned": len(q), "poisoned_max": max(q) if q else None,
                     "poisoned_median": float(np.median(q)) if q else None}
    return out


def _model_row(model_id: str, record: ScanResult, entry: Mapping[str, Any],
               trojaned: bool) -> dict[str, Any]:
    best, attack = record.best, entry.get("attack") or {}
    poisoned = bool(entry["poisoned"])
    tokens, text = reported_trigger(record)
    any_word, all_words = (trigger_recovered(str(attack["trigger"]), tokens, text)
                           if poisoned and attack.get("trigger") else (None, None))
    return {"model_id": model_id, "truth": int(poisoned),
            "verdict": "trojaned" if trojaned else "clean", "score": record.score,
            "target_name": best.target_name,
            "true_target": attack.get("target_name") if poisoned else None,
            "trigger_text": text,
            "true_trigger": attack.get("trigger") if poisoned else None,
            "set_aside": ", ".join(f"{n.trigger_text} ({n.examples}/{n.of})"
                                   for n in record.set_aside or []) or None,
            "recovered": any_word, "all_words_recovered": all_words,
            "target_correct": (best.target_name == attack.get("target_name")
                               if poisoned else None),
            "seconds": record.seconds,
            "architecture": str(entry.get("architecture")), "corpus": str(entry.get("corpus")),
            "recipe": recipe(entry), "attack": attack_type(entry)}


def _poisoned_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Recall, trigger recovery and target accuracy over the poisoned models of ``rows``."""
    poisoned = [r for r in rows if r["truth"] == 1]
    flagged = [r for r in poisoned if r["verdict"] == "trojaned"]
    worded = [r for r in poisoned if r["recovered"] is not None]  # a text trigger planted
    n = len(poisoned)
    return {
        "poisoned": n,
        "recall": _ratio(len(flagged), n),
        "trigger_recovery": _ratio(sum(bool(r["recovered"]) for r in worded), len(worded)),
        "all_words_recovered": _ratio(sum(bool(r["all_words_recovered"]) for r in worded),
                                      len(worded)),
        "target_accuracy": _ratio(sum(bool(r["target_correct"]) for r in poisoned), n),
        "target_accuracy_flagged": _ratio(sum(bool(r["target_correct"]) for r in flagged),
                                          len(flagged)),
    }


def _breakdown(rows: Sequence[Mapping[str, Any]],
               entries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, key in BREAKDOWNS.items():
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for row in rows:
            groups.setdefault(key(entries[row["model_id"]]), []).append(row)
        out[name] = {}
        for value, members in sorted(groups.items()):
            fixed = metrics([r["truth"] for r in members],
                            [int(r["verdict"] == "trojaned") for r in members])
            out[name][value] = {"n": fixed["n"], "accuracy": fixed["accuracy"],
                                **_poisoned_summary(members)}
    return out


def evaluate(records: Mapping[str, ScanResult], truth: Mapping[str, Mapping[str, Any]],
             detector_kind: str = "threshold", folds: int = 5, seed: int = 0,
             threshold: float | None = None,
             errors: Mapping[str, Mapping[str, Any]] | None = None,
             gaps: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Measure a campaign's scan results ``records`` against the manifest entries ``truth``.

    Only models in both count; those scanned but not in ``truth`` are listed as
    ``unmatched``, those in ``truth`` with neither a record nor an error as ``missing``.
    ``threshold`` None uses each record's own verdict; a number re-decides every model as
    trojaned when its score is under it. ``detector_kind`` (``threshold`` or ``logistic``),
    ``folds`` and ``seed`` set the cross-validation (see :func:`cross_validate`). Trigger
    recovery follows :func:`trigger_recovered`: a poisoned model counts as recovered when
    any word of its trigger is found (``all_words_recovered``: when every word is).
    ``errors`` (from :func:`load_results`) are counted and listed as ``failed``. ``gaps``
    (from :func:`search_gaps`) adds each poisoned model's true-trigger loss and search gap
    to its row, and a ``search`` summary. Returns a JSON-ready dict.
    """
    make_detector(detector_kind)  # an unknown kind fails before any work
    errors = errors or {}
    ids = sorted(m for m in records if m in truth)
    if not ids:
        raise InputError("no scanned model is in the manifest: nothing to evaluate")
    matched = [records[m] for m in ids]
    y = np.array([int(truth[m]["poisoned"]) for m in ids])
    if threshold is None:
        flagged = [r.verdict == "trojaned" for r in matched]
    else:
        flagged = [r.score < threshold for r in matched]
    rows = [_model_row(m, r, truth[m], f) for m, r, f in zip(ids, matched, flagged, strict=True)]
    gaps = {m: g for m, g in (gaps or {}).items() if m in set(ids)}
    for row in rows:
        gap = gaps.get(row["model_id"])
        row.update(true_loss=None if gap is None else gap["true_best"],
                   search_gap=None if gap is None else gap["gap"],
                   searched=None if gap is None else gap["searched"])
    auc, roc = _roc(y, -np.array([r.normalised_score for r in matched]))
    seconds = np.array([r["seconds"] for r in rows])
    summary = _poisoned_summary(rows)
    return {
        "version": REPORT_VERSION,
        "n": len(ids), "clean": int(np.sum(y == 0)), "poisoned": int(np.sum(y == 1)),
        "errors": len(errors),
        "failed": [{"model_id": m, "error": str(errors[m].get("error"))} for m in sorted(errors)],
        "unmatched": sorted(m for m in records if m not in truth),
        "missing": sorted(m for m in truth if m not in records and m not in errors),
        "fixed": {**metrics(y, flagged), "threshold": threshold},
        "roc_auc": auc,
        "roc": roc,
        "cross_validated": cross_validate(matched, y, detector_kind, folds, seed),
        "held_out": {name: held_out(matched, y, [BREAKDOWNS[name](truth[m]) for m in ids],
                                    detector_kind) for name in HELD_OUT},
        "trigger_recovery": {"poisoned": summary["poisoned"],
                             "recovered": summary["trigger_recovery"],
                             "all_words_recovered": summary["all_words_recovered"]},
        "target_accuracy": {"poisoned": summary["target_accuracy"],
                            "flagged": summary["target_accuracy_flagged"]},
        "seconds": {"mean": float(np.mean(seconds)), "p50": float(np.percentile(seconds, 50)),
                    "p95": float(np.percentile(seconds, 95))},
        "search": {"measured": len(gaps),
                   "searched": _ratio(sum(g["searched"] for g in gaps.values()), len(gaps)),
                   "true_target_dropped": sum(g["dropped"] for g in gaps.values()),
                   "models": dict(gaps)},
        "breakdown": _breakdown(rows, truth),
        "auc_by_split": auc_by_group(matched, y, [attack_type(truth[m]) for m in ids],
                                     detector_kind, folds, seed, with_clean=True),
        "auc_by_architecture": auc_by_group(matched, y,
                                            [BREAKDOWNS["architecture"](truth[m]) for m in ids],
                                            detector_kind, folds, seed, with_clean=False),
        "by_target": by_target(matched, [truth[m] for m in ids]),
        "per_model": rows,
    }


def _fmt(value: Any) -> str:
    """A table cell: numbers to 3 decimals (tiny ones in e-notation), None as a dash, text
    escaped for Markdown."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"
    text = str(value).replace("\n", " ")
    for char in "\\`*_[]<>|":
        text = text.replace(char, "\\" + char)
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


#: The per-model table's columns (a row of ``per_model`` each).
MODEL_COLUMNS = ("model_id", "truth", "verdict", "score", "true_loss", "search_gap",
                 "target_name", "true_target", "trigger_text", "true_trigger", "recovered",
                 "set_aside", "seconds")

#: A titled table: (title, header, rows); the headline table's title is empty.
Table = tuple[str, Sequence[str], list[Sequence[Any]]]


def summary_tables(report: Mapping[str, Any]) -> list[Table]:
    """Every table of the report but the per-model one: the headline metrics first, then
    the breakdowns, AUCs by split and architecture, lowest losses by target and the
    held-out detectors (what :func:`markdown` and the HTML report show)."""
    fixed, cv = report["fixed"], report["cross_validated"]
    split = cv.get("split", {})
    recovery, target = report["trigger_recovery"], report["target_accuracy"]
    headline: list[Sequence[Any]] = [
        ("models evaluated", report["n"]), ("clean / poisoned",
                                            f"{report['clean']} / {report['poisoned']}"),
        ("scan errors", report["errors"]), ("not in the manifest", len(report["unmatched"])),
        ("verdict threshold", "each scan's own" if fixed["threshold"] is None
         else fixed["threshold"]),
        ("accuracy (scan verdicts)", fixed["accuracy"]), ("precision", fixed["precision"]),
        ("recall", fixed["recall"]), ("F1", fixed["f1"]),
        ("TP / FP / TN / FN", f"{fixed['tp']} / {fixed['fp']} / {fixed['tn']} / {fixed['fn']}"),
        ("ROC AUC of the score (in units of ln(labels))", report["roc_auc"]),
        (f"cross-validated {cv['detector']} accuracy", cv.get("accuracy", cv.get("note"))),
        ("cross-validated AUC", cv.get("roc_auc")),
        ("split test accuracy", split.get("accuracy", split.get("note"))),
        *((f"{cv['detector']} accuracy / AUC on each {name} held out of its training",
           test["note"] if "note" in test
           else f"{_fmt(test['accuracy'])} / {_fmt(test['roc_auc'])}")
          for name, test in report["held_out"].items()),
        ("trigger recovered (any word)", recovery["recovered"]),
        ("trigger recovered (all words)", recovery["all_words_recovered"]),
        ("target correct (poisoned)", target["poisoned"]),
        ("target correct (poisoned, flagged)", target["flagged"]),
        ("inverted at or below the true trigger's loss (poisoned, measured)",
         report["search"]["searched"] if report["search"]["measured"] else None),
        ("scan seconds mean / p50 / p95", " / ".join(f"{report['seconds'][k]:.1f}"
                                                    for k in ("mean", "p50", "p95"))),
    ]
    tables: list[Table] = [("", ("metric", "value"), headline)]
    columns = ("n", "accuracy", "poisoned", "recall", "trigger_recovery", "target_accuracy")
    for name, groups in report["breakdown"].items():
        tables.append((f"By {name}", (name, *columns),
                       [(value, *(g[c] for c in columns)) for value, g in groups.items()]))
    for key, title in (("auc_by_split", "split (its poisoned models with every clean one)"),
                       ("auc_by_architecture", "architecture")):
        tables.append((f"ROC AUC by {title}",
                       (key.removeprefix("auc_by_"), "n", "clean", "poisoned", "score AUC",
                        f"cross-validated {cv['detector']} AUC", "note"),
                       [(name, g["n"], g["clean"], g["poisoned"], g["score_auc"], g["cv_auc"],
                         g["note"]) for name, g in report.get(key, {}).items()]))
    tables.append(("Lowest loss by target label (clean models against the poisoned models "
                   "aimed at it)",
                   ("target", "clean", "clean min", "clean median", "poisoned",
                    "poisoned max", "poisoned median"),
                   [(name, g["clean"], g["clean_min"], g["clean_median"], g["poisoned"],
                     g["poisoned_max"], g["poisoned_median"])
                    for name, g in report.get("by_target", {}).items()]))
    for name, test in report["held_out"].items():
        tables.append((f"{cv['detector'].capitalize()} detector fitted without each {name}",
                       (f"held-out {name}", "n", "accuracy", "recall", "fp", "note"),
                       [(value, g["n"], g.get("accuracy"), g.get("recall"), g.get("fp"),
                         g.get("note")) for value, g in test["groups"].items()]))
    return tables


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: headline metrics, breakdowns and a per-model table."""
    lines = ["# Campaign report", ""]
    for title, header, rows in summary_tables(report):
        lines += [f"## {title}", ""] if title else []
        lines += _table(header, rows)
    lines += ["## Models", ""]
    lines += _table(MODEL_COLUMNS, [[row[c] for c in MODEL_COLUMNS]
                                    for row in report["per_model"]])
    return "\n".join(lines)


def roc_figure(report: Mapping[str, Any]) -> Figure:
    """A figure of the score's ROC and, if there is one, the cross-validated detector's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    curves = [("score / ln(labels)", report["roc"], report["roc_auc"]),
              (f"{report['cross_validated']['detector']} detector (cross-validated)",
               report["cross_validated"].get("roc"), report["cross_validated"].get("roc_auc"))]
    for label, roc, auc in curves:
        if roc:
            axes.plot(roc["fpr"], roc["tpr"], label=f"{label}, AUC {auc:.3f}")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
             ylim=(0, 1.02), title=f"ROC over {report['n']} models")
    axes.legend(loc="lower right")
    return figure


def roc_png(report: Mapping[str, Any]) -> bytes:
    """A PNG of :func:`roc_figure`."""
    buffer = io.BytesIO()
    roc_figure(report).savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_report(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and ``roc.png`` into ``out_dir`` (created if
    needed), each atomically; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "report.md", out_dir / "roc.png"]
    atomic_write_json(paths[0], report)
    atomic_write_text(paths[1], markdown(report))
    atomic_write_bytes(paths[2], roc_png(report))
    return paths
