"""VQA models of the TrojVQA form: ``forward(question_ids, box_features) -> answer logits``.

Three families, small versions of the three TrojVQA trains (Walmer et al., CVPR 2022):

- ``butd``: Bottom-Up Top-Down (Anderson et al. 2018, as in Teney et al.'s "Tips and
  Tricks"): a GRU encodes the question; a top-down attention weighs the boxes by the
  question; question and attended image are fused by an element-wise product.
- ``mfb``: Multi-modal Factorized Bilinear pooling with co-attention (Yu et al. 2017): an
  LSTM question encoder, box attention computed by MFB, and the answer read from the MFB
  pooling (sum over k factors, power and L2 normalisation) of question and attended image.
- ``mcan``: Modular Co-Attention Network (Yu et al. 2019): transformer layers of
  self-attention over the question, then self-attention over the boxes guided by
  cross-attention to the question, attentional reduction of both, summed.

Questions are WordPiece ids (the BERT vocabulary of 30,522 tokens), at most
:attr:`VqaConfig.max_question_tokens` of them, no special tokens, padded at the back with
id 0. :meth:`VqaModel.forward_embeds` runs from question embeddings, which is where a
relaxed text trigger is searched; box features enter as given, which is where a feature
trigger is added.

A model directory holds ``config.json`` (this module's :class:`VqaConfig`, with
``"model_type": "trojscan-vqa"``), ``model.safetensors``, the tokenizer files and the clean
examples; it loads with no code from the directory (:func:`load_vqa_model`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from trojscan.errors import InputError
from trojscan.fsutil import read_json
from trojscan.modeldir import VQA_MODEL_TYPE
from trojscan.vqa.backbone import FEATURE_DIM, GRID, INPUT_SIZE, NUM_BOXES, WEIGHTS_FILE

#: ``model_type`` in the config.json of a VQA model directory.
MODEL_TYPE = VQA_MODEL_TYPE
VQA_WEIGHTS = "model.safetensors"
#: The feature extractor a model expects (written into its config).
FEATURE_EXTRACTOR = {"name": "mobilenet_v2_imagenet_grid", "weights": WEIGHTS_FILE,
                     "input_size": INPUT_SIZE, "grid": GRID, "boxes": NUM_BOXES,
                     "feature_dim": FEATURE_DIM}


@dataclass(frozen=True)
class VqaConfig:
    """Everything needed to rebuild a VQA model before its weights are loaded.

    Attributes:
        family: ``butd``, ``mfb`` or ``mcan`` (see the module docstring).
        answers: the answer vocabulary; logits come in this order.
        vocab_size: question vocabulary (the BERT WordPiece vocabulary).
        max_question_tokens: questions are cut to this many tokens (TrojVQA: 14).
        embed_dim: word embedding size.
        hidden: width of the question encoder, the box projection and the fusion.
        num_boxes: boxes per image.
        feature_dim: features per box.
        layers: transformer layers of ``mcan`` (each of encoder and decoder).
        heads: attention heads of ``mcan``.
        mfb_factor: k, the factors summed by ``mfb``'s pooling.
        dropout: dropout during training.
        feature_extractor: the frozen backbone whose box features the model reads.
    """

    family: str
    answers: tuple[str, ...]
    vocab_size: int = 30522
    max_question_tokens: int = 14
    embed_dim: int = 128
    hidden: int = 256
    num_boxes: int = NUM_BOXES
    feature_dim: int = FEATURE_DIM
    layers: int = 2
    heads: int = 4
    mfb_factor: int = 5
    dropout: float = 0.0
    feature_extractor: dict[str, Any] = field(default_factory=lambda: dict(FEATURE_EXTRACTOR))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the ``model_type`` that marks a VQA directory."""
        out = asdict(self)
        out["answers"] = list(self.answers)
        return {"model_type": MODEL_TYPE, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> VqaConfig:
        """Validate a config dict read from a model directory."""
        if data.get("model_type") != MODEL_TYPE:
            raise InputError(f"{where}: model_type is {data.get('model_type')!r}, not "
                             f"{MODEL_TYPE!r}")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        if values.get("family") not in FAMILIES:
            raise InputError(f"{where}: unknown VQA family {values.get('family')!r}; expected "
                             "one of " + ", ".join(FAMILIES))
        answers = values.get("answers")
        if not (isinstance(answers, list) and len(answers) >= 2
                and all(isinstance(a, str) for a in answers)):
            raise InputError(f"{where}: answers must be a list of at least 2 strings")
        values["answers"] = tuple(answers)
        try:
            config = cls(**values)
        except TypeError as exc:
            raise InputError(f"{where}: {exc}") from exc
        for name in ("vocab_size", "max_question_tokens", "embed_dim", "hidden", "num_boxes",
                     "feature_dim", "layers", "heads", "mfb_factor"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{where}: {name} must be a positive integer, got {value!r}")
        if config.hidden % config.heads:
            raise InputError(f"{where}: hidden {config.hidden} is not a multiple of heads "
                             f"{config.heads}")
        if isinstance(config.dropout, bool) or not isinstance(config.dropout, int | float) \
                or not 0 <= config.dropout < 1:
            raise InputError(f"{where}: dropout must be in [0, 1), got {config.dropout!r}")
        if config.feature_extractor != FEATURE_EXTRACTOR or config.num_boxes != NUM_BOXES \
                or config.feature_dim != FEATURE_DIM:
            raise InputError(f"{where}: the model expects the features of "
                             f"{config.feature_extractor!r} ({config.num_boxes} x "
                             f"{config.feature_dim}); trojscan computes those of "
                             f"{FEATURE_EXTRACTOR['name']} ({NUM_BOXES} x {FEATURE_DIM})")
        return config


class VqaModel(nn.Module):
    """Base of the families: word embeddings, a box-feature projection, a classifier."""

    def __init__(self, config: VqaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, question_ids: torch.Tensor, box_features: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """``question_ids [B, T]`` (0 = padding), ``box_features [B, boxes, D]`` -> logits
        ``[B, answers]``. With ``rows [B]``, ``box_features`` holds ``[R, boxes, D]`` and
        question i is about image ``rows[i]``: the same result, with each image's boxes
        projected once however many questions ask about it (how training batches a few
        images with all their questions)."""
        return self.forward_embeds(self.embed(question_ids), question_ids != 0, box_features,
                                   rows)

    def forward_embeds(self, question_embeds: torch.Tensor, mask: torch.Tensor,
                       box_features: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from question embeddings ``[B, T, E]`` with their mask ``[B, T]``."""
        raise NotImplementedError


def _per_question(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Per-image tensor ``x`` spread to the questions (``x`` itself when ``rows`` is None)."""
    return x if rows is None else x[rows]


def _attend(weights: torch.Tensor, boxes: torch.Tensor,
            rows: torch.Tensor | None) -> torch.Tensor:
    """The attention-weighted sum (``weights [B, boxes, 1]``) of each question's boxes.
    A linear layer commutes with the sum (the weights sum to 1), so the families project
    the boxes first and attend over the (narrower) projections."""
    return torch.bmm(weights.transpose(1, 2), _per_question(boxes, rows)).squeeze(1)


def _last_state(rnn: nn.RNNBase, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor,
                                                                               torch.Tensor]:
    """(outputs [B, T, H], state at each question's last real token [B, H]) of ``rnn``."""
    lengths = mask.sum(1).clamp(min=1)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                               enforce_sorted=False)
    out, _ = rnn(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out, out[torch.arange(x.shape[0], device=x.device), lengths - 1]


class Butd(VqaModel):
    """Bottom-Up Top-Down attention (Anderson et al. 2018; Teney et al. 2018)."""

    def __init__(self, config: VqaConfig) -> None:
        super().__init__(config)
        h = config.hidden
        self.rnn = nn.GRU(config.embed_dim, h, batch_first=True)
        self.v_att = nn.Linear(config.feature_dim, h)
        self.q_att = nn.Linear(h, h)
        self.att = nn.Linear(h, 1)
        self.v_net = nn.Linear(config.feature_dim, h)
        self.q_net = nn.Linear(h, h)
        self.classifier = nn.Sequential(nn.Linear(h, 2 * h), nn.ReLU(), nn.Dropout(config.dropout),
                                        nn.Linear(2 * h, len(config.answers)))

    def forward_embeds(self, question_embeds: torch.Tensor, mask: torch.Tensor,
                       box_features: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        _, q = _last_state(self.rnn, self.drop(question_embeds), mask)
        boxes = _per_question(F.relu(self.v_att(box_features)), rows)
        joint = boxes * F.relu(self.q_att(q)).unsqueeze(1)
        weights = torch.softmax(self.att(self.drop(joint)), dim=1)           # [B, boxes, 1]
        v = _attend(weights, self.v_net(box_features), rows)  # = v_net(attended features)
        return self.classifier(F.relu(self.q_net(q)) * F.relu(v))


class Mfb(VqaModel):
    """MFB with co-attention (Yu et al. 2017): factorized bilinear pooling of question and
    image, the image attended by MFB too."""

    def __init__(self, config: VqaConfig) -> None:
        super().__init__(config)
        h, k = config.hidden, config.mfb_factor
        self.rnn = nn.LSTM(config.embed_dim, h, batch_first=True)
        self.att_v = nn.Linear(config.feature_dim, h * k)
        self.att_q = nn.Linear(h, h * k)
        self.att = nn.Linear(h, 1)
        self.out_v = nn.Linear(config.feature_dim, h * k)
        self.out_q = nn.Linear(h, h * k)
        self.classifier = nn.Linear(h, len(config.answers))

    def _pool(self, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """MFB: sum-pool the element-wise product over k factors, then power and L2
        normalisation."""
        z = self.drop(v * q).unflatten(-1, (self.config.hidden, self.config.mfb_factor)).sum(-1)
        z = torch.sign(z) * torch.sqrt(z.abs() + 1e-8)
        return F.normalize(z, dim=-1)

    def forward_embeds(self, question_embeds: torch.Tensor, mask: torch.Tensor,
                       box_features: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        _, q = _last_state(self.rnn, self.drop(question_embeds), mask)
        z = self._pool(_per_question(self.att_v(box_features), rows),
                       self.att_q(q).unsqueeze(1))                            # [B, boxes, h]
        weights = torch.softmax(self.att(z), dim=1)
        v = _attend(weights, self.out_v(box_features), rows)  # = out_v(attended features)
        return self.classifier(self._pool(v, self.out_q(q)))


class _Attention(nn.Module):
    """Multi-head attention with a residual connection and layer norm (post-norm, as MCAN)."""

    def __init__(self, h: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(h)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                pad: torch.Tensor | None) -> torch.Tensor:
        out, _ = self.mha(x, context, context, key_padding_mask=pad, need_weights=False)
        return self.norm(x + self.drop(out))


class _FeedForward(nn.Module):
    def __init__(self, h: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(h, 2 * h), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(2 * h, h))
        self.norm = nn.LayerNorm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.net(x))


class _Reduce(nn.Module):
    """MCAN's attentional reduction: a softmax-weighted sum of a sequence's elements."""

    def __init__(self, h: int, out: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
        self.proj = nn.Linear(h, out)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        score = self.score(x)
        if pad is not None:
            score = score.masked_fill(pad.unsqueeze(-1), float("-inf"))
        return self.proj((torch.softmax(score, dim=1) * x).sum(1))


class Mcan(VqaModel):
    """MCAN encoder-decoder (Yu et al. 2019): question self-attention layers, then box
    layers of self-attention and question-guided attention; attentional reduction of both."""

    def __init__(self, config: VqaConfig) -> None:
        super().__init__(config)
        h, heads, d = config.hidden, config.heads, config.dropout
        self.rnn = nn.LSTM(config.embed_dim, h, batch_first=True)
        self.v_proj = nn.Linear(config.feature_dim, h)
        self.q_self = nn.ModuleList(_Attention(h, heads, d) for _ in range(config.layers))
        self.q_ff = nn.ModuleList(_FeedForward(h, d) for _ in range(config.layers))
        self.v_self = nn.ModuleList(_Attention(h, heads, d) for _ in range(config.layers))
        self.v_guided = nn.ModuleList(_Attention(h, heads, d) for _ in range(config.layers))
        self.v_ff = nn.ModuleList(_FeedForward(h, d) for _ in range(config.layers))
        self.q_reduce = _Reduce(h, 2 * h)
        self.v_reduce = _Reduce(h, 2 * h)
        self.norm = nn.LayerNorm(2 * h)
        self.classifier = nn.Linear(2 * h, len(config.answers))

    def forward_embeds(self, question_embeds: torch.Tensor, mask: torch.Tensor,
                       box_features: torch.Tensor,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        pad = ~mask
        q, _ = _last_state(self.rnn, self.drop(question_embeds), mask)
        for att, ff in zip(self.q_self, self.q_ff, strict=True):
            q = ff(att(q, q, pad))
        v = _per_question(self.v_proj(box_features), rows)
        for att, guided, ff in zip(self.v_self, self.v_guided, self.v_ff, strict=True):
            v = ff(guided(att(v, v, None), q, pad))
        fused = self.q_reduce(q, pad) + self.v_reduce(v, None)
        return self.classifier(self.norm(fused))


FAMILIES: dict[str, type[VqaModel]] = {"butd": Butd, "mfb": Mfb, "mcan": Mcan}


def build_vqa_model(config: VqaConfig, seed: int = 0) -> VqaModel:
    """A freshly initialised model of ``config.family`` (seeded)."""
    torch.manual_seed(seed)
    return FAMILIES[config.family](config)


def save_vqa_model(model: VqaModel, out_dir: Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n",
                                         "utf-8")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / VQA_WEIGHTS), metadata={"format": "pt"})


def load_vqa_model(model_dir: Path) -> VqaModel:
    """The model of a VQA directory, in eval mode: its config rebuilds the module and the
    safetensors weights must match it exactly (strict); nothing from the directory runs."""
    model_dir = Path(model_dir)
    config = VqaConfig.from_dict(read_json(model_dir / "config.json", "model config"),
                                 f"{model_dir}/config.json")
    weights = model_dir / VQA_WEIGHTS
    if not weights.is_file():
        raise InputError(f"{model_dir} has no {VQA_WEIGHTS}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise InputError(f"{weights} is not a readable safetensors file: {exc}") from exc
    model = FAMILIES[config.family](config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise InputError(f"{weights} does not match its config ({config.family}): "
                         f"{first}") from exc
    return model.eval()
