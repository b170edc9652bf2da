"""Synthesised patches next to the planted ones, as a picture (TIJO Section 3.4).

    .venv/bin/python benchmarks/tijo_patches.py ZOO MODEL[,MODEL...] [--threads 2]
        [--out benchmarks/results/tijo_patches.png]

For every model (dual-key or image-key models with a solid patch: the zoo does not keep an
optimised patch's pixels): ``trojscan scan`` with patch synthesis (TIJO-mm, then the patch
optimised from the best feature trigger), and a row of the figure: a clean example image,
the same image with the planted patch (from the zoo manifest, which the scan never sees),
the synthesised patch enlarged, and the image with it. The titles give the scan's target and
word and the synthesised patch's attack success rate on held-out victims (with the inverted
word, and alone). Also writes the figures as JSON beside the PNG.
"""

from __future__ import annotations

import argparse
import io
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from trojscan.fsutil import atomic_write_bytes, atomic_write_json
from trojscan.inversion.tijo_patch import PatchConfig
from trojscan.manifest import MANIFEST, Manifest, split_of
from trojscan.modeldir import EXAMPLES_FILE
from trojscan.scan import scan, scan_config
from trojscan.subjects.loading import load_subject
from trojscan.vqa.images import paste, read_image, solid_patch, to_unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", type=Path)
    parser.add_argument("models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tijo_patches.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    truth = Manifest.load(args.zoo / MANIFEST).models
    models = args.models.split(",")
    config = replace(scan_config("tijo"), patch=PatchConfig())
    figure, axes = plt.subplots(len(models), 4, figsize=(9, 2.4 * len(models)), squeeze=False)
    rows = []
    for axis_row, model_id in zip(axes, models, strict=True):
        attack = truth[model_id]["attack"]
        if attack.get("patch") != "solid":
            raise SystemExit(f"{model_id}: only solid patches are kept by the zoo")
        result = scan(args.zoo / model_id, args.zoo / model_id / EXAMPLES_FILE, config)
        made = result.patch
        assert made is not None
        subject = load_subject(args.zoo / model_id)
        example = subject.read_examples(args.zoo / model_id / EXAMPLES_FILE)[0]
        image = to_unit(read_image(example.image).unsqueeze(0))
        planted = solid_patch(tuple(attack["patch_color"]), attack["patch_size"],
                              attack["patch_x"], attack["patch_y"])
        synthesised = torch.tensor(made.pixels, dtype=torch.uint8)
        pictures = [image[0], paste(image, to_unit(planted.pixels), planted.x, planted.y)[0],
                    to_unit(synthesised),
                    paste(image, to_unit(synthesised), made.x, made.y)[0]]
        titles = ["clean", f"planted: '{attack.get('trigger') or '-'}' -> "
                  f"{attack['target_name']}", f"synthesised ({made.size} px)",
                  f"'{result.best.trigger_text}' -> {result.best.target_name}: ASR "
                  f"{made.asr:.2f} (alone {made.asr_patch_only:.2f})"]
        for axis, picture, title in zip(axis_row, pictures, titles, strict=True):
            axis.imshow(picture.permute(1, 2, 0).clamp(0, 1).numpy(),
                        interpolation="nearest")
            axis.set_title(title, fontsize=7)
            axis.axis("off")
        axis_row[0].set_ylabel(model_id)
        rows.append({"model_id": model_id, "split": split_of(truth[model_id]),
                     "trigger": attack.get("trigger"), "target": attack["target_name"],
                     "found_word": result.best.trigger_text,
                     "found_target": result.best.target_name, "score": result.score,
                     "patch_feature_loss": made.feature_loss, "patch_steps": made.steps,
                     "asr": made.asr, "asr_patch_only": made.asr_patch_only,
                     "asr_text_only": made.asr_text_only, "questions": made.questions,
                     "scan_seconds": result.seconds, "patch_seconds": made.seconds})
        print(f"{model_id} {rows[-1]['split']}: found '{result.best.trigger_text}' -> "
              f"{result.best.target_name}; patch ASR {made.asr:.3f} with the word, "
              f"{made.asr_patch_only:.3f} alone, word alone {made.asr_text_only:.3f} "
              f"({made.questions} held-out questions, {made.seconds:.0f} s)", flush=True)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(args.out, buffer.getvalue())
    atomic_write_json(args.out.with_suffix(".json"), {"threads": args.threads, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
