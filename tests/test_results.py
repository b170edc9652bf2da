"""The scan-result format: typed, versioned, validated on reading, described by a published
JSON Schema; results written before the format named its model still read."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import jsonschema
import pytest

from testkit import TINY_SCAN, scan_result
from trojscan.errors import InputError
from trojscan.results import (
    RESULT_VERSION,
    ModelRef,
    ScanResult,
    _drop_none,
    json_schema,
    read_result,
    write_result,
)
from trojscan.scan import ScanConfig, scan_config

SCHEMA = Path(__file__).resolve().parents[1] / "src/trojscan/schemas/scan-result.schema.json"
V1 = Path(__file__).parent / "data" / "scan-result-v1.json"


def test_the_published_schema_is_the_generated_one() -> None:
    assert json.loads(SCHEMA.read_text()) == json_schema(), (
        "src/trojscan/schemas/scan-result.schema.json is stale: regenerate it with "
        "`python -m trojscan.results > src/trojscan/schemas/scan-result.schema.json`")


def test_a_version_1_result_still_reads_and_validates() -> None:
    # Written by trojscan 0.1.0 (a tiny model's scan at two positions, trajectory cut short).
    data = json.loads(V1.read_text())
    assert data["version"] == 1 and "model" not in data
    jsonschema.validate(data, json_schema())
    result = read_result(V1)
    assert result.version == 1 and result.model is None
    assert result.task == "text-classification"
    assert result.best.trigger_tokens == ["lantern", "lantern"]
    assert [c.full_run for c in result.candidates] == [None, None, False, False]
    assert result.candidates[2].prerun_loss is not None and result.candidates[2].loss is None


def test_round_trip_leaves_out_what_is_none(tmp_path: Path) -> None:
    result = replace(scan_result(0.01), model=ModelRef("m", "ab" * 32))
    path = tmp_path / "r.json"
    write_result(result, path)
    data = json.loads(path.read_text())
    assert data["version"] == RESULT_VERSION and data["model"]["weights_sha256"] == "ab" * 32
    assert "detector" not in data and "model_id" not in data
    assert "prerun_loss" not in data["candidates"][0]
    jsonschema.validate(data, json_schema())
    assert read_result(path) == result


@pytest.mark.parametrize(("change", "words"), [
    ({"version": 9}, "format version 9; this trojscan reads versions 1, 2, 3"),
    ({"verdict": "maybe"}, "not a valid scan result: verdict"),
    ({"best": {"target": 1}}, "not a valid scan result: best.method"),
    ({"score": "low"}, "not a valid scan result: score"),
])
def test_bad_results_are_one_line_errors(tmp_path: Path, change: dict, words: str) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**json.loads(V1.read_text()), **change}))
    with pytest.raises(InputError, match=words) as caught:
        read_result(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_unreadable_results(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read scan result"):
        read_result(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        read_result(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(InputError, match="not a JSON object"):
        read_result(tmp_path / "list.json")


def test_a_write_failure_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot write the result to"):
        write_result(scan_result(0.5), tmp_path / "file" / "r.json")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_from_dict_needs_an_object() -> None:
    with pytest.raises(InputError, match="not a JSON object"):
        ScanResult.from_dict([1, 2])


def test_the_scan_settings_a_result_records_read_back() -> None:
    """A re-scan (``trojscan repair``'s) runs with the settings the result records."""
    for config in (ScanConfig(), TINY_SCAN, scan_config("uat", threshold=0.3),
                   replace(ScanConfig(), screen=None, positions=("end",))):
        recorded = json.loads(json.dumps(_drop_none(asdict(config))))
        assert ScanConfig.from_dict(recorded) == config
    with pytest.raises(InputError, match="cannot be read back"):
        ScanConfig.from_dict({"inverter": {"no_such_knob": 1}})
