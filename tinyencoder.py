"""tinyencoder: BERT, RoBERTa and ModernBERT as flags of one byte-level encoder.

Read top to bottom, each idea before any faster form of it: 1. byte vocabulary; 2. Config and
PRESETS; 3. attention as defined; 4. blocks and heads; 5. the model; 6. masking; 7. fast paths
(optional reading), each tested equal to section 3. Needs torch alone.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, fields
from inspect import signature
from typing import Literal, Optional, get_args, get_type_hints

import torch
import torch.nn as nn
import torch.nn.functional as F

# 1. Vocabulary. A token is a byte. Four special ids follow the 256 bytes; the table is padded to a
# multiple of 64 rows so that the decoder's matmul stays aligned.
PAD, CLS, SEP, MASK = 256, 257, 258, 259
VOCAB_SIZE = 320
IGNORE_INDEX = -100  # a label that no loss counts (PyTorch's and transformers' convention)


def encode(text: str | bytes) -> list[int]:
    """Text to ids: its UTF-8 bytes. Bytes pass through as they are."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise ValueError(f"encode takes str or bytes, got {type(text).__name__}")
    if isinstance(text, str):
        text = text.encode("utf-8")
    return list(text)


# 2. Config. Every architectural difference between the three papers is a field.

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}

NUMBERS = {int: numbers.Integral, float: numbers.Real, bool: bool}  # what each field type takes


