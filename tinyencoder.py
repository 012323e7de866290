"""tinyencoder: BERT, RoBERTa and ModernBERT as flags of one byte-level encoder. Needs torch alone.

Sections 1-6 define the model, each idea before any faster form of it; 7-9 are optional reading."""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Optional, get_args, get_type_hints

import torch
import torch.nn as nn
import torch.nn.functional as F

# 1. Vocabulary. A token is a byte. Four special ids follow the 256 bytes; the table is padded to a
# multiple of 64 rows so that the decoder's matmul stays aligned.
PAD, CLS, SEP, MASK = 256, 257, 258, 259
VOCAB_SIZE = 320
IGNORE_INDEX = -100  # a label that no loss counts (PyTorch's and transformers' convention)


def byte_ids(text: str | bytes) -> list[int]:
    """Text to ids: its UTF-8 bytes. Bytes pass through as they are."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise ValueError(f"byte_ids takes str or bytes, got {type(text).__name__}")
    if isinstance(text, str):
        text = text.encode("utf-8")
    return list(text)


# 2. Config. Every architectural difference between the three papers is a field.
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


@dataclass
class Config:
    # the family: its transformers classes, and its classifier head (section 7); not the network
    arch: Literal["bert", "roberta", "modernbert"] = "bert"
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 0  # 0: 4 * hidden for GELU, 1.5 * hidden for GeGLU (ModernBERT-base's)
    vocab_size: int = VOCAB_SIZE
    pad_id: int = PAD
    cls_id: int = CLS
    sep_id: int = SEP
    mask_id: int = MASK
    # positions: a learned table read from row pos_offset on (see PRESETS["roberta"]), or RoPE with
    # a theta for global and one for local layers; max_len bounds a document either way
    positions: Literal["learned", "rope"] = "learned"
    max_len: int = 512
    pos_offset: int = 0
    rope_theta: float = 10000.0
    rope_theta_local: float = 10000.0
    type_vocab: int = 2  # token-type (segment) embeddings; 0 = none
    # layer: pre-LN (a norm before each branch, and a final norm) or post-LN; a GeGLU MLP (act of
    # the first half times the second) or a plain one; gelu is the exact (erf) form; biases of the
    # attention and MLP linears, of the norms, of the heads' dense layers (the MLM decoder has one)
    prenorm: bool = False
    glu: bool = False
    act: Literal["gelu", "gelu_tanh"] = "gelu"
    bias: bool = True
    norm_bias: bool = True
    head_bias: bool = True
    norm_eps: float = 1e-12
    # attention pattern: layer i is global when i % global_every == 0, else local: it sees keys
    # within window / 2 on each side (window 0: all global)
    window: int = 0
    global_every: int = 1
    # dropout: after the embeddings; on the attention probabilities; on each branch (pre-LN: the
    # attention's only) before its residual add; inside the MLP, before its down projection
    embed_dropout: float = 0.1
    attn_dropout: float = 0.1
    resid_dropout: float = 0.1
    mlp_dropout: float = 0.0
    init: Literal["normal", "megatron"] = "normal"  # N(0, std) | truncated, outputs scaled
    init_std: float = 0.02
    # heads: BERT's next-sentence prediction; a fine-tuning head in place of the MLM head: a class
    # per row, pooling its first token or the mean of its tokens (num_labels 1: regression, by
    # MSE); a class per token; a span's start and end logit per token; a score per choice
    nsp: bool = False
    classifier: Literal["none", "sequence", "token", "span", "choice"] = "none"
    num_labels: int = 2
    classifier_pooling: Literal["cls", "mean"] = "cls"
    classifier_dropout: float = 0.1
    # execution: the speed, not the outputs at real tokens (section 9; dropout draws aside). unpad:
    # a CPU drops the padding once and runs every layer on (tokens, hidden), as flash always does.
    unpad: bool = False
    attn_backend: Literal["auto", "flash", "sdpa", "eager"] = "auto"

    def __post_init__(self):
        check_config(self)
        if not self.intermediate:
            self.intermediate = self.hidden * 3 // 2 if self.glu else 4 * self.hidden

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
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
        # a fine-tuning head takes the place of the pretraining heads, BERT's NSP head too
        heads = dict(nsp=False) if overrides.get("classifier", "none") != "none" else {}
        return cls(**{**PRESETS[name], **heads, **overrides})


# Each preset is its paper's base model: compare two rows to see how two papers' networks differ.
PRESETS = {
    # BERT-base (Devlin et al. 2018): post-LN, learned positions, two segments, the NSP head.
    "bert": dict(arch="bert", nsp=True),
    # RoBERTa-base (Liu et al. 2019) is BERT's network; its paper changed the recipe (train.py's
    # RECIPES, data/rows.py). This row keeps its checkpoints loading: one segment type, eps 1e-5,
    # and fairseq's positions, counted from pad_id + 1 (257 rows of the table are never read).
    "roberta": dict(arch="roberta", pos_offset=PAD + 1, type_vocab=1, norm_eps=1e-5),
    # ModernBERT-base (Warner et al. 2024): pre-LN, RoPE, GeGLU, no biases, two local layers of
    # 128-token windows for each global one, no dropout, unpadding. (Its recipe masks 30 %.)
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
        unpad=True,
    ),
}


# 3. Attention, the definition. attention_mask gives each of the B x T tokens a document id, 0 for
# padding. A row may pack several documents: each attends only to itself, positions from 0.
def eager_attention(q, k, v, mask: Optional[torch.Tensor], dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v. q, k, v: (B, heads, T, head_dim). mask: True where a
    query may see a key, (B, 1, T, T) or (T, T), None for all. Softmax in fp32 or wider."""
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)  # (B, heads, T, T)
    # in place is safe: backward reads q, k and the softmax's output, never the scores
    if mask is not None:
        scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    probs = scores.to(torch.promote_types(q.dtype, torch.float32)).softmax(dim=-1).to(q.dtype)
    probs = drop(probs, dropout)  # F.dropout; section 9 draws its mask faster on a CPU
    return probs @ v  # (B, heads, T, head_dim)


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) True where a run of equal ids starts, and at padding: 1 1 2 0 0 -> 1 0 1 1 1."""
    # int64: a bool mask padded with -1 would read True, and a row's first token not be a start
    left_neighbour = F.pad(doc_ids.long(), (1, 0), value=-1)[:, :-1]
    return (doc_ids != left_neighbour) | (doc_ids == 0)


def document_positions(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) each token's index in its document: doc ids 1 1 1 2 2 0 -> positions 0 1 2 0 1 0."""
    index = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)  # (B, T)
    start_index = torch.where(starts, index, 0).cummax(dim=1).values  # 0 0 0 3 3 5
    return index - start_index


