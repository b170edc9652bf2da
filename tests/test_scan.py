"""`trojscan scan` on tiny models: verdicts, the result record, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertModel

from testkit import TINY_SCAN, RunCli
from trojscan.attacks.spec import AttackSpec, TrainConfig
from trojscan.attacks.train import build_one
from trojscan.corpora import Corpus
from trojscan.errors import InputError
from trojscan.inversion.base import make_config
from trojscan.inversion.dbs import DBSConfig
from trojscan.modeldir import weights_sha256
from trojscan.results import RESULT_VERSION, json_schema
from trojscan.scan import ScanConfig, scan, scan_subject
from trojscan.subjects.base import Candidate
from trojscan.subjects.loading import load_subject
from trojscan.subjects.text_classification import TextExample


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory: pytest.TempPathFactory, rt: Corpus) -> Path:
    path = tmp_path_factory.mktemp("examples") / "clean.jsonl"
    rows = [{"text": e.text, "label": label} for label in (0, 1)
            for e in [x for x in rt.examples if x.label == label][:20]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_poisoned_model_is_flagged_with_its_trigger_and_target(
        poisoned_model: tuple[Path, dict], examples_file: Path) -> None:
    result = scan(poisoned_model[0], examples_file, TINY_SCAN)
    assert result.verdict == "trojaned"
    assert result.best.target_name == "positive"
    assert "lantern" in result.best.trigger_tokens
    assert result.best.hard_asr >= 0.9
    assert result.version == RESULT_VERSION and result.task == "text-classification"
    assert {c.target for c in result.candidates} == {0, 1}
    assert result.config["inverter"]["trigger_length"] == 1
    assert result.trajectory and "temperature" in result.trajectory[0]
    assert result.model is not None and result.model.path == str(poisoned_model[0])
    assert result.model.weights_sha256 == weights_sha256(poisoned_model[0])


@pytest.mark.parametrize(("trigger_type", "trigger", "insertion"), [
    ("phrase", "cobalt harbor", "end"),
    ("word", "quartz", "first_half"),
])
def test_phrase_and_word_triggers_at_other_positions_are_recovered(
        tmp_path: Path, rt: Corpus, tiny_config: TrainConfig, examples_file: Path,
        trigger_type: str, trigger: str, insertion: str) -> None:
    attack = AttackSpec.from_dict({"poisoned": True, "trigger_type": trigger_type,
                                   "trigger": trigger, "insertion": insertion,
                                   "target": "negative"}, rt.labels)
    metrics = build_one(tmp_path / "model", rt, "bert", attack, tiny_config, seed=2)
    assert metrics["asr"] >= 0.9
    words = trigger.split()
    config = replace(TINY_SCAN, positions=(insertion,),
                     inverter=replace(TINY_SCAN.inverter, trigger_length=len(words)))
    result = scan(tmp_path / "model", examples_file, config)
    assert result.verdict == "trojaned"
    assert result.best.target_name == "negative"
    assert result.best.position == insertion
    assert set(words) & set(result.best.trigger_tokens), result.best.trigger_tokens


def test_clean_model_is_not_flagged(clean_model: tuple[Path, dict], examples_file: Path) -> None:
    result = scan(clean_model[0], examples_file, TINY_SCAN)
    assert result.verdict == "clean"
    assert result.score > TINY_SCAN.threshold


def test_many_labels_use_a_prerun_and_keep_top_k(poisoned_model: tuple[Path, dict],
                                                 examples_file: Path) -> None:
    subject = load_subject(poisoned_model[0])
    rows = subject.read_examples(examples_file)
    config = ScanConfig(inverter=DBSConfig(trigger_length=1, epochs=60), threshold=0.1,
                        positions=("start", "end"), preselect_above=1, top_k=1, prerun_epochs=60,
                        screen_selects=False)
    result = scan_subject(subject, rows, config)
    full = [c for c in result.candidates if c.relaxed_loss is not None]
    assert len(full) == 1 and full[0].target == 1
    assert len([c for c in result.candidates if c.full_run is False]) == 3


@pytest.mark.parametrize("method", ["uat", "dbs-fixed-temperature", "dbs-no-backtracking"])
def test_other_methods_scan_through_the_same_interface(
        poisoned_model: tuple[Path, dict], examples_file: Path, method: str) -> None:
    # The screen picks the candidates every method inverts fully: both targets of a binary
    # model (top_k 2).
    config = replace(TINY_SCAN, method=method, inverter=make_config(method, trigger_length=1,
                                                                    epochs=100))
    result = scan(poisoned_model[0], examples_file, config)
    assert result.verdict == "trojaned" and result.best.method == method.split("-")[0]
    assert result.best.target_name == "positive"
    assert "lantern" in result.best.trigger_tokens
    assert result.config["method"] == method
    full = [c for c in result.candidates if c.relaxed_loss is not None]
    assert len(full) == 2
    ablated = {"dbs-fixed-temperature": "temperature_scaling",
               "dbs-no-backtracking": "backtracking"}.get(method)
    if ablated:
        assert result.config["inverter"][ablated] is False


def test_a_method_needs_its_own_config() -> None:
    with pytest.raises(InputError, match="method uat needs a UATConfig"):
        ScanConfig(method="uat")


def test_victims_are_capped_evenly_across_labels(poisoned_model: tuple[Path, dict]) -> None:
    subject = load_subject(poisoned_model[0])
    rows = [TextExample(f"t{i}", i % 3) for i in range(12)]  # 4 examples of each label
    pair = Candidate((1, 2), 0, "start")
    chosen = subject.victims(rows, pair, 5)
    assert [r.text for r in chosen] == ["t1", "t2", "t4", "t5", "t7"]
    assert len(subject.victims(rows, pair, 0)) == 8 == len(subject.victims(rows, pair, 20))



def _run(run_cli: RunCli, *args: str) -> subprocess.CompletedProcess:
    return run_cli("scan", *args)


def _one_line_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trojscan: error: "), result.stderr
    assert words in lines[0], lines[0]


def test_cli_scan_writes_the_record_and_prints_a_summary(
        run_cli: RunCli, poisoned_model: tuple[Path, dict], examples_file: Path,
        tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = _run(run_cli, str(poisoned_model[0]), "--examples", str(examples_file), "--out",
                str(out), "--trigger-length", "1", "--positions", "start", "--epochs", "100",
                "--threshold", "0.1")
    assert done.returncode == 0, done.stderr
    assert "TROJANED" in done.stdout and "lantern" in done.stdout
    record = json.loads(out.read_text())
    assert record["verdict"] == "trojaned" and record["threshold"] == 0.1
    jsonschema.validate(record, json_schema())
    assert record["model"]["weights_sha256"] == weights_sha256(poisoned_model[0])


def test_a_reference_model_measures_the_short_triggers(
        run_cli: RunCli, poisoned_model: tuple[Path, dict], clean_model: tuple[Path, dict],
        examples_file: Path, tmp_path: Path) -> None:
    # The planted word flips the poisoned model, not a clean model of the same task.
    out = tmp_path / "result.json"
    done = _run(run_cli, str(poisoned_model[0]), "--examples", str(examples_file), "--out",
                str(out), "--trigger-length", "1", "--positions", "start", "--epochs", "100",
                "--threshold", "0.1", "--reference", str(clean_model[0]))
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    jsonschema.validate(record, json_schema())
    reference = record["reference"]
    assert reference["weights_sha256"] == weights_sha256(clean_model[0])
    planted = next(t for t in reference["triggers"] if t["trigger_text"] == "lantern")
    assert planted["asr"] >= 0.9 and planted["reference_asr"] <= 0.5
    assert planted["reference_loss"] > planted["loss"]
    assert planted["reference_rank"] >= 1
    assert "of the clean reference" in done.stdout
    # A reference of other labels is no reference for this model.
    other = tmp_path / "other-labels"
    shutil.copytree(clean_model[0], other)
    config = json.loads((other / "config.json").read_text())
    config["id2label"] = {"0": "sad", "1": "glad"}
    config["label2id"] = {"sad": 0, "glad": 1}
    (other / "config.json").write_text(json.dumps(config))
    _one_line_error(_run(run_cli, str(poisoned_model[0]), "--examples", str(examples_file),
                         "--reference", str(other)), "no reference model has the labels")


def test_out_is_checked_before_the_scan(run_cli: RunCli, examples_file: Path,
                                        tmp_path: Path) -> None:
    # The model does not exist: each error below comes before any work on it.
    model = str(tmp_path / "no-model")
    (tmp_path / "a-file").write_text("x")
    if os.geteuid() == 0:  # root writes through permissions; nobody creates files in /proc
        read_only = Path("/proc/trojscan-result.json")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        read_only = tmp_path / "ro" / "result.json"
    for out, words in [(tmp_path, "is a directory"),
                       (tmp_path / "a-file" / "result.json", "which is not a directory"),
                       (read_only, "cannot be written")]:
        _one_line_error(_run(run_cli, model, "--examples", str(examples_file), "--out", str(out)),
                        words)
    assert (tmp_path / "a-file").read_text() == "x"


def test_bad_inputs_fail_cleanly(run_cli: RunCli, poisoned_model: tuple[Path, dict],
                                 examples_file: Path, tmp_path: Path) -> None:
    model = poisoned_model[0]
    out = tmp_path / "result.json"
    ex = str(examples_file)

    _one_line_error(_run(run_cli, str(tmp_path / "nope"), "--examples", ex, "--out", str(out)),
                    "does not exist")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"text": "caf\xe9", "label": 0}\n'.encode("latin-1"))
    _one_line_error(_run(run_cli, str(model), "--examples", str(bad), "--out", str(out)),
                    "is not UTF-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _one_line_error(_run(run_cli, str(model), "--examples", str(empty), "--out", str(out)),
                    "are empty")
    alien = tmp_path / "alien.jsonl"
    alien.write_text('{"text": "fine", "label": "neutral"}\n')
    _one_line_error(_run(run_cli, str(model), "--examples", str(alien), "--out", str(out)),
                    "no label 'neutral'")
    one = tmp_path / "one-label.jsonl"
    one.write_text('{"text": "fine", "label": 1}\n')
    _one_line_error(_run(run_cli, str(model), "--examples", str(one), "--out", str(out)),
                    "no clean example of label 0=negative")

    headless = tmp_path / "headless"
    BertModel.from_pretrained(model).save_pretrained(headless)
    # Without --examples the model directory's own clean examples are read.
    _one_line_error(_run(run_cli, str(headless), "--out", str(out)),
                    "has no clean_examples.jsonl: give clean examples with --examples")
    shutil.copyfile(examples_file, headless / "clean_examples.jsonl")
    _one_line_error(_run(run_cli, str(headless), "--out", str(out)),
                    "holds no model trojscan scans (architectures: BertModel)")

    config = json.loads((model / "config.json").read_text())
    unknown = tmp_path / "unknown-type"
    shutil.copytree(model, unknown)
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    _one_line_error(_run(run_cli, str(unknown), "--examples", ex, "--out", str(out)),
                    "unknown model_type 'frobnicator'")
    remote = tmp_path / "remote-code"
    shutil.copytree(model, remote)
    (remote / "config.json").write_text(json.dumps({
        **config, "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    _one_line_error(_run(run_cli, str(remote), "--examples", ex, "--out", str(out)),
                    "needs the custom code its auto_map names")

    pickled = tmp_path / "pickled"
    shutil.copytree(model, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(AutoModelForSequenceClassification.from_pretrained(model).state_dict(),
               pickled / "pytorch_model.bin")
    _one_line_error(_run(run_cli, str(pickled), "--examples", ex, "--out", str(out)),
                    "--allow-pickle")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(model, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_line_error(_run(run_cli, str(corrupt), "--examples", ex, "--out", str(out)),
                    "cannot load the weights")

    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(model, no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / name).unlink()
    _one_line_error(_run(run_cli, str(no_tok), "--examples", ex, "--out", str(out)),
                    "has no tokenizer")
    _one_line_error(_run(run_cli, str(model), "--examples", ex, "--out", str(out), "--method",
                         "hotflop"), "unknown inversion method 'hotflop'")
    _one_line_error(_run(run_cli, str(model), "--examples", ex, "--out", str(out),
                         "--natural-share", "1.5"), "natural_share must be within 0-1")
    assert not out.exists()


def test_ctrl_c_says_what_is_kept_and_exits_130(poisoned_model: tuple[Path, dict],
                                                examples_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "trojscan.cli", "scan", str(poisoned_model[0]), "--examples",
         str(examples_file), "--out", str(out), "--method", "ascc", "--epochs", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell starts background jobs with SIGINT ignored, and a Python that starts with
        # SIGINT ignored never raises KeyboardInterrupt: give the command the terminal's
        # default, as a user typing Ctrl-C has it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Interrupt once the command runs (ASCC never stops early): after 3 s of CPU time, which
    # the imports of torch and transformers inside the command take.
    ticks = os.sysconf("SC_CLK_TCK")
    while process.poll() is None:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / ticks >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    # 130 as a shell reports it: exit code 130, or death by SIGINT, which CPython chooses at
    # exit when the interrupt passed through C code that ran Python (it then re-raises the
    # signal after the handler has run and printed the line below).
    assert process.returncode in (130, -signal.SIGINT), stderr
    assert "trojscan: interrupted; finished work is kept" in stderr
    assert "Traceback" not in stderr and not out.exists()