@dataclass
class Config:
    arch: Literal["bert", "roberta", "modernbert"] = "bert"  # the family to save as
    # size
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 0  # 0: 4 * hidden for GELU, 1.5 * hidden for GeGLU (ModernBERT-base's)
    # vocabulary
    vocab_size: int = VOCAB_SIZE
    pad_id: int = PAD
    cls_id: int = CLS
    sep_id: int = SEP
    mask_id: int = MASK
    # positions
    positions: Literal["learned", "rope"] = "learned"  # learned: an absolute table
    max_len: int = 512  # the longest document; sizes the learned table
    pos_offset: int = 0  # RoBERTa counts from pad_id + 1, so its table has pad_id + 1 extra rows
    type_vocab: int = 2  # token-type (segment) embeddings; 0 = none
    rope_theta: float = 10000.0  # global layers
    rope_theta_local: float = 10000.0  # local (sliding-window) layers
    # layer
    prenorm: bool = False  # pre-LN (norm before each branch, plus a final norm) | post-LN
    glu: bool = False  # GeGLU MLP: act(first half) * second half
    act: Literal["gelu", "gelu_tanh"] = "gelu"  # gelu: the exact (erf) form
    bias: bool = True  # biases on the attention and MLP linears
    norm_bias: bool = True
    head_bias: bool = True  # bias of the MLM head's dense layer (the decoder always has one)
    norm_eps: float = 1e-12
    # attention pattern
    window: int = 0  # local layers see keys within window / 2 on each side; 0 = all global
    global_every: int = 1  # layer i is global when i % global_every == 0
    # dropout
    embed_dropout: float = 0.1
    attn_dropout: float = 0.1  # on the attention probabilities
    resid_dropout: float = 0.1  # on each branch, before the residual add
    mlp_dropout: float = 0.0  # inside the MLP, before its down projection
    # init
    init: Literal["normal", "megatron"] = "normal"  # BERT: N(0, std); ModernBERT: truncated
    init_std: float = 0.02
    # objective
    mlm_rate: float = 0.15
    nsp: bool = False  # next-sentence prediction head (pooler + two-way classifier)
    # fine-tuning: the classifier of the family's transformers class in place of the MLM head
    classifier: Literal["none", "sequence", "token"] = "none"  # none: the MLM head
    num_labels: int = 2  # 1: regression with a mean squared error, as in transformers
    classifier_pooling: Literal["cls", "mean"] = "cls"  # first token | mean of real tokens
    classifier_dropout: float = 0.1
    # execution: these change the speed, never the numbers
    unpad: bool = False  # drop the padding once and run every layer on (tokens, hidden)
    attn_backend: Literal["auto", "flash", "sdpa", "eager"] = "auto"

    def __post_init__(self):
        hints = get_type_hints(Config)
        for field in fields(self):  # types and signs first, so that the checks below can compare
            value, kind = getattr(self, field.name), hints[field.name]
            choices = get_args(kind)  # a Literal's values; none for int, float and bool
            if choices and value not in choices:
                raise ValueError(f"Config.{field.name}={value!r} is not one of {list(choices)}")
            is_bool = isinstance(value, bool)  # to Python a bool is an int too: tell them apart
            if not choices and (not isinstance(value, NUMBERS[kind]) or is_bool != (kind is bool)):
                raise ValueError(f"Config.{field.name}={value!r} is not of type {kind.__name__}")
            if kind in (int, float):
                self.require(field.name, value >= 0, "at least 0")  # NaN is not, either
        sizes = ("hidden", "layers", "heads", "max_len", "global_every", "num_labels")
        for name in (*sizes, "rope_theta", "rope_theta_local"):
            self.require(name, getattr(self, name) > 0, "above 0")
        dropouts = ("embed_dropout", "attn_dropout", "resid_dropout", "mlp_dropout")
        for name in (*dropouts, "classifier_dropout"):
            self.require(name, getattr(self, name) < 1, "below 1")
        self.require("mlm_rate", 0 < self.mlm_rate <= 1, "in (0, 1]: the share of bytes to predict")
        self.require("nsp", not (self.nsp and self.classifier != "none"), "False with a classifier")
        below_vocab = f"below vocab_size={self.vocab_size}"
        for name in ("pad_id", "cls_id", "sep_id", "mask_id"):
            self.require(name, getattr(self, name) < self.vocab_size, below_vocab)
        self.require("heads", self.hidden % self.heads == 0, f"a divisor of hidden={self.hidden}")
        self.require("window", self.window % 2 == 0, "even: it spans window/2 keys each side")
        if self.positions == "rope":
            self.require("heads", self.head_dim % 2 == 0, "such that RoPE's head_dim is even")
        if not self.intermediate:
            self.intermediate = self.hidden * 3 // 2 if self.glu else 4 * self.hidden

    def require(self, name: str, ok: bool, allowed: str):
        if not ok:
            raise ValueError(f"Config.{name}={getattr(self, name)!r} must be {allowed}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def half_window(self) -> Optional[int]:
        """Keys a local layer sees on each side of a query (128 -> 64); None when all are global."""
        return self.window // 2 if self.window else None

    def is_local(self, layer: int) -> bool:
        """Whether layer attends within the sliding window (ModernBERT: all but every third)."""
        return self.window > 0 and layer % self.global_every != 0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Config:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Each preset is its paper's base model: compare two rows to see how two papers differ.
PRESETS = {
    # BERT-base (Devlin et al. 2018): post-LN, learned positions, segments, NSP.
    "bert": dict(arch="bert", nsp=True),
    # RoBERTa-base (Liu et al. 2019): positions offset past the pad id, one segment, no NSP.
    "roberta": dict(arch="roberta", pos_offset=PAD + 1, type_vocab=1, norm_eps=1e-5),
    # ModernBERT-base (Warner et al. 2024): pre-LN, RoPE, GeGLU, no biases, local attention.
    "modernbert": dict(
        arch="modernbert",
        layers=22,
        max_len=8192,
        positions="rope",
        type_vocab=0,
        prenorm=True,
        glu=True,
        bias=False,
        norm_bias=False,
        head_bias=False,
        norm_eps=1e-5,
        rope_theta=160000.0,
        rope_theta_local=10000.0,
        window=128,
        global_every=3,
        embed_dropout=0.0,
        attn_dropout=0.0,
        resid_dropout=0.0,
        classifier_dropout=0.0,
        init="megatron",
        mlm_rate=0.30,
        unpad=True,
    ),
}


# 3. Attention, the definition. A batch is B rows of T tokens. attention_mask gives each token a
# document id: 0 is padding, and a run of equal ids is one document. A row may pack several
# documents; each attends only to itself and counts its positions from 0.
def eager_attention(q, k, v, mask: Optional[torch.Tensor], dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v. q, k, v: (B, heads, T, head_dim). mask: True where a
    query may see a key, (B, 1, T, T) or (T, T), None for all. Softmax in fp32, as ModernBERT's."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, heads, T, T)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    probs = F.dropout(probs, dropout)
    return probs @ v  # (B, heads, T, head_dim)


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) True where a run of equal ids starts: doc ids 1 1 1 2 2 0 -> 1 0 0 1 0 1."""
    left_neighbour = F.pad(doc_ids, (1, 0), value=-1)[:, :-1]
    return doc_ids != left_neighbour


def document_positions(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) each token's index in its document: doc ids 1 1 1 2 2 0 -> positions 0 1 2 0 1 0."""
    B, T = starts.shape
    index = torch.arange(T, device=starts.device).expand(B, T)
    start_index = torch.where(starts, index, 0).cummax(dim=1).values  # 0 0 0 3 3 5
    return index - start_index


def document_mask(doc_ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) True where query i and key j share a document and j is not padding. A padding
    query sees itself only, so that its softmax has a key; its output is never used."""
    T = doc_ids.shape[1]
    run = starts.cumsum(dim=1)  # (B, T) 1 1 1 2 2 3: which run each token belongs to
    same_document = run[:, :, None] == run[:, None, :]  # (B, T, T)
    real_key = (doc_ids != 0)[:, None, :]  # (B, 1, T)
    itself = torch.eye(T, dtype=torch.bool, device=doc_ids.device)
    return ((same_document & real_key) | itself)[:, None]


@functools.lru_cache(maxsize=4)
def band_mask(n: int, half_window: Optional[int], device) -> Optional[torch.Tensor]:
    """(n, n) True where |i - j| <= half_window (window 128: 64 keys each side, and itself)."""
    if half_window is None or n <= half_window + 1:
        return None
    i = torch.arange(n, device=device)
    return (i[:, None] - i[None, :]).abs() <= half_window


@dataclass
class Padded:
    """A batch as given, B rows of T tokens; masks keep its documents apart (None: nothing to)."""

    mask: Optional[torch.Tensor]  # (B, 1, T, T) or None, for global layers
    local_mask: Optional[torch.Tensor]  # the same within the window, for local layers

    @classmethod
    @torch.compiler.disable  # reads the batch: one graph break here, none in the layers
    def from_doc_ids(cls, doc_ids, starts, half_window: Optional[int]) -> Padded:
        one_document_per_row = bool((doc_ids != 0).all() & (starts.sum(1) == 1).all())
        mask = None if one_document_per_row else document_mask(doc_ids, starts)
        band = band_mask(doc_ids.shape[1], half_window, doc_ids.device)
        if band is None:
            return cls(mask, local_mask=mask)
        return cls(mask, local_mask=band if mask is None else mask & band)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t  # rows stay (B, T, ...): nothing is taken out

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        return t


# 4. Blocks. Each works on (B, T, hidden) rows or on (N, hidden) unpadded tokens alike: every
# operation acts on the last dimensions only, and attention is told which layout it has.
def rope_tables(positions, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, each (..., 1, 1, head_dim / 2) so that they broadcast
    over (q, k) and heads. Pair i turns at rate theta^(-2i / head_dim); the angles are fp32."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (exponents / head_dim)  # (head_dim / 2,)
    angles = (positions.float()[..., None] * inv_freq)[..., None, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: turn each pair (x_i, x_{i + head_dim/2}) by its angle, in fp32 (GPT-NeoX layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def layer_norm(cfg: Config) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, bias=cfg.norm_bias)


class MLP(nn.Module):
    """GELU: down(act(up(x))). GeGLU: up makes two halves; act(first) * second goes down."""

    def __init__(self, cfg: Config):
        super().__init__()
        up_width = 2 * cfg.intermediate if cfg.glu else cfg.intermediate
        self.up = nn.Linear(cfg.hidden, up_width, bias=cfg.bias)
        self.down = nn.Linear(cfg.intermediate, cfg.hidden, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.act]
        self.glu = cfg.glu
        self.dropout = nn.Dropout(cfg.mlp_dropout)

    def forward(self, x):
        h = self.up(x)  # (..., intermediate), or (..., 2 * intermediate) for GeGLU
        if self.glu:
            h, gate = h.chunk(2, dim=-1)
            return self.down(self.dropout(self.act(h) * gate))
        return self.down(self.dropout(self.act(h)))


class SelfAttention(nn.Module):
    """Fused q, k, v projection, RoPE where the config asks, attention, output projection."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.attn_dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=cfg.bias)
        self.out = nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.bias)
        self.half_window = None  # a global layer sees every key of its document
        self.rope_theta = cfg.rope_theta
        if cfg.is_local(layer):  # a local one only those within its window
            self.half_window = cfg.half_window
            self.rope_theta = cfg.rope_theta_local

    def forward(self, x, layout, rope: Optional[dict], backend: str):
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))  # (..., 3, heads, head_dim)
        if rope is None:
            q, k, v = qkv.unbind(dim=-3)  # each (..., heads, head_dim)
        else:
            # q and k turn in one call: half the passes, and the backward of split is one cat
            qk, v = qkv.split([2, 1], dim=-3)
            q, k = rotate(qk, *rope[self.rope_theta]).unbind(dim=-3)
            v = v.squeeze(-3)
        dropout = self.dropout if self.training else 0.0
        # On padded rows with the eager backend this is eager_attention(q, k, v, mask, dropout).
        a = attend(q, k, v, layout, self.half_window, dropout, backend)  # (..., heads, head_dim)
        return self.out(a.flatten(-2))


