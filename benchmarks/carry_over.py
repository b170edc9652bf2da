"""Carry a finished campaign's results over to a campaign at today's default settings when
only the verdict's rule changed, so that only the models whose verdict the new rule could
change are scanned again (issue 14: the zoo re-measured after the natural-feature rule).

A change to the decision alone (``DECISION_KEYS`` of :class:`trojscan.scan.ScanConfig`:
settings read after the search, on the short triggers it found) leaves every search the
same. For each result of ``OLD`` (a campaign whose scan settings equal today's default but
for those keys), the new rule is applied to the short triggers the result holds, exactly as
:func:`trojscan.scan.scan_subject` applies it (:func:`trojscan.scan.natural_features`, on
the model's own clean examples): when it sets aside no trigger the old verdict rested on or
beat, the scan at today's default would write the same result, so it is copied to ``NEW``
with today's settings recorded; otherwise it is left out, for ``trojscan campaign run`` to
scan afresh. Nothing of ``OLD`` is changed.

    .venv/bin/python benchmarks/carry_over.py runs/exp4-varied runs/exp5-varied runs/zoo-varied
    trojscan campaign run runs/zoo-varied --out runs/exp5-varied --cpus-per-model 1
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from trojscan.campaign.run import CAMPAIGN_FILE, CAMPAIGN_VERSION, MODELS_DIR, CampaignConfig
from trojscan.fsutil import atomic_write_json
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.results import read_result
from trojscan.scan import ScanConfig, natural_features
from trojscan.subjects.base import Candidate
from trojscan.subjects.loading import load_subject

#: Scan settings read only after the search (the verdict's rule): the old campaign may lack
#: them or differ in them.
DECISION_KEYS = ("natural_share",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the finished campaign's results directory")
    parser.add_argument("new", type=Path, help="the new campaign's results directory")
    parser.add_argument("zoo", type=Path, help="the zoo both campaigns scan")
    args = parser.parse_args()
    config = ScanConfig()
    settings = CampaignConfig(scan=config).settings()
    old = json.loads((args.old / CAMPAIGN_FILE).read_text(encoding="utf-8"))
    today = json.loads(json.dumps(settings["scan"]))
    search = {k: v for k, v in today.items() if k not in DECISION_KEYS}
    theirs = {k: v for k, v in old["scan"].items() if k not in DECISION_KEYS}
    if theirs != search or old["method"] != settings["method"]:
        differ = sorted(k for k in search if theirs.get(k) != search[k])
        raise SystemExit(f"{args.old} searched with other settings ({', '.join(differ)})")
    (args.new / MODELS_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.new / CAMPAIGN_FILE, {"version": CAMPAIGN_VERSION,
                                                 "zoo": str(args.zoo.resolve()), **settings})
    carried, left = [], []
    for path in sorted((args.old / MODELS_DIR).glob("model-*.json")):
        if path.name.endswith(".error.json"):
            continue
        result = read_result(path)
        subject = load_subject(args.zoo / str(result.model_id), max_length=config.max_length)
        examples = subject.read_examples(args.zoo / str(result.model_id) / EXAMPLES_FILE)
        found = [(Candidate(tuple(c.victims), c.target, c.position), t)
                 for c in result.candidates for t in c.short_triggers()
                 if t.length <= config.decision_length]
        natural = natural_features(subject, examples, found, config.natural_share)
        deciding = result.short_trigger.loss if result.short_trigger else float("inf")
        if any(n.loss <= deciding for n in natural.values()):
            words = sorted({n.trigger_text for n in natural.values()})
            left.append(f"{result.model_id} ({', '.join(words)})")
            continue
        atomic_write_json(args.new / MODELS_DIR / path.name,
                          replace(result, config=asdict(config)).to_dict())
        carried.append(str(result.model_id))
    print(f"carried over {len(carried)}; left to scan again {len(left)}: {'; '.join(left)}")


if __name__ == "__main__":
    main()
