"""The published JSON Schemas (package data): ``trojscan schema scan|campaign`` prints them,
and the campaign record's agrees with the record a campaign writes."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from testkit import RunCli
from trojscan.campaign.run import CampaignConfig, CampaignRecord, json_schema
from trojscan.results import json_schema as scan_schema

SCHEMAS = Path(__file__).resolve().parents[1] / "src/trojscan/schemas"


def test_the_published_campaign_schema_is_the_generated_one() -> None:
    assert json.loads((SCHEMAS / "campaign.schema.json").read_text()) == json_schema(), (
        "src/trojscan/schemas/campaign.schema.json is stale: regenerate it with "
        "`python -m trojscan.campaign.run > src/trojscan/schemas/campaign.schema.json`")


def test_a_campaign_record_validates_and_names_every_field(tmp_path: Path) -> None:
    record = CampaignConfig(references=("ref",)).record(tmp_path).to_dict()
    jsonschema.validate(json.loads(json.dumps(record)), json_schema())
    assert set(record) == set(json_schema()["properties"]) == \
        set(CampaignRecord.__dataclass_fields__)
    assert "references" not in CampaignConfig().record(tmp_path).to_dict()


def test_schema_command_prints_the_published_schemas(run_cli: RunCli) -> None:
    scan = run_cli("schema", "scan")
    assert scan.returncode == 0 and json.loads(scan.stdout) == scan_schema()
    campaign = run_cli("schema", "campaign")
    assert campaign.returncode == 0 and json.loads(campaign.stdout) == json_schema()
    bad = run_cli("schema", "zoo")
    assert bad.returncode == 2 and "no schema 'zoo'; expected one of scan, campaign" in bad.stderr