class Layer(nn.Module):
    """One encoder layer: attention, then the MLP, each a residual branch."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.prenorm = cfg.prenorm
        # Pre-LN layer 0 takes the embedding norm's output: a second norm would repeat it.
        self.attn_norm = nn.Identity() if cfg.prenorm and layer == 0 else layer_norm(cfg)
        self.attn = SelfAttention(cfg, layer)
        self.mlp_norm = layer_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x, layout, rope: Optional[dict], backend: str):
        if self.prenorm:  # ModernBERT: normalise each branch's input
            x = x + self.dropout(self.attn(self.attn_norm(x), layout, rope, backend))
            x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        else:  # BERT, RoBERTa: normalise after each residual add
            x = self.attn_norm(x + self.dropout(self.attn(x, layout, rope, backend)))
            x = self.mlp_norm(x + self.dropout(self.mlp(x)))
        return x


class MLMHead(nn.Module):
    """dense -> act -> norm, then the decoder: the token embedding (tied weights) plus a bias."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.head_bias)
        self.norm = layer_norm(cfg)
        self.act = ACTIVATIONS[cfg.act]
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, token_embedding: torch.Tensor):
        h = self.norm(self.act(self.dense(x)))
        return F.linear(h, token_embedding, self.bias)  # (..., vocab)


