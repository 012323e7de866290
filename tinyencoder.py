"""tinyencoder: BERT, RoBERTa and ModernBERT as flags of one byte-level encoder.

Read top to bottom: vocabulary, config and presets, masking, attention (the only place that knows about backends),
the blocks, the model, and interop with transformers checkpoints. Needs torch alone.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary: a token is a byte. Four special ids follow the 256 bytes; the table is padded to a multiple of 64 so the
# decoder matmul stays aligned.
PAD, CLS, SEP, MASK = 256, 257, 258, 259
VOCAB_SIZE = 320


def encode(text: str | bytes) -> list[int]:
    return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))


def decode(ids) -> str:
    return bytes(i for i in (ids.tolist() if torch.is_tensor(ids) else ids) if 0 <= i < 256).decode(errors="replace")


# ----------------------------------------------------------------------------------------------------------------------
# Config. Every architectural difference between the three papers is a field; PRESETS below is the whole diff.
@dataclass
class Config:
    arch: str = "bert"                # the transformers class family to save as: bert | roberta | modernbert
    vocab_size: int = VOCAB_SIZE
    pad_id: int = PAD
    cls_id: int = CLS
    sep_id: int = SEP
    mask_id: int = MASK
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 0             # 0: 4*hidden for GELU, 1.5*hidden for GeGLU (ModernBERT-base's ratio)
    max_len: int = 512                # longest document; bounds the learned position table
    positions: str = "learned"        # learned (absolute table) | rope
    pos_offset: int = 0               # RoBERTa counts positions from pad_id+1, so its table has pad_id+1 leading rows
    type_vocab: int = 2               # token-type (segment) embeddings; 0 = none
    prenorm: bool = False             # pre-LN adds a final norm; layer 0 reuses the embedding norm
    glu: bool = False                 # GeGLU MLP: gelu(first half) * second half
    act: str = "gelu"                 # gelu (erf) | gelu_tanh
    bias: bool = True                 # biases on the attention and MLP linears
    norm_bias: bool = True
    head_bias: bool = True            # bias of the MLM head's dense layer (the decoder always has one)
    norm_eps: float = 1e-12
    rope_theta: float = 10000.0       # global layers
    rope_theta_local: float = 10000.0
    window: int = 0                   # local layers see +-window/2 keys, inclusive; 0 = every layer global
    global_every: int = 1             # layer i is global iff i % global_every == 0
    embed_dropout: float = 0.1
    attn_dropout: float = 0.1         # on attention probabilities
    resid_dropout: float = 0.1        # on each branch before the residual add
    mlp_dropout: float = 0.0          # inside the MLP, before its output projection
    init: str = "normal"              # normal (HF BERT: N(0, 0.02)) | megatron (ModernBERT: truncated, depth-scaled)
    init_std: float = 0.02
    mlm_rate: float = 0.15
    nsp: bool = False                 # next-sentence prediction head (pooler + 2-way classifier)
    static_masking: bool = False      # BERT fixes each example's masks ahead of time; the others draw anew
    sparse_prediction: bool = True    # run the MLM head only on labelled rows, as the original BERT and fairseq do
    unpad: bool = False               # strip padding once and run every layer on (tokens, hidden)
    attn_backend: str = "auto"        # auto | flash | sdpa | eager

    def __post_init__(self):
        if not self.intermediate:
            self.intermediate = self.hidden * 3 // 2 if self.glu else 4 * self.hidden
        checks = {"positions": ("learned", "rope"), "act": tuple(ACTS), "init": ("normal", "megatron"),
                  "attn_backend": BACKENDS, "arch": tuple(PRESETS)}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Config.{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.window % 2:
            raise ValueError(f"window={self.window} must be even: it spans window/2 keys on each side")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # BERT-base (Devlin et al. 2018): post-LN, learned positions, segments, NSP, static masks.
    "bert": dict(arch="bert", nsp=True, static_masking=True),
    # RoBERTa-base (Liu et al. 2019): BERT's network with offset positions, one segment, eps 1e-5, no NSP.
    "roberta": dict(arch="roberta", pos_offset=PAD + 1, type_vocab=1, norm_eps=1e-5),
    # ModernBERT-base (Warner et al. 2024): pre-LN, RoPE, GeGLU, no biases, alternating global/local attention.
    "modernbert": dict(arch="modernbert", layers=22, max_len=8192, positions="rope", type_vocab=0, prenorm=True,
                       glu=True, bias=False, norm_bias=False, head_bias=False, norm_eps=1e-5, rope_theta=160000.0,
                       rope_theta_local=10000.0, window=128, global_every=3, embed_dropout=0.0, attn_dropout=0.0,
                       resid_dropout=0.0, init="megatron", mlm_rate=0.30, unpad=True),
}
ACTS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
BACKENDS = ("auto", "flash", "sdpa", "eager")


# ----------------------------------------------------------------------------------------------------------------------
# Masking: pick cfg.mlm_rate of the ordinary tokens; of those, 80% become [MASK], 10% a random byte, 10% stay.
# The generator decides static versus dynamic: reseed it per example for fixed masks, keep one running for fresh ones.
def mask_tokens(ids: torch.Tensor, cfg: Config, generator: Optional[torch.Generator] = None,
                rate: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    rate = cfg.mlm_rate if rate is None else rate
    draw = lambda: torch.rand(ids.shape, generator=generator, device=ids.device)
    special = torch.isin(ids, torch.tensor([cfg.pad_id, cfg.cls_id, cfg.sep_id, cfg.mask_id], device=ids.device))
    picked = (draw() < rate) & ~special
    labels = torch.where(picked, ids, -100)
    roll, random_bytes = draw(), torch.randint(0, 256, ids.shape, generator=generator, device=ids.device)
    inputs = torch.where(picked & (roll < 0.8), cfg.mask_id, ids)
    inputs = torch.where(picked & (roll >= 0.8) & (roll < 0.9), random_bytes, inputs)
    return inputs, labels


# ----------------------------------------------------------------------------------------------------------------------
# Attention. Everything that depends on the backend lives in this section. A batch arrives in one of two layouts
# (Layout): padded (B, T, heads, head_dim) with a boolean mask, or unpadded (tokens, heads, head_dim) with cu_seqlens,
# the document boundaries. The eager branch is the definition; the others are tested equal to it.
@dataclass
class Layout:
    mask: Optional[torch.Tensor] = None        # padded: (B, 1, T, T) True where a query may see a key; None = all
    local_mask: Optional[torch.Tensor] = None  # padded: the same, ANDed with the sliding window
    cu: Optional[torch.Tensor] = None          # unpadded: (docs + 1,) int32 offsets of each document
    sizes: Optional[list] = None               # unpadded: each document's length, as Python ints
    max_len: int = 0                           # unpadded: longest document


@functools.lru_cache(None)
def _flash_kernel():
    """(kernel, takes_dropout): flash-attn's varlen kernel if it imports, else PyTorch's own if windowed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func as f
        return (lambda q, k, v, cu, n, p, w: f(q, k, v, cu, cu, n, n, p, window_size=(w, w))), True
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn as f
        if "window_size" in inspect.signature(f).parameters:
            return (lambda q, k, v, cu, n, p, w: f(q, k, v, cu, cu, n, n, window_size=(w, w))), False
    except ImportError:
        pass
    return None, False


