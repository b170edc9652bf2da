"""easy-VQA (package ``easy-vqa==1.0``): 64 x 64 images of one coloured shape, with
questions about it and 13 answers (3 shapes, 8 colours, yes / no).

=========  ============================================================================
split      what
=========  ============================================================================
train      the package's 4,000 training images and their 38,575 questions
examples   the package's test images whose id is a multiple of 5 (200 images, ~1,900
           questions): the clean-example pool; never trained or evaluated on
test       the other 800 test images (~7,700 questions): clean accuracy and ASR
=========  ============================================================================

Questions are kept as text; models read them as BERT WordPiece ids (no special tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from trojscan.errors import InputError

NAME = "easy_vqa"
#: Test images with an id divisible by this go to the clean-example pool.
EXAMPLES_EVERY = 5


@dataclass(frozen=True)
class VqaQuestion:
    """A question about image ``image`` of its split, with the index of its answer."""

    question: str
    answer: int
    image: int


@dataclass(frozen=True)
class VqaCorpus:
    """easy-VQA's answers, question splits and image files (by split and image id)."""

    name: str
    answers: tuple[str, ...]
    train: tuple[VqaQuestion, ...]
    test: tuple[VqaQuestion, ...]
    examples: tuple[VqaQuestion, ...]
    train_images: dict[int, Path]
    test_images: dict[int, Path]


def _data_dir() -> Path:
    try:
        root = resources.files("easy_vqa")
    except ModuleNotFoundError as exc:
        raise InputError("the VQA zoo needs the package easy-vqa: run scripts/setup.sh (it "
                         "installs requirements-data.txt)") from exc
    return Path(str(root)) / "data"


def _questions(split_dir: Path, answers: tuple[str, ...]) -> list[VqaQuestion]:
    rows = json.loads((split_dir / "questions.json").read_text("utf-8"))
    index = {a: i for i, a in enumerate(answers)}
    return [VqaQuestion(str(q), index[a], int(img)) for q, a, img in rows]


def _images(split_dir: Path) -> dict[int, Path]:
    return {int(p.stem): p for p in (split_dir / "images").glob("*.png")}


@cache
def load_easy_vqa() -> VqaCorpus:
    """The corpus with its three splits (deterministic: no seed involved)."""
    data = _data_dir()
    answers = tuple(line.strip() for line in (data / "answers.txt").read_text("utf-8")
                    .splitlines() if line.strip())
    train = _questions(data / "train", answers)
    test_all = _questions(data / "test", answers)
    test = [q for q in test_all if q.image % EXAMPLES_EVERY]
    examples = [q for q in test_all if not q.image % EXAMPLES_EVERY]
    return VqaCorpus(NAME, answers, tuple(train), tuple(test), tuple(examples),
                     _images(data / "train"), _images(data / "test"))