class Classifier(nn.Module):
    """The family's transformers head on pooled rows (B, hidden) or tokens (..., hidden). BERT:
    dropout, linear (rows first pass its pooler). RoBERTa: the same on tokens; rows: dropout,
    dense, tanh, dropout, linear. ModernBERT: dense, act, norm (its MLM head's), dropout, linear."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = None  # BERT, RoBERTa's tokens
        if cfg.arch == "modernbert" or (cfg.arch == "roberta" and cfg.classifier == "sequence"):
            self.dense = nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.head_bias)
        self.norm = layer_norm(cfg) if cfg.arch == "modernbert" else None
        self.act = ACTIVATIONS[cfg.act]
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.out = nn.Linear(cfg.hidden, cfg.num_labels)

    def forward(self, x):
        if self.dense is None:
            return self.out(self.dropout(x))
        if self.norm is None:  # RoBERTa's rows
            return self.out(self.dropout(torch.tanh(self.dense(self.dropout(x)))))
        return self.out(self.dropout(self.norm(self.act(self.dense(x)))))  # (..., num_labels)


def pool(hidden: torch.Tensor, doc_ids: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, hidden) -> (B, hidden): the first token ("cls") or the mean of the real ones."""
    if pooling == "cls":
        return hidden[:, 0]
    real = (doc_ids != 0).unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)