_said = set()


def pick_backend(want: str, device: torch.device, dtype: torch.dtype, dropout: float, head_dim: int) -> str:
    """Resolve cfg.attn_backend for this device and dtype. A backend asked for by name must be usable here."""
    (kernel, takes_dropout), why = _flash_kernel(), None
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        why = f"flash needs a CUDA device and fp16/bf16, got {device.type} {dtype}"
    elif torch.cuda.get_device_capability(device) < (8, 0) or head_dim % 8 or head_dim > 256:
        why = f"flash needs an sm80+ GPU and a head_dim that is a multiple of 8 up to 256 (head_dim {head_dim})"
    elif kernel is None:
        why = "flash needs the flash-attn package or a torch whose nn.attention.varlen.varlen_attn takes window_size"
    elif dropout > 0 and not takes_dropout:
        why = "torch's varlen flash kernel has no attention dropout; set attn_dropout=0 or install flash-attn"
    if want == "flash" and why:
        raise ValueError(f"attn_backend='flash' is not available: {why}")
    choice = want if want != "auto" else ("flash" if why is None else "sdpa")
    if want == "auto" and (device.type, choice) not in _said:
        _said.add((device.type, choice))
        print(f"tinyencoder: attention backend {choice} on {device.type}" + (f" ({why})" if why else ""),
              file=sys.stderr)
    return choice