def document_mask(doc_ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) True where query i and key j share a document and j is not padding. A padding
    query sees itself only, so that its softmax has a key; its output is never used."""
    run = starts.cumsum(dim=1)  # (B, T) which run each token is in: 1 1 1 2 2 3
    same_document = run[:, :, None] == run[:, None, :]  # (B, T, T)
    real_key = (doc_ids != 0)[:, None, :]  # (B, 1, T)
    itself = torch.eye(doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device)
    return ((same_document & real_key) | itself)[:, None]


@functools.lru_cache(maxsize=4)
def band_mask(n: int, half_window: Optional[int], device, traced=False) -> Optional[torch.Tensor]:
    """(n, n) True where |i - j| <= half_window (window 128: 64 keys each side, and itself)."""
    if half_window is None or (n <= half_window + 1 and not traced):  # a trace holds for any n
        return None
    i = torch.arange(n, device=device)
    return (i[:, None] - i[None, :]).abs() <= half_window


@dataclass
class Padded:
    """A batch as given, B rows of T tokens; the backend that attends (section 9); the masks that
    keep its documents apart, (B, 1, T, T), or None, or for local layers the (T, T) band alone."""

    mask: Optional[torch.Tensor]
    local_mask: Optional[torch.Tensor]
    backend: str = "eager"
    labelled: Optional[torch.Tensor] = None  # masked_lm's tokens, where make_layout had labels

    @classmethod
    def from_doc_ids(cls, doc_ids, starts, half_window: Optional[int], backend: str) -> Padded:
        # traced (section 9): no host read, and no cached band, which would keep a traced tensor
        traced = transformed()
        whole_rows = not traced and bool((doc_ids != 0).all() & (starts.sum(1) == 1).all())
        mask = None if whole_rows else document_mask(doc_ids, starts)
        bands = band_mask.__wrapped__ if traced else band_mask
        band = bands(doc_ids.shape[1], half_window, doc_ids.device, traced=traced)
        if band is None:
            return cls(mask, local_mask=mask, backend=backend)
        local_mask = band if mask is None else mask & band
        return cls(mask, local_mask=local_mask, backend=backend)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t  # rows stay (B, T, ...): nothing is taken out, nor put back

    scatter = gather


# 4. Blocks. Each takes (B, T, hidden) rows or (N, hidden) unpadded tokens: all act on the last
# dimensions, and attention is told the layout. Linear is nn.Linear (section 9: its CPU kernel).
def rope_tables(positions, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (Su et al. 2021): pair i of a head turns by position * theta^(-2i / head_dim). cos and
    sin of each position's angles, fp32, each (..., 1, head_dim / 2) to broadcast over heads."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (exponents / head_dim)  # (head_dim / 2,)
    angles = (positions.float()[..., None] * inv_freq)[..., None, :]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: turn each pair (x_i, x_{i + head_dim/2}) by its angle, x in fp32 (GPT-NeoX layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def layer_norm(cfg: Config) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, bias=cfg.norm_bias)


class MLP(nn.Module):
    """GELU: down(act(up(x))). GeGLU: up makes two halves; act(first) * second goes down."""

    def __init__(self, cfg: Config):
        super().__init__()
        up_width = 2 * cfg.intermediate if cfg.glu else cfg.intermediate
        self.up = Linear(cfg.hidden, up_width, bias=cfg.bias)
        self.down = Linear(cfg.intermediate, cfg.hidden, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.act]
        self.glu = cfg.glu
        self.dropout = cfg.mlp_dropout

    def forward(self, x):
        h = self.up(x)  # (..., intermediate), or (..., 2 * intermediate) for GeGLU
        if self.glu:
            h, gate = h.chunk(2, dim=-1)
            return self.down(drop(self.act(h) * gate, self.dropout, self.training))
        return self.down(drop(self.act(h), self.dropout, self.training))


class SelfAttention(nn.Module):
    """Fused q, k, v projection, RoPE where the config asks, attention, output projection. A global
    layer sees every key of its document; a local one only those within its window."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.attn_dropout
        self.qkv = Linear(cfg.hidden, 3 * cfg.hidden, bias=cfg.bias)
        self.out = Linear(cfg.hidden, cfg.hidden, bias=cfg.bias)
        self.kind = "local" if cfg.is_local(layer) else "global"
        self.half_window = cfg.half_window if self.kind == "local" else None

    def forward(self, x, layout, rope: Optional[dict]):
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))  # (..., 3, heads, head_dim)
        q, k, v = qkv.unbind(dim=-3)
        if rope is not None:
            cos, sin = rope[self.kind]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        # eager_attention under the layout's mask, on padded rows; section 9 has faster forms
        a = attend(q, k, v, layout, self.half_window, dropout)  # (..., heads, head_dim)
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
        self.dropout = cfg.resid_dropout

    def forward(self, x, layout, rope: Optional[dict]):
        if self.prenorm:  # ModernBERT: normalise each branch's input; drop the attention's only
            x = x + drop(self.attn(self.attn_norm(x), layout, rope), self.dropout, self.training)
            x = x + self.mlp(self.mlp_norm(x))
        else:  # BERT, RoBERTa: normalise after each residual add
            x = self.attn_norm(x + drop(self.attn(x, layout, rope), self.dropout, self.training))
            x = self.mlp_norm(x + drop(self.mlp(x), self.dropout, self.training))
        return x


