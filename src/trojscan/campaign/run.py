"""Campaign runs: scan every model of a zoo, one result file per model, resumable.

A zoo is any folder of model directories (each with its ``clean_examples.jsonl``); a zoo
manifest is never read here, so no ground truth can reach the scans. Results go to
``RESULTS_DIR/models/<model_id>.json`` (the scan record) or, for a model whose scan failed,
``RESULTS_DIR/models/<model_id>.error.json`` (the error), each written atomically as soon as
that model is done. ``RESULTS_DIR/campaign.json`` holds the settings; a re-run with the same
settings scans only the models that have neither file, so a campaign killed at any moment
resumes without redoing or losing a finished model.

Two executors run the scans, each model in a worker process of its own:

* ``local``: a pool of ``workers`` processes on this machine, the cores shared among them;
* ``ray``: one Ray task per model, declaring the CPUs (and GPU) it needs
  (:func:`ray_options`), results gathered as tasks finish, each with the id of the node that
  ran it. ``ray.init()`` starts a local runtime unless ``address`` names a cluster. A task
  whose worker process or node dies is run again, up to :data:`RAY_MAX_RETRIES` times; one
  that still fails (or that Ray cannot run at all) is recorded as the model's error, so no
  model is lost.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from trojscan.errors import InputError
from trojscan.fsutil import atomic_write_json
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.scan import ScanConfig, write_patch

CAMPAIGN_FILE = "campaign.json"
MODELS_DIR = "models"
CAMPAIGN_VERSION = 1
EXECUTORS = ("local", "ray")
ERROR_SUFFIX = ".error.json"
#: A VQA model's synthesised patch (``--patch``) is written beside its result as ID + this.
PATCH_SUFFIX = ".patch.png"

#: Times Ray runs a model's task again when the worker process or node running it dies (a
#: scan that raises is not retried: :func:`scan_one` returns that as the model's error).
RAY_MAX_RETRIES = 2

#: Called as (model id, "ok" or "error", models done, models in all) after each model.
CampaignCallback = Callable[[str, str, int, int], None]


@dataclass(frozen=True)
class CampaignConfig:
    """How a campaign runs.

    Attributes:
        scan: the scan settings, the same for every model (the inverter included).
        device: ``cpu`` or ``cuda[:N]``.
        allow_pickle: also load pickled weights (runs code from the files: trusted zoos only).
        workers: models scanned at once (processes for ``local``; tasks in flight are
            bounded by Ray's resources for ``ray``).
        executor: ``local`` or ``ray``.
        address: the Ray cluster to join (``ray`` only); None starts a local runtime.
        cpus_per_model: CPU threads (and Ray CPUs) per model; 0 = this machine's cores
            divided among the workers.
        retry_errors: scan again the models whose earlier scan failed.
        references: clean reference models; each model's short triggers are also measured
            on the one with its labels, if any (:func:`trojscan.scan.scan`).
    """

    scan: ScanConfig = field(default_factory=ScanConfig)
    device: str = "cpu"
    allow_pickle: bool = False
    workers: int = 1
    executor: str = "local"
    address: str | None = None
    cpus_per_model: int = 0
    retry_errors: bool = False
    references: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise InputError(f"unknown executor {self.executor!r}; expected local or ray")
        if self.workers < 1 or self.cpus_per_model < 0:
            raise InputError("workers must be >= 1 and cpus_per_model >= 0")
        if self.address and self.executor != "ray":
            raise InputError("--address joins a Ray cluster; it needs --executor ray")

    @property
    def threads(self) -> int:
        """CPU threads each model's scan uses."""
        return self.cpus_per_model or max(1, (os.cpu_count() or 1) // self.workers)

    def record(self, zoo: Path) -> CampaignRecord:
        """The campaign record of this campaign over ``zoo``: what must match for it to
        resume (the method and what it computes)."""
        return CampaignRecord(version=CAMPAIGN_VERSION, zoo=str(Path(zoo).resolve()),
                              method=self.scan.method, scan=asdict(self.scan),
                              device=self.device,
                              references=list(self.references) if self.references else None)


@dataclass
class CampaignRecord:
    """What ``campaign.json`` in a results directory holds (its JSON Schema:
    :func:`json_schema`, published as ``trojscan/schemas/campaign.schema.json``).

    Attributes:
        version: the format version (:data:`CAMPAIGN_VERSION`).
        zoo: the zoo scanned, as an absolute path.
        method: the trigger inverter every model was scanned with.
        scan: the scan settings (:class:`trojscan.scan.ScanConfig` as a dict), the same for
            every model.
        device: where the scans ran (``cpu``, ``cuda[:N]``).
        references: the clean reference models, when any were given.
    """

    version: int
    zoo: str
    method: str
    scan: dict[str, Any]
    device: str
    references: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``references`` left out when there are none."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a campaign record, generated from :class:`CampaignRecord`."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(CampaignRecord).json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def discover(zoo: Path) -> list[str]:
    """Model ids of a zoo: its sub-directories, hidden ones (builds in progress) excluded."""
    if not zoo.is_dir():
        raise InputError(f"zoo {zoo} is not a directory")
    ids = sorted(p.name for p in zoo.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not ids:
        raise InputError(f"zoo {zoo} holds no model directories")
    return ids


def select(ids: list[str], only: Sequence[str] | None) -> list[str]:
    """``ids`` restricted to ``only`` (all when None); an id the zoo lacks is an error."""
    if only is None:
        return ids
    unknown = sorted(set(only) - set(ids))
    if unknown:
        raise InputError(f"the zoo has no model {unknown[0]!r}")
    return [m for m in ids if m in set(only)]


def result_path(results: Path, model_id: str, error: bool = False) -> Path:
    """Where a model's result (or error) lives in a results directory."""
    return results / MODELS_DIR / f"{model_id}{ERROR_SUFFIX if error else '.json'}"


def scan_one(model_dir: str, config: CampaignConfig) -> dict[str, Any]:
    """Scan one model (in a worker): ``{"ok": ScanResult}`` or ``{"error": message}``."""
    import torch

    from trojscan.scan import scan

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    try:
        result = scan(Path(model_dir), Path(model_dir) / EXAMPLES_FILE, config.scan,
                      config.device, config.allow_pickle,
                      references=[Path(p) for p in config.references], reference_required=False)
    except InputError as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - started}
    except Exception as exc:  # a broken model must not end the campaign
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - started}
    return {"ok": result}


def ray_options(config: CampaignConfig) -> dict[str, Any]:
    """The options of each model's Ray task: the CPUs its scan's threads use
    (``cpus_per_model``), one GPU for a ``cuda`` device, and the retries of a task whose worker
    or node dies."""
    return {"num_cpus": config.threads,
            "num_gpus": 1 if config.device.startswith("cuda") else 0,
            "max_retries": RAY_MAX_RETRIES}


def scan_on_node(model_dir: str, config: CampaignConfig) -> dict[str, Any]:
    """A model's Ray task: :func:`scan_one` on the node Ray chose, its outcome with that node's
    id (``node``)."""
    import ray

    if config.device.startswith("cuda"):  # Ray shows the task the one GPU it gave it, as cuda:0
        config = replace(config, device="cuda")
    return {**scan_one(model_dir, config), "node": ray.get_runtime_context().get_node_id()}


def _ray_failure(exc: Exception) -> str:
    """The error recorded for a model whose Ray task failed outside the scan."""
    import ray.exceptions

    lines = str(exc).strip().splitlines()
    what = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    if isinstance(exc, ray.exceptions.RayTaskError):
        return f"the Ray task raised {what}"
    return (f"the Ray task failed ({what}); a task whose worker process or node dies is run "
            f"{1 + RAY_MAX_RETRIES} times at most")


def _open(results: Path, zoo: Path, config: CampaignConfig) -> None:
    """Create the results directory, or check that it holds this same campaign."""
    path = results / CAMPAIGN_FILE
    # as it reads back from the file
    mine = json.loads(json.dumps(config.record(zoo).to_dict()))
    if path.exists():
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path} is unreadable ({exc}); use a new --out") from exc
        if {k: theirs.get(k) for k in mine} != mine:
            raise InputError(f"{results} holds a campaign of another zoo or with other "
                             "settings; resume it with the same ones or use a new --out")
    else:
        atomic_write_json(path, mine)
    (results / MODELS_DIR).mkdir(parents=True, exist_ok=True)


