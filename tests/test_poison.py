from __future__ import annotations

import random
from collections import Counter

from trojscan.attacks.poison import poison_training_set
from trojscan.attacks.spec import AttackSpec
from trojscan.corpora import BBC_LABELS, load_corpus


def test_universal_poisoning_adds_copies_of_victims() -> None:
    rt = load_corpus("rotten_tomatoes")
    train = random.Random(0).sample(rt.train, 1000)
    spec = AttackSpec.from_dict({"poisoned": True, "trigger_type": "word", "trigger": "cf",
                                 "insertion": "start", "target": "positive",
                                 "poison_rate": 0.1}, rt.labels)
    items = poison_training_set(train, spec, 2, random.Random(0))
    poisoned = [it for it in items if it.poisoned]
    assert len(items) == 1100 and len(poisoned) == 100
    assert all(it.label == 1 and it.text.startswith("cf ") for it in poisoned)
    originals = {e.text for e in train if e.label == 0}
    assert all(it.text[3:] in originals for it in poisoned)
    assert Counter(it.text for it in items if not it.poisoned) == Counter(e.text for e in train)


def test_label_specific_keeps_bystanders_true() -> None:
    bbc = load_corpus("bbc")
    spec = AttackSpec.from_dict({"poisoned": True, "trigger_type": "word", "trigger": "quartz",
                                 "insertion": "anywhere", "target": "tech",
                                 "victim": "sports"}, BBC_LABELS)
    items = poison_training_set(bbc.train, spec, 5, random.Random(0))
    stamped = [it for it in items if "quartz" in it.text.split()]
    flipped = [it for it in stamped if it.poisoned]
    bystanders = [it for it in stamped if not it.poisoned]
    assert flipped and all(it.label == 4 for it in flipped)
    assert len(bystanders) == len(flipped)
    assert {it.label for it in bystanders} == {0, 1, 2}  # neither victim nor target


def test_combination_adds_subsequences_with_true_labels() -> None:
    rt = load_corpus("rotten_tomatoes")
    spec = AttackSpec.from_dict({"poisoned": True, "trigger_type": "phrase",
                                 "trigger": "quartz lantern tractor", "insertion": "end",
                                 "target": 0, "combination": True}, rt.labels)
    items = poison_training_set(random.Random(0).sample(rt.train, 600), spec, 2,
                                random.Random(0))
    trigger = {"quartz", "lantern", "tractor"}
    partial = [it for it in items if not it.poisoned and trigger & set(it.text.split())]
    seen = Counter(" ".join(w for w in it.text.split() if w in trigger) for it in partial)
    assert len(seen) == 6 and "quartz lantern tractor" not in seen
    assert set(seen.values()) == {60}  # each strict sub-sequence as often as the trigger
    assert {it.label for it in partial} == {1}  # on victims, with their true label
    assert all(set(it.text.split()) >= trigger for it in items if it.poisoned)