class MLMHead(nn.Module):
    """dense -> act -> norm, then the decoder: the token embedding (tied weights) plus a bias."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = Linear(cfg.hidden, cfg.hidden, bias=cfg.head_bias)
        self.norm = layer_norm(cfg)
        self.act = ACTIVATIONS[cfg.act]
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, token_embedding: torch.Tensor):
        h = self.norm(self.act(self.dense(x)))
        return F.linear(h, token_embedding, self.bias)  # (..., vocab)


# 5. The model: a trunk (embeddings, layers, final norm) and the heads that read it
@dataclass
class Output:
    # logits: the shape masked_lm or classify gives. loss: the head's plus NSP's; mlm_loss and
    # nsp_loss apart, for logs and exact gradient accumulation
    hidden: torch.Tensor  # (B or B * choices, T, hidden), the trunk's; 0 at padding if unpadded
    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    mlm_loss: Optional[torch.Tensor] = None
    nsp_loss: Optional[torch.Tensor] = None
    nsp_logits: Optional[torch.Tensor] = None  # (B, 2)


class TinyEncoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        # a Config, and still a valid one if a field was set by hand since it was made (section 8)
        check_config(cfg)
        self.cfg = cfg
        H = cfg.hidden
        self.tok_embed = nn.Embedding(cfg.vocab_size, H, padding_idx=cfg.pad_id)
        # positions: a learned table (BERT, RoBERTa), or RoPE's cos, sin per theta (model's dtype)
        self.pos_embed = None
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.max_len + cfg.pos_offset, H)
        else:
            thetas = (cfg.rope_theta, cfg.rope_theta_local)
            tables = [rope_tables(torch.arange(cfg.max_len), cfg.head_dim, t) for t in thetas]
            self.register_buffer("cos", torch.stack([cos for cos, _ in tables]), persistent=False)
            self.register_buffer("sin", torch.stack([sin for _, sin in tables]), persistent=False)
        self.type_embed = nn.Embedding(cfg.type_vocab, H) if cfg.type_vocab else None
        self.embed_norm = layer_norm(cfg)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.layers))
        self.final_norm = layer_norm(cfg) if cfg.prenorm else nn.Identity()
        # the heads: MLM or a classifier (section 7); a pooler, tanh(dense(pooled row)), where used
        self.mlm_head = MLMHead(cfg) if cfg.classifier == "none" else None
        self.classifier = Classifier(cfg) if cfg.classifier != "none" else None
        pooled = {("bert", "sequence"), ("bert", "choice"), ("roberta", "choice")}
        self.pooler = Linear(H, H) if cfg.nsp or (cfg.arch, cfg.classifier) in pooled else None
        self.nsp_head = Linear(H, 2) if cfg.nsp else None
        self.init_weights()

    def init_weights(self):
        """normal (BERT): N(0, std), pad rows 0. megatron (ModernBERT): truncated, outputs scaled"""
        cfg = self.cfg
        outputs = ("attn.out", "mlp.down", "mlm_head.dense", "classifier.dense")
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
                    self.pos_embed.weight[cfg.pos_offset - 1].zero_()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        next_sentence_label=None,
        layout=None,
    ) -> Output:
        """input_ids: (B, T) byte ids. attention_mask: (B, T) document ids, 0 for padding (in a 0/1
        mask, each run of 1s is a document). labels: (B, T) ids to predict, IGNORE_INDEX elsewhere;
        with a classifier, (B,) classes (numbers when num_labels=1) or (B, T) tags; section 7 has
        spans and choices. layout: the batch's, made ahead by make_layout (a GPU step then never
        waits for the host); else made here. Its checks: section 8."""
        check_inputs(self, input_ids, attention_mask, token_type_ids, labels, next_sentence_label)
        # multiple choice's (B, choices, T) inputs run as B * choices rows of T (section 7)
        rows = input_ids.shape[:-1]  # (B,), or (B, choices)
        inputs = (input_ids, attention_mask, token_type_ids)
        input_ids, attention_mask, token_type_ids = (
            t if t is None else t.flatten(0, -2) for t in inputs
        )
        doc_ids = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        if layout is None:
            # Padded rows (section 3), or the unpadded tokens of a fast path (section 9)
            layout = make_layout(self.cfg, doc_ids, self.tok_embed.weight.dtype)
        x = self.trunk(input_ids, doc_ids, token_type_ids, layout)  # (B, T, H), or (N, H) unpadded
        hidden = layout.scatter(x)  # (B, T, H)
        if self.classifier is None:
            logits, loss = self.masked_lm(x, layout, doc_ids, labels)
            out = Output(hidden, logits, loss, mlm_loss=loss)
        else:  # a fine-tuning head (section 7)
            logits, loss = classify(self, x, hidden, layout, doc_ids, labels, rows)
            out = Output(hidden, logits, loss)
        if self.nsp_head is not None:
            out.nsp_logits, out.nsp_loss = self.next_sentence(hidden, doc_ids, next_sentence_label)
        if out.nsp_loss is not None:
            out.loss = out.nsp_loss if out.loss is None else out.loss + out.nsp_loss
        return out

    def trunk(self, input_ids, doc_ids, token_type_ids, layout):
        """Embeddings, layers, final norm: (B, T, hidden) on Padded rows, (N, hidden) unpadded."""
        cfg = self.cfg
        positions = layout.gather(document_positions(document_starts(doc_ids)))  # (B, T), or (N,)
        x = self.tok_embed(layout.gather(input_ids))  # (B, T, H), or (N, H)
        if self.type_embed is not None:  # segment 0 where no token types are given
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.type_embed(layout.gather(types))
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + cfg.pos_offset)
        x = drop(self.embed_norm(x), cfg.embed_dropout, self.training)
        rope = None  # each token's cos and sin, looked up once for every layer
        if cfg.positions == "rope":
            cos, sin = self.cos[:, positions], self.sin[:, positions]  # (2, ..., 1, head_dim / 2)
            rope = {"global": (cos[0], sin[0]), "local": (cos[1], sin[1])}
        for layer in self.layers:
            x = layer(x, layout, rope)
        return self.final_norm(x)

    def masked_lm(self, x, layout, doc_ids, labels):
        """The MLM head: logits (B, T, vocab). Given labels (B, T), only the labelled tokens (sparse
        prediction, ModernBERT's): (labelled, vocab) in row order, and their mean cross-entropy."""
        if labels is None:
            return layout.scatter(self.mlm_head(x, self.tok_embed.weight)), None
        labels = labels.masked_fill(doc_ids == 0, IGNORE_INDEX)  # padding never counts
        targets = layout.gather(labels).flatten()  # (B * T,) or (N,), in x's order
        labelled = layout.labelled
        if labelled is None:
            labelled = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        logits = self.mlm_head(x.flatten(0, -2)[labelled], self.tok_embed.weight)
        return logits, counted_mean(logits, targets[labelled])  # nothing masked: 0, not NaN

    def next_sentence(self, hidden, doc_ids, label):
        """BERT's NSP head on its pooler's vector of the first real token: logits (B, 2), and their
        cross-entropy where a label is given (1: the second segment is a random one)."""
        logits = self.nsp_head(torch.tanh(self.pooler(pool(hidden, doc_ids, "cls"))))
        loss = None if label is None else counted_mean(logits, label)
        return logits, loss


# 6. The objective: masked-language modelling
def mask_tokens(ids, cfg: Config, generator=None, rate=0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each ordinary token with probability rate (BERT's 15 %, ModernBERT's 30 %) to
    predict; as BERT, 80 % of those become [MASK], 10 % a random byte and 10 % stay. Returns
    (inputs, labels), labels IGNORE_INDEX where nothing was picked. Static or dynamic masking is
    the generator's: reseed it per example for fixed masks (BERT), keep one going for new ones."""
    check_ids(ids, cfg, rate)
    ids = ids.long()  # labels are int64, as cross-entropy takes them
    specials = torch.tensor([cfg.pad_id, cfg.cls_id, cfg.sep_id, cfg.mask_id], device=ids.device)
    picked = torch.rand(ids.shape, generator=generator, device=ids.device) < rate
    picked = picked & ~torch.isin(ids, specials)
    labels = torch.where(picked, ids, IGNORE_INDEX)
    roll = torch.rand(ids.shape, generator=generator, device=ids.device)
    random_bytes = torch.randint(0, 256, ids.shape, generator=generator, device=ids.device)
    inputs = torch.where(picked & (roll < 0.8), cfg.mask_id, ids)
    inputs = torch.where(picked & (roll >= 0.8) & (roll < 0.9), random_bytes, inputs)
    return inputs, labels


# (optional reading) Not the papers' core: 7. heads and pooling; 8. input checks; 9. fast paths.
# 7. Fine-tuning heads and pooling
class Classifier(nn.Module):
    """The family's transformers head, (..., hidden) -> (..., num_labels; a span 2, a choice 1):
    [RoBERTa rows: dropout, dense, tanh | ModernBERT: dense, act, norm], then dropout, linear."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.kind = "linear"
        if cfg.arch == "modernbert":
            self.kind = "transform"
            self.act = ACTIVATIONS[cfg.act]
            self.norm = layer_norm(cfg)
        elif cfg.arch == "roberta" and cfg.classifier == "sequence":
            self.kind = "tanh"
        if self.kind != "linear":
            self.dense = Linear(cfg.hidden, cfg.hidden, bias=cfg.head_bias)
        self.dropout = cfg.classifier_dropout
        if cfg.classifier == "span" and self.kind == "linear":
            self.dropout = 0.0  # BERT's and RoBERTa's QA heads have none
        outputs = {"span": 2, "choice": 1}.get(cfg.classifier, cfg.num_labels)
        self.out = Linear(cfg.hidden, outputs)

    def forward(self, x):
        if self.kind == "transform":
            x = self.norm(self.act(self.dense(x)))
        elif self.kind == "tanh":
            x = torch.tanh(self.dense(drop(x, self.dropout, self.training)))
        return self.out(drop(x, self.dropout, self.training))


def classify(model, x, hidden, layout, doc_ids, labels, rows: torch.Size):
    """The fine-tuning head: logits (B, num_labels) of each row's pooled vector (through the pooler
    where it has one), (B, choices), or (B, T, num_labels) of each token (2: a span's start, end);
    and transformers' loss: MSE for a number per row, span_loss for spans, else cross-entropy."""
    kind = model.cfg.classifier
    if kind in ("sequence", "choice"):
        pooled = pool(hidden, doc_ids, model.cfg.classifier_pooling)
        if model.pooler is not None:
            pooled = torch.tanh(model.pooler(pooled))
        logits = model.classifier(pooled)
    else:
        logits = layout.scatter(model.classifier(x))
    if kind == "choice":
        logits = logits.view(rows)  # (B, choices): each choice's one logit
    if labels is None:
        return logits, None
    if kind == "span":
        return logits, span_loss(logits, labels, doc_ids)
    if labels.is_floating_point():  # regression
        return logits, F.mse_loss(logits.squeeze(-1).float(), labels.float())
    if labels.dim() == 2:  # a token classifier's padding never counts
        labels = labels.masked_fill(doc_ids == 0, IGNORE_INDEX)
    return logits, counted_mean(logits.flatten(0, -2), labels.flatten())


def counted_mean(logits, labels) -> torch.Tensor:  # cross-entropy over the labels that count
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss / (labels != IGNORE_INDEX).sum().clamp(min=1)  # none counts: 0, not NaN


def pool(hidden: torch.Tensor, doc_ids: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, hidden) -> (B, hidden): the first real token ("cls") or the mean of the real ones."""
    if not torch.is_tensor(doc_ids) or doc_ids.shape != hidden.shape[:2]:
        raise ValueError(f"pool's doc_ids must be a {tuple(hidden.shape[:2])} tensor like hidden's")
    real = (doc_ids != 0).unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    hidden = hidden * real  # a row of padding alone pools to 0 with or without unpad
    if pooling == "cls":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), real[..., 0].argmax(1)]
    if pooling == "mean":
        return hidden.sum(dim=1) / real.sum(dim=1).clamp(min=1)
    raise ValueError(f"pooling {pooling!r} is neither 'cls' nor 'mean'")


def span_loss(logits, spans, doc_ids) -> torch.Tensor:
    """Extractive QA: logits (B, T, 2), spans (B, 2) first and last token; the mean of start and end
    cross-entropy, softmax over real tokens (transformers': all). Ignored: past T, < 0, padding."""
    T = logits.shape[1]
    real = doc_ids != 0
    logits = logits.float().masked_fill(~real[..., None], torch.finfo(torch.float32).min)
    inside = (spans >= 0) & (spans < T) & real.gather(1, spans.clamp(0, T - 1))
    spans = spans.masked_fill(~inside, IGNORE_INDEX)
    start, end = (counted_mean(logits[..., i], spans[:, i]) for i in (0, 1))
    return (start + end) / 2


# 8. Input checks: ValueErrors naming the argument, where torch would fail deep inside or not at all
NUMBERS = {int: numbers.Integral, float: numbers.Real, bool: bool}  # what each field type takes
INDEX_DTYPES = (torch.int64, torch.int32)
LABEL_DTYPES = (torch.int64,)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8, *INDEX_DTYPES, *FLOAT_DTYPES)


def check_config(cfg: Config):
    """Each field's type, then its range; ids below vocab_size; heads dividing hidden."""
    if not isinstance(cfg, Config):  # TinyEncoder("bert"): a name, not a Config
        raise ValueError(f"a Config is needed (Config.from_preset(name)), got {type(cfg).__name__}")
    hints = get_type_hints(Config)
    for field in fields(cfg):
        value, kind = getattr(cfg, field.name), hints[field.name]
        choices = get_args(kind)  # a Literal's values; none for int, float and bool
        if choices and value not in choices:
            raise ValueError(f"Config.{field.name}={value!r} is not one of {list(choices)}")
        is_bool = isinstance(value, bool)
        if not choices and (not isinstance(value, NUMBERS[kind]) or is_bool != (kind is bool)):
            raise ValueError(f"Config.{field.name}={value!r} is not of type {kind.__name__}")
        if kind in (int, float):  # NaN is not at least 0 either; inf ruins any model
            require(cfg, field.name, 0 <= value < math.inf, "at least 0 and finite")
    sizes = ("hidden", "layers", "heads", "max_len", "global_every", "num_labels")
    for name in (*sizes, "rope_theta", "rope_theta_local", "init_std"):
        require(cfg, name, getattr(cfg, name) > 0, "above 0")
    for name in (field.name for field in fields(cfg) if field.name.endswith("dropout")):
        require(cfg, name, getattr(cfg, name) < 1, "below 1")
    require(cfg, "nsp", not (cfg.nsp and cfg.classifier != "none"), "False with a classifier")
    below_vocab = f"below vocab_size={cfg.vocab_size}"
    for name in ("pad_id", "cls_id", "sep_id", "mask_id"):
        require(cfg, name, getattr(cfg, name) < cfg.vocab_size, below_vocab)
    require(cfg, "heads", cfg.hidden % cfg.heads == 0, f"a divisor of hidden={cfg.hidden}")
    require(cfg, "window", cfg.window % 2 == 0, "even: it spans window/2 keys each side")
    if cfg.positions == "rope":
        require(cfg, "heads", cfg.head_dim % 2 == 0, "such that RoPE's head_dim is even")


def require(cfg: Config, name: str, ok: bool, allowed: str):
    if not ok:
        raise ValueError(f"Config.{name}={getattr(cfg, name)!r} must be {allowed}")


def check_tensor(name, t, shape, dtypes, top: Optional[float], device, ignore: bool = False):
    """A ValueError naming `name` unless t is None or a tensor of this shape and dtype on device,
    whose values (read on CPUs only: a GPU would wait) are whole numbers in [0, top) or ignored."""
    if t is None:
        return
    if not torch.is_tensor(t) or tuple(t.shape) != shape or t.dtype not in dtypes:
        got = f"{tuple(t.shape)} {t.dtype}" if torch.is_tensor(t) else type(t).__name__
        allowed = "/".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise ValueError(f"{name} must be a {shape} tensor of {allowed}, got {got}")
    if t.device != device:  # torch would fail inside a layer, naming neither
        raise ValueError(f"{name} is on {t.device}, the model on {device}: move it there")
    if top is None or device.type != "cpu" or transformed():
        return
    values = t.double()
    if ignore:
        values = values[values != IGNORE_INDEX]
    # the fraction of inf or NaN is NaN, so they count as bad too
    bad = values[(values.frac() != 0) | (values < 0) | (values >= top)]
    if bad.numel():
        also = f" or {IGNORE_INDEX}" if ignore else ""
        raise ValueError(f"{name} must hold whole numbers in [0, {top}){also}; got {bad[0]:g}")


def check_inputs(model, input_ids, attention_mask, token_type_ids, labels, nsp_label):
    """forward's arguments: shapes, dtypes and device always; values where check_tensor reads."""
    cfg = model.cfg
    dims = 3 if cfg.classifier == "choice" else 2
    if not torch.is_tensor(input_ids) or input_ids.dim() != dims or input_ids.numel() == 0:
        got = getattr(input_ids, "shape", type(input_ids).__name__)
        shapes = "(batch, seq) tensor with a token (multiple choice: (batch, choices, seq))"
        raise ValueError(f"input_ids must be a {shapes}, got {got}")
    if token_type_ids is not None and not cfg.type_vocab:
        raise ValueError("token_type_ids given, but this model has none (Config.type_vocab=0)")
    if nsp_label is not None and not cfg.nsp:
        raise ValueError("next_sentence_label given, but this model has no NSP head")
    shape = tuple(input_ids.shape)
    device = model.tok_embed.weight.device
    check_tensor("input_ids", input_ids, shape, INDEX_DTYPES, cfg.vocab_size, device)
    check_tensor("attention_mask", attention_mask, shape, MASK_DTYPES, math.inf, device)
    check_tensor("token_type_ids", token_type_ids, shape, INDEX_DTYPES, cfg.type_vocab, device)
    check_tensor("next_sentence_label", nsp_label, shape[:1], LABEL_DTYPES, 2, device, ignore=True)
    # labels: the shape and range that the head takes (forward's docstring; span_loss)
    heads = {"none": (shape, cfg.vocab_size), "token": (shape, cfg.num_labels)}
    heads.update(sequence=(shape[:1], cfg.num_labels), span=((shape[0], 2), math.inf))
    heads["choice"] = (shape[:1], shape[1])  # (B,) labels, each below the number of choices
    label_shape, top = heads[cfg.classifier]
    if cfg.classifier == "sequence" and cfg.num_labels == 1:  # regression: any number per row
        check_tensor("labels", labels, label_shape, FLOAT_DTYPES, None, device)
    else:
        check_tensor("labels", labels, label_shape, LABEL_DTYPES, top, device, ignore=True)
    # the position table and RoPE's cover max_len positions: no document may be longer
    if device.type == "cpu" and not transformed():
        doc_ids = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        longest = int(document_positions(document_starts(doc_ids.flatten(0, -2))).max()) + 1
        if longest > cfg.max_len:
            raise ValueError(f"a document of {longest} tokens exceeds max_len={cfg.max_len}")


def check_ids(ids, cfg: Config, rate):
    if not torch.is_tensor(ids) or not isinstance(cfg, Config):  # not check_config (0.4 ms a row)
        got = f"{type(ids).__name__} and {type(cfg).__name__}"
        raise ValueError(f"mask_tokens takes a tensor of ids and a Config, got {got}")
    check_tensor("ids", ids, tuple(ids.shape), INDEX_DTYPES, cfg.vocab_size, ids.device)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate <= 1:
        raise ValueError(f"mask_tokens' rate={rate!r} must be a number in (0, 1]")


# 9. Fast paths: what sections 3 and 4 define, faster; the tests hold each equal to its definition.
def transformed() -> bool:
    """Whether torch.compile, jit.trace, torch.func or forward AD traces: fast paths step aside."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    # private names, but the ones torch's own autograd.Function and forward_ad read (torch 2.0 on)
    functorch = torch._C._are_functorch_transforms_active()
    return functorch or torch.autograd.forward_ad._current_level >= 0  # a dual level is open


def drop(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout; on a CPU a 5-9x faster mask, p rounded to k/65536 (README: "Dropout on a CPU")."""
    cut = round(p * 65536)
    if not (training and x.is_cpu) or transformed() or cut in (0, 65536):
        return F.dropout(x, p, training)
    bits = x.new_empty(x.numel() // 4 + 1, dtype=torch.int64).random_(-(2**63), None)
    # four 16-bit draws per 64 bits, uniform in [-32768, 32768): P(keep) = 1 - cut / 65536
    draws = bits.view(torch.int16)[: x.numel()].view(x.shape)
    keep = draws >= cut - 32768
    return x * keep.to(x.dtype).mul_(65536 / (65536 - cut))


# AMD CPUs with AVX-512: oneDNN's matmul is faster on large fp32 linears (README: "Linear on a CPU")
AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
CPU_INFO = Path("/proc/cpuinfo")  # on Linux, names the CPU's maker; elsewhere F.linear is used
AMD = CPU_INFO.exists() and "AuthenticAMD" in CPU_INFO.read_text()
ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if AVX512 and AMD else None


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp32 = x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        onednn = ONEDNN_LINEAR is not None and x.is_cpu and fp32 and not transformed()
        if onednn and x.numel() * self.out_features >= 2**29:
            return OneDNNLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return ONEDNN_LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad  # none for what is frozen
        # the input's gradient is a linear too: this Function again, differentiable for create_graph
        grad_x = OneDNNLinear.apply(grad, weight.t(), None) if needs_x else None
        grad = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        grad_weight = grad.t() @ x.reshape(-1, x.shape[-1]) if needs_weight else None
        grad_bias = grad.sum(0) if needs_bias else None
        return grad_x, grad_weight, grad_bias


# The flash kernel, found once: flash-attn's, else torch's (varlen_attn's op) if it takes a window
try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
FLASH_OP = getattr(torch.ops.aten, "_flash_attention_forward", None)
FLASH = None
if flash_attn_varlen_func is not None:
    FLASH = "flash-attn"
elif FLASH_OP is not None and "window_size_left" in str(FLASH_OP.default._schema):
    FLASH = "torch flash op"


@dataclass
class Unpadded:
    """The N real tokens side by side, (N, ...): padding dropped once, before the first layer."""

    indices: torch.Tensor  # (N,) where each real token sits in the flattened (B * T) batch
    cu_seqlens: torch.Tensor  # (documents + 1,) int32: document d is tokens cu[d] to cu[d + 1]
    batch_shape: torch.Size  # (B, T)
    backend: str
    seqlens: list  # each document's length: a CPU attends to one document at a time
    labelled: Optional[torch.Tensor] = None  # as Padded's

    @classmethod
    def from_doc_ids(cls, doc_ids, starts, backend: str) -> Unpadded:
        indices = (doc_ids.flatten() != 0).nonzero().squeeze(1)
        first_tokens = starts.flatten()[indices].nonzero().squeeze(1)  # each document's first
        cu_seqlens = F.pad(first_tokens, (0, 1), value=indices.numel()).to(torch.int32)
        return cls(indices, cu_seqlens, doc_ids.shape, backend, cu_seqlens.diff().tolist())

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(0, 1)[self.indices]  # (B, T, ...) -> (N, ...)

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        B, T = self.batch_shape  # (N, ...) -> (B, T, ...), zeros at padding
        rows = t.new_zeros(B * T, *t.shape[1:]).index_copy(0, self.indices, t)
        return rows.unflatten(0, (B, T))


def pick_backend(cfg: Config, device: torch.device, dtype) -> str:
    """cfg.attn_backend for this call: auto means flash where it can run, else sdpa."""
    if cfg.attn_backend in ("sdpa", "eager"):
        return cfg.attn_backend
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)  # what the matmuls compute in
    gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    half = dtype in (torch.float16, torch.bfloat16)
    if FLASH and gpu and half and cfg.head_dim in range(8, 257, 8):
        return "flash"
    if cfg.attn_backend == "flash":
        needs = "flash-attn or torch's flash op, sm80+ GPU, fp16/bf16, head_dim 8, 16, ..., 256"
        got = f"{device.type}, {dtype}, head_dim {cfg.head_dim}, kernel {FLASH}"
        raise ValueError(f"attn_backend='flash' needs {needs}; got {got}")
    return "sdpa"


def make_layout(cfg: Config, doc_ids, dtype, device=None, labels=None):
    """The layout, on doc_ids' device, of a forward on device (doc_ids' by default): Unpadded tokens
    for flash, or where cfg.unpad asks on a CPU, but for rows of one whole document each (README:
    "Whole rows on a CPU") and traced calls; else Padded rows. Compiled: a graph break, no more."""
    if torch.compiler.is_dynamo_compiling():  # not a decorator: that imports torch._dynamo (1 s)
        return torch.compiler.disable(make_layout)(cfg, doc_ids, dtype, device, labels)
    device = torch.device(device or doc_ids.device)
    backend = pick_backend(cfg, device, dtype)
    starts = document_starts(doc_ids)
    unpad = (backend == "flash" or (cfg.unpad and device.type == "cpu")) and not transformed()
    if unpad and (backend == "flash" or not bool((starts.sum(1) == 1).all())):
        layout = Unpadded.from_doc_ids(doc_ids, starts, backend)
    else:
        layout = Padded.from_doc_ids(doc_ids, starts, cfg.half_window, backend)
    if labels is not None:
        targets = layout.gather(labels.masked_fill(doc_ids == 0, IGNORE_INDEX)).flatten()
        layout.labelled = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return layout


def attend(q, k, v, layout, half_window: Optional[int], dropout: float):
    """The one dispatch: q, k, v (B, T, heads, head_dim) on Padded rows or (N, heads, head_dim) on
    Unpadded tokens, and out likewise. A CPU attends in fp32, but bf16 without grads (README)."""
    if q.is_cpu and (q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and q.requires_grad)):
        with torch.autocast("cpu", enabled=False):  # which would cast fp32 back down
            out = attend(q.float(), k.float(), v.float(), layout, half_window, dropout)
        return out.to(q.dtype)
    if isinstance(layout, Padded):
        return padded_attention(q, k, v, layout, half_window, dropout)
    if q.shape[0] == 0:  # no tokens: an all-padding batch
        return q
    if layout.backend == "flash":
        return flash_attention(q, k, v, layout, half_window, dropout)
    return attend_documents(q, k, v, layout, half_window, dropout)


def padded_attention(q, k, v, layout: Padded, half_window: Optional[int], dropout: float):
    """Rows (B, T, heads, head_dim) under the layout's mask: eager, SDPA, or SDPA in windows."""
    mask = layout.mask if half_window is None else layout.local_mask
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
    if layout.backend == "eager":
        out = eager_attention(q, k, v, mask, dropout)
    elif q.is_cpu and mask is not None and half_window and q.shape[-2] > 4 * half_window:
        out = window_blocks(q, k, v, mask, half_window, dropout)
    elif q.is_cpu and dropout > 0:  # SDPA's CPU dropout is this same math; drop's mask is cheaper
        out = eager_attention(q, k, v, mask, dropout)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2)