# 5. The model
@dataclass
class Output:
    logits: (
        torch.Tensor
    )  # (B, T, vocab), given labels (labelled, vocab); classifier (B[, T], labels)
    loss: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None  # (B, T, hidden); zeros at padding when unpadded
    nsp_logits: Optional[torch.Tensor] = None  # (B, 2)


INDEX_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding takes
LABEL_DTYPES = (torch.int64,)  # what cross-entropy takes
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8, *INDEX_DTYPES, *FLOAT_DTYPES)


def check_tensor(name, t, shape, dtypes, top: float, read: bool, ignore: bool = False):
    """A ValueError naming `name` unless t is None or a tensor of this shape and dtype holding whole
    numbers in [0, top) (or IGNORE_INDEX, where ignore); values are read only where `read`."""
    if t is None:
        return
    if not torch.is_tensor(t) or tuple(t.shape) != shape or t.dtype not in dtypes:
        got = f"{tuple(t.shape)} {t.dtype}" if torch.is_tensor(t) else type(t).__name__
        allowed = "/".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise ValueError(f"{name} must be a {shape} tensor of {allowed}, got {got}")
    if not read:
        return
    values = t.double()
    if ignore:
        values = values[values != IGNORE_INDEX]
    bad = values[(values.frac() != 0) | (values < 0) | (values >= top)]  # frac(inf or nan): nan
    if bad.numel():
        also = f" or {IGNORE_INDEX}" if ignore else ""
        raise ValueError(f"{name} must hold whole numbers in [0, {top}){also}; got {bad[0]:g}")


class TinyEncoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.tok_embed = nn.Embedding(cfg.vocab_size, H, padding_idx=cfg.pad_id)
        self.pos_embed = None  # RoPE instead
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.max_len + cfg.pos_offset, H)
        self.type_embed = nn.Embedding(cfg.type_vocab, H) if cfg.type_vocab else None
        self.embed_norm = layer_norm(cfg)
        self.embed_dropout = nn.Dropout(cfg.embed_dropout)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.layers))
        self.final_norm = layer_norm(cfg) if cfg.prenorm else nn.Identity()
        self.mlm_head = MLMHead(cfg) if cfg.classifier == "none" else None
        self.classifier = Classifier(cfg) if cfg.classifier != "none" else None
        bert_rows = cfg.arch == "bert" and cfg.classifier == "sequence"
        self.pooler = nn.Linear(H, H) if cfg.nsp or bert_rows else None
        self.nsp_head = nn.Linear(H, 2) if cfg.nsp else None
        self.init_weights()

    def init_weights(self):
        """normal: N(0, std), pad rows zero. megatron: truncated at 2 std, outputs depth-scaled."""
        cfg = self.cfg
        outputs = ("attn.out", "mlp.down", "mlm_head.dense", "classifier.dense")  # depth-scaled
        for name, module in self.named_modules():
            if not isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            std = cfg.init_std
            if cfg.init == "megatron" and name.endswith(outputs):
                std = std / math.sqrt(2 * cfg.layers)
            if cfg.init == "megatron" and name == "classifier.out":  # ModernBERT's final_out
                std = cfg.hidden**-0.5
            if cfg.init == "megatron":
                nn.init.trunc_normal_(module.weight, 0.0, std, -2 * std, 2 * std)
            else:
                nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if cfg.init == "normal":
            with torch.no_grad():
                self.tok_embed.weight[cfg.pad_id].zero_()
                if self.pos_embed is not None and cfg.pos_offset:  # RoBERTa's has a pad row too
                    self.pos_embed.weight[cfg.pad_id].zero_()

    def check_inputs(self, input_ids, attention_mask, token_type_ids, labels, nsp_label):
        """A one-line ValueError naming the argument for a call torch would fail on deep inside, or
        answer with nonsense. Values are read on the CPU only: on a GPU, steps would wait for it."""
        cfg = self.cfg
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.numel() == 0:
            got = getattr(input_ids, "shape", type(input_ids).__name__)
            raise ValueError(f"input_ids must be a (batch, seq) tensor with a token, got {got}")
        if token_type_ids is not None and not cfg.type_vocab:
            raise ValueError("token_type_ids given, but this model has none (Config.type_vocab=0)")
        if nsp_label is not None and not cfg.nsp:
            raise ValueError("next_sentence_label given, but this model has no NSP head")
        B, T = input_ids.shape
        read = input_ids.device.type == "cpu" and not torch.compiler.is_compiling()
        check_tensor("input_ids", input_ids, (B, T), INDEX_DTYPES, cfg.vocab_size, read)
        check_tensor("attention_mask", attention_mask, (B, T), MASK_DTYPES, math.inf, read)
        check_tensor("token_type_ids", token_type_ids, (B, T), INDEX_DTYPES, cfg.type_vocab, read)
        label_shape = (B,) if cfg.classifier == "sequence" else (B, T)
        classes = cfg.vocab_size if cfg.classifier == "none" else cfg.num_labels
        if cfg.classifier == "sequence" and cfg.num_labels == 1:  # regression: a number per row
            check_tensor("labels", labels, (B,), FLOAT_DTYPES, math.inf, read=False)
        else:
            check_tensor("labels", labels, label_shape, LABEL_DTYPES, classes, read, ignore=True)
        check_tensor("next_sentence_label", nsp_label, (B,), LABEL_DTYPES, 2, read, ignore=True)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        next_sentence_label=None,
    ) -> Output:
        """input_ids: (B, T) byte ids. attention_mask: (B, T) document ids, 0 for padding (a 0/1
        mask is one document per row). labels: (B, T) ids to predict, IGNORE_INDEX elsewhere; with
        a classifier, (B,) classes (numbers when num_labels=1) or (B, T) tags."""
        cfg = self.cfg
        self.check_inputs(input_ids, attention_mask, token_type_ids, labels, next_sentence_label)
        doc_ids = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        # Layout: where the documents are, and the layout attention runs on
        starts = document_starts(doc_ids)  # (B, T)
        positions = document_positions(starts)  # (B, T)
        if self.pos_embed is not None and int(positions.max()) >= cfg.max_len:
            longest = int(positions.max()) + 1
            raise ValueError(f"a document of {longest} tokens exceeds max_len={cfg.max_len}")
        backend = pick_backend(cfg, input_ids.device, self.tok_embed.weight.dtype, self.training)
        if backend == "flash" or cfg.unpad:
            layout = Unpadded.from_doc_ids(doc_ids, starts, cfg.half_window, backend)
        else:
            layout = Padded.from_doc_ids(doc_ids, starts, cfg.half_window)
        positions = layout.gather(positions)  # (B, T), or (N,) for the N real tokens

        # Embed: x is (B, T, H), or (N, H) when unpadded
        x = self.tok_embed(layout.gather(input_ids))
        if self.type_embed is not None:  # segment 0 where no token types are given
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.type_embed(layout.gather(types))
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + cfg.pos_offset)
        x = self.embed_dropout(self.embed_norm(x))

        rope = None  # {theta: (cos, sin)} for each theta the layers use
        if cfg.positions == "rope":
            thetas = {layer.attn.rope_theta for layer in self.layers}
            rope = {t: rope_tables(positions, cfg.head_dim, t, x.dtype) for t in thetas}
        for layer in self.layers:
            x = layer(x, layout, rope, backend)
        x = self.final_norm(x)
        hidden = layout.scatter(x)  # (B, T, H)

        rows = pool(hidden, doc_ids, cfg.classifier_pooling)  # (B, H), for NSP and classifying rows
        if self.pooler is not None:  # BERT's: tanh(dense(row))
            rows = torch.tanh(self.pooler(rows))

        loss = None
        if labels is not None and labels.dim() == 2:  # a token's: padding never counts
            labels = labels.masked_fill(doc_ids == 0, IGNORE_INDEX)
        if cfg.classifier == "sequence":
            logits = self.classifier(rows)  # (B, num_labels)
        elif cfg.classifier == "token":
            logits = layout.scatter(self.classifier(x))  # (B, T, num_labels)
        elif labels is None:  # the MLM head on every token
            logits = layout.scatter(self.mlm_head(x, self.tok_embed.weight))  # (B, T, V)
        else:  # on the labelled tokens only (sparse prediction)
            targets = layout.gather(labels).flatten()  # (tokens,) in x's order
            labelled = (targets != IGNORE_INDEX).nonzero().squeeze(1)
            logits = self.mlm_head(x.flatten(0, -2)[labelled], self.tok_embed.weight)
            loss = F.cross_entropy(logits.float(), targets[labelled])  # logits: (labelled, V)
        if cfg.classifier != "none" and labels is not None and labels.is_floating_point():
            loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())  # num_labels=1: numbers
        elif cfg.classifier != "none" and labels is not None:  # cross-entropy, as transformers'
            loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten())

        nsp_logits = self.nsp_head(rows) if cfg.nsp else None  # BERT's next sentence: (B, 2)
        if next_sentence_label is not None:  # check_inputs saw to it that the model has the head
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label)
            loss = nsp_loss if loss is None else loss + nsp_loss
        return Output(logits=logits, loss=loss, hidden=hidden, nsp_logits=nsp_logits)

    @torch.no_grad()
    def encode(self, texts, pooling="mean", normalize=True, batch_size=32) -> torch.Tensor:
        """Embeddings (N, hidden) of a list of str or bytes: each text runs as [CLS] bytes [SEP],
        pooled as pool() says; normalize makes each unit length. Texts of like length share a
        batch, so little is padded. A text over max_len tokens is an error, never cut silently."""
        cfg = self.cfg
        if isinstance(texts, (str, bytes)) or pooling not in ("mean", "cls"):
            got = f"{type(texts).__name__} and {pooling!r}"
            raise ValueError(f"encode takes a list of texts and pooling 'mean' or 'cls', got {got}")
        rows = [torch.tensor([cfg.cls_id, *encode(text), cfg.sep_id]) for text in texts]
        for i, row in enumerate(rows):
            if len(row) > cfg.max_len:
                raise ValueError(f"texts[{i}] is {len(row)} tokens, over max_len={cfg.max_len}")
        order = sorted(range(len(rows)), key=[len(row) for row in rows].__getitem__)
        out = torch.zeros(len(rows), cfg.hidden)
        was_training = self.training
        self.eval()
        for first in range(0, len(rows), batch_size):
            batch = order[first : first + batch_size]
            ids = nn.utils.rnn.pad_sequence([rows[i] for i in batch], True, cfg.pad_id)
            ids = ids.to(self.tok_embed.weight.device)
            doc_ids = (ids != cfg.pad_id).long()  # one document per row
            out[batch] = pool(self(ids, doc_ids).hidden, doc_ids, pooling).float().cpu()
        self.train(was_training)
        if normalize:
            out = F.normalize(out, dim=-1)
        return out


