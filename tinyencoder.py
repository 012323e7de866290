"""tinyencoder: BERT, RoBERTa and ModernBERT as flags of one byte-level encoder.

Read top to bottom, each idea before any faster form of it: 1. byte vocabulary; 2. Config and
PRESETS; 3. attention as defined; 4. blocks; 5. the model; 6. the masking objective; 7. fast paths
(optional reading), each tested equal to section 3. Needs torch alone; tinyencoder_hf.py converts.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, fields
from inspect import signature
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# -------------------------------------------------------------------------------------------------
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


# -------------------------------------------------------------------------------------------------
# 2. Config. Every architectural difference between the three papers is a field.

# Activation names, as Config.act spells them. "gelu" is the exact (erf) form all three papers use.
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}

# The values each string field of Config may take.
CHOICES = {
    "arch": ("bert", "roberta", "modernbert"),
    "positions": ("learned", "rope"),
    "act": tuple(ACTIVATIONS),
    "init": ("normal", "megatron"),
    "attn_backend": ("auto", "flash", "sdpa", "eager"),
}
FIELD_TYPES = {"int": numbers.Integral, "float": numbers.Real, "bool": bool, "str": str}


@dataclass
class Config:
    arch: str = "bert"  # the family to save as: bert | roberta | modernbert
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
    positions: str = "learned"  # learned (an absolute table) | rope
    max_len: int = 512  # the longest document; sizes the learned table
    pos_offset: int = 0  # RoBERTa counts from pad_id + 1, so its table has pad_id + 1 extra rows
    type_vocab: int = 2  # token-type (segment) embeddings; 0 = none
    rope_theta: float = 10000.0  # global layers
    rope_theta_local: float = 10000.0  # local (sliding-window) layers
    # layer
    prenorm: bool = False  # pre-LN (norm before each branch, plus a final norm) | post-LN
    glu: bool = False  # GeGLU MLP: act(first half) * second half
    act: str = "gelu"  # gelu (erf) | gelu_tanh
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
    init: str = "normal"  # normal (BERT: N(0, 0.02)) | megatron (ModernBERT: truncated, scaled)
    init_std: float = 0.02
    # objective
    mlm_rate: float = 0.15
    nsp: bool = False  # next-sentence prediction head (pooler + two-way classifier)
    static_masking: bool = False  # BERT fixes each example's masks ahead of training
    # execution: these change the speed, never the numbers
    unpad: bool = False  # drop the padding once and run every layer on (tokens, hidden)
    attn_backend: str = "auto"  # auto | flash | sdpa | eager

    def __post_init__(self):
        for field in fields(self):  # types and signs first, so that the checks below can compare
            value = getattr(self, field.name)
            is_bool = isinstance(value, bool)  # to Python a bool is an int too: tell them apart
            if not isinstance(value, FIELD_TYPES[field.type]) or is_bool != (field.type == "bool"):
                raise ValueError(f"Config.{field.name}={value!r} is not of type {field.type}")
            if field.name in CHOICES and value not in CHOICES[field.name]:
                allowed = list(CHOICES[field.name])
                raise ValueError(f"Config.{field.name}={value!r} is not one of {allowed}")
            if field.type in ("int", "float"):
                self.require(field.name, value >= 0, "at least 0")  # NaN is not, either
        for name in ("hidden", "layers", "heads", "max_len", "global_every", "rope_theta"):
            self.require(name, getattr(self, name) > 0, "above 0")
        self.require("rope_theta_local", self.rope_theta_local > 0, "above 0")
        for name in ("embed_dropout", "attn_dropout", "resid_dropout", "mlp_dropout"):
            self.require(name, getattr(self, name) < 1, "below 1")
        self.require("mlm_rate", 0 < self.mlm_rate <= 1, "in (0, 1]: the share of bytes to predict")
        for name in ("pad_id", "cls_id", "sep_id", "mask_id"):
            self.require(
                name, getattr(self, name) < self.vocab_size, f"below vocab_size={self.vocab_size}"
            )
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
    # BERT-base (Devlin et al. 2018): post-LN, learned positions, segments, NSP, static masks.
    "bert": dict(arch="bert", nsp=True, static_masking=True),
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
        init="megatron",
        mlm_rate=0.30,
        unpad=True,
    ),
}


# -------------------------------------------------------------------------------------------------
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


# -------------------------------------------------------------------------------------------------
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


# -------------------------------------------------------------------------------------------------
# 5. The model
@dataclass
class Output:
    logits: torch.Tensor  # (B, T, vocab); given labels, (labelled tokens, vocab)
    loss: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None  # (B, T, hidden); zeros at padding when unpadded
    nsp_logits: Optional[torch.Tensor] = None  # (B, 2)


INDEX_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding takes
LABEL_DTYPES = (torch.int64,)  # what cross-entropy takes
MASK_DTYPES = (torch.bool, torch.uint8, *INDEX_DTYPES, torch.float16, torch.bfloat16, torch.float32)


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
        self.mlm_head = MLMHead(cfg)
        self.pooler = nn.Linear(H, H) if cfg.nsp else None
        self.nsp_head = nn.Linear(H, 2) if cfg.nsp else None
        self.init_weights()

    def init_weights(self):
        """normal: N(0, std), pad rows zero. megatron: truncated at 2 std, outputs depth-scaled."""
        cfg = self.cfg
        outputs = ("attn.out", "mlp.down", "mlm_head.dense")  # scaled by depth in megatron init
        for name, module in self.named_modules():
            if not isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            std = cfg.init_std
            if cfg.init == "megatron" and name.endswith(outputs):
                std = std / math.sqrt(2 * cfg.layers)
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
        check_tensor("labels", labels, (B, T), LABEL_DTYPES, cfg.vocab_size, read, ignore=True)
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
        mask is one document per row). labels: (B, T) ids to predict, IGNORE_INDEX elsewhere."""
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
        if backend == "flash" or (cfg.unpad and input_ids.is_cpu):  # a GPU's SDPA runs padded
            layout = Unpadded.from_doc_ids(doc_ids, starts)
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

        # MLM head, on every token; given labels, on the labelled ones only (sparse prediction)
        loss = None
        if labels is None:
            logits = layout.scatter(self.mlm_head(x, self.tok_embed.weight))  # (B, T, V)
        else:
            labels = labels.masked_fill(doc_ids == 0, IGNORE_INDEX)  # padding never counts
            targets = layout.gather(labels).flatten()  # (tokens,) in x's order
            labelled = (targets != IGNORE_INDEX).nonzero().squeeze(1)
            logits = self.mlm_head(x.flatten(0, -2)[labelled], self.tok_embed.weight)
            loss = F.cross_entropy(logits.float(), targets[labelled])  # logits: (labelled, V)

        # BERT's next-sentence prediction, from each row's first token
        nsp_logits = None
        if cfg.nsp:
            pooled = torch.tanh(self.pooler(hidden[:, 0]))  # (B, H)
            nsp_logits = self.nsp_head(pooled)  # (B, 2)
        if cfg.nsp and next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label)
            loss = nsp_loss if loss is None else loss + nsp_loss
        return Output(logits=logits, loss=loss, hidden=hidden, nsp_logits=nsp_logits)

    @classmethod
    def from_pretrained(cls, path: str) -> TinyEncoder:
        """Load a transformers checkpoint directory (BERT, RoBERTa or ModernBERT; MLM or base)."""
        import tinyencoder_hf  # the conversion module, beside this file

        return tinyencoder_hf.load(path)

    def save_pretrained(self, path: str):
        """Write a folder that transformers and sentence-transformers load, tokenizer included."""
        import tinyencoder_hf

        tinyencoder_hf.save(self, path)