def attention(q, k, v, lay: Layout, local: bool, window: int, dropout: float, backend: str) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the keys each query may see; local layers see +-window/2 positions."""
    w = window // 2 if local else -1
    if lay.cu is not None and backend == "flash" and len(q):   # unpadded tokens, one kernel for the whole batch
        q, k, v = (t.contiguous() for t in (q, k, v))
        return _flash_kernel()[0](q, k, v, lay.cu, lay.max_len, dropout, w)
    if lay.cu is not None:                                      # unpadded, CPU backends: no padding computed
        sizes, full = lay.sizes, _band(lay.max_len, w, q.device)   # one band per batch, sliced per document
        if len(set(sizes)) == 1:                                # equal lengths (full rows): one batched call
            qb, kb, vb = (t.view(-1, sizes[0], *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
            return _attend(qb, kb, vb, full, dropout, backend, w).transpose(1, 2).flatten(0, 1)
        outs = []                                               # else one call per document; split, not t[s:e]:
        for n, qd, kd, vd in zip(sizes, *(t.split(sizes) for t in (q, k, v))):   # a slice's backward zero-fills N rows
            band = None if full is None or n <= w + 1 else full[:n, :n]
            qd, kd, vd = (t.transpose(0, 1)[None] for t in (qd, kd, vd))   # (1, heads, L, head_dim): SDPA's CPU
            outs.append(_attend(qd, kd, vd, band, dropout, backend, w).squeeze(0).transpose(0, 1))   # flash is 4-D
        return torch.cat(outs) if outs else q                   # an all-padding batch has no tokens
    mask = lay.local_mask if local else lay.mask                # padded: (B, T, heads, head_dim)
    out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, dropout, backend, w)
    return out.transpose(1, 2)


def _attend(q, k, v, mask, dropout, backend, w=-1):
    if backend == "sdpa" and w > 0 and mask is not None and q.shape[-2] > 4 * w:
        return _local_sdpa(q, k, v, mask, w, dropout)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # eager: the readable definition
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.float().softmax(-1).to(q.dtype), dropout)
    return probs @ v


def _local_sdpa(q, k, v, mask, w, dropout):
    """Sliding-window SDPA in blocks of w queries: block i only needs key blocks i-1, i, i+1 (exact: the mask)."""
    ks, vs, outs = k.split(w, -2), v.split(w, -2), []
    for i, qi in enumerate(q.split(w, -2)):
        lo, hi = max(i - 1, 0), min(i + 2, len(ks))
        m = mask[..., i * w:i * w + qi.shape[-2], lo * w:hi * w]
        outs.append(F.scaled_dot_product_attention(qi, torch.cat(ks[lo:hi], -2), torch.cat(vs[lo:hi], -2),
                                                   attn_mask=m, dropout_p=dropout))
    return torch.cat(outs, -2)


@functools.lru_cache(4)
def _band(n: int, w: int, device) -> Optional[torch.Tensor]:
    """(n, n) True where |i - j| <= w; None when the window covers the whole document."""
    if w < 0 or n <= w + 1:
        return None
    i = torch.arange(n, device=device)
    return (i[:, None] - i[None, :]).abs() <= w


def make_layout(doc: torch.Tensor, unpad: bool, window: int):
    """From attention_mask (B, T) (0 = padding, runs of equal nonzero ids = documents) build positions and Layout.

    Returns (positions (B, T), keep (flat indices of real tokens) or None, Layout)."""
    B, T = doc.shape
    idx = torch.arange(T, device=doc.device).expand(B, T)
    starts = doc != F.pad(doc, (1, 0), value=-1)[:, :-1]       # first token of every run, and of every row
    pos = idx - torch.where(starts, idx, 0).cummax(1).values   # index within the document
    if unpad:
        keep = (doc.flatten() != 0).nonzero().squeeze(1)
        first = starts.flatten()[keep].nonzero().squeeze(1)
        cu = F.pad(first, (0, 1), value=keep.numel()).to(torch.int32)
        sizes = cu.diff().tolist()                             # a host sync: max_len and the CPU loop need ints
        return pos, keep, Layout(cu=cu, sizes=sizes, max_len=max(sizes, default=0))
    if bool((doc != 0).all()) and bool((starts.sum(1) == 1).all()):   # one whole document per row: no mask
        mask = None
    else:
        run = starts.cumsum(1)
        mask = (run[:, :, None] == run[:, None, :]) & (doc != 0)[:, None, :]
        mask = (mask | torch.eye(T, dtype=torch.bool, device=doc.device))[:, None]   # pad queries see themselves
    local = None
    if window:
        band = _band(T, window // 2, doc.device)
        local = mask if band is None else (band if mask is None else mask & band)
    return pos, None, Layout(mask=mask, local_mask=local)


# ----------------------------------------------------------------------------------------------------------------------
# Blocks
def rope_tables(pos: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos, sin (..., 1, 1, head_dim/2) for NeoX-style rotation: dim i pairs with i + head_dim/2. Angles in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    ang = (pos.float()[..., None] * inv_freq)[..., None, None, :]   # broadcast over (q, k) and heads
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate(x, cos, sin):
    x1, x2 = x.float().chunk(2, -1)                            # each pair (x1_i, x2_i) turns by its angle
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def norm(cfg: Config) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps, bias=cfg.norm_bias)


class Layer(nn.Module):
    def __init__(self, cfg: Config, i: int):
        super().__init__()
        self.cfg, self.local = cfg, bool(cfg.window) and i % cfg.global_every != 0
        H, I = cfg.hidden, cfg.intermediate
        self.qkv = nn.Linear(H, 3 * H, bias=cfg.bias)
        self.attn_out = nn.Linear(H, H, bias=cfg.bias)
        self.mlp_in = nn.Linear(H, 2 * I if cfg.glu else I, bias=cfg.bias)
        self.mlp_out = nn.Linear(I, H, bias=cfg.bias)
        # Post-LN normalises after each residual add; pre-LN before each branch, where layer 0 already gets a
        # normalised input from the embeddings.
        self.attn_norm = nn.Identity() if cfg.prenorm and i == 0 else norm(cfg)
        self.mlp_norm = norm(cfg)

    def forward(self, x, lay: Layout, rope, backend: str):
        cfg, drop = self.cfg, self.training
        # x: (B, T, H) padded or (N, H) unpadded; every op below is shape-agnostic over the leading dims
        h = x if not cfg.prenorm else self.attn_norm(x)
        qkv = self.qkv(h).unflatten(-1, (3, cfg.heads, -1))   # (..., 3, heads, head_dim)
        if rope is not None:                                   # rotate q and k in one go; split's backward is a cat
            qk, v = qkv.split([2, 1], -3)
            q, k = rotate(qk, *rope[self.local]).unbind(-3)
            v = v.squeeze(-3)
        else:
            q, k, v = qkv.unbind(-3)                           # each (..., heads, head_dim)
        a = attention(q, k, v, lay, self.local, cfg.window, cfg.attn_dropout if drop else 0.0, backend)
        a = F.dropout(self.attn_out(a.flatten(-2)), cfg.resid_dropout, drop)
        x = x + a if cfg.prenorm else self.attn_norm(x + a)
        u = self.mlp_in(self.mlp_norm(x) if cfg.prenorm else x)   # (..., I) or (..., 2I)
        if cfg.glu:                                            # GeGLU: the first half is activated, the second gates
            u, gate = u.chunk(2, -1)
        u = ACTS[cfg.act](u) * gate if cfg.glu else ACTS[cfg.act](u)
        m = F.dropout(self.mlp_out(F.dropout(u, cfg.mlp_dropout, drop)), cfg.resid_dropout, drop)
        return x + m if cfg.prenorm else self.mlp_norm(x + m)


@dataclass
class Output:
    logits: torch.Tensor                       # (B, T, V), or (labelled rows, V) with sparse prediction
    loss: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None      # (B, T, H) final hidden states; zeros at padding when unpadded
    nsp_logits: Optional[torch.Tensor] = None  # (B, 2)


# ----------------------------------------------------------------------------------------------------------------------
# The model
class TinyEncoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.tok = nn.Embedding(cfg.vocab_size, H, padding_idx=cfg.pad_id)
        self.pos = nn.Embedding(cfg.max_len + cfg.pos_offset, H) if cfg.positions == "learned" else None
        self.seg = nn.Embedding(cfg.type_vocab, H) if cfg.type_vocab else None
        self.emb_norm = norm(cfg)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.layers))
        self.final_norm = norm(cfg) if cfg.prenorm else nn.Identity()
        self.head_dense = nn.Linear(H, H, bias=cfg.head_bias)
        self.head_norm = norm(cfg)
        self.decoder_bias = nn.Parameter(torch.zeros(cfg.vocab_size))   # decoder weight is self.tok.weight
        self.pooler = nn.Linear(H, H) if cfg.nsp else None
        self.nsp_head = nn.Linear(H, 2) if cfg.nsp else None
        self.apply(self._init)

    def _init(self, m: nn.Module):
        cfg, std = self.cfg, self.cfg.init_std
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            return
        if cfg.init == "megatron":                             # truncated at 2 std; output projections depth-scaled
            out = m is self.head_dense or any(m is l.attn_out or m is l.mlp_out for l in self.layers)
            s = std / math.sqrt(2 * cfg.layers) if out else std
            nn.init.trunc_normal_(m.weight, 0.0, s, -2 * s, 2 * s)
        else:
            nn.init.normal_(m.weight, 0.0, std)
            if m is self.tok or (m is self.pos and cfg.pos_offset):   # pad rows start at zero (ModernBERT's do not)
                m.weight.data[cfg.pad_id].zero_()
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.tok.weight.numel() - (self.pos.weight.numel() if self.pos else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight (forward + backward), plus 12 * H per key that each layer attends."""
        keys = sum(min(seq_len, self.cfg.window + 1) if l.local else seq_len for l in self.layers)
        return 6 * self.num_params(embeddings=False) + 12 * self.cfg.hidden * keys

    def check_inputs(self, ids, **others):
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be a (batch, seq) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
        for name, t, top in (("input_ids", ids, self.cfg.vocab_size), ("token_type_ids", others["token_type_ids"],
                                                                       self.cfg.type_vocab)):
            if t is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= top):
                raise ValueError(f"{name} must lie in [0, {top}); got values from {int(t.min())} to {int(t.max())}")
        for name, t in others.items():
            if t is not None and t.shape != ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(ids.shape)}")

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None):
        cfg = self.cfg
        self.check_inputs(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels)
        (B, T), dev = input_ids.shape, input_ids.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else self.tok.weight.dtype
        backend = pick_backend(cfg.attn_backend, dev, dtype, cfg.attn_dropout * self.training, cfg.hidden // cfg.heads)
        unpad = cfg.unpad or backend == "flash"                # the flash kernels only take unpadded tokens
        doc = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        pos, keep, lay = make_layout(doc, unpad, cfg.window)
        if self.pos is not None and int(pos.max()) >= cfg.max_len:
            raise ValueError(f"a document of {int(pos.max()) + 1} tokens exceeds max_len={cfg.max_len}, the number of "
                             f"learned positions; split it into pieces of at most {cfg.max_len} tokens")
        # (B, T, ...) <-> (N, ...) when unpadded; padding comes back as zeros
        gather = (lambda t: t.flatten(0, 1)[keep]) if unpad else (lambda t: t)
        scatter = (lambda t: t.new_zeros(B * T, t.shape[-1]).index_copy(0, keep, t).view(B, T, -1)) if unpad else (
            lambda t: t)
        ids, pos = gather(input_ids), gather(pos)

        # Embeddings: (B, T, H) or (N, H)
        x = self.tok(ids)
        if self.seg is not None:
            x = x + self.seg(gather(token_type_ids) if token_type_ids is not None else torch.zeros_like(ids))
        if self.pos is not None:
            x = x + self.pos(pos + cfg.pos_offset)
        x = F.dropout(self.emb_norm(x), cfg.embed_dropout, self.training)
        rope = None if cfg.positions != "rope" else [                                   # indexed by Layer.local
            rope_tables(pos, cfg.hidden // cfg.heads, t, x.dtype) for t in (cfg.rope_theta, cfg.rope_theta_local)]

        for layer in self.layers:
            x = layer(x, lay, rope, backend)
        x = self.final_norm(x)
        hidden = scatter(x)                                    # (B, T, H)

        # MLM head: only on labelled rows with sparse prediction, else everywhere
        flat = x.flatten(0, -2)                                # (tokens, H)
        tgt = None if labels is None else gather(labels.masked_fill(doc == 0, -100)).flatten()   # never at padding
        if tgt is not None and cfg.sparse_prediction:
            rows = (tgt != -100).nonzero().squeeze(1)
            flat, tgt = flat[rows], tgt[rows]
        h = self.head_norm(ACTS[cfg.act](self.head_dense(flat)))
        logits = F.linear(h, self.tok.weight, self.decoder_bias)  # decoder tied to the token embedding
        loss = None if tgt is None else F.cross_entropy(logits.float(), tgt, ignore_index=-100)
        if not (tgt is not None and cfg.sparse_prediction):
            logits = scatter(logits).view(B, T, -1)            # (B, T, V)

        nsp_logits = None
        if self.nsp_head is not None:                          # BERT pools the first token of each row
            nsp_logits = self.nsp_head(torch.tanh(self.pooler(hidden[:, 0])))
            if next_sentence_label is not None:
                nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label.view(-1))
                loss = nsp_loss if loss is None else loss + nsp_loss
        return Output(logits=logits, loss=loss, hidden=hidden, nsp_logits=nsp_logits)

    # ------------------------------------------------------------------------------------------------------------------
    # Interop with transformers: a config translation and one name map, used in both directions.
    @classmethod
    def from_pretrained(cls, path: str) -> "TinyEncoder":
        """Load a directory written by transformers' save_pretrained (Bert/Roberta/ModernBert, MLM or base model)."""
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        kind = (hf.get("architectures") or [None])[0] or {"bert": "BertModel", "roberta": "RobertaModel",
                                                          "modernbert": "ModernBertModel"}.get(hf.get("model_type"))
        if kind not in HF_CLASSES:
            raise ValueError(f"{path}: architecture {kind!r} is not supported; supported: {sorted(HF_CLASSES)}")
        sd = {k.removesuffix(".gamma") + ".weight" if k.endswith(".gamma") else k.removesuffix(".beta") + ".bias"
              if k.endswith(".beta") else k: v for k, v in _read_weights(path).items()}   # old TF-era LN names
        model = cls(config_from_hf(hf, nsp="cls.seq_relationship.weight" in sd))
        base = not any(k.startswith(("bert.", "roberta.", "model.")) for k in sd)   # BertModel & co: no prefix
        names = hf_names(model, base)
        wanted = {n for group in names.values() for n in group}
        # a base model has no MLM head (ours stays freshly made); tied copies, buffers and an unused pooler are skipped
        missing = [n for n in wanted if n not in sd and not (base and n.startswith(("cls.", "lm_head.", "head.",
                                                                                      "decoder.")))]
        unexpected = [k for k in sd if k not in wanted and not k.endswith(("position_ids", "token_type_ids",
                      "decoder.weight", "decoder.bias", "pooler.dense.weight", "pooler.dense.bias"))]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match {kind}: missing {sorted(missing)[:8]}, unexpected "
                             f"{unexpected[:8]} ({len(missing)} missing, {len(unexpected)} unexpected)")
        with torch.no_grad():
            for ours, theirs in names.items():
                if all(n in sd for n in theirs):
                    p = model.get_parameter(ours)
                    w = torch.cat([sd[n] for n in theirs])       # q, k, v stack into one fused projection
                    if w.shape != p.shape:
                        raise ValueError(f"{path}: {theirs[0]} has shape {tuple(w.shape)}, expected {tuple(p.shape)}")
                    p.copy_(w)
        return model

    def save_pretrained(self, path: str):
        """Write config.json and model.safetensors that transformers' AutoModelForMaskedLM loads."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config_to_hf(self.cfg), f, indent=2)
        sd = {n: w.contiguous().cpu().clone() for ours, theirs in hf_names(self).items()   # fused q/k/v split in 3
              for n, w in zip(theirs, self.get_parameter(ours).detach().chunk(len(theirs)))}
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


HF_CLASSES = {"BertForMaskedLM", "BertForPreTraining", "BertModel", "RobertaForMaskedLM", "RobertaModel",
              "ModernBertForMaskedLM", "ModernBertModel"}
HF_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def hf_names(model: TinyEncoder, base: bool = False) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the transformers state-dict key(s) holding it (three for the fused q/k/v)."""
    cfg = model.cfg
    if cfg.arch == "modernbert":
        p = "" if base else "model."
        mods = {"tok": p + "embeddings.tok_embeddings", "emb_norm": p + "embeddings.norm", "final_norm": p +
                "final_norm", "head_dense": "head.dense", "head_norm": "head.norm", "decoder_bias": "decoder"}
        layer = {"qkv": "attn.Wqkv", "attn_out": "attn.Wo", "attn_norm": "attn_norm", "mlp_norm": "mlp_norm",
                 "mlp_in": "mlp.Wi", "mlp_out": "mlp.Wo"}
        stem = p + "layers."
    else:
        p = "" if base else cfg.arch + "."
        head = "cls.predictions." if cfg.arch == "bert" else "lm_head."
        mods = {"tok": p + "embeddings.word_embeddings", "pos": p + "embeddings.position_embeddings",
                "seg": p + "embeddings.token_type_embeddings", "emb_norm": p + "embeddings.LayerNorm",
                "head_dense": head + ("transform.dense" if cfg.arch == "bert" else "dense"),
                "head_norm": head + ("transform.LayerNorm" if cfg.arch == "bert" else "layer_norm"),
                "decoder_bias": head[:-1], "pooler": p + "pooler.dense", "nsp_head": "cls.seq_relationship"}
        layer = {"qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
                 "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                 "mlp_in": "intermediate.dense", "mlp_out": "output.dense", "mlp_norm": "output.LayerNorm"}
        stem = p + "encoder.layer."
    for i in range(cfg.layers):
        mods.update({f"layers.{i}.{a}": tuple(f"{stem}{i}.{n}" for n in (b if isinstance(b, tuple) else (b,)))
                     for a, b in layer.items()})
    names = {}
    for name, _ in model.named_parameters():                   # the tied decoder weight appears once, as tok
        mod, leaf = ("decoder_bias", "bias") if name == "decoder_bias" else name.rsplit(".", 1)
        target = mods[mod]
        names[name] = tuple(f"{t}.{leaf}" for t in (target if isinstance(target, tuple) else (target,)))
    return names


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st):
        from safetensors.torch import load_file
        return load_file(st)
    if os.path.exists(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)   # weights only: no code runs on load
    raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin")


# Config field -> transformers config key. The few keys that need arithmetic or a pattern are handled in the functions.
HF_KEYS = dict(vocab_size="vocab_size", hidden="hidden_size", layers="num_hidden_layers", heads="num_attention_heads",
               intermediate="intermediate_size", pad_id="pad_token_id", init_std="initializer_range")
HF_KEYS = {"bert": dict(HF_KEYS, type_vocab="type_vocab_size", norm_eps="layer_norm_eps", cls_id="bos_token_id",
                        sep_id="eos_token_id", resid_dropout="hidden_dropout_prob",
                        attn_dropout="attention_probs_dropout_prob"),
           "modernbert": dict(HF_KEYS, max_len="max_position_embeddings", norm_eps="norm_eps", bias="attention_bias",
                              norm_bias="norm_bias", head_bias="classifier_bias", window="local_attention",
                              global_every="global_attn_every_n_layers", rope_theta="global_rope_theta",
                              rope_theta_local="local_rope_theta", embed_dropout="embedding_dropout",
                              attn_dropout="attention_dropout", mlp_dropout="mlp_dropout", cls_id="cls_token_id",
                              sep_id="sep_token_id")}
HF_KEYS["roberta"] = HF_KEYS["bert"]
LAYER_TYPES = ("full_attention", "sliding_attention")


def config_from_hf(hf: dict, nsp: bool = False) -> Config:
    """Translate a transformers config.json (including the hub's legacy ModernBERT keys) into a Config."""
    arch = hf.get("model_type")
    if arch not in PRESETS:
        raise ValueError(f"model_type {arch!r} is not supported; supported: {list(PRESETS)}")
    kw = dict(PRESETS[arch], nsp=nsp, pad_id={"bert": 0, "roberta": 1, "modernbert": 50283}[arch])
    kw.update({ours: hf[theirs] for ours, theirs in HF_KEYS[arch].items() if hf.get(theirs) is not None})
    act = hf.get("hidden_activation" if arch == "modernbert" else "hidden_act") or "gelu"
    if act not in HF_ACTS:
        raise ValueError(f"activation {act!r} is not supported; supported: {list(HF_ACTS)}")
    kw["act"] = HF_ACTS[act]
    if arch == "modernbert":
        n, types = kw["layers"], hf.get("layer_types")
        if types:                                               # recover n from the pattern, then insist it fits
            kw["global_every"] = next((i for i in range(1, n) if types[i] == LAYER_TYPES[0]), n)
            if types != [LAYER_TYPES[bool(i % kw["global_every"])] for i in range(n)]:
                raise ValueError(f"layer_types {types} is not 'global every n-th layer', the only pattern supported")
        for field, kind in zip(("rope_theta", "rope_theta_local"), LAYER_TYPES):
            kw[field] = (hf.get("rope_parameters") or {}).get(kind, {}).get("rope_theta", kw[field])
        if bool(hf.get("mlp_bias")) != kw["bias"] or not hf.get("decoder_bias", True):
            raise ValueError("attention_bias must equal mlp_bias and decoder_bias must be true")
        if HF_ACTS.get(hf.get("classifier_activation") or "gelu") != kw["act"]:
            raise ValueError("classifier_activation must equal hidden_activation")
        kw["resid_dropout"] = kw["attn_dropout"]               # one knob drives both in transformers
        return Config(**kw)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported; only 'absolute'")
    kw["pos_offset"] = kw["pad_id"] + 1 if arch == "roberta" else 0
    kw.update(max_len=hf["max_position_embeddings"] - kw["pos_offset"], embed_dropout=kw["resid_dropout"])
    return Config(**kw)


def config_to_hf(cfg: Config) -> dict:
    """The transformers config.json for cfg; refuses configs that no transformers class can express."""
    ours = {"modernbert": dict(positions="rope", prenorm=True, glu=True, type_vocab=0, pos_offset=0,
                               resid_dropout=cfg.attn_dropout, bias=cfg.bias),
            "bert": dict(positions="learned", prenorm=False, glu=False, bias=True, norm_bias=True, head_bias=True,
                         window=0, mlp_dropout=0.0, embed_dropout=cfg.resid_dropout, pos_offset=0)}
    ours["roberta"] = {**ours["bert"], "pos_offset": cfg.pad_id + 1}
    bad = {k: getattr(cfg, k) for k, v in ours[cfg.arch].items() if getattr(cfg, k) != v}
    if bad or (cfg.arch != "modernbert" and cfg.type_vocab < 1):
        raise ValueError(f"this {cfg.arch} config has no transformers equivalent; offending: {bad or 'type_vocab'}")
    act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.act]
    hf = {theirs: getattr(cfg, ours) for ours, theirs in HF_KEYS[cfg.arch].items()}
    hf.update(model_type=cfg.arch, tie_word_embeddings=True)
    if cfg.arch == "modernbert":
        return dict(hf, architectures=["ModernBertForMaskedLM"], hidden_activation=act, classifier_activation=act,
                    mlp_bias=cfg.bias, decoder_bias=True, local_attention=cfg.window or 2 * cfg.max_len,
                    layer_types=[LAYER_TYPES[bool(cfg.window and i % cfg.global_every)] for i in range(cfg.layers)],
                    rope_parameters={kind: {"rope_type": "default", "rope_theta": theta} for kind, theta in
                                     zip(LAYER_TYPES, (cfg.rope_theta, cfg.rope_theta_local))},
                    bos_token_id=cfg.cls_id, eos_token_id=cfg.sep_id)
    name = "BertForPreTraining" if cfg.nsp else {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}[cfg.arch]
    return dict(hf, architectures=[name], hidden_act=act, max_position_embeddings=cfg.max_len + cfg.pos_offset,
                position_embedding_type="absolute")