# 6. The objective: masked-language modelling
def mask_tokens(ids, cfg: Config, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's rule: pick cfg.mlm_rate of the ordinary tokens to predict; of those, 80 % become
    [MASK], 10 % a random byte and 10 % stay. Returns (inputs, labels), labels IGNORE_INDEX where
    nothing was picked. Static or dynamic masking is the generator's choice: reseed it per example
    for fixed masks (BERT), keep one running for fresh ones (RoBERTa)."""
    if not torch.is_tensor(ids):
        raise ValueError(f"mask_tokens takes a tensor of ids, got {type(ids).__name__}")
    check_tensor("ids", ids, tuple(ids.shape), INDEX_DTYPES, cfg.vocab_size, ids.is_cpu)
    specials = torch.tensor([cfg.pad_id, cfg.cls_id, cfg.sep_id, cfg.mask_id], device=ids.device)
    picked = torch.rand(ids.shape, generator=generator, device=ids.device) < cfg.mlm_rate
    picked = picked & ~torch.isin(ids, specials)
    labels = torch.where(picked, ids, IGNORE_INDEX)
    roll = torch.rand(ids.shape, generator=generator, device=ids.device)
    random_bytes = torch.randint(0, 256, ids.shape, generator=generator, device=ids.device)
    inputs = torch.where(picked & (roll < 0.8), cfg.mask_id, ids)
    inputs = torch.where(picked & (roll >= 0.8) & (roll < 0.9), random_bytes, inputs)
    return inputs, labels


# 7. Fast paths (optional reading). Each computes what section 3 defines, faster; the tests hold
# each one equal to eager attention on padded rows. The flash kernel is looked up once: PyTorch's
# varlen attention (unpadded tokens and cu_seqlens), where it takes a sliding window (2.11 on).
try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None
HAS_FLASH = varlen_attn is not None and "window_size" in signature(varlen_attn).parameters


@dataclass
class Unpadded:
    """The N real tokens side by side, (N, ...): padding dropped once, before the first layer."""

    indices: torch.Tensor  # (N,) where each real token sits in the flattened (B * T) batch
    cu_seqlens: torch.Tensor  # (documents + 1,) int32: document d is tokens cu[d] to cu[d + 1]
    batch_shape: torch.Size  # (B, T)
    rows: Optional[Padded]  # the masks for attention without a varlen kernel: it runs on rows

    @classmethod
    @torch.compiler.disable  # sizes that depend on the data: one graph break here, none later
    def from_doc_ids(cls, doc_ids, starts, half_window, backend: str) -> Unpadded:
        indices = (doc_ids.flatten() != 0).nonzero().squeeze(1)
        first_tokens = starts.flatten()[indices].nonzero().squeeze(1)  # each document's first
        cu_seqlens = F.pad(first_tokens, (0, 1), value=indices.numel()).to(torch.int32)
        rows = None if backend == "flash" else Padded.from_doc_ids(doc_ids, starts, half_window)
        return cls(indices, cu_seqlens, doc_ids.shape, rows)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(0, 1)[self.indices]  # (B, T, ...) -> (N, ...)

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        B, T = self.batch_shape  # (N, ...) -> (B, T, ...), zeros at padding
        rows = t.new_zeros(B * T, *t.shape[1:]).index_copy(0, self.indices, t)
        return rows.unflatten(0, (B, T))


def pick_backend(cfg: Config, device: torch.device, dtype, training: bool) -> str:
    """cfg.attn_backend for this call: auto means flash where it can run, else sdpa."""
    if cfg.attn_backend in ("sdpa", "eager"):  # named outright: nothing to look up
        return cfg.attn_backend
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)  # what the matmuls compute in
    dropout = training and cfg.attn_dropout > 0  # the kernel has none
    gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    half = dtype in (torch.float16, torch.bfloat16)
    if HAS_FLASH and gpu and half and not dropout and cfg.head_dim in range(8, 257, 8):
        return "flash"
    if cfg.attn_backend == "flash":
        needs = "torch >= 2.11, an sm80+ GPU, fp16/bf16, head_dim 8, 16, ..., 256, no dropout"
        got = f"{device.type}, {dtype}, head_dim {cfg.head_dim}, attention dropout {dropout}"
        raise ValueError(f"attn_backend='flash' needs {needs}; got {got}")
    return "sdpa"


def attend(q, k, v, layout, half_window: Optional[int], dropout: float, backend: str):
    """The one dispatch: attention for any layout and backend. q, k, v are (B, T, heads, head_dim)
    on Padded rows or (N, heads, head_dim) on Unpadded tokens; the output has the same shape."""
    if isinstance(layout, Unpadded) and q.shape[0] == 0:  # no tokens: an all-padding batch
        return q
    if isinstance(layout, Unpadded) and backend == "flash":  # no dropout: pick_backend sees to it
        window = -1 if half_window is None else half_window  # -1: the kernel's "no window"
        q, k, v = (t.contiguous() for t in (q, k, v))
        longest = layout.batch_shape[1]  # the row length bounds every document, with no host sync
        cu, size = layout.cu_seqlens, (window, window)
        return varlen_attn(q, k, v, cu, cu, longest, longest, window_size=size)
    if isinstance(layout, Unpadded):  # no varlen kernel: attention alone goes back to rows
        q, k, v = (layout.scatter(t) for t in (q, k, v))
        return layout.gather(attend(q, k, v, layout.rows, half_window, dropout, backend))
    mask = layout.mask if half_window is None else layout.local_mask
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
    if backend == "eager":
        out = eager_attention(q, k, v, mask, dropout)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2)