def _record(results: Path, model_id: str, outcome: dict[str, Any]) -> str:
    """Write a finished model's file; returns ``ok`` or ``error``."""
    if "ok" in outcome:
        result = replace(outcome["ok"], model_id=model_id, node=outcome.get("node"))
        if result.patch is not None:
            result = write_patch(result, results / MODELS_DIR / f"{model_id}{PATCH_SUFFIX}")
        atomic_write_json(result_path(results, model_id), result.to_dict())
        result_path(results, model_id, error=True).unlink(missing_ok=True)
        return "ok"
    atomic_write_json(result_path(results, model_id, error=True),
                      {"model_id": model_id, "error": outcome["error"],
                       "seconds": outcome["seconds"],
                       **({"node": outcome["node"]} if outcome.get("node") else {})})
    return "error"


def pending(results: Path, ids: list[str], retry_errors: bool) -> list[str]:
    """The models still to scan."""
    def finished(model_id: str) -> bool:
        return result_path(results, model_id).exists() or (
            not retry_errors and result_path(results, model_id, error=True).exists())
    return [m for m in ids if not finished(m)]


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker as soon as the campaign process that started it
    is gone (killed, even with SIGKILL), instead of scanning on for nobody."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _local(zoo: Path, todo: list[str],
           config: CampaignConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    with ProcessPoolExecutor(config.workers, mp_context=get_context("spawn"),
                             initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        running = {pool.submit(scan_one, str(zoo / m), config): m for m in todo}
        try:
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield running.pop(future), future.result()
        finally:
            for future in running:
                future.cancel()


def _ray(zoo: Path, todo: list[str],
         config: CampaignConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    import ray
    import ray.exceptions

    started_here = not ray.is_initialized()
    if started_here:
        if config.address:
            ray.init(address=config.address, log_to_driver=False)
        else:
            ray.init(num_cpus=config.workers * config.threads, include_dashboard=False,
                     log_to_driver=False)
    task = ray.remote(**ray_options(config))(scan_on_node)
    # Absolute paths: a task's worker, maybe on another machine, has a working directory of its own.
    remote = replace(config, references=tuple(str(Path(p).resolve()) for p in config.references))
    submitted = time.perf_counter()
    running = {task.remote(str((zoo / m).resolve()), remote): m for m in todo}
    try:
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                model_id = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:  # retries spent, or Ray could not run it
                    outcome = {"error": _ray_failure(exc),  # seconds since submission:
                               "seconds": time.perf_counter() - submitted}  # queueing included
                yield model_id, outcome
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def run_campaign(zoo: Path, results: Path, config: CampaignConfig | None = None,
                 on_model: CampaignCallback | None = None,
                 only: Sequence[str] | None = None) -> dict[str, int]:
    """Scan every model of ``zoo`` (or the ids in ``only``) not yet done into ``results``;
    returns counts of ``scanned``, ``errors`` (this run), ``skipped`` (done earlier) and
    ``total``."""
    config = config or CampaignConfig()
    zoo, results = Path(zoo), Path(results)
    ids = select(discover(zoo), only)
    if results.resolve() == zoo.resolve() or zoo.resolve() in results.resolve().parents:
        raise InputError(f"--out {results} lies inside the zoo {zoo}; write results elsewhere")
    _open(results, zoo, config)
    todo = pending(results, ids, config.retry_errors)
    counts = {"scanned": 0, "errors": 0, "skipped": len(ids) - len(todo), "total": len(ids)}
    executor = _ray if config.executor == "ray" else _local
    for model_id, outcome in executor(zoo, todo, config) if todo else ():
        status = _record(results, model_id, outcome)
        counts["scanned" if status == "ok" else "errors"] += 1
        if on_model:
            on_model(model_id, status, counts["skipped"] + counts["scanned"] + counts["errors"],
                     len(ids))
    return counts


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
