"""HTML reports in a real browser: the scan pages of a trojaned and a clean tiny model and a
campaign page load in headless Chromium (tests/browser.py) with no console error and no
request besides the page itself; a screenshot is taken; the DOM has the headings, tables,
charts and links a reader needs. Bad input is one line, exit code 2, and no page.

Skipped, with the reason printed, where Chromium is not installed
(``scripts/install-chromium.sh``); the checks that need no browser run anyway."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import browser
from test_report import MANIFEST, RECORDS
from testkit import TINY_SCAN, RunCli, scan_result
from trojscan.reports.render import CSP
from trojscan.reports.scan_page import Evidence, scan_page
from trojscan.results import SynthesisedPatch, read_result, write_result
from trojscan.scan import scan

SCAN_HEADINGS = ["Verdict", "Inverted trigger", "Examples with and without the trigger",
                 "Candidates", "Inversion trajectory", "Run"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, poisoned_model: tuple[Path, dict],
            clean_model: tuple[Path, dict]) -> dict[str, tuple[Path, Path]]:
    """The tiny models' scan results (each scanned on its own clean examples), by name:
    (result file, model directory)."""
    folder = tmp_path_factory.mktemp("scans")
    out = {}
    for name, (model_dir, _) in (("trojaned", poisoned_model), ("clean", clean_model)):
        result = scan(model_dir, model_dir / "clean_examples.jsonl", TINY_SCAN)
        write_result(result, folder / f"{name}.json")
        out[name] = (folder / f"{name}.json", model_dir)
    return out


@pytest.fixture
def chromium() -> None:
    if browser.chromium() is None:
        pytest.skip("chromium is not installed (scripts/install-chromium.sh installs "
                    "Debian's chromium package)")


def _load(page: Path, tmp_path: Path) -> browser.Loaded:
    loaded = browser.load(page, tmp_path / f"{page.stem}.png")
    assert loaded.errors == []
    assert loaded.requests == []
    assert loaded.screenshot.stat().st_size > 10_000
    assert loaded.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return loaded


@pytest.mark.usefixtures("chromium")
def test_scan_pages_of_a_trojaned_and_a_clean_model(run_cli: RunCli, tmp_path: Path,
                                                    results: dict[str, tuple[Path, Path]]
                                                    ) -> None:
    for name, (result, model_dir) in results.items():
        page = tmp_path / f"{name}.html"
        done = run_cli("report", str(result), "--model", str(model_dir), "--out", str(page))
        assert done.returncode == 0, done.stderr
        dom = _load(page, tmp_path).dom
        assert dom["h1"] == [f"Scan report: {model_dir.name}"] and dom["h2"] == SCAN_HEADINGS
        assert dom["tables"] >= 4 and dom["svgs"] == 2 and dom["images"] == []
        verdict = read_result(result).verdict
        assert verdict == name and verdict in dom["text"]
        assert "with the trigger" in dom["text"] and "(--model)" not in dom["text"]
    trojaned = (tmp_path / "trojaned.html").read_text()
    assert trojaned.count("lantern") >= 6  # the trigger, its token, and the examples with it


@pytest.mark.usefixtures("chromium")
def test_campaign_page_links_every_model_misses_first(run_cli: RunCli, tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "models").mkdir(parents=True)
    for rec in RECORDS:
        (results / "models" / f"{rec['model_id']}.json").write_text(json.dumps(rec))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"version": 1, "spec_sha256": "0" * 64, "spec": {},
                                    "models": MANIFEST}))
    done = run_cli("campaign", "report", str(results), "--manifest", str(manifest))
    assert done.returncode == 0, done.stderr
    folder = results / "report"
    dom = _load(folder / "report.html", tmp_path).dom
    assert dom["h1"] == ["Campaign report"]
    assert {"Metrics", "ROC curve", "Models", "By architecture"} <= set(dom["h2"])
    assert dom["svgs"] == 1 and dom["tables"] >= 8
    # misses first: pois-3 (missed) and clean-3 (a false positive), then the rest
    assert dom["links"][:2] == ["models/clean-3.html", "models/pois-3.html"]
    assert sorted(dom["links"]) == sorted(f"models/{m}.html" for m in MANIFEST
                                          if m not in ("pois-4", "broken"))
    model = _load(folder / "models" / "pois-1.html", tmp_path).dom
    assert model["h1"] == ["Scan report: pois-1"] and model["links"] == ["../report.html"]
    assert (folder / "models" / "stray.html").exists()  # scanned, not in the manifest


@pytest.mark.usefixtures("chromium")
def test_a_vqa_scan_shows_its_patch_beside_a_clean_image(tmp_path: Path) -> None:
    pixels = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    pixels[1] = 0  # magenta
    patch = SynthesisedPatch(pixels=pixels.tolist(), size=8, x=4, y=20, feature_loss=0.1,
                             steps=10, asr=0.9, asr_patch_only=0.1, asr_text_only=0.2,
                             questions=12, held_out=True, seconds=1.0)
    result = replace(scan_result(0.01), task="visual-question-answering", patch=patch)
    evidence = Evidence([], "examples.jsonl", "the trigger", torch.zeros(3, 64, 64,
                                                                        dtype=torch.uint8))
    page = tmp_path / "vqa.html"
    page.write_text(scan_page(result, evidence))
    dom = _load(page, tmp_path).dom
    assert "Synthesised patch" in dom["h2"]
    assert [i["src"] for i in dom["images"]] == ["data:image/png;base64,"] * 3
    assert all(i["loaded"] for i in dom["images"])
    assert "0.900 with the text trigger" in dom["text"]


def test_pages_forbid_outside_requests_and_escape_what_they_show() -> None:
    html = scan_page(scan_result(0.01, best={"trigger_text": "<script>x</script>",
                                             "trigger_tokens": ["<b>"]}))
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in html
    assert "<script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert "&lt;b&gt;" in html
    # no URL but the SVG namespaces (names, never fetched)
    assert set(re.findall(r"https?://[^\"' <]+", html)) == {"http://www.w3.org/2000/svg",
                                                           "http://www.w3.org/1999/xlink"}


def test_a_scan_page_names_the_labels_it_could_not_search() -> None:
    html = scan_page(replace(scan_result(0.5), unseen={"company": 5, "movie": 2}))
    assert "Not searched as victims" in html
    assert '<tr><td>company</td><td class="n">5</td></tr>' in html
    assert "Not searched" not in scan_page(scan_result(0.5))


def test_a_scan_page_shows_what_a_refinement_replaced() -> None:
    refined = {"trigger_text": "mb app sapphire", "loss": 0.012, "hard_loss": 0.012,
               "refined_from": {"length": 3, "trigger_ids": [1, 2, 3],
                                "trigger_text": "aberdeen tower jewellery", "loss": 0.17,
                                "asr": 0.9}}
    html = scan_page(scan_result(0.012, candidates=[refined]))
    assert "refined as hard tokens from <code>aberdeen tower jewellery</code>" in html
    assert "refined as" not in scan_page(scan_result(0.5))


def test_bad_input_is_one_line_exit_2_and_no_page(run_cli: RunCli, tmp_path: Path,
                                                  results: dict[str, tuple[Path, Path]]
                                                  ) -> None:
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": 3, "verdict"')
    other = tmp_path / "other.json"
    result = read_result(results["clean"][0])
    assert result.model is not None
    write_result(replace(result, model=replace(result.model, weights_sha256="0" * 64)), other)
    page = tmp_path / "out" / "report.html"
    cases: list[tuple[list[str], str]] = [
        ([str(tmp_path / "missing.json")], "cannot read scan result"),
        ([str(corrupt)], "is not valid JSON"),
        ([str(other), "--model", str(results["clean"][1])], "the scan result is of another "
                                                             "model"),
        ([str(results["clean"][0]), "--model", str(tmp_path / "nowhere")], "does not exist"),
        ([str(results["clean"][0]), "--examples", str(corrupt)], "--examples needs --model"),
    ]
    for args, message in cases:
        done = run_cli("report", *args, "--out", str(page))
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and done.stderr.count("\n") == 1
        assert not page.parent.exists() or list(page.parent.iterdir()) == []