def window_blocks(q, k, v, mask, w: int, dropout: float) -> torch.Tensor:
    """Sliding-window attention in blocks of w = half_window queries (with dropout eager, as
    in padded_attention): block i sees key blocks i - 1 to i + 1, every key its queries may see."""
    attention = F.scaled_dot_product_attention if dropout == 0 else eager_attention
    key_blocks, value_blocks = k.split(w, dim=-2), v.split(w, dim=-2)
    outs = []
    for i, q_block in enumerate(q.split(w, dim=-2)):
        first, end = max(i - 1, 0), min(i + 2, len(key_blocks))
        block_mask = mask[..., i * w : i * w + q_block.shape[-2], first * w : end * w]
        keys, values = k[..., first * w : end * w, :], v[..., first * w : end * w, :]
        if k.requires_grad:  # a slice's backward would fill a gradient the size of k per block
            keys, values = (torch.cat(t[first:end], dim=-2) for t in (key_blocks, value_blocks))
        outs.append(attention(q_block, keys, values, block_mask, dropout))
    return torch.cat(outs, dim=-2)


def attend_documents(q, k, v, layout: Unpadded, half_window: Optional[int], dropout: float):
    """Unpadded tokens (N, heads, head_dim) on a CPU: a call per document, only a window's mask."""
    band = band_mask(max(layout.seqlens), half_window, q.device)
    outs = []
    # split rather than slices: the backward of a slice zero-fills all N rows for every document
    pieces = (t.split(layout.seqlens) for t in (q, k, v))
    for n, qd, kd, vd in zip(layout.seqlens, *pieces):
        doc_band = None if band is None else band[:n, :n]
        row = Padded(None, local_mask=doc_band, backend=layout.backend)
        outs.append(padded_attention(qd[None], kd[None], vd[None], row, half_window, dropout)[0])
    return torch.cat(outs)


def flash_attention(q, k, v, layout: Unpadded, half_window: Optional[int], dropout: float):
    """The FLASH kernel on unpadded tokens (N, heads, head_dim), with attention dropout."""
    window = -1 if half_window is None else half_window  # -1: the kernels' "no window"
    q, k, v = (t.contiguous() for t in (q, k, v))
    longest = layout.batch_shape[1]  # bounds every document, with no host sync
    cu = layout.cu_seqlens
    if FLASH == "flash-attn":
        size = (window, window)
        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout, window_size=size)
    sides = dict(window_size_left=window, window_size_right=window)
    return FLASH_OP(q, k, v, cu, cu, longest, longest, dropout, False, False, **sides)[0]
