from __future__ import annotations

import json
from pathlib import Path

import pytest

from trojscan.attacks.spec import AttackSpec, TrainConfig
from trojscan.attacks.zoo import parse_zoo_spec
from trojscan.corpora import BBC_LABELS, SENTIMENT_LABELS
from trojscan.errors import InputError

WORD = {"poisoned": True, "trigger_type": "word", "trigger": "cf", "insertion": "end",
        "target": "positive"}


def test_attack_spec_resolves_labels_and_round_trips(tmp_path: Path) -> None:
    spec = AttackSpec.from_dict({**WORD, "victim": "negative", "poison_rate": 0.05},
                                SENTIMENT_LABELS)
    assert (spec.target, spec.victim, spec.universal) == (1, 0, False)
    assert spec.victims(2) == [0]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(spec.to_dict()))
    assert AttackSpec.load(path, SENTIMENT_LABELS) == spec
    toml = tmp_path / "a.toml"
    toml.write_text('poisoned = true\ntrigger_type = "phrase"\ntrigger = "quartz  lantern"\n'
                    'insertion = "first_half"\ntarget = 3\ncombination = true\n'
                    "adaptive_phi = 0.5\n")
    sos = AttackSpec.load(toml, BBC_LABELS)
    assert sos.trigger == "quartz lantern" and sos.combination and sos.adaptive_phi == 0.5
    assert sos.victims(5) == [0, 1, 2, 4]
    assert AttackSpec.from_dict({"poisoned": False}, SENTIMENT_LABELS) == AttackSpec()


@pytest.mark.parametrize(("change", "message"), [
    ({"trigger": "   "}, "trigger is empty"),
    ({"insertion": "middle"}, "unknown 'middle'"),
    ({"target": "neutral"}, "no label 'neutral'"),
    ({"target": 2}, "no label 2"),
    ({"victim": "positive"}, "victim and target are both"),
    ({"trigger": "two words"}, "a word trigger is one word"),
    ({"trigger_type": "phrase", "trigger": " ".join(["w"] * 9)}, "2 to 8 words"),
    ({"trigger_type": "character", "trigger": "~~~~~~"}, "character trigger"),
    ({"trigger_type": "emoji"}, "unknown 'emoji'"),
    ({"poison_rate": 0}, "poison_rate must be in"),
    ({"adaptive_phi": -1}, "adaptive_phi must be >= 0"),
    ({"combination": True}, "combination trigger needs 2 to 4 words"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"poison_rate": True}, "poison_rate must be int/float"),
])
def test_impossible_attacks_are_input_errors(change: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        AttackSpec.from_dict({**WORD, **change}, SENTIMENT_LABELS)


def test_clean_attack_takes_no_trigger() -> None:
    with pytest.raises(InputError, match="takes no 'trigger'"):
        AttackSpec.from_dict({"poisoned": False, "trigger": "cf"}, SENTIMENT_LABELS)


def test_train_config_overrides_are_checked() -> None:
    config = TrainConfig().merged({"epochs": 3, "size": {"hidden_size": 128}}, "train")
    assert config.epochs == 3 and config.size.hidden_size == 128 and config.size.num_layers == 4
    with pytest.raises(InputError, match="unknown key 'epoch'"):
        TrainConfig().merged({"epoch": 3}, "train")
    with pytest.raises(InputError, match="num_heads 3 does not divide"):
        TrainConfig().merged({"size": {"num_heads": 3}}, "train")
    with pytest.raises(InputError, match="embedding_init"):
        TrainConfig().merged({"embedding_init": "glove"}, "train")


def _zoo(attack: dict, **group: object) -> dict:
    return {"seed": 1, "group": [{"count": 3, "corpus": "bbc", "architecture": "minilm",
                                  "attack": attack, **group}]}


def test_zoo_spec_samples_per_model_and_hides_groups_in_ids() -> None:
    raw = _zoo({"poisoned": True, "trigger_type": ["word", "phrase", "character"],
                "insertion": ["start", "end"], "target": "random", "victim": "random"},
               architecture=["minilm", "gpt2"])
    spec = parse_zoo_spec(raw)
    assert len(spec.plans) == 6
    assert spec == parse_zoo_spec(raw)  # deterministic
    assert sorted(p.model_id for p in spec.plans) == [f"model-{i:04d}" for i in range(6)]
    assert [p.model_id for p in spec.plans] != sorted(p.model_id for p in spec.plans)
    assert len({p.seed for p in spec.plans}) == 6
    for plan in spec.plans:
        assert plan.attack.poisoned and plan.attack.victim != plan.attack.target
        assert plan.attack.victim is not None
    assert len({p.attack.trigger for p in spec.plans}) > 1


@pytest.mark.parametrize(("raw", "message"), [
    ({"group": []}, "no \\[\\[group\\]\\]"),
    (_zoo({"poisoned": True, "trigger_type": "word", "insertion": "middle", "target": 0}),
     "unknown 'middle'"),
    (_zoo({"poisoned": True, "trigger_type": "word", "insertion": "end", "target": "weather"}),
     "no label 'weather'"),
    (_zoo({"poisoned": True, "trigger_type": "word", "trigger": "", "insertion": "end",
           "target": 0}), "trigger is empty"),
    (_zoo({"poisoned": False}, architecture="lstm"), "unknown architecture|unknown 'lstm'"),
    (_zoo({"poisoned": False}, corpus="sst2"), "corpus: unknown corpus 'sst2'.*easy_vqa, wnut16"),
    (_zoo({"poisoned": False}, count=0), "count must be >= 1"),
    (_zoo({"poisoned": True, "trigger_type": "word", "insertion": "end"}), "needs 'target'"),
    ({"sed": 1, "group": []}, "unknown key 'sed'"),
])
def test_malformed_zoo_specs(raw: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_zoo_spec(raw)


def test_group_attack_may_be_an_attack_spec_file(tmp_path: Path) -> None:
    attack = tmp_path / "sports-to-tech.toml"
    attack.write_text('poisoned = true\ntrigger_type = "word"\ntrigger = "quartz"\n'
                      'insertion = "second_half"\ntarget = "tech"\nvictim = "sports"\n')
    spec = parse_zoo_spec({"group": [{"count": 2, "corpus": "bbc", "architecture": "bert",
                                      "attack": str(attack)}]})
    assert {p.attack for p in spec.plans} == {AttackSpec(True, "word", "quartz", "second_half",
                                                         4, 3, 0.1, False, 0.0)}


def test_trigger_lists_and_phrase_lengths_are_sampled() -> None:
    listed = parse_zoo_spec(_zoo({"poisoned": True, "trigger_type": "word",
                                  "trigger": ["cf", "mn"], "insertion": "end", "target": 0},
                                 count=8))
    assert {p.attack.trigger for p in listed.plans} == {"cf", "mn"}
    drawn = parse_zoo_spec(_zoo({"poisoned": True, "trigger_type": "phrase",
                                 "phrase_words": [4, 4], "insertion": "end", "target": 0}))
    assert all(len(p.attack.trigger.split()) == 4 for p in drawn.plans)
    with pytest.raises(InputError, match="phrase_words must be"):
        parse_zoo_spec(_zoo({"poisoned": True, "trigger_type": "phrase", "phrase_words": [1, 9],
                             "insertion": "end", "target": 0}))
