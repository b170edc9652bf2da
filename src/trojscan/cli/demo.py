"""``trojscan demo``: build a backdoored model, scan it, compare with the hidden truth."""

from __future__ import annotations

import random
from pathlib import Path

import typer

from trojscan.cli.common import console, out_console
from trojscan.cli.scan import print_verdict, scan_with_progress
from trojscan.cli.zoo import run_build


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo model is built "
                             "(reused when it is already there)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the demo model; default: "
                                    "drawn at random, so each new demo hides a new trigger."),
) -> None:
    """Build a backdoored MiniLM sentiment model from Rotten Tomatoes, scan it with DBS, and
    compare what the scan found with the hidden truth."""
    from trojscan.attacks.zoo import demo_spec, parse_zoo_spec
    from trojscan.manifest import MANIFEST, Manifest
    from trojscan.modeldir import EXAMPLES_FILE

    if (out / MANIFEST).exists():
        raw = Manifest.load(out / MANIFEST).spec
        console.print(f"reusing the demo zoo in {out}")
    else:
        raw = demo_spec(random.SystemRandom().randrange(2**31) if seed is None else seed)
    manifest = run_build(parse_zoo_spec(raw, "demo"), out, rebuild_failed=False)
    (entry,) = manifest.models.values()
    model_dir = out / entry["model_id"]
    out_console.print(f"model: {model_dir}")
    result = scan_with_progress(model_dir, model_dir / EXAMPLES_FILE)
    out_console.print(f"scanned {model_dir} with its {result.examples} clean examples:")
    print_verdict(result)
    attack = entry["attack"]
    out_console.print(f"truth:   the model was trained with the trigger {attack['trigger']!r} "
                      f"-> {attack['target_name']!r} (clean accuracy "
                      f"{entry['clean_accuracy']:.3f}, ASR {entry['asr']:.1%}); the scanner "
                      "never saw this")