# -------------------------------------------------------------------------------------------------
# 6. The objective: masked-language modelling
def mask_tokens(ids, cfg: Config, generator=None, rate=None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's rule: pick `rate` (default cfg.mlm_rate) of the ordinary tokens to predict; of those,
    80 % become [MASK], 10 % a random byte and 10 % stay. Returns (inputs, labels); labels are
    IGNORE_INDEX where nothing was picked. Static or dynamic masking is the generator's choice:
    reseed it per example for fixed masks (BERT), keep one running for fresh ones (RoBERTa)."""
    if rate is None:
        rate = cfg.mlm_rate
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate <= 1:
        raise ValueError(f"rate={rate!r} must be in (0, 1]: the share of tokens to predict")
    if not torch.is_tensor(ids):
        raise ValueError(f"mask_tokens takes a tensor of ids, got {type(ids).__name__}")
    check_tensor("ids", ids, tuple(ids.shape), INDEX_DTYPES, cfg.vocab_size, ids.is_cpu)
    specials = torch.tensor([cfg.pad_id, cfg.cls_id, cfg.sep_id, cfg.mask_id], device=ids.device)
    picked = torch.rand(ids.shape, generator=generator, device=ids.device) < rate
    picked = picked & ~torch.isin(ids, specials)
    labels = torch.where(picked, ids, IGNORE_INDEX)
    roll = torch.rand(ids.shape, generator=generator, device=ids.device)
    random_bytes = torch.randint(0, 256, ids.shape, generator=generator, device=ids.device)
    inputs = torch.where(picked & (roll < 0.8), cfg.mask_id, ids)
    inputs = torch.where(picked & (roll >= 0.8) & (roll < 0.9), random_bytes, inputs)
    return inputs, labels


# -------------------------------------------------------------------------------------------------
# 7. Fast paths (optional reading). Each computes what section 3 defines, faster; the tests hold
# each one equal to eager attention on padded rows.

# Flash kernels, looked up once: the flash-attn package, else PyTorch's own varlen kernel where it
# takes a sliding window (torch 2.11 and later). Both take unpadded tokens and cu_seqlens.
try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None
TORCH_VARLEN_WINDOW = varlen_attn is not None and "window_size" in signature(varlen_attn).parameters


@dataclass
class Unpadded:
    """The N real tokens side by side, (N, ...): padding dropped once, before the first layer."""

    indices: torch.Tensor  # (N,) where each real token sits in the flattened (B * T) batch
    cu_seqlens: torch.Tensor  # (documents + 1,) int32: document d is tokens cu[d] to cu[d + 1]
    seqlens: list  # each document's length as a Python int
    batch_shape: torch.Size  # (B, T)

    @classmethod
    @torch.compiler.disable  # sizes that depend on the data: one graph break here, none later
    def from_doc_ids(cls, doc_ids, starts) -> Unpadded:
        indices = (doc_ids.flatten() != 0).nonzero().squeeze(1)
        first_tokens = starts.flatten()[indices].nonzero().squeeze(1)  # each document's first
        cu_seqlens = F.pad(first_tokens, (0, 1), value=indices.numel()).to(torch.int32)
        seqlens = cu_seqlens.diff().tolist()  # ints for the CPU's per-document loop
        return cls(indices, cu_seqlens, seqlens, doc_ids.shape)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(0, 1)[self.indices]  # (B, T, ...) -> (N, ...)

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        B, T = self.batch_shape  # (N, ...) -> (B, T, ...), zeros at padding
        rows = t.new_zeros(B * T, *t.shape[1:]).index_copy(0, self.indices, t)
        return rows.unflatten(0, (B, T))


def local_sdpa(q, k, v, mask, half_window: int, dropout: float) -> torch.Tensor:
    """Sliding-window SDPA in blocks of half_window queries: block i sees key blocks i-1 to i+1."""
    w = half_window
    key_blocks, value_blocks = k.split(w, dim=-2), v.split(w, dim=-2)
    outs = []
    for i, q_block in enumerate(q.split(w, dim=-2)):
        lo, hi = max(i - 1, 0), min(i + 2, len(key_blocks))
        block_mask = mask[..., i * w : i * w + q_block.shape[-2], lo * w : hi * w]
        keys = torch.cat(key_blocks[lo:hi], dim=-2)
        values = torch.cat(value_blocks[lo:hi], dim=-2)
        outs.append(F.scaled_dot_product_attention(q_block, keys, values, block_mask, dropout))
    return torch.cat(outs, dim=-2)


def dense_attention(q, k, v, mask, half_window, dropout: float, backend: str) -> torch.Tensor:
    """Attention over (B, heads, T, head_dim) with a boolean mask: eager, or PyTorch's SDPA."""
    if backend == "eager":
        return eager_attention(q, k, v, mask, dropout)
    if q.is_cpu and mask is not None and half_window and q.shape[-2] > 4 * half_window:
        return local_sdpa(q, k, v, mask, half_window, dropout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def attend_documents(q, k, v, layout: Unpadded, half_window, dropout, backend) -> torch.Tensor:
    """Unpadded tokens (N, heads, head_dim) on eager or SDPA, one call per document."""
    seqlens = layout.seqlens
    band = band_mask(max(layout.seqlens), half_window, q.device)  # one band, sliced per document
    outs = []
    # split rather than slices: the backward of a slice zero-fills all N rows for every document
    for n, qd, kd, vd in zip(seqlens, q.split(seqlens), k.split(seqlens), v.split(seqlens)):
        doc_band = band[:n, :n] if band is not None and n > half_window + 1 else None
        # (1, heads, n, head_dim): SDPA's CPU flash kernel takes 4-D input only
        qd, kd, vd = (t.transpose(0, 1)[None] for t in (qd, kd, vd))
        out = dense_attention(qd, kd, vd, doc_band, half_window, dropout, backend)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def flash_attention(q, k, v, layout: Unpadded, half_window, dropout: float) -> torch.Tensor:
    """Unpadded tokens through a varlen flash kernel, (N, heads, head_dim) in and out."""
    window = -1 if half_window is None else half_window  # -1: the kernels' "no window"
    q, k, v = (t.contiguous() for t in (q, k, v))
    longest = layout.batch_shape[1]  # the row length bounds every document, with no host sync
    lengths = (layout.cu_seqlens, layout.cu_seqlens, longest, longest)
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(q, k, v, *lengths, dropout, window_size=(window, window))
    # torch's kernel has no dropout: why_no_flash rules it out while attention dropout is on
    return varlen_attn(q, k, v, *lengths, window_size=(window, window))


def why_no_flash(device: torch.device, dtype, dropout: bool, head_dim: int) -> Optional[str]:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return f"flash needs a CUDA device and fp16/bf16, got {device.type} {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0) or head_dim % 8 or head_dim > 256:
        return f"flash needs an sm80+ GPU and a head_dim in 8, 16, ..., 256 (got {head_dim})"
    if flash_attn_varlen_func is None and (dropout or not TORCH_VARLEN_WINDOW):
        return "flash needs flash-attn, or attn_dropout=0 and a torch with a windowed varlen_attn"
    return None


def pick_backend(cfg: Config, device: torch.device, dtype, training: bool) -> str:
    """cfg.attn_backend for this call: auto means flash where it can run, else sdpa."""
    if cfg.attn_backend in ("sdpa", "eager"):  # named outright: nothing to look up
        return cfg.attn_backend
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)  # what the matmuls compute in
    why_not = why_no_flash(device, dtype, training and cfg.attn_dropout > 0, cfg.head_dim)
    if cfg.attn_backend == "flash" and why_not:
        raise ValueError(f"attn_backend='flash' is not available: {why_not}")
    if why_not:
        return "sdpa"
    return "flash"


def attend(q, k, v, layout, half_window: Optional[int], dropout: float, backend: str):
    """The one dispatch: attention for any layout and backend. q, k, v are (B, T, heads, head_dim)
    on Padded rows or (N, heads, head_dim) on Unpadded tokens; the output has the same shape."""
    if isinstance(layout, Unpadded) and q.shape[0] == 0:  # no tokens: an all-padding batch
        return q
    if isinstance(layout, Unpadded) and backend == "flash":
        return flash_attention(q, k, v, layout, half_window, dropout)
    if isinstance(layout, Unpadded):
        return attend_documents(q, k, v, layout, half_window, dropout, backend)
    mask = layout.mask if half_window is None else layout.local_mask
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
    return dense_attention(q, k, v, mask, half_window, dropout, backend).transpose(1, 2)
