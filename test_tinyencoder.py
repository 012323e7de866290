"""Tests for tinyencoder itself: backends and unpadding, packing, masking, sparse prediction,
training steps, input validation, presets, import hygiene, byte codec, initialisation."""

import ast
import collections
import importlib.util
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tinyencoder
from conftest import CPU_BACKENDS, PRESETS, SPECIALS, TRUNC2, assert_close, assert_ran, batch
from conftest import packed_batch, perturb, tiny, variant
from tinyencoder import CLS, IGNORE_INDEX, MASK, PAD, SEP, VOCAB_SIZE, Config, TinyEncoder
from tinyencoder import INDEX_DTYPES, byte_ids, check_tensor, mask_tokens
from data.rows import to_device
from mfu import flops_per_token
import pipelines


# -------------------------------------------------------------------------------------------------
# 3. Backends and layouts agree; 4. packed documents are isolated
@pytest.mark.parametrize("preset", PRESETS)
def test_backends_and_unpadding_agree(preset, kernels):
    base = perturb(TinyEncoder(tiny(preset))).eval()
    ids, doc = packed_batch()
    inputs, labels = mask_tokens(ids, base.cfg, torch.Generator().manual_seed(1))
    keep = doc != 0
    results = {}
    for backend in CPU_BACKENDS:
        for unpad in (False, True):
            model = variant(base, attn_backend=backend, unpad=unpad)
            with torch.no_grad():
                dense = model(inputs, doc)
                sparse = model(inputs, doc, labels=labels)
            assert_ran(kernels, backend, unpad)
            if unpad:
                assert not dense.hidden[~keep].any(), (
                    "unpadded hidden states must be zero at padding"
                )
            results[backend, unpad] = dense.logits[keep], sparse.loss, sparse.logits
    ref = results["eager", False]
    for key, got in results.items():
        assert_close(got[0], ref[0])
        assert abs(got[1].item() - ref[1].item()) <= 1e-4, key
        assert_close(got[2], ref[2])


@pytest.mark.parametrize("rows", ["packed", "padded"])
@pytest.mark.parametrize("preset", PRESETS)
def test_backends_and_unpadding_agree_on_every_gradient(preset, rows, kernels):
    """Every CPU route (SDPA and eager, on rows or on unpadded tokens one document at a time, the
    window in blocks where rows are long) gives eager attention's gradients on padded rows, for
    every parameter. Rows of 24 tokens against a window of 8: the blocks run."""
    base = perturb(TinyEncoder(tiny(preset))).eval()
    ids, doc = packed_batch() if rows == "packed" else batch()
    inputs, labels = mask_tokens(ids, base.cfg, torch.Generator().manual_seed(1), rate=0.3)
    kw = dict(labels=labels)
    if base.cfg.nsp:  # so that BERT's pooler and NSP head get gradients too
        kw["next_sentence_label"] = torch.tensor([0, 1, 0])
    grads = {}
    for backend in CPU_BACKENDS:
        for unpad in (False, True):
            model = variant(base, attn_backend=backend, unpad=unpad)
            model(inputs, doc, **kw).loss.backward()
            assert_ran(kernels, backend, unpad)
            grads[backend, unpad] = {n: p.grad for n, p in model.named_parameters()}
    ref = grads["eager", False]
    for key, got in grads.items():
        for name, grad in ref.items():
            assert grad is not None and grad.abs().max() > 0, name
            assert_close(got[name], grad, 1e-4 * max(1.0, grad.abs().max().item()))


@pytest.mark.parametrize("T", [24, 27])
def test_window_blocks_equal_one_masked_call(T):
    """window_blocks, on rows that are a whole number of blocks and on rows that end in a short
    block, equals one SDPA call under the band mask: output and the gradients of q, k and v, and
    the output without a gradient."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    band = tinyencoder.band_mask(T, 4, torch.device("cpu"))
    grad = torch.randn(2, 3, T, 8, dtype=torch.float64)
    blocks = tinyencoder.window_blocks(q, k, v, band, 4, 0.0)
    blocks_grads = torch.autograd.grad(blocks, (q, k, v), grad)
    one_call = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    one_call_grads = torch.autograd.grad(one_call, (q, k, v), grad)
    assert_close(blocks, one_call, 1e-6)
    for got, want in zip(blocks_grads, one_call_grads):
        assert_close(got, want, 1e-6)
    with torch.no_grad():  # no gradient to carry: the keys are slices of k and v
        assert_close(tinyencoder.window_blocks(q, k, v, band, 4, 0.0), one_call, 1e-6)


def test_eager_attention_keeps_float64():
    """The softmax runs in fp32 or wider: float64 attention is float64 throughout (gradcheck's)."""
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    want = torch.softmax(q @ k.transpose(-1, -2) / 2, dim=-1) @ v
    assert_close(tinyencoder.eager_attention(q, k, v, None, 0.0), want, 1e-12)


def test_nsp_reads_the_first_real_token():
    """On a left-padded row BERT's NSP head reads the text's first token, not a padding slot: the
    same logits unpadded or not, and the ones the row right-padded gives."""
    base = perturb(TinyEncoder(tiny("bert"))).eval()
    text = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    pads = torch.full((1, 3), PAD)
    left, right = torch.cat([pads, text], dim=1), torch.cat([text, pads], dim=1)
    with torch.no_grad():
        want = base(right, (right != PAD).long()).nsp_logits
        for unpad in (False, True):
            got = variant(base, unpad=unpad)(left, (left != PAD).long()).nsp_logits
            assert_close(got, want, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a CUDA device")
@pytest.mark.parametrize("preset", PRESETS)
def test_flash_matches_eager_on_cuda(preset):
    """Flash in bf16 is as close to fp32 eager as eager itself is in bf16: packed rows with
    padding, ModernBERT's window shorter than the first document."""
    cfg = tiny(preset, hidden=64, heads=2, attn_dropout=0.0)
    model = perturb(TinyEncoder(cfg)).to("cuda").eval()
    ids, doc = (t.cuda() for t in packed_batch())
    keep = doc != 0
    with torch.no_grad():
        reference = variant(model, attn_backend="eager")(ids, doc).logits[keep]
        half = model.to(torch.bfloat16)
        errors = {}
        for backend in ("eager", "flash"):
            try:
                logits = variant(half, attn_backend=backend)(ids, doc).logits[keep].float()
            except ValueError as e:  # e.g. a torch without a windowed varlen kernel
                pytest.skip(str(e))
            errors[backend] = (logits - reference).abs().max().item()
    assert errors["flash"] <= 2 * errors["eager"] + 1e-3, errors


def stand_in_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, window_size):
    """flash_attn_varlen_func's arguments, computed on a CPU by eager attention per document."""
    bounds = cu_q.tolist()
    outs = []
    for first, end in zip(bounds, bounds[1:]):
        qd, kd, vd = (t[first:end].transpose(0, 1) for t in (q, k, v))  # (heads, n, head_dim)
        band = None
        assert window_size[0] == window_size[1], window_size  # ours sees as far each side
        if window_size[0] >= 0:
            band = tinyencoder.band_mask(end - first, window_size[0], q.device)
        outs.append(tinyencoder.eager_attention(qd, kd, vd, band, dropout_p).transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def stand_in(monkeypatch):
    """The flash route on a CPU, with stand_in_flash in the flash-attn package's place: the
    wiring, not the kernel. Returns the kernel's calls, counted by dropout rate."""
    monkeypatch.setattr(tinyencoder, "FLASH", "flash-attn")
    counted = collections.Counter()

    def spy(*args, **kwargs):
        counted[args[7]] += 1  # calls by dropout_p
        return stand_in_flash(*args, **kwargs)

    def flash_unless_named(cfg, device, dtype):
        if cfg.attn_backend in ("eager", "sdpa"):
            return cfg.attn_backend
        return "flash"

    monkeypatch.setattr(tinyencoder, "flash_attn_varlen_func", spy)
    monkeypatch.setattr(tinyencoder, "pick_backend", flash_unless_named)
    return counted


@pytest.mark.parametrize("preset", PRESETS)
def test_flash_without_dropout_gives_eager_gradients(preset, stand_in):
    """At dropout 0 the flash route (unpadded tokens, cu_seqlens, the window) gives eager
    attention's logits and every gradient on padded rows, packed rows with padding."""
    base = perturb(TinyEncoder(tiny(preset, hidden=64, heads=2, attn_dropout=0.0)))
    ids, doc = packed_batch()
    keep = doc != 0
    results = {}
    for backend in ("eager", "flash"):
        model = variant(base, attn_backend=backend).eval()
        logits = model(ids, doc).logits
        (logits[keep] * torch.linspace(-1, 1, VOCAB_SIZE)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = logits[keep].detach(), grads
    assert_close(results["flash"][0], results["eager"][0])
    for name, grad in results["eager"][1].items():
        assert_close(results["flash"][1][name], grad, 1e-4 * max(1.0, grad.abs().max().item()))
    assert stand_in[0.0] > 0, "the stand-in kernel did not run"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_flash_dropout_is_seeded_and_unbiased(device, request):
    """BERT trains through flash with its attention dropout: the kernel gets the rate, the same
    seed gives the same output, gradients are finite, and the mean over many seeds is the output
    without dropout (dropout scales what it keeps by 1 / (1 - p)). On a CPU through the stand-in;
    on CUDA through the kernel found at import."""
    if device == "cuda" and not (torch.cuda.is_available() and tinyencoder.FLASH):
        pytest.skip("no CUDA device with a flash kernel")
    counted = collections.Counter()
    if device == "cpu":
        counted = request.getfixturevalue("stand_in")
    torch.manual_seed(0)
    q, k, v = (torch.randn(22, 2, 16, device=device) for _ in range(3))
    if device == "cuda":
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    layout = tinyencoder.make_layout(tiny("bert"), packed_batch()[1][:1].to(device), q.dtype)
    assert layout.backend == "flash"
    clean = tinyencoder.attend(q, k, v, layout, None, 0.0).float()
    draws = []
    for seed in range(300):
        torch.manual_seed(seed)
        draws.append(tinyencoder.attend(q, k, v, layout, None, 0.1).float())
    torch.manual_seed(7)
    assert torch.equal(tinyencoder.attend(q, k, v, layout, None, 0.1).float(), draws[7])
    assert not torch.equal(draws[0], draws[1])
    assert (torch.stack(draws).mean(0) - clean).abs().max() < 0.1 * clean.abs().max()
    model = TinyEncoder(tiny("bert", hidden=64, heads=2)).to(device).train()
    ids, doc = (t.to(device) for t in packed_batch())
    with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
        model(ids, doc, labels=ids.masked_fill(doc == 0, IGNORE_INDEX)).loss.backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
    if device == "cpu":
        assert counted[0.1] > 0, "the kernel never got the dropout rate"


# torch 2.4.1's flash op takes a window but has no meta kernel
FLASH_OP_ON_META = torch._C._dispatch_has_kernel_for_dispatch_key(
    "aten::_flash_attention_forward", "Meta"
)


def test_the_flash_kernel_is_found_on_every_torch_this_takes():
    """Without flash-attn, torch's own flash op is the kernel: every torch from 2.4 on has it with
    a window. A detection that broke would send a GPU to SDPA in silence, and skip the op's test."""
    if importlib.util.find_spec("flash_attn") is not None:
        assert tinyencoder.FLASH == "flash-attn"
    else:
        assert tinyencoder.FLASH == "torch flash op"


@pytest.mark.skipif(
    tinyencoder.FLASH != "torch flash op" or not FLASH_OP_ON_META,
    reason="flash-attn is installed, or this torch's flash op takes no window or no meta tensors",
)
@pytest.mark.parametrize("half_window", [None, 4])
def test_torch_flash_op_takes_the_call_on_meta_tensors(half_window):
    """PyTorch's own flash op, the GPU route where flash-attn is not installed, which the
    stand-in does not reach: attend's call parses against this torch's schema, and the output
    and every gradient have q's shape and dtype. Meta tensors carry shapes, no data, no GPU."""
    shape = (40, 4, 64)  # (N, heads, head_dim): two documents of 10 and 30 tokens
    q, k, v = (torch.randn(shape, device="meta", dtype=torch.bfloat16) for _ in range(3))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cu_seqlens = torch.tensor([0, 10, 40], dtype=torch.int32, device="meta")
    indices = torch.arange(40, device="meta")
    layout = tinyencoder.Unpadded(indices, cu_seqlens, torch.Size([2, 30]), "flash", [10, 30])
    out = tinyencoder.attend(q, k, v, layout, half_window, 0.1)
    assert out.is_meta and out.shape == q.shape and out.dtype == q.dtype
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(grad.shape == q.shape and grad.dtype == q.dtype for grad in grads)


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_packed_documents_are_isolated(preset, unpad):
    model = perturb(TinyEncoder(tiny(preset, unpad=unpad))).eval()
    ids, doc = packed_batch()
    row, d = ids[:1], doc[:1]
    spans = [(0, 11), (11, 17), (17, 22)]  # the first is longer than ModernBERT's window
    with torch.no_grad():
        packed = model(row, d).logits[0]
        for s, e in spans:  # alone in its own row, positions from 0
            assert_close(packed[s:e], model(row[:, s:e]).logits[0])
        other = row.clone()
        other[0, 11:17] = (other[0, 11:17] + 1) % 256  # change every token of document B
        changed = model(other, d).logits[0]
    assert torch.allclose(changed[0:11], packed[0:11], atol=1e-5)
    assert torch.allclose(changed[17:22], packed[17:22], atol=1e-5)
    assert not torch.allclose(changed[11:17], packed[11:17], atol=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_runs_of_one_id_split_by_padding_are_two_documents(preset, backend):
    """In a 0/1 mask each run of 1s is a document: 1 1 0 1 1 is two, not one with a hole."""
    model = perturb(TinyEncoder(tiny(preset, attn_backend=backend, unpad=False))).eval()
    doc = torch.tensor([[1] * 6 + [0] * 3 + [1] * 6])
    ids = torch.randint(0, 256, doc.shape).masked_fill(doc == 0, PAD)
    changed = ids.clone()
    changed[0, 9:] = (ids[0, 9:] + 1) % 256
    with torch.no_grad():
        first, first_changed = model(ids, doc).hidden[0, :6], model(changed, doc).hidden[0, :6]
        alone = model(ids[:, :6], doc[:, :6]).hidden[0]
    assert_close(first, first_changed, 1e-5)
    assert_close(first, alone, 1e-5)


def test_the_document_mask_keeps_documents_and_padding_apart():
    """Each token sees its own document's real tokens; a padding query sees itself alone, so that
    its softmax has a key (with none, a backend may give NaN, and NaN times 0 is NaN)."""
    doc = torch.tensor([[1, 1, 2, 0, 0]])
    mask = tinyencoder.document_mask(doc, tinyencoder.document_starts(doc))
    seen = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, seen[None, None])


@pytest.mark.parametrize("half_window", [None, 4])
@pytest.mark.parametrize("unpad", [False, True])
def test_cpu_attention_dtype_routes(unpad, half_window):
    """On a CPU, SDPA trains faster in fp32 than in bf16, and autocast would run it in bf16: bf16 q,
    k, v that a gradient flows to attend in fp32, under autocast or not, and come back bf16,
    gradients too (a window: blocks). With no gradient, bf16 stays bf16 (a forward is faster so);
    fp16 attends in fp32 either way."""
    doc = packed_batch()[1]
    layout = tinyencoder.make_layout(tiny("modernbert", unpad=unpad), doc, torch.bfloat16)
    torch.manual_seed(0)
    shape = (*layout.gather(doc).shape, 2, 16)  # (B, T, heads, head_dim) or (N, heads, head_dim)
    q, k, v = (torch.randn(shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    in_fp32 = tinyencoder.attend(q.float(), k.float(), v.float(), layout, half_window, 0.0)
    for autocast in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = tinyencoder.attend(q, k, v, layout, half_window, 0.0)
            forward_only = tinyencoder.attend(
                q.detach(), k.detach(), v.detach(), layout, half_window, 0.0
            )
        assert out.dtype == torch.bfloat16 and torch.equal(out, in_fp32.bfloat16())
        assert forward_only.dtype == torch.bfloat16 and not torch.equal(forward_only, out)
        torch.testing.assert_close(forward_only.float(), in_fp32, atol=0.05, rtol=0)
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.isfinite().all() and q.grad.abs().sum() > 0
    half = tinyencoder.attend(
        q.detach().half(), k.detach().half(), v.detach().half(), layout, half_window, 0.0
    )
    assert half.dtype == torch.float16 and torch.equal(half, in_fp32.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_zeroes_its_share_and_keeps_the_mean(dtype):
    """drop on a CPU: it zeroes p of the values (p rounded to 1/65536), scales the rest by the
    exact inverse of the kept share, passes the gradient through the same mask, draws the same
    mask from the same seed; out of training it leaves x as it is."""
    x = torch.ones(1 << 20, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    y = tinyencoder.drop(x, 0.1)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - 6554 / 65536) < 4 * math.sqrt(0.09 / x.numel())
    scale = torch.tensor(65536 / (65536 - 6554)).to(dtype)
    assert y.dtype == dtype and torch.all((y == 0) | (y == scale))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # x is 1: the gradient is the mask times the scale
    torch.manual_seed(0)
    assert torch.equal(tinyencoder.drop(x.detach(), 0.1), y.detach())
    assert not torch.equal(tinyencoder.drop(x.detach(), 0.1), y.detach())
    assert tinyencoder.drop(x, 0.5, training=False) is x
    # at the ends: a rate that rounds to 1 is F.dropout's (not a division by 0); 1/65536 drops
    # that share, not one more in 65,536 (267 of 2^24 here; 547 with one more)
    torch.manual_seed(1)
    nearly_all = tinyencoder.drop(x.detach(), 0.999995)
    torch.manual_seed(1)
    assert torch.equal(nearly_all, F.dropout(x.detach(), 0.999995))
    torch.manual_seed(0)
    rare = tinyencoder.drop(torch.ones(1 << 24, dtype=dtype), 1 / 65536)
    assert 150 < (rare == 0).sum().item() < 400


def op_calls(prof) -> collections.Counter:
    """How often each op ran under a torch.profiler.profile."""
    return collections.Counter(event.name for event in prof.events())


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("preset", ["bert", "modernbert"])
def test_cpu_training_draws_no_bernoulli(preset, unpad):
    """BERT's dropout on a CPU (embeddings, attention probabilities, residual branches) all goes
    through drop's mask: torch's bernoulli_ (F.dropout's, and SDPA's with dropout_p) costs 5-9x
    the random bits there. Padded rows and unpadded documents alike, and a ModernBERT given
    attention dropout, whose local layers attend to a long document in blocks of the window."""
    model = TinyEncoder(tiny(preset, unpad=unpad, attn_dropout=0.1)).train()
    ids, doc = packed_batch()
    inputs, labels = mask_tokens(ids, model.cfg, torch.Generator().manual_seed(3), rate=0.3)
    with torch.profiler.profile() as prof:
        model(inputs, doc, labels=labels).loss.backward()
    ops = op_calls(prof)
    assert ops["aten::bernoulli_"] == 0 and ops["aten::random_"] > 0, ops


# oneDNN's linear runs on any x86 CPU with AVX2 or more; Linear takes it on AMD ones with AVX-512
# only (where it is faster), so the tests below switch it on wherever it runs, to test the wiring.
ONEDNN_KERNEL = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
X86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_onednn = pytest.mark.skipif(
    ONEDNN_KERNEL is None or not X86, reason="oneDNN's linear: an x86 CPU with AVX2 or more"
)


@pytest.fixture
def onednn(monkeypatch):
    """Linear with oneDNN's kernel switched on, on any CPU where it runs."""
    monkeypatch.setattr(tinyencoder, "ONEDNN_LINEAR", ONEDNN_KERNEL)


def linear_twins(bias=True) -> tuple[torch.nn.Linear, tinyencoder.Linear]:
    """A seeded nn.Linear(256, 2048) and a tinyencoder Linear holding its weights."""
    torch.manual_seed(0)
    reference = torch.nn.Linear(256, 2048, bias=bias)
    layer = tinyencoder.Linear(256, 2048, bias=bias)
    layer.load_state_dict(reference.state_dict())
    return reference, layer


@pytest.mark.parametrize("kernel", [pytest.param("onednn", marks=needs_onednn), "F.linear"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 256, 256), (1024, 256), (0, 256), (3, 256), (256,)])
def test_linear_is_nn_linear_on_a_cpu(shape, bias, kernel, monkeypatch):
    """Section 9's Linear gives nn.Linear's output and its input's, weight's and bias's gradients:
    through oneDNN's kernel (forward, input gradient) from 2^29 multiply-adds a call (here 1024
    tokens, 256 -> 2048) where it is on, else F.linear; rows, tokens, one, none; +/- bias."""
    kernels = {"onednn": ONEDNN_KERNEL, "F.linear": None}
    monkeypatch.setattr(tinyencoder, "ONEDNN_LINEAR", kernels[kernel])
    reference, layer = linear_twins(bias)
    x = torch.randn(shape)
    results = []
    for module in (reference, layer):
        xi = x.clone().requires_grad_()
        with torch.profiler.profile() as prof:
            out = module(xi)
            out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        results.append([out, xi.grad, *(p.grad for p in module.parameters())])
    large = x.numel() >= 1024 * 256 and kernel == "onednn"
    assert op_calls(prof)["mkldnn::_linear_pointwise"] == (2 if large else 0)
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)  # empty tensors too


def weight_grad_with_penalty(module, x):
    """The weight's gradient of loss + |d loss / d x|^2: a double backward (create_graph=True)."""
    x = x.clone().requires_grad_()
    loss = torch.tanh(module(x)).sum()
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    return torch.autograd.grad(loss + grad_x.pow(2).sum(), module.weight)[0]


def func_weight_grad(module, x):
    """torch.func.grad of the same loss with respect to the weights, through functional_call."""
    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss(params):
        return torch.tanh(torch.func.functional_call(module, params, (x,))).sum()

    return torch.func.grad(loss)(params)["weight"]


def forward_tangent(module, x):
    """The output's tangent by torch.autograd.forward_ad, for a tangent of ones on x."""
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        return torch.autograd.forward_ad.unpack_dual(module(dual)).tangent


@needs_onednn
@pytest.mark.parametrize("frozen", ["weights", "input"])
def test_onednn_linear_computes_only_the_gradients_needed(frozen, onednn):
    """Frozen weights (an adapter's base layer) get no weight gradient computed, an input that needs
    none no input gradient; what is computed is nn.Linear's."""
    reference, layer = linear_twins()
    x = torch.randn(1024, 256)
    results = []
    for module in (reference, layer):
        module.requires_grad_(frozen != "weights")
        xi = x.clone().requires_grad_(frozen != "input")
        with torch.profiler.profile() as prof:
            module(xi).sum().backward()
        results.append([xi.grad, module.weight.grad, module.bias.grad])
    ops = op_calls(prof)
    if frozen == "weights":  # forward and the input's gradient; no weight gradient
        assert ops["mkldnn::_linear_pointwise"] == 2 and ops["aten::mm"] == 0, ops
    else:  # the forward alone, then the weight's gradient
        assert ops["mkldnn::_linear_pointwise"] == 1 and ops["aten::mm"] == 1, ops
    for ours, theirs in zip(results[1], results[0]):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@needs_onednn
@pytest.mark.parametrize(
    "use",
    ["jit.trace", "torch.func.grad", "vmap", "jvp", "forward AD", "double backward"],
)
def test_linear_traces_transforms_and_differentiates_twice(use, onednn):
    """Where Linear runs oneDNN's kernel (2^29 multiply-adds a call, the kernel on): jit.trace,
    torch.func's grad, vmap and jvp, and torch.autograd.forward_ad take F.linear instead, and a
    gradient penalty's double backward runs the kernel; each gives nn.Linear's numbers (each raised
    in the kernel or its autograd Function before)."""
    reference, layer = linear_twins()
    x = torch.randn(2, 1024, 256)  # vmap's calls see one (1024, 256) slice: 2^29 too
    uses = {
        "jit.trace": lambda module: torch.jit.trace(module, x, check_trace=False)(x),
        "torch.func.grad": lambda module: func_weight_grad(module, x),
        "vmap": lambda module: torch.func.vmap(module)(x),
        "jvp": lambda module: torch.func.jvp(module, (x,), (torch.ones_like(x),))[1],
        "forward AD": lambda module: forward_tangent(module, x),
        "double backward": lambda module: weight_grad_with_penalty(module, x),
    }
    with torch.profiler.profile() as prof:
        ours = uses[use](layer)
    kernel_calls = op_calls(prof)["mkldnn::_linear_pointwise"]
    if use == "double backward":  # forward, the input's gradient, and that gradient's own
        assert kernel_calls >= 3, kernel_calls
    else:
        assert kernel_calls == 0, kernel_calls
    theirs = uses[use](reference)
    # fp32 sums of 1024 products, in two kernels' orders: within 1e-5 of the largest value
    torch.testing.assert_close(ours, theirs, atol=1e-5 * float(theirs.detach().abs().max()), rtol=0)


def linear_step(model, batch_kwargs, **autocast):
    """A training step on a CPU: how often it called oneDNN's linear, and its loss."""
    with torch.profiler.profile() as prof, torch.autocast("cpu", **autocast):
        loss = model(**batch_kwargs).loss
        loss.backward()
    return op_calls(prof)["mkldnn::_linear_pointwise"], loss.detach()


@needs_onednn
@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_fp32_cpu_linears_run_onednn_and_fall_back(preset, unpad, monkeypatch):
    """In fp32, each linear of a layer in a CPU training step at 512 wide on 2048 tokens (2^29
    multiply-adds and more) runs oneDNN's kernel, forward and for its input's gradient; under bf16
    autocast none does, and without the kernel the step's loss and gradients are the ones it
    gives."""
    window = dict(window=32) if preset == "modernbert" else {}  # one SDPA call per document
    model = TinyEncoder(tiny(preset, hidden=512, unpad=unpad, **window))
    ids = torch.randint(0, 256, (32, 64), generator=torch.Generator().manual_seed(0))
    doc = torch.ones_like(ids)
    doc[1::2, 40:] = 2  # odd rows pack two documents
    inputs, labels = mask_tokens(ids, model.cfg, torch.Generator().manual_seed(3), rate=0.3)
    batch_kwargs = dict(input_ids=inputs, attention_mask=doc, labels=labels)
    steps = []
    for kernel in (ONEDNN_KERNEL, None):
        monkeypatch.setattr(tinyencoder, "ONEDNN_LINEAR", kernel)
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout
        calls, loss = linear_step(model, batch_kwargs, enabled=False)
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        steps.append((calls, loss, grads))
    assert steps[0][0] >= 2 * 4 * model.cfg.layers and steps[1][0] == 0
    assert_close(steps[0][1], steps[1][1], 1e-5)
    for with_onednn, without in zip(steps[0][2], steps[1][2]):
        assert_close(with_onednn, without, 1e-5)
    monkeypatch.setattr(tinyencoder, "ONEDNN_LINEAR", ONEDNN_KERNEL)
    assert linear_step(model, batch_kwargs, dtype=torch.bfloat16)[0] == 0


@pytest.mark.parametrize("unpad", [False, True])
def test_cpu_attention_dropout_is_seeded_and_unbiased(unpad):
    """Attention dropout on a CPU (section 3's attention, drop's mask), on padded rows and on
    unpadded documents: the same seed gives the same output, and the mean over many seeds is
    the output without dropout."""
    doc = packed_batch()[1]
    layout = tinyencoder.make_layout(tiny("bert", unpad=unpad), doc, torch.float32)
    shape = (*layout.gather(doc).shape, 2, 16)  # (B, T, heads, head_dim) or (N, heads, head_dim)
    q, k, v = (torch.randn(shape) for _ in range(3))
    clean = tinyencoder.attend(q, k, v, layout, None, 0.0)
    draws = []
    for seed in range(300):
        torch.manual_seed(seed)
        draws.append(tinyencoder.attend(q, k, v, layout, None, 0.1))
    torch.manual_seed(7)
    assert torch.equal(tinyencoder.attend(q, k, v, layout, None, 0.1), draws[7])
    assert not torch.equal(draws[0], draws[1])
    real = layout.gather(doc) != 0  # padding's output is never used
    error = (torch.stack(draws).mean(0) - clean)[real].abs().max()
    assert error < 0.1 * clean[real].abs().max()


@pytest.mark.parametrize("branch", ["attn", "mlp"])
@pytest.mark.parametrize("preset", PRESETS)
def test_residual_dropout_is_the_familys(preset, branch):
    """BERT and RoBERTa drop both branches' outputs before their residual adds; ModernBERT (its
    attention_dropout, transformers' out_drop) only the attention's. With the other branch's output
    projection zeroed, weight and bias, this one alone is left: training mode differs from eval
    mode where it is dropped."""
    cfg = tiny(preset, embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.5, mlp_dropout=0.0)
    model = perturb(TinyEncoder(cfg))
    with torch.no_grad():
        for layer in model.layers:
            other = layer.mlp.down if branch == "attn" else layer.attn.out
            other.weight.zero_()
            if other.bias is not None:
                other.bias.zero_()
    trained, evaluated = train_and_eval(model, *batch())
    dropped = branch == "attn" or preset != "modernbert"
    assert torch.allclose(trained, evaluated, atol=1e-5) != dropped


def train_and_eval(model, ids, mask):
    """The hidden states at real tokens in training mode and in eval mode."""
    real = mask.bool()
    with torch.no_grad():
        return model.train()(ids, mask).hidden[real], model.eval()(ids, mask).hidden[real]


@pytest.mark.parametrize("preset", PRESETS)
def test_embedding_dropout_alone_makes_training_differ(preset):
    off = dict(attn_dropout=0.0, resid_dropout=0.0, mlp_dropout=0.0)
    ids, mask = batch()
    for rate in (0.0, 0.5):
        model = perturb(TinyEncoder(tiny(preset, embed_dropout=rate, **off)))
        trained, evaluated = train_and_eval(model, ids, mask)
        assert torch.allclose(trained, evaluated, atol=1e-5) == (rate == 0.0)


@pytest.mark.parametrize("kind", ["sequence", "token", "span"])
@pytest.mark.parametrize("preset", PRESETS)
def test_classifier_dropout_is_the_familys(preset, kind):
    """A fine-tuning head drops its input at classifier_dropout in training (the trunk's dropout
    off here), but for BERT's and RoBERTa's span heads, which have none, as transformers'."""
    off = dict(embed_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0, mlp_dropout=0.0)
    ids, mask = batch()
    real = mask.bool()
    dropped = {}
    for rate in (0.0, 0.5):
        cfg = tiny(preset, **off, nsp=False, classifier=kind, classifier_dropout=rate)
        model = perturb(TinyEncoder(cfg))
        with torch.no_grad():
            trained, evaluated = model.train()(ids, mask).logits, model.eval()(ids, mask).logits
        if kind != "sequence":  # per token: the real ones
            trained, evaluated = trained[real], evaluated[real]
        dropped[rate] = not torch.allclose(trained, evaluated, atol=1e-6)
    has_dropout = kind != "span" or preset == "modernbert"
    assert dropped == {0.0: False, 0.5: has_dropout}


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_left_padding_and_empty_rows(preset, unpad):
    model = perturb(TinyEncoder(tiny(preset, unpad=unpad))).eval()
    ids, mask = batch()
    n = mask[1].sum().item()
    left_ids, left_mask = ids.roll(-n, 1), mask.roll(-n, 1)  # row 1 becomes left-padded
    empty = mask.clone()
    empty[2] = 0  # row 2 becomes all padding
    with torch.no_grad():
        right, left, gone = (
            model(ids, m).logits for ids, m in ((ids, mask), (left_ids, left_mask), (ids, empty))
        )
    assert_close(left[1, -n:], right[1, :n])  # positions count from the first real token
    assert gone.isfinite().all() and torch.equal(gone[:2], right[:2])
    with torch.no_grad():  # a batch of nothing but padding still runs
        assert model(ids, torch.zeros_like(mask)).logits.isfinite().all()


# -------------------------------------------------------------------------------------------------
# 5. Masking
@pytest.mark.parametrize("preset,rate", [("bert", 0.15), ("roberta", 0.15), ("modernbert", 0.30)])
def test_mask_tokens_statistics(preset, rate):
    cfg = Config.from_preset(preset)
    ids = torch.randint(0, 256, (64, 4096), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1], ids[:, 1000:1500], ids[::3, 7] = CLS, SEP, PAD, MASK
    inputs, labels = mask_tokens(ids, cfg, torch.Generator().manual_seed(1), rate)
    special, picked = torch.isin(ids, SPECIALS), labels != IGNORE_INDEX
    assert not picked[special].any(), "special tokens must never be picked"
    assert torch.equal(labels[picked], ids[picked]) and (labels[~picked] == IGNORE_INDEX).all()
    assert torch.equal(inputs[~picked], ids[~picked])
    n = picked.sum().item()
    assert abs(n / (~special).sum().item() - rate) < 0.005
    masked = (picked & (inputs == MASK)).sum().item() / n
    random = (picked & (inputs != MASK) & (inputs != ids)).sum().item() / n
    kept = (picked & (inputs == ids)).sum().item() / n
    assert (
        abs(masked - 0.8) < 0.01
        and abs(random - 0.1 * 255 / 256) < 0.01
        and abs(kept - 0.1 - 0.1 / 256) < 0.01
    )
    replaced = inputs[picked & (inputs != MASK)]
    assert (replaced >= 0).all() and (replaced < 256).all(), "random replacements must be bytes"
    assert replaced.unique().numel() == 256  # drawn over all bytes, not a narrow range
    _, half = mask_tokens(ids, cfg, torch.Generator().manual_seed(1), rate=0.5)
    assert abs((half != IGNORE_INDEX).sum().item() / (~special).sum().item() - 0.5) < 0.005


def test_mask_tokens_is_deterministic_per_seed():
    cfg = Config.from_preset("bert")
    ids = torch.randint(0, 256, (8, 128))
    a, b, c = (mask_tokens(ids, cfg, torch.Generator().manual_seed(s)) for s in (3, 3, 4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


# -------------------------------------------------------------------------------------------------
# 6. Sparse prediction; 7. training
@pytest.mark.parametrize("unpad", [False, True])
def test_sparse_prediction_matches_dense(unpad):
    """With labels the head runs on the labelled tokens only: the same logits, loss and gradients
    (the tied token embedding's through the decoder among them) as the full head over every
    token, and cross-entropy over the labelled ones."""
    model = perturb(TinyEncoder(tiny("modernbert", unpad=unpad))).eval()
    ids, mask = batch()
    inputs, labels = mask_tokens(ids, model.cfg, torch.Generator().manual_seed(2))
    sel = labels != IGNORE_INDEX
    sparse, dense = model(inputs, mask, labels=labels), model(inputs, mask)
    assert sparse.logits.shape == (sel.sum().item(), VOCAB_SIZE)
    assert dense.logits.shape == (*ids.shape, VOCAB_SIZE)
    assert_close(sparse.logits, dense.logits[sel], 1e-5)
    expected = F.cross_entropy(dense.logits[sel], labels[sel])
    assert abs(sparse.loss.item() - expected.item()) < 1e-5
    sparse_grads = torch.autograd.grad(sparse.loss, list(model.parameters()))
    dense_grads = torch.autograd.grad(expected, list(model.parameters()))
    for (name, _), got, want in zip(model.named_parameters(), sparse_grads, dense_grads):
        assert (got - want).abs().max() <= 1e-5, name


@pytest.mark.parametrize("preset", PRESETS)
def test_adamw_steps_lower_the_loss(preset):
    model = TinyEncoder(tiny(preset))
    ids, mask = batch()
    inputs, labels = mask_tokens(ids, model.cfg, torch.Generator().manual_seed(0), rate=0.3)
    kw = dict(attention_mask=mask, labels=labels)
    if model.cfg.nsp:
        kw["next_sentence_label"] = torch.tensor([0, 1, 0])

    def eval_loss():
        model.eval()
        with torch.no_grad():
            out, mlm = model(inputs, **kw), model(inputs, attention_mask=mask, labels=labels).loss
        if model.cfg.nsp:  # total = MLM + NSP
            assert (
                abs(out.loss - mlm - F.cross_entropy(out.nsp_logits, kw["next_sentence_label"]))
                < 1e-5
            )
        return out.loss.item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(10):
        opt.zero_grad()
        model(inputs, **kw).loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    after = eval_loss()
    assert after < before - 0.2, (before, after)


# -------------------------------------------------------------------------------------------------
# 6. Heads and embeddings
def trained(model, ids, doc_ids, labels, steps):
    """The model in eval mode after steps of AdamW on one batch; every parameter had a finite
    gradient."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(ids, doc_ids, labels=labels).loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    return model.eval()


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_a_batch_with_no_label_that_counts_has_loss_zero(task):
    """As the MLM loss: every label IGNORE_INDEX (a batch of empty texts to tag) gives loss 0 and
    zero gradients, not NaN, so that one such batch does not spoil a run; others, the mean."""
    model = TinyEncoder(tiny("roberta", classifier=task, num_labels=3))
    ids, doc = batch()
    shape = ids.shape if task == "token" else ids.shape[:1]
    out = model(ids, doc, labels=torch.full(shape, IGNORE_INDEX))
    out.loss.backward()
    assert out.loss.item() == 0 and all(not p.grad.any() for p in model.parameters())
    labels = torch.randint(0, 3, shape)
    if task == "token":
        labels = labels.masked_fill(doc == 0, IGNORE_INDEX)
    out = model(ids, doc, labels=labels)
    flat = out.logits.flatten(0, -2)
    assert abs(out.loss.item() - F.cross_entropy(flat, labels.flatten()).item()) < 1e-6


def test_nsp_with_no_label_that_counts_has_loss_zero():
    """BERT's NSP head as the others: every next_sentence_label IGNORE_INDEX gives loss 0 and zero
    gradients, not NaN; others, the mean cross-entropy over those that count."""
    model = TinyEncoder(tiny("bert", nsp=True))
    ids, doc = batch()
    out = model(ids, doc, next_sentence_label=torch.full(ids.shape[:1], IGNORE_INDEX))
    out.loss.backward()
    assert out.loss.item() == 0  # the MLM head, given no labels, has no gradient at all
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    label = torch.tensor([IGNORE_INDEX, *[1] * (len(ids) - 1)])
    out = model(ids, doc, next_sentence_label=label)
    expected = F.cross_entropy(out.nsp_logits[1:], label[1:])
    assert abs(out.nsp_loss.item() - expected.item()) < 1e-6


@pytest.mark.parametrize("task", ["sequence", "token", "span", "choice"])
def test_a_preset_with_a_classifier_has_no_nsp_head(task):
    """BERT's preset is the pretraining model; with a fine-tuning head, as transformers' BERT
    classifiers, it has the pooler where the family's head uses one, but no NSP head."""
    bert = TinyEncoder(Config.from_preset("bert", hidden=32, layers=1, heads=2, classifier=task))
    assert not bert.cfg.nsp and bert.nsp_head is None
    assert (bert.pooler is not None) == (task in ("sequence", "choice"))
    assert Config.from_preset("bert").nsp  # and the pretraining model keeps it


@pytest.mark.parametrize("task", ["sequence", "token"])
@pytest.mark.parametrize("preset", PRESETS)
def test_classifiers_learn_a_byte_rule(preset, task):
    """Each family's head learns whether a byte is >= 128: the second byte's, for a row; each
    byte's, for tags. Every parameter gets a finite gradient; padding never counts."""
    model = TinyEncoder(tiny(preset, nsp=False, classifier=task, num_labels=2))
    ids, mask = batch()
    tags = (ids >= 128).long().masked_fill(mask == 0, IGNORE_INDEX)
    labels = tags[:, 1] if task == "sequence" else tags
    model = trained(model, ids, mask, labels, 40)
    with torch.no_grad():
        guess = model(ids, mask).logits.argmax(-1)
    keep = labels != IGNORE_INDEX
    assert (guess[keep] == labels[keep]).float().mean() >= 0.9


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_encode_is_the_same_alone_or_batched(preset, unpad, kernels):
    """A text's embedding does not depend on the texts batched with it (nor their padding), and
    encode leaves the model in the mode it found it in. On a CPU a batch with padding runs
    unpadded, unpad or not, and gives the padded forward's mean-pooled vectors."""
    model = perturb(TinyEncoder(tiny(preset, unpad=unpad)))
    texts = ["", "a", "hello world", "é" * 30, b"\x00\xff bytes", "x" * 62]
    if preset == "bert":  # a BERT checkpoint's pad id is the byte 0: it stays a token
        model = variant(model, pad_id=0)
    together = pipelines.encode(model, texts, batch_size=4)
    assert model.training, "encode must restore training mode"
    # a batch size counted by NumPy is a whole number too
    assert torch.equal(pipelines.encode(model, texts, batch_size=np.int64(4)), together)
    assert kernels["unpadded"] > 0, dict(kernels)
    cfg = model.cfg
    batch = pipelines.padded([[cfg.cls_id, *byte_ids(t), cfg.sep_id] for t in texts], cfg.pad_id)
    padded_model = variant(model, unpad=False).eval()
    with torch.no_grad():
        hidden = padded_model(batch["input_ids"], batch["attention_mask"]).hidden
    vectors = tinyencoder.pool(hidden, batch["attention_mask"], "mean")
    assert_close(together, F.normalize(vectors, dim=-1), 1e-5)
    alone = torch.cat([pipelines.encode(model, [text]) for text in texts])
    assert_close(together, alone, 1e-5)
    assert pipelines.encode(model, []).shape == (0, model.cfg.hidden)


@pytest.mark.parametrize("preset", PRESETS)
def test_span_and_choice_heads_learn(preset):
    """A span head learns to point at a row's first byte >= 128 (start and end); a choice head to
    pick the choice that holds one. Every parameter gets a finite gradient."""
    ids, mask = batch(lens=(24, 19, 11, 24, 16, 20), lo=0, hi=128)
    g = torch.Generator().manual_seed(1)
    where = torch.stack([torch.randint(1, int(n), (1,), generator=g) for n in mask.sum(1)])[:, 0]
    ids[torch.arange(6), where] = 200
    span = TinyEncoder(tiny(preset, nsp=False, classifier="span"))
    choice = TinyEncoder(tiny(preset, nsp=False, classifier="choice"))
    # each question's three choices: rows 0-2 and 3-5; the right one is the row with byte 200
    plain, _ = batch(lens=(24, 19, 11, 24, 16, 20), lo=0, hi=128, seed=2)
    right = torch.tensor([1, 2])
    choices = plain.clone().unflatten(0, (2, 3))
    choices[torch.arange(2), right] = ids.unflatten(0, (2, 3))[torch.arange(2), right]
    cases = [(span, ids, mask, torch.stack([where, where], 1))]
    cases.append((choice, choices, mask.unflatten(0, (2, 3)), right))
    for model, inputs, doc_ids, labels in cases:
        model = trained(model, inputs, doc_ids, labels, 60)
        with torch.no_grad():
            logits = model(inputs, doc_ids).logits
        guess = logits.argmax(-2 if model is span else -1)
        assert torch.equal(guess, labels), (model.cfg.classifier, guess, labels)


@pytest.mark.parametrize("preset", PRESETS)
def test_span_loss_counts_real_tokens_only(preset):
    """A span's loss is the same padded or unpadded, ignores a position past the row, at padding
    or IGNORE_INDEX, and is the mean of the start's and the end's cross-entropy."""
    model = perturb(TinyEncoder(tiny(preset, nsp=False, classifier="span"))).eval()
    ids, mask = batch()
    spans = torch.tensor([[3, 7], [5, 30], [2, 20]])  # row 1's end past T, row 2's at padding
    with torch.no_grad():
        losses = [variant(model, unpad=u)(ids, mask, labels=spans).loss for u in (False, True)]
        logits = model(ids, mask).logits.masked_fill((mask == 0)[..., None], -1e30)
    assert_close(losses[0], losses[1], 1e-5)
    start = F.cross_entropy(logits[:, :, 0], spans[:, 0])
    end = F.cross_entropy(logits[:1, :, 1], spans[:1, 1])  # row 0's end alone counts
    assert_close(losses[0], (start + end) / 2, 1e-5)
    ignored = spans.clone()
    ignored[1, 1] = IGNORE_INDEX
    # row 0 is whole: an end at T, one past its last token, is past the row too
    at_t, ignored_0 = spans.clone(), spans.clone()
    at_t[0, 1] = ids.shape[1]
    ignored_0[0, 1] = IGNORE_INDEX
    with torch.no_grad():
        assert_close(model(ids, mask, labels=ignored).loss, losses[0], 1e-6)
        assert_close(model(ids, mask, labels=at_t).loss, model(ids, mask, labels=ignored_0).loss)
    # no span counted (every answer cut off by truncation): loss 0 and zero gradients, not NaN
    nothing = model(ids, mask, labels=torch.full_like(spans, IGNORE_INDEX)).loss
    nothing.backward()
    assert nothing.item() == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_choice_batch_frames_each_choice_as_question_row(preset):
    """choice_batch: (questions, choices, T) rows that question_row frames, padded, with a mask
    from the lengths (a byte equal to a checkpoint's pad id stays a token), which a choice model
    scores; each choice alone scores the same."""
    cfg = tiny(preset, nsp=False, classifier="choice", pad_id=0)
    model = perturb(TinyEncoder(cfg)).eval()
    questions, choices = ["q?", "r"], [["a\x00", "bb"], ["ccc", "d"]]
    inputs = pipelines.choice_batch(cfg, questions, choices)
    assert inputs["input_ids"].shape == (2, 2, 7)
    for q in range(2):
        for c in range(2):
            row = pipelines.question_row(cfg, questions[q], choices[q][c])
            n = len(row.ids)
            assert inputs["input_ids"][q, c, :n].tolist() == row.ids
            assert inputs["attention_mask"][q, c].tolist() == [1] * n + [0] * (7 - n)
    with torch.no_grad():
        scores = model(**inputs).logits
        alone = model(**pipelines.choice_batch(cfg, questions[:1], [choices[0][1:]])).logits
    assert scores.shape == (2, 2)
    assert_close(alone[0, 0], scores[0, 1], 1e-5)
    # questions by choices where the two differ in number: 1 question, 3 choices
    one_by_three = pipelines.choice_batch(cfg, ["q"], [["a", "bb", "ccc"]])["input_ids"]
    assert one_by_three.shape[:2] == (1, 3)
    for c, choice in enumerate(["a", "bb", "ccc"]):
        row = pipelines.question_row(cfg, "q", choice).ids
        assert one_by_three[0, c, : len(row)].tolist() == row
    # a question that fills max_len with [CLS] and two [SEP], and empty choices: it fits exactly
    filled = pipelines.choice_batch(cfg, ["q" * (cfg.max_len - 3)], [["", ""]])["input_ids"]
    assert filled.shape == (1, 2, cfg.max_len)


@pytest.mark.parametrize("preset", PRESETS)
def test_question_rows_frame_and_segment_as_the_saved_tokenizer(preset):
    """[CLS] question [SEP] context [SEP]: segment 0 up to the first [SEP], 1 after it where the
    model has two segments (BERT), as a tokenizer's pair; the context where answers may lie."""
    cfg = tiny(preset)
    row = pipelines.question_row(cfg, "ab", "cde")
    assert row.ids == [CLS, *byte_ids("ab"), SEP, *byte_ids("cde"), SEP]
    second = 1 if preset == "bert" else 0
    assert row.token_types == [0] * 4 + [second] * 4
    assert [row.ids[i] for i in row.context] == byte_ids("cde")


def test_best_span_is_the_best_allowed_pair():
    """best_span against every pair: the highest start + end logit with first <= last, at most
    max_length tokens, both allowed; an answer is the text of those bytes."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 2, generator=g)
    allowed = torch.zeros(20, dtype=torch.bool)
    allowed[6:19] = True
    for max_length in (1, 3, 30, 10**30):  # no longer than the row: every length allowed
        pairs = [
            (logits[i, 0] + logits[j, 1], i, j)
            for i in range(20)
            for j in range(i, min(20, i + max_length))
            if allowed[i] and allowed[j]
        ]
        _, first, last = max(pairs)
        assert pipelines.best_span(logits, allowed, max_length) == (first, last)
    # the best end logit on the closing [SEP], which no answer may end on
    logits = torch.zeros(5, 2)
    logits[4, 1] = 10.0
    allowed = torch.tensor([False, True, True, True, False])
    first, last = pipelines.best_span(logits, allowed, 30)
    assert allowed[first] and allowed[last] and first <= last
    # a character cut at either end is taken whole, never past a special id
    ids = [SEP, *byte_ids("dé€f"), SEP]
    assert pipelines.span_text(ids, 1, 3) == "dé"
    assert pipelines.span_text(ids, 1, 2) == "dé"
    assert pipelines.span_text(ids, 3, 5) == "é€"
    assert pipelines.span_text(ids, 5, 5) == "€"
    assert pipelines.span_text([SEP, *byte_ids("é")[1:], SEP], 1, 1) == "\ufffd"


# -------------------------------------------------------------------------------------------------
# 8. Bad input: one-line ValueErrors that name the argument, what it got and what is allowed
ROW = torch.full((2, 8), 65)
ONES = torch.ones(2, 8, dtype=torch.long)
NAN = float("nan")


def forward(preset, input_ids=ROW, **inputs):
    """Call a tiny model of the preset, in eval mode."""
    return TinyEncoder(tiny(preset)).eval()(input_ids, **inputs)


def masked(preset, ids=ROW):
    return mask_tokens(ids, tiny(preset), torch.Generator().manual_seed(0))


def classify(preset, labels, classifier="sequence", num_labels=3):
    """A tiny classifier of the preset on ROW, with these labels."""
    cfg = tiny(preset, nsp=False, classifier=classifier, num_labels=num_labels)
    return TinyEncoder(cfg).eval()(ROW, labels=labels)


def embed(preset, texts, vocab_size=VOCAB_SIZE, pad_id=PAD, **kw):
    model = TinyEncoder(tiny(preset, vocab_size=vocab_size, pad_id=pad_id))
    return pipelines.encode(model, texts, **kw)


def classifier(preset, kind):
    """A tiny model of the preset with a classifier of that kind, of 3 labels."""
    return TinyEncoder(tiny(preset, nsp=False, classifier=kind, num_labels=3))


def named(model, names):
    """The model, its classes named."""
    model.label_names = names
    return model


def span_labels(preset, labels):
    """A tiny span model of the preset on ROW, with these (start, end) labels."""
    return TinyEncoder(tiny(preset, nsp=False, classifier="span")).eval()(ROW, labels=labels)


def choose(preset, input_ids, labels):
    """A tiny multiple-choice model of the preset on input_ids, with these labels."""
    model = TinyEncoder(tiny(preset, nsp=False, classifier="choice")).eval()
    return model(input_ids, labels=labels)


def set_column(t, value, dtype=None):
    """A copy of t, converted to dtype, whose fourth column holds value."""
    t = t.to(dtype or t.dtype, copy=True)
    t[:, 3] = value
    return t


def changed_by_hand(preset):
    """A model of a config whose field was set after it was made, to a value it refuses."""
    cfg = tiny(preset)
    cfg.heads = 5  # does not divide hidden=32
    return TinyEncoder(cfg)


class Bad(NamedTuple):
    call: Callable  # called with a preset name
    match: str  # a regular expression the message must match
    presets: tuple = PRESETS


NO_NSP = ("roberta", "modernbert")
SEGMENTS = ("bert", "roberta")
BAD_CALLS = {
    "ids list": Bad(
        lambda p: forward(p, ROW.tolist()), r"input_ids must be a \(batch, seq\) .*list"
    ),
    "ids 1-D": Bad(lambda p: forward(p, ROW[0]), r"input_ids must be a \(batch, seq\).*\[8\]"),
    "empty batch": Bad(lambda p: forward(p, ROW[:0]), r"input_ids must be .*\[0, 8\]"),
    "empty rows": Bad(lambda p: forward(p, ROW[:, :0]), r"input_ids must be .*\[2, 0\]"),
    "ids float": Bad(
        lambda p: forward(p, ROW.float()), r"input_ids .* of int64/int32, got .*float32"
    ),
    "id 320": Bad(
        lambda p: forward(p, set_column(ROW, 320)), r"input_ids .* in \[0, 320\); got 320"
    ),
    "id -1": Bad(lambda p: forward(p, set_column(ROW, -1)), r"input_ids .* in \[0, 320\); got -1"),
    "mask shape": Bad(
        lambda p: forward(p, attention_mask=ONES[:, :7]), r"attention_mask must be a \(2, 8\) .*7\)"
    ),
    "mask list": Bad(
        lambda p: forward(p, attention_mask=ONES.tolist()), r"attention_mask .*got list"
    ),
    "mask negative": Bad(
        lambda p: forward(p, attention_mask=set_column(ONES, -1)),
        r"attention_mask must hold whole numbers in \[0, inf\); got -1",
    ),
    "mask 0.5": Bad(
        lambda p: forward(p, attention_mask=set_column(ONES, 0.5, torch.float)), r"got 0.5$"
    ),
    "mask nan": Bad(lambda p: forward(p, attention_mask=set_column(ONES, NAN, torch.float)), "nan"),
    "mask complex": Bad(
        lambda p: forward(p, attention_mask=ONES.to(torch.complex64)), r"attention_mask .*complex64"
    ),
    "types 2": Bad(
        lambda p: forward(p, token_type_ids=ONES * 2),
        r"token_type_ids .*\[0, 2\); got 2",
        ("bert",),
    ),
    "types 1": Bad(
        lambda p: forward(p, token_type_ids=ONES), r"token_type_ids .*\[0, 1\); got 1", ("roberta",)
    ),
    "types float": Bad(
        lambda p: forward(p, token_type_ids=ONES.float() * 0), r"token_type_ids .*float32", SEGMENTS
    ),
    "types unused": Bad(
        lambda p: forward(p, token_type_ids=ONES * 0),
        r"token_type_ids given, but this model has none",
        ("modernbert",),
    ),
    "labels 5000": Bad(
        lambda p: forward(p, labels=set_column(ONES * -100, 5000)),
        r"labels must hold whole numbers in \[0, 320\) or -100; got 5000",
    ),
    "labels -5": Bad(lambda p: forward(p, labels=set_column(ONES * -100, -5)), r"labels .*got -5"),
    "labels float": Bad(
        lambda p: forward(p, labels=ROW.float()), r"labels .*of int64, got .*float32"
    ),
    "labels int32": Bad(lambda p: forward(p, labels=ROW.int()), r"labels .*of int64, got .*int32"),
    "labels shape": Bad(lambda p: forward(p, labels=ROW[:, :5]), r"labels must be a \(2, 8\)"),
    "nsp label 2": Bad(
        lambda p: forward(p, next_sentence_label=torch.tensor([0, 2])),
        r"next_sentence_label .*\[0, 2\) or -100; got 2",
        ("bert",),
    ),
    "nsp label shape": Bad(
        lambda p: forward(p, next_sentence_label=torch.zeros(2, 1, dtype=torch.long)),
        r"next_sentence_label must be a \(2,\) tensor",
        ("bert",),
    ),
    "nsp label unused": Bad(
        lambda p: forward(p, next_sentence_label=torch.tensor([0, 1])),
        "next_sentence_label given, but this model has no NSP head",
        NO_NSP,
    ),
    "too long": Bad(
        lambda p: forward(p, torch.full((1, 65), 65)), r"document of 65 tokens exceeds max_len=64"
    ),
    "flash on cpu": Bad(
        lambda p: TinyEncoder(tiny(p, attn_backend="flash")).eval()(ROW),
        r"attn_backend='flash' needs flash-attn or torch's flash op, sm80\+ GPU.*got cpu",
    ),
    "mlm rate 1.5": Bad(
        lambda p: mask_tokens(ROW, tiny(p), rate=1.5),
        r"mask_tokens' rate=1.5 must be a number in \(0, 1\]",
    ),
    "mlm rate str": Bad(
        lambda p: mask_tokens(ROW, tiny(p), rate="0.15"),
        r"mask_tokens' rate='0.15' must be a number in \(0, 1\]",
    ),
    "mlm rate nan": Bad(
        lambda p: mask_tokens(ROW, tiny(p), rate=float("nan")),
        r"mask_tokens' rate=nan must be a number in \(0, 1\]",
    ),
    "masking floats": Bad(lambda p: masked(p, ROW.float()), r"ids must be a \(2, 8\) .*float32"),
    "masking a list": Bad(lambda p: masked(p, ROW.tolist()), "mask_tokens takes a tensor of ids"),
    "masking id 400": Bad(lambda p: masked(p, set_column(ROW, 400)), r"ids .*\[0, 320\); got 400"),
    "heads 0": Bad(lambda p: tiny(p, heads=0), "Config.heads=0 must be above 0"),
    "negative width": Bad(lambda p: tiny(p, hidden=-32), "Config.hidden=-32 must be at least 0"),
    "mlm rate 0": Bad(
        lambda p: mask_tokens(ROW, tiny(p), rate=0.0), r"mask_tokens' rate=0.0 must be a number"
    ),
    "heads str": Bad(lambda p: tiny(p, heads="4"), "Config.heads='4' is not of type int"),
    "width float": Bad(lambda p: tiny(p, hidden=32.0), "Config.hidden=32.0 is not of type int"),
    "prenorm str": Bad(
        lambda p: tiny(p, prenorm="yes"), "Config.prenorm='yes' is not of type bool"
    ),
    "odd window": Bad(lambda p: tiny(p, window=7), "Config.window=7 must be even"),
    "dropout 1": Bad(
        lambda p: tiny(p, attn_dropout=1.0), "Config.attn_dropout=1.0 must be below 1"
    ),
    "pad id": Bad(lambda p: tiny(p, pad_id=320), "Config.pad_id=320 must be below vocab_size=320"),
    "heads divide": Bad(
        lambda p: tiny(p, hidden=30), "Config.heads=4 must be a divisor of hidden=30"
    ),
    "eps nan": Bad(lambda p: tiny(p, norm_eps=NAN), "Config.norm_eps=nan must be at least 0"),
    # an infinite init_std made every hidden state NaN, and an infinite eps every one 0
    "std inf": Bad(lambda p: tiny(p, init_std=math.inf), "Config.init_std=inf must be at least"),
    "global every 0": Bad(
        lambda p: tiny(p, global_every=0), "Config.global_every=0 must be above 0"
    ),
    # ModernBERT's truncated normal divides by it: a ZeroDivisionError while the model was built
    "init std 0": Bad(lambda p: tiny(p, init_std=0.0), "Config.init_std=0.0 must be above 0"),
    "rope odd": Bad(
        lambda p: tiny(p, hidden=40, heads=8),
        "Config.heads=8 .*RoPE's head_dim is even",
        ("modernbert",),
    ),
    "activation": Bad(lambda p: tiny(p, act="relu"), r"Config.act='relu' is not one of \['gelu'"),
    "backend": Bad(
        lambda p: tiny(p, attn_backend="cudnn"), r"attn_backend='cudnn'.*'auto', 'flash', 'sdpa'"
    ),
    "preset": Bad(lambda p: Config.from_preset("electra"), r"unknown preset 'electra'.*'bert'"),
    "preset given a config": Bad(
        lambda p: Config.from_preset(tiny(p)), r"unknown preset Config\(arch='bert'", ("bert",)
    ),
    "model of a name": Bad(lambda p: TinyEncoder(p), r"a Config is needed .*, got str"),
    "config changed by hand": Bad(changed_by_hand, r"Config.heads=5 must be a divisor of hidden"),
    "masking for a model": Bad(
        lambda p: mask_tokens(ROW, TinyEncoder(tiny(p))), "a Config, got Tensor and TinyEncoder"
    ),
    "encode int": Bad(lambda p: byte_ids(5), "byte_ids takes str or bytes, got int"),
    "class 3 of 3": Bad(
        lambda p: classify(p, torch.tensor([0, 3])), r"labels .*\[0, 3\) or -100; got 3"
    ),
    "row labels per token": Bad(
        lambda p: classify(p, ONES), r"labels must be a \(2,\) tensor of int64, got \(2, 8\)"
    ),
    "regression ints": Bad(
        lambda p: classify(p, torch.tensor([1, 2]), num_labels=1),
        r"labels must be a \(2,\) tensor of float16/.*float64, got \(2,\) torch.int64",
    ),
    "tag 5 of 3": Bad(
        lambda p: classify(p, set_column(ONES, 5), "token"), r"\[0, 3\) or -100; got 5"
    ),
    "classifier": Bad(lambda p: tiny(p, classifier="ner"), r"classifier='ner' is not one of"),
    "no labels": Bad(lambda p: tiny(p, num_labels=0), "Config.num_labels=0 must be above 0"),
    "nsp and classifier": Bad(
        lambda p: tiny(p, classifier="token", nsp=True), "Config.nsp=True must be False", ("bert",)
    ),
    "span shape": Bad(
        lambda p: span_labels(p, torch.tensor([3, 7])), r"labels must be a \(2, 2\) tensor"
    ),
    "span -5": Bad(lambda p: span_labels(p, torch.tensor([[3, 7], [-5, 2]])), r"got -5"),
    "choices 2-D": Bad(
        lambda p: choose(p, ROW, torch.tensor([0, 1])),
        r"input_ids must be a \(batch, seq\) .*choices.*\[2, 8\]",
    ),
    "choice 3 of 3": Bad(
        lambda p: choose(p, ROW[:, None].expand(2, 3, 8), torch.tensor([0, 3])),
        r"labels must hold whole numbers in \[0, 3\) or -100; got 3",
    ),
    "question too long": Bad(
        lambda p: pipelines.question_row(tiny(p), "q" * 62, ""),
        "question is 62 bytes; max_len=64 leaves no room",
    ),
    "context too long": Bad(
        lambda p: pipelines.question_row(tiny(p), "q" * 20, "c" * 42),
        "context is 42 bytes; after the question, room for 41",
    ),
    "choice counts": Bad(
        lambda p: pipelines.choice_batch(tiny(p), ["a", "b"], [["x", "y"], ["z"]]),
        r"choices\[1\] has 1 choices and choices\[0\] 2",
    ),
    "answer unfit": Bad(
        lambda p: pipelines.answer(TinyEncoder(tiny(p)), "q", "c"), "answer needs a span model"
    ),
    "embed a str": Bad(lambda p: embed(p, "hello"), "encode takes a list of texts, got str"),
    "embed pooling": Bad(
        lambda p: embed(p, ["a"], pooling="max"), "encode's pooling is 'mean' or 'cls', .*'max'"
    ),
    # a set's vectors would come in no order the caller knows, and a dict's would be its keys'
    "embed a set": Bad(lambda p: embed(p, {"a", "b"}), "encode takes a list of texts, got set"),
    "classify a dict": Bad(
        lambda p: pipelines.classify(classifier(p, "sequence"), {"a": 1}),
        "classify takes a list of texts, got dict",
    ),
    "embed normalize str": Bad(
        lambda p: embed(p, ["a"], normalize="no"), "normalize True or False; got 'mean' and 'no'"
    ),
    "classify a tagger": Bad(
        lambda p: pipelines.classify(classifier(p, "token"), ["a"]),
        r"classify needs a sequence model \(Config.classifier='sequence'\), not 'token'",
    ),
    "tag an MLM model": Bad(
        lambda p: pipelines.tag(TinyEncoder(tiny(p)), ["a"]),
        r"tag needs a token model \(Config.classifier='token'\), not 'none'",
    ),
    "tag too long": Bad(
        lambda p: pipelines.tag(classifier(p, "token"), ["ok", "x" * 63]),
        r"tag's texts\[1\] is 65 tokens, over max_len=64",
    ),
    # names that are not one per class: a regression read as classes, an index past the names
    "classify names short": Bad(
        lambda p: pipelines.classify(named(classifier(p, "sequence"), ["a"]), ["x"]),
        r"model.label_names must be a list of num_labels=3 names, got \['a'\]",
    ),
    # an empty list is no names either (it read as none set: LABEL_0, ...)
    "classify names empty": Bad(
        lambda p: pipelines.classify(named(classifier(p, "sequence"), []), ["x"]),
        r"model.label_names must be a list of num_labels=3 names, got \[\]",
    ),
    "tag names long": Bad(
        lambda p: pipelines.tag(named(classifier(p, "token"), list("abcd")), ["x"]),
        "model.label_names must be a list of num_labels=3 names",
    ),
    "tag a 0-d array": Bad(
        lambda p: pipelines.tag(classifier(p, "token"), np.array("abc")),
        "tag takes a list of texts, got ndarray",
    ),
    "embed dict keys": Bad(
        lambda p: embed(p, {"a": 1, "b": 2}.keys()), "encode takes a list of texts, got dict_keys"
    ),
    "classify batch 0": Bad(
        lambda p: pipelines.classify(classifier(p, "sequence"), ["a"], batch_size=0),
        "classify's batch_size must be a whole number above 0, got 0",
    ),
    "embed too long": Bad(
        lambda p: embed(p, ["x" * 63]), r"encode's texts\[0\] is 65 tokens, over max_len=64"
    ),
    "embed None": Bad(lambda p: embed(p, None), "encode takes a list of texts, got NoneType"),
    "embed a choice model": Bad(
        lambda p: pipelines.encode(TinyEncoder(tiny(p, nsp=False, classifier="choice")), ["a"]),
        "encode takes a model of rows of text, not a multiple-choice one",
    ),
    "questions a str": Bad(
        lambda p: pipelines.choice_batch(tiny(p), "q", [["a", "b"]]),
        "choice_batch takes a list of questions and one of choices, got str and list",
    ),
    "answer no context": Bad(
        lambda p: pipelines.answer(TinyEncoder(tiny(p, classifier="span", nsp=False)), "q", ""),
        "answer's context is empty: no span of it can answer",
    ),
    "rate True": Bad(
        lambda p: mask_tokens(ROW, tiny(p), rate=True), r"mask_tokens' rate=True must be a number"
    ),
    "choices None": Bad(
        lambda p: pipelines.choice_batch(tiny(p), ["q"], [None]),
        r"choices\[0\] must be a list of one choice or more, got None",
    ),
    "embed an int": Bad(
        lambda p: embed(p, ["a", 5]), r"encode's texts\[1\] must be str or bytes, got int"
    ),
    # a lone surrogate (JSON's "\udc80" escape reads as one) has no UTF-8 bytes
    "embed a surrogate": Bad(
        lambda p: embed(p, ["a", "x\udc80"]),
        r"encode's texts\[1\]: '\\udc80' at character 1 is a lone surrogate, not text",
    ),
    "answer an int": Bad(
        lambda p: pipelines.answer(TinyEncoder(tiny(p, classifier="span", nsp=False)), 5, "c"),
        "question must be str or bytes, got int",
    ),
    "choice a surrogate": Bad(
        lambda p: pipelines.choice_batch(tiny(p), ["q"], [["a", "\udc80"]]),
        r"choices\[0\]\[1\]: '\\udc80' at character 0 is a lone surrogate",
    ),
    "ids on meta": Bad(
        lambda p: forward(p, ROW.to("meta")),
        "input_ids is on meta, the model on cpu: move it there",
    ),
    "mask on meta": Bad(
        lambda p: forward(p, attention_mask=ONES.to("meta")), "attention_mask is on meta, the model"
    ),
    "labels on meta": Bad(lambda p: forward(p, labels=ROW.to("meta")), "labels is on meta, the"),
    "pool no mask": Bad(
        lambda p: tinyencoder.pool(torch.zeros(2, 8, 4), None, "mean"),
        r"pool's doc_ids must be a \(2, 8\) tensor",
    ),
    "pool mask shape": Bad(
        lambda p: tinyencoder.pool(torch.zeros(2, 8, 4), ROW[:, :7], "mean"),
        r"pool's doc_ids must be a \(2, 8\) tensor",
    ),
    "pool max": Bad(
        lambda p: tinyencoder.pool(torch.zeros(2, 8, 4), ROW, "max"),
        "pooling 'max' is neither 'cls' nor 'mean'",
    ),
    "embed batch 0": Bad(lambda p: embed(p, ["a"], batch_size=0), "batch_size must be .* got 0"),
    "embed wordpiece": Bad(
        lambda p: embed(p, ["a"], vocab_size=30522, pad_id=0),
        r"not a byte-level model \(vocab_size=30522, cls_id=257, sep_id=258; bytes are 0-255\)",
    ),
    # a [SEP] that is a byte (a newline) would read the text's newlines as [SEP]
    "embed sep a byte": Bad(
        lambda p: pipelines.encode(TinyEncoder(tiny(p, sep_id=10)), ["a"]),
        r"not a byte-level model \(vocab_size=320, cls_id=257, sep_id=10; bytes are 0-255\)",
    ),
    "embed a bytearray": Bad(
        lambda p: embed(p, bytearray(b"hi")), "encode takes a list of texts, got bytearray"
    ),
    # the model where its Config is asked for: one line, not torch's AttributeError
    "choices of a model": Bad(
        lambda p: pipelines.choice_batch(TinyEncoder(tiny(p)), ["q"], [["a", "b"]]),
        r"a Config is needed \(a model's is model.cfg\), got TinyEncoder",
    ),
    "question row of a model": Bad(
        lambda p: pipelines.question_row(TinyEncoder(tiny(p)), "q", "c"),
        r"a Config is needed \(a model's is model.cfg\), got TinyEncoder",
    ),
    "best span allowed ints": Bad(
        lambda p: pipelines.best_span(torch.zeros(4, 2), torch.ones(4, dtype=torch.long)),
        r"best_span's allowed must be a \(4,\) bool tensor, one per token",
        ("bert",),
    ),
    # one value would broadcast to every token
    "best span allowed short": Bad(
        lambda p: pipelines.best_span(torch.zeros(4, 2), torch.ones(1, dtype=torch.bool)),
        r"best_span's allowed must be a \(4,\) bool tensor, one per token",
        ("bert",),
    ),
    "best span length 0": Bad(
        lambda p: pipelines.best_span(torch.zeros(4, 2), torch.ones(4, dtype=torch.bool), 0),
        "best_span's max_length must be a whole number above 0, got 0",
        ("bert",),
    ),
    "embed a dict": Bad(
        lambda p: pipelines.encode({"arch": p}, ["a"]), "encode takes a TinyEncoder, got dict"
    ),
    "answer length 0": Bad(
        lambda p: pipelines.answer(TinyEncoder(tiny(p, classifier="span", nsp=False)), "q", "c", 0),
        "answer's max_length must be a whole number above 0, got 0",
    ),
    "choices a str": Bad(
        lambda p: pipelines.choice_batch(tiny(p), ["q"], ["ab"]),
        r"choices\[0\] must be a list of one choice or more, got 'ab'",
    ),
}
BAD_CASES = [(case, p) for case, bad in BAD_CALLS.items() for p in bad.presets]


@pytest.mark.parametrize("case,preset", BAD_CASES)
def test_bad_input_raises_value_error(case, preset):
    with pytest.raises(ValueError, match=BAD_CALLS[case].match) as raised:
        BAD_CALLS[case].call(preset)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("preset", PRESETS)
def test_encode_and_answer_leave_the_training_mode_as_it_was_after_an_error(preset):
    """A model embedding or answering mid-training stays in training mode (dropout on) after
    the call, an error raised in its forward included."""
    model = TinyEncoder(tiny(preset, classifier="span", nsp=False, attn_backend="flash"))
    for call in (
        lambda: pipelines.encode(model, ["a", "bb"]),
        lambda: pipelines.answer(model, "q", "c"),
    ):
        with pytest.raises(ValueError, match="flash"):  # no flash kernel on a CPU
            call()
        assert model.training
    # each module as it was: a layer the caller froze in eval mode stays so, the rest train
    model.layers[0].eval()
    model.cfg.attn_backend = "auto"
    pipelines.encode(model, ["a", "bb"])
    pipelines.answer(model, "q", "c")
    assert not model.layers[0].training and not model.layers[0].attn.training
    assert model.training and all(layer.training for layer in model.layers[1:])


@pytest.mark.parametrize("preset", PRESETS)
def test_the_lone_copy_embedding_is_encode_before_normalising(preset):
    """What pipelines.py's docstring and the README tell a lone copy of tinyencoder.py to do:
    frame the text as [CLS] bytes [SEP], and pool the model's output in eval mode."""
    model = perturb(TinyEncoder(tiny(preset)))
    text = "def f(x): return x"
    ids = torch.tensor([[model.cfg.cls_id, *tinyencoder.byte_ids(text), model.cfg.sep_id]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        vector = tinyencoder.pool(model.eval()(ids, mask).hidden, mask, "mean")
    assert_close(vector, pipelines.encode(model, [text], normalize=False), 1e-5)


def test_tag_gives_each_character_its_first_byte_tag_in_runs():
    """pipelines.tag's spans: runs of one tag over characters (bytes, for bytes given), "O" left
    out, each character tagged as its first byte is: seen through a forward that tags UTF-8's
    continuation bytes "cont" and the others by whether they are letters."""
    model = classifier("modernbert", "token").eval()
    model.label_names = ["O", "letter", "cont"]

    def forward(ids, attention_mask=None, layout=None):
        letters = (ids >= ord("a")) & (ids <= ord("z"))
        continuation = (ids >= 0x80) & (ids < 0xC0)
        tags = torch.where(continuation, 2, letters.long())  # (B, T)
        return tinyencoder.Output(hidden=None, logits=F.one_hot(tags, 3).float())

    model.forward = forward
    texts = ["ab é€cd", b"a\xc3\xa9", "", "  ", bytearray(b"a\xc3\xa9")]
    # é and € begin with bytes that are neither letters nor continuations
    as_bytes = [[0, 1, "letter"], [2, 3, "cont"]]
    expected = [[[0, 2, "letter"], [5, 7, "letter"]], as_bytes, [], [], as_bytes]
    assert pipelines.tag(model, texts, batch_size=2) == expected
    # classes named by numbers, as a model's label_names may be set by hand, are names too; and
    # np.unique's names (NumPy refused its truth value deep inside)
    model.label_names = [0, 1, 2]
    assert pipelines.tag(model, ["ab"]) == [[[0, 2, "1"]]]
    model.label_names = np.array(["O", "word", "cont"])
    assert pipelines.tag(model, ["ab"]) == [[[0, 2, "word"]]]
    assert pipelines.tag_runs(["a", "a", "O", "a", "b", "b", "a"]) == [
        [0, 2, "a"],
        [3, 4, "a"],
        [4, 6, "b"],
        [6, 7, "a"],
    ]
    # the B-/I- scheme: B-X starts a run of X, I-X goes on with one (or starts one after another)
    bio = ["B-X", "I-X", "B-X", "I-X", "O", "I-X", "B-Y", "I-X", "my-tag", "B-O", "I-O"]
    expected = [[0, 2, "X"], [2, 4, "X"], [5, 6, "X"], [6, 7, "Y"], [7, 8, "X"], [8, 9, "my-tag"]]
    assert pipelines.tag_runs(bio) == expected


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_classify_and_tag_give_the_same_alone_or_batched(preset, kind):
    """A text's verdict or tags do not depend on the texts batched with it (their lengths, its
    padding, whether the batch ran unpadded), and match the model's own forward on the framed
    text, in eval mode whatever mode the model was in."""
    model = perturb(classifier(preset, kind), scale=1.0)
    texts = ["short", "def f(x): return x + 1", "", "x" * 40, "ab"]
    call = {"sequence": pipelines.classify, "token": pipelines.tag}[kind]
    together = call(model, texts, batch_size=3)
    alone = [call(model, [text])[0] for text in texts]
    assert model.training
    if kind == "token":
        assert together == alone
    else:
        assert [v["label"] for v in together] == [v["label"] for v in alone]
        scores = [v["score"] for v in alone]
        # fp32 sums in another order, from weights perturbed at scale 1: 1.4e-5 apart on torch 2.11
        assert [v["score"] for v in together] == pytest.approx(scores, abs=1e-4)
    framed = torch.tensor([[CLS, *tinyencoder.byte_ids(texts[1]), SEP]])
    with torch.no_grad():
        logits = model.eval()(framed).logits
    if kind == "sequence":
        probability, best = logits.softmax(-1).max(-1)
        assert together[1]["label"] == f"LABEL_{int(best)}"
        assert together[1]["score"] == pytest.approx(float(probability), abs=1e-5)
    else:
        tags = [f"LABEL_{i}" for i in logits[0, 1:-1].argmax(-1).tolist()]
        assert together[1] == pipelines.tag_runs(tags) and together[1]


@pytest.mark.parametrize("preset", PRESETS)
def test_legitimate_edge_cases_keep_working(preset):
    """Masks as bool, int or 0/1 floats; int32 ids; padding rows; the ignore index; a batch of
    padding only."""
    model = perturb(TinyEncoder(tiny(preset))).eval()
    ids, mask = batch()
    with torch.no_grad():
        ref = model(ids, mask).logits
        for dtype in (torch.bool, torch.uint8, torch.int32, torch.float16, torch.float32):
            assert_close(model(ids, mask.to(dtype)).logits, ref, 0)
        assert_close(model(ids.int(), mask).logits, ref, 0)
        # int32 ids give int64 labels, which forward takes
        inputs, masked_labels = mask_tokens(ids.int(), model.cfg, torch.Generator().manual_seed(0))
        assert inputs.dtype == torch.int64 and masked_labels.dtype == torch.int64
        assert model(inputs, mask, labels=masked_labels).loss.isfinite()
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, 2] = ids[:, 2]
        assert model(ids, mask, labels=labels).loss.isfinite()
        padding_only = model(ids, mask * 0).hidden
        assert padding_only.shape == (*ids.shape, model.cfg.hidden)
        if model.cfg.type_vocab:
            assert_close(model(ids, mask, token_type_ids=torch.zeros_like(ids)).logits, ref, 0)
        if model.cfg.nsp:
            nsp = torch.tensor([0, IGNORE_INDEX, 1])
            assert model(ids, mask, labels=labels, next_sentence_label=nsp).loss.isfinite()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("unpad", [False, True])
def test_a_layout_made_ahead_from_any_mask_dtype_is_forwards_own(preset, unpad):
    """make_layout takes the masks forward takes: a bool row starting with a real token has its
    document start there (F.pad's -1 is True in bool), and uint8 ids pad without overflow."""
    model = perturb(TinyEncoder(tiny(preset, unpad=unpad))).eval()
    ids, mask = batch(lens=(24, 19, 11))
    left_padded = torch.tensor([[0] * 4 + [1] * 20])
    with torch.no_grad():
        for rows, doc in ((ids, mask), (ids[:1], left_padded), (ids[:1], torch.full((1, 24), 255))):
            ref = model(rows, doc).logits
            for dtype in (torch.bool, torch.uint8):
                layout = tinyencoder.make_layout(model.cfg, doc.to(dtype), torch.float32)
                assert_close(model(rows, doc.to(dtype), layout=layout).logits, ref, 0)


@pytest.mark.parametrize("unpad", [False, True])
def test_a_layout_made_ahead_with_labels_on_padding_picks_real_tokens_only(unpad):
    """A label on padding never counts: make_layout's labelled tokens leave it out, so that the
    logits are those of a layout forward makes itself (it took one more row, on padded rows)."""
    model = perturb(TinyEncoder(tiny("bert", unpad=unpad))).eval()
    ids, mask = batch(lens=(24, 19, 11))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3], labels[1, 2], labels[1, 20] = 65, 66, 67  # row 1's 20th token is padding
    layout = tinyencoder.make_layout(model.cfg, mask, torch.float32, labels=labels)
    with torch.no_grad():
        ahead = model(ids, mask, labels=labels, layout=layout)
        inside = model(ids, mask, labels=labels)
    assert len(layout.labelled) == 2 and ahead.logits.shape == (2, VOCAB_SIZE)
    assert_close(ahead.logits, inside.logits, 0)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_row_of_padding_alone_pools_to_zero_with_or_without_unpad(preset, pooling):
    """unpad is speed, not function: a row with no real token pools to 0 either way (it took the
    pad token's hidden state at position 0 on padded rows), for a classifier and for NSP."""
    over = dict(nsp=False, classifier="sequence", classifier_pooling=pooling)
    model = perturb(TinyEncoder(tiny(preset, **over))).eval()
    ids, mask = batch(lens=(24, 0, 11))
    with torch.no_grad():
        padded, unpadded = (variant(model, unpad=u)(ids, mask).logits for u in (False, True))
        assert_close(padded, unpadded, 1e-5)
        pooled = torch.zeros(1, model.cfg.hidden)
        if model.pooler is not None:
            pooled = torch.tanh(model.pooler(pooled))
        assert_close(padded[1], model.classifier(pooled)[0], 1e-6)
        if preset == "bert":
            nsp = perturb(TinyEncoder(tiny("bert"))).eval()
            padded, unpadded = (variant(nsp, unpad=u)(ids, mask).nsp_logits for u in (False, True))
            assert_close(padded, unpadded, 1e-5)


def test_values_are_not_read_off_the_host():
    """Off a CPU (a GPU batch; here the meta device) the value checks, which would wait for the
    device, are skipped, but shapes, dtypes and the device are still checked."""
    out_of_range, meta = torch.full((2, 8), 999), torch.device("meta")
    check_tensor("ids", out_of_range.to(meta), (2, 8), INDEX_DTYPES, VOCAB_SIZE, meta)
    with pytest.raises(ValueError, match="got 999"):
        check_tensor("ids", out_of_range, (2, 8), INDEX_DTYPES, VOCAB_SIZE, out_of_range.device)
    with pytest.raises(ValueError, match="ids must be a"):
        check_tensor("ids", out_of_range.float().to(meta), (2, 8), INDEX_DTYPES, VOCAB_SIZE, meta)
    with pytest.raises(ValueError, match="ids is on cpu, the model on meta"):
        check_tensor("ids", out_of_range, (2, 8), INDEX_DTYPES, VOCAB_SIZE, meta)


def readme_python_block(heading):
    """The first ```python block after a heading of README.md, as its lines."""
    text = (Path(__file__).parent / "README.md").read_text(encoding="utf-8")
    after_heading = text.split(f"\n{heading}\n", 1)[1]
    return after_heading.split("```python\n", 1)[1].split("```", 1)[0].splitlines()


def test_the_readme_s_bad_input_calls_raise_the_errors_it_shows():
    """Each call in README's "Bad input" block raises the ValueError the comment under it
    shows, word for word, and every other line runs: the README quotes what the code says."""
    namespace = {}
    previous = None
    shown = 0
    for line in readme_python_block("## Bad input"):
        if line.startswith("# ValueError: "):
            with pytest.raises(ValueError) as caught:
                exec(previous, namespace)
            assert str(caught.value) == line.removeprefix("# ValueError: ")
            shown += 1
            previous = None
            continue
        if previous is not None:
            exec(previous, namespace)
        previous = line
    assert shown == 13


def test_the_readme_s_module_in_one_screen_runs_as_its_comments_say():
    """README's one screen runs (less its two lines that need a transformers folder, which
    test_hf.py covers), and gives the shapes its comments give."""
    lines = readme_python_block("## The module in one screen")
    folder_lines = [line for line in lines if "path/to/" in line or "tinyencoder_hf.save" in line]
    assert len(folder_lines) == 2
    # the comments that the assertions below hold the code to
    said = "\n".join(lines)
    for comment in ("out.logits: (labelled, 320)", "(2, 256), unit length", "(1, T, 2)"):
        assert comment in said
    namespace = {}
    exec("\n".join(line for line in lines if line not in folder_lines), namespace)
    out, labels, ids = namespace["out"], namespace["labels"], namespace["ids"]
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.logits.shape == ((labels != IGNORE_INDEX).sum().item(), VOCAB_SIZE)
    assert namespace["vectors"].shape == (2, 256)
    assert_close(namespace["vectors"].norm(dim=-1), torch.ones(2), 1e-6)
    span = namespace["qa"](ids, labels=torch.tensor([[3, 5]]))
    assert span.logits.shape == (1, ids.shape[1], 2) and torch.isfinite(span.loss)
    assert pipelines.answer(namespace["qa"], "default of x", "def f(x=1): ...") in "def f(x=1): ..."


# -------------------------------------------------------------------------------------------------
# 9. Config
BASE = dict(hidden=768, heads=12)
PAPER = {
    "bert": dict(
        BASE,
        layers=12,
        intermediate=3072,
        norm_eps=1e-12,
        max_len=512,
        positions="learned",
        prenorm=False,
        type_vocab=2,
        nsp=True,
        window=0,
    ),
    "roberta": dict(
        BASE,
        layers=12,
        intermediate=3072,
        norm_eps=1e-5,
        max_len=512,
        positions="learned",
        prenorm=False,
        type_vocab=1,
        nsp=False,
    ),
    "modernbert": dict(
        BASE,
        layers=22,
        intermediate=1152,
        norm_eps=1e-5,
        max_len=8192,
        positions="rope",
        prenorm=True,
        glu=True,
        bias=False,
        norm_bias=False,
        window=128,
        global_every=3,
        rope_theta=160000.0,
        rope_theta_local=10000.0,
        init="megatron",
        nsp=False,
    ),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_default_to_paper_base_size(preset):
    cfg = Config.from_preset(preset)
    assert {k: getattr(cfg, k) for k in PAPER[preset]} == PAPER[preset]
    model = TinyEncoder(
        Config.from_preset(preset, hidden=24, heads=2, intermediate=8)
    )  # only the layer pattern
    local = [layer.attn.half_window is not None for layer in model.layers]
    assert local == [preset == "modernbert" and i % 3 != 0 for i in range(cfg.layers)]
    assert {layer.attn.half_window for layer in model.layers} <= {None, 64}


@pytest.mark.parametrize("preset", PRESETS)
def test_flops_per_token_counts_weights_and_attended_keys(preset):
    model = TinyEncoder(Config.from_preset(preset, hidden=64, heads=2, layers=3))
    n = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name not in ("tok_embed.weight", "pos_embed.weight")
    )
    keys = (
        512 + 2 * 129 if preset == "modernbert" else 3 * 512
    )  # sliding layers: 64 keys each side and itself
    assert flops_per_token(model, 512) == 6 * n + 12 * 64 * keys


@pytest.mark.parametrize(
    "preset,hidden,intermediate",
    [("bert", 96, 384), ("roberta", 384, 1536), ("modernbert", 96, 144)],
)
def test_hidden_override_derives_intermediate(preset, hidden, intermediate):
    assert Config.from_preset(preset, hidden=hidden).intermediate == intermediate
    assert Config.from_preset(preset, hidden=hidden, intermediate=100).intermediate == 100


@pytest.mark.parametrize(
    "preset,over",
    [
        ("bert", dict(positions="rope", prenorm=False)),
        ("bert", dict(glu=True)),
        ("roberta", dict(prenorm=True, positions="rope", unpad=True)),
        ("modernbert", dict(prenorm=False, glu=False, bias=True, unpad=False)),
        ("modernbert", dict(positions="learned", max_len=64, act="gelu_tanh")),
    ],
)
def test_unusual_combinations_run_forward_and_backward(preset, over):
    model = TinyEncoder(tiny(preset, **over))
    up_width = 2 * model.cfg.intermediate if model.cfg.glu else model.cfg.intermediate
    assert model.layers[0].mlp.up.out_features == up_width
    ids, doc = packed_batch()
    inputs, labels = mask_tokens(ids, model.cfg, torch.Generator().manual_seed(0))
    nsp = torch.tensor([0, 1, 1]) if model.cfg.nsp else None
    out = model(inputs, doc, labels=labels, next_sentence_label=nsp)
    out.loss.backward()
    assert out.loss.isfinite() and all(
        p.grad is not None and p.grad.isfinite().all() for p in model.parameters()
    )


# -------------------------------------------------------------------------------------------------
# 10. import hygiene; 11. byte codec
def test_import_needs_only_torch():
    code = (
        "import sys; sys.modules['transformers'] = None; sys.modules['safetensors'] = None; "
        "sys.modules['numpy'] = None; import tinyencoder; "
        "assert 'tinyencoder_hf' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def project_imports() -> dict[str, set[str]]:
    """Each of the project's modules -> the project modules it imports, at any depth of its code
    (imports inside functions count too)."""
    root = Path(__file__).parent
    files = sorted(root.glob("*.py")) + sorted((root / "data").glob("*.py"))
    names = {str(f.relative_to(root).with_suffix("")).replace("/", "."): f for f in files}
    graph = {}
    for name, path in names.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {module for module in imported if module in names and module != name}
    return graph


def test_the_import_graph_has_no_cycle():
    """Scripts -> libraries -> tinyencoder: no module imports one that imports it back."""
    graph = project_imports()
    assert graph["tinyencoder"] == set()
    # train.py reads its checkpoints without the transformers conversion (finetune.py needs it to
    # start from a transformers folder)
    assert "tinyencoder_hf" not in graph["train"]

    def cycle_from(module, path):
        if module in path:
            return path[path.index(module) :] + [module]
        for imported in sorted(graph[module]):
            found = cycle_from(imported, path + [module])
            if found:
                return found
        return None

    for module in graph:
        assert cycle_from(module, []) is None, " -> ".join(cycle_from(module, []))


def test_rope_scores_depend_on_relative_position_only():
    """RoPE turns each pair of a head by its position's angles: a query at m and a key at n score
    q.k as at m + s and n + s, and a turn keeps a vector's length (no transformers needed)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 16, generator=g)  # (heads, head_dim) each
    positions = torch.tensor([3, 11, 3 + 40, 11 + 40])
    cos, sin = tinyencoder.rope_tables(positions, 16, 10000.0)  # (4, 1, 8) each
    turned_q = tinyencoder.rotate(q.expand(4, 1, 16), cos, sin)
    turned_k = tinyencoder.rotate(k.expand(4, 1, 16), cos, sin)
    near = (turned_q[0] * turned_k[1]).sum()
    shifted = (turned_q[2] * turned_k[3]).sum()
    assert_close(near, shifted, 1e-5)
    assert_close(turned_q.norm(dim=-1), q.norm(dim=-1).expand(4, 1), 1e-5)
    assert not torch.allclose(near, (turned_q[0] * turned_k[3]).sum(), atol=1e-3)


def test_rope_turns_each_pair_of_a_head_half_apart():
    """Pair i of a head is (x_i, x_{i + head_dim/2}), as transformers' rotate_half pairs them: a
    quarter turn takes e_0 to e_{head_dim/2}. (Both halves swapped on the way out would give the
    same scores, q and k alike, but not the same rotate.)"""
    x = torch.zeros(1, 1, 8)
    x[..., 0] = 1.0
    cos, sin = torch.zeros(1, 1, 4), torch.ones(1, 1, 4)
    turned = torch.zeros(1, 1, 8)
    turned[..., 4] = 1.0
    assert torch.equal(tinyencoder.rotate(x, cos, sin), turned)


def test_roberta_reads_positions_from_past_its_pad_id():
    """fairseq's positions: a row's first real token reads row pad_id + 1 of the table."""
    model = TinyEncoder(tiny("roberta"))
    read = []
    model.pos_embed.register_forward_hook(lambda module, args, out: read.append(args[0]))
    ids, mask = batch()
    model(ids, mask)
    assert read[0].min() == PAD + 1 and model.cfg.pos_offset == PAD + 1


def test_rope_tables_are_made_once_and_stay_out_of_checkpoints(monkeypatch):
    """The model holds rope_tables' cos and sin of every position below max_len for each theta
    (a longer document is an input error), made once: a forward looks them up, never makes them
    again; checkpoints hold none of it."""
    model = TinyEncoder(tiny("modernbert", rope_theta=160000.0))
    cfg = model.cfg
    assert not any(name in ("cos", "sin") for name in model.state_dict())
    assert model.cos.shape[:2] == (2, cfg.max_len) and model.sin.shape == model.cos.shape
    positions = torch.tensor([[0, 5, 63]])
    for i, theta in enumerate((cfg.rope_theta, cfg.rope_theta_local)):
        cos, sin = tinyencoder.rope_tables(positions, cfg.head_dim, theta)
        assert torch.equal(model.cos[i, positions], cos)
        assert torch.equal(model.sin[i, positions], sin)

    def made_again(*args):
        raise AssertionError("rope_tables called in a forward")

    monkeypatch.setattr(tinyencoder, "rope_tables", made_again)
    ids, doc = packed_batch()
    model(ids, doc).logits.sum().backward()


def test_byte_ids():
    raw = bytes(range(256)) + b"\xff\xfe\xc3(\xe2\x82"  # every byte, then invalid UTF-8
    assert byte_ids(raw) == list(raw) and bytes(byte_ids(bytearray(raw))) == raw
    assert byte_ids("héllo ✓") == list("héllo ✓".encode())


# -------------------------------------------------------------------------------------------------
# 12. Initialisation
def test_bert_and_roberta_init():
    bert = TinyEncoder(Config.from_preset("bert", hidden=128, layers=2, heads=2))
    assert not bert.tok_embed.weight[PAD].any(), "BERT's pad embedding row starts at zero"
    w = torch.cat(
        [
            bert.tok_embed.weight[:PAD].flatten(),
            bert.layers[0].attn.qkv.weight.flatten(),
            bert.layers[1].mlp.down.weight.flatten(),
            bert.pos_embed.weight.flatten(),
        ]
    )
    assert abs(w.std().item() - 0.02) < 0.0005 and abs(w.mean().item()) < 0.0005
    assert w.abs().max().item() > 3.5 * 0.02, "HF BERT init is an untruncated normal"
    assert not bert.layers[0].attn.qkv.bias.any() and not bert.mlm_head.bias.any()
    roberta = TinyEncoder(Config.from_preset("roberta", hidden=32, layers=1, heads=2))
    assert not roberta.pos_embed.weight[PAD].any() and roberta.pos_embed.weight[PAD + 1].any()


@pytest.mark.parametrize("offset, max_len", [(1, 128), (1, 512), (3, 64)])
def test_a_position_offset_zeroes_the_row_below_the_first_position(offset, max_len):
    """The row just below pos_offset starts at 0, RoBERTa's pad row whatever its offset; row pad_id
    was zeroed instead: an IndexError with a table of under 257 rows, a row in use zeroed above."""
    model = TinyEncoder(Config(hidden=32, layers=1, heads=2, pos_offset=offset, max_len=max_len))
    rows = model.pos_embed.weight
    assert not rows[offset - 1].any() and rows[offset:].abs().sum(1).all()


@pytest.mark.parametrize("preset", PRESETS)
def test_the_pad_row_takes_no_gradient_from_the_lookup(preset):
    """As transformers' padding_idx: a PAD id read as a real token (no attention_mask) adds its row,
    but the row learns nothing from it. A sequence head: no tied decoder writes to the row."""
    model = perturb(TinyEncoder(tiny(preset, classifier="sequence")))
    ids, _ = batch(lens=(24, 24))
    # read as real tokens: no mask given
    ids[:, 5:9] = PAD
    model(ids, labels=torch.tensor([0, 1])).loss.backward()
    grad = model.tok_embed.weight.grad
    assert not grad[PAD].any() and grad[ids[0, 1]].any()


def test_modernbert_classifier_out_starts_at_hidden_to_the_minus_half():
    """transformers' ModernBERT: final_out ~ N(0, hidden^-0.5) truncated at 2 std, not init_std."""
    cfg = Config.from_preset(
        "modernbert", hidden=128, layers=2, heads=2, classifier="sequence", num_labels=64
    )
    w = TinyEncoder(cfg).classifier.out.weight.detach()
    s = cfg.hidden**-0.5
    assert w.abs().max() <= 2 * s + 1e-7 and abs(w.std().item() / (TRUNC2 * s) - 1) < 0.05


def test_modernbert_init():
    L, std = 4, 0.02
    model = TinyEncoder(Config.from_preset("modernbert", hidden=128, layers=L, heads=2))
    out_std = std / math.sqrt(2 * L)
    layers = model.layers
    groups = {
        std: [model.tok_embed.weight]
        + [p for x in layers for p in (x.attn.qkv.weight, x.mlp.up.weight)],
        out_std: [model.mlm_head.dense.weight]
        + [p for x in layers for p in (x.attn.out.weight, x.mlp.down.weight)],
    }
    for s, params in groups.items():
        w = torch.cat([p.detach().flatten() for p in params])
        assert w.abs().max().item() <= 2 * s + 1e-7, "truncated at 2 std"
        assert abs(w.std().item() / (TRUNC2 * s) - 1) < 0.03, (s, w.std().item())
    assert model.tok_embed.weight[PAD].any(), "ModernBERT leaves the pad row random"


@pytest.mark.parametrize("preset", PRESETS)
def test_labels_at_padding_are_ignored_with_and_without_unpadding(preset):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, IGNORE_INDEX)
    labels[1, 15] = 65  # a label on padding must not count
    clean = labels.masked_fill(mask == 0, IGNORE_INDEX)
    # the MLM head's, and a token classifier's (a tag on padding, as transformers would count)
    tags = (ids % 3).masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX)
    tags[1, 15] = 2
    cases = [(TinyEncoder(tiny(preset)), labels, clean)]
    tagger = TinyEncoder(tiny(preset, nsp=False, classifier="token", num_labels=3))
    cases.append((perturb(tagger), tags, tags.masked_fill(mask == 0, IGNORE_INDEX)))
    for model, given, clean in cases:
        model.eval()
        losses = [variant(model, unpad=u)(ids, mask, labels=given).loss for u in (False, True)]
        assert torch.allclose(losses[0], losses[1], atol=1e-5)
        assert torch.allclose(losses[0], model(ids, mask, labels=clean).loss, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_row_longer_than_max_len(preset):
    """max_len bounds each document, not the row: two 40-token documents fit a model of 64
    positions, learned or RoPE's."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, 80))
    docs = torch.tensor([[1] * 40 + [2] * 40])
    model = TinyEncoder(tiny(preset)).eval()
    out = model(ids, docs).logits
    alone = model(ids[:, 40:]).logits
    assert torch.allclose(out[:, 40:], alone, atol=1e-5)
    # beside a row of one short document and 70 tokens of padding, which is not a long document
    short = torch.tensor([[1] * 10 + [0] * 70])
    both = model(ids.expand(2, -1), torch.cat([docs, short])).logits
    assert torch.allclose(both[:1, 40:], alone, atol=1e-5)
    assert torch.allclose(both[1:, :10], model(ids[:, :10]).logits, atol=1e-5)


def test_whole_rows_run_batched_on_a_cpu():
    """cfg.unpad on a CPU: rows that are each one whole document stay Padded rows with no mask
    (batched calls, as transformers' run them); padding or packing unpads. The same logits and
    gradients either way, local layers' windows (8 tokens here) included."""
    cfg = tiny("modernbert")
    model = perturb(TinyEncoder(cfg))
    ids, whole = torch.randint(0, 256, (3, 40)), torch.ones(3, 40, dtype=torch.long)
    layout = tinyencoder.make_layout(cfg, whole, torch.float32)
    assert isinstance(layout, tinyencoder.Padded) and layout.mask is None and cfg.unpad
    for doc in (packed_batch()[1], batch()[1]):
        assert isinstance(tinyencoder.make_layout(cfg, doc, torch.float32), tinyencoder.Unpadded)
    starts = tinyencoder.document_starts(whole)
    unpadded = tinyencoder.Unpadded.from_doc_ids(whole, starts, "sdpa")
    results = []
    for given in (layout, unpadded):
        model.zero_grad()
        out = model(ids, labels=ids, layout=given)
        out.loss.backward()
        results.append([out.logits, *(p.grad.clone() for p in model.parameters())])
    for batched, per_document in zip(*results):
        assert_close(batched, per_document, 1e-5)


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_a_layout_made_ahead_gives_the_same_step(preset, unpad):
    """make_layout on the batch builder's side (with the labels, so that masked_lm picks no tokens
    itself) gives the forward's own logits, loss and gradients."""
    model = perturb(TinyEncoder(tiny(preset, unpad=unpad)))
    ids, doc = packed_batch()
    inputs, labels = mask_tokens(ids, model.cfg, torch.Generator().manual_seed(3), rate=0.3)
    layout = tinyencoder.make_layout(model.cfg, doc, torch.float32, "cpu", labels)
    assert layout.labelled is not None and isinstance(layout, tinyencoder.Unpadded) == unpad
    results = []
    for given in (None, layout):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout
        out = model(inputs, doc, labels=labels, layout=given)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((out.logits, out.loss, grads))
    assert_close(results[1][0], results[0][0], 0)
    assert results[1][1].item() == results[0][1].item()
    for own, ahead in zip(results[0][2], results[1][2]):
        assert_close(ahead, own, 0)


@pytest.mark.parametrize("unpad", [False, True])
def test_the_batch_builder_moves_a_layout_whole(unpad):
    """data/rows.py's to_device takes a layout as it takes a tensor: each tensor field moves (here
    to the meta device), the rest stay as they were."""
    ids, doc = packed_batch()
    labels = mask_tokens(ids, tiny("bert"), torch.Generator().manual_seed(3), rate=0.3)[1]
    layout = tinyencoder.make_layout(tiny("bert", unpad=unpad), doc, torch.float32, "cpu", labels)
    before = {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}
    after = vars(to_device(layout, torch.device("meta")))
    moved = [name for name, value in before.items() if torch.is_tensor(value)]
    assert len(moved) >= 2 and all(after[name].is_meta for name in moved)
    assert all(after[name] == value for name, value in before.items() if name not in moved)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_step_with_a_layout_made_ahead_compiles_whole(preset):
    """Given its layout, a training forward has no graph break at all: nothing in it reads the
    device's values or has a size that depends on them (the flash route on a GPU likewise)."""
    import torch._dynamo

    model = TinyEncoder(tiny(preset, unpad=True))
    ids, doc = packed_batch()
    inputs, labels = mask_tokens(ids, model.cfg, torch.Generator().manual_seed(3), rate=0.3)
    layout = tinyencoder.make_layout(model.cfg, doc, torch.float32, "cpu", labels)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(inputs, doc, labels=labels, layout=layout)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a GPU's matter")
def test_a_compiled_gpu_step_never_waits_for_the_host():
    """A compiled training step on CUDA, its layout made ahead, runs with syncs made errors."""
    model = TinyEncoder(tiny("modernbert", unpad=True)).cuda()
    step = torch.compile(model)
    ids, doc = packed_batch()
    inputs, labels = mask_tokens(ids, model.cfg, torch.Generator().manual_seed(3), rate=0.3)
    layout = tinyencoder.make_layout(model.cfg, doc, torch.bfloat16, "cuda", labels)
    layout = to_device(layout, torch.device("cuda"))  # pinned, without waiting
    batch = dict(input_ids=inputs.cuda(), attention_mask=doc.cuda(), labels=labels.cuda())
    with torch.autocast("cuda", torch.bfloat16):
        step(**batch, layout=layout).loss.backward()  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", torch.bfloat16):
            step(**batch, layout=layout).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -------------------------------------------------------------------------------------------------
# 11. torch.compile: few graph breaks, none inside the layer stack
RESUMED = re.compile(r"^torch_dynamo_resume_in_(\w+)_at_\d+$")


def test_import_leaves_the_compiler_unloaded():
    """import tinyencoder loads torch and not torch._dynamo, which took over a second more on a
    2-core CPU (as @torch.compiler.disable at import): every script starts that much sooner."""
    code = "import sys, tinyencoder; print('torch._dynamo' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stdout + run.stderr[-2000:]


class Logits(torch.nn.Module):
    """A model's logits alone: what jit.trace and torch.export take back from a forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask).logits


def masks_to_check():
    """Packed documents with padding, full rows, right padding: (3, 24) each."""
    return [packed_batch()[1], torch.ones(3, 24, dtype=torch.long), batch(lens=(24, 5, 13))[1]]


@pytest.mark.parametrize("length", [24, 4])
@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_a_trace_on_full_rows_keeps_documents_apart_later(preset, unpad, length):
    """jit.trace on two rows of one document each, no padding (the usual example), then three
    packed or padded rows of 24: eager's logits. The trace kept the example's layout (no mask;
    nothing to unpad), so that every later batch attended to its padding and across its documents;
    and an example within half a window (4 tokens) kept no band: local layers attended globally."""
    model = perturb(TinyEncoder(tiny(preset, unpad=unpad))).eval()
    example = batch(lens=(length, length), T=length)[0]
    ids = packed_batch()[0]
    with torch.no_grad():
        traced = torch.jit.trace(
            Logits(model), (example, torch.ones_like(example)), check_trace=False
        )
        for mask in masks_to_check():
            real = mask != 0
            assert_close(traced(ids, mask)[real], model(ids, mask).logits[real], 1e-5)


def test_only_a_traced_layout_bands_a_row_within_reach(monkeypatch):
    """A row within half a window needs no band, and a traced layout builds one anyway (the trace
    must hold for longer rows); a compiled CPU forward's attend_documents, where transformed() is
    true too, still gets none for its short documents (it got an all-True one in every layer)."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(tinyencoder, "transformed", lambda: True)
    assert tinyencoder.band_mask.__wrapped__(4, 4, cpu) is None
    assert tinyencoder.band_mask.__wrapped__(4, 4, cpu, traced=True).all()
    doc = torch.ones(1, 4, dtype=torch.long)
    layout = tinyencoder.make_layout(tiny("modernbert"), doc, torch.float32)
    assert layout.local_mask.shape == (1, 1, 4, 4) and layout.local_mask.all()


def test_a_traced_layout_is_rows_where_flash_would_run(monkeypatch):
    """Flash (on a GPU) attends to unpadded tokens, whose count and split a trace would fix: a
    traced forward gets rows under the document mask there too."""
    cfg = tiny("modernbert")
    doc = packed_batch()[1]
    monkeypatch.setattr(tinyencoder, "pick_backend", lambda cfg, device, dtype: "flash")
    assert isinstance(tinyencoder.make_layout(cfg, doc, torch.bfloat16), tinyencoder.Unpadded)
    monkeypatch.setattr(tinyencoder, "transformed", lambda: True)
    layout = tinyencoder.make_layout(cfg, doc, torch.bfloat16)
    assert isinstance(layout, tinyencoder.Padded)
    assert torch.equal(
        layout.mask, tinyencoder.document_mask(doc, tinyencoder.document_starts(doc))
    )


def test_a_traced_classifier_takes_another_batch_size():
    """A sequence classifier traced on two rows runs on three: pooling picked each row's first
    token at arange(len(hidden)), a length that a trace keeps as the example's."""
    model = perturb(TinyEncoder(tiny("roberta", classifier="sequence"))).eval()
    example = batch(lens=(24, 24))[0]
    ids, mask = batch()
    with torch.no_grad():
        traced = torch.jit.trace(
            Logits(model), (example, torch.ones_like(example)), check_trace=False
        )
        assert_close(traced(ids, mask), model(ids, mask).logits, 1e-5)


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_export_traces_a_forward_that_keeps_documents_apart(preset, unpad):
    """torch.export (non-strict: its default from torch 2.7, and the ONNX exporter's tracer) goes
    through the forward, the layout made as rows under a document mask: the program gives eager's
    logits on packed, full and padded rows. Eager calls after it still run: export's band, a fake
    tensor, stays out of band_mask's cache. (Export stopped at a data-dependent guard before.)"""
    model = perturb(TinyEncoder(tiny(preset, unpad=unpad))).eval()
    ids, doc = packed_batch()
    program = torch.export.export(Logits(model), (ids, doc), strict=False).module()
    with torch.no_grad():
        for mask in masks_to_check():
            real = mask != 0
            assert_close(program(ids, mask)[real], model(ids, mask).logits[real], 1e-5)


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_forward_breaks_outside_the_layers(preset, unpad):
    """A forward with labels breaks at two places, both outside the layers: where the layout is
    built from the documents, and where masked_lm picks the labelled tokens (counted in both frames
    it stops: forward's and masked_lm's). Value checks are skipped while compiling."""
    import torch._dynamo

    model = TinyEncoder(tiny(preset, unpad=unpad))
    ids, mask = batch()
    inputs, labels = mask_tokens(ids, model.cfg, torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(inputs, mask, labels=labels)
    assert explained.graph_break_count <= 4, [b.reason for b in explained.break_reasons]
    for graph_break in explained.break_reasons:
        # torch 2.4 names the frame that resumes after a break torch_dynamo_resume_in_forward_at_N
        functions = [RESUMED.sub(r"\1", frame.name) for frame in graph_break.user_stack]
        # make_layout (called by TinyEncoder.forward), or masked_lm: never a layer's forward
        assert functions.count("forward") <= 1, (graph_break.reason, functions)
        assert functions[-1] in ("make_layout", "masked_lm"), (graph_break.reason, functions)


# -------------------------------------------------------------------------------------------------
# Tests from a mutation run over sections 7-9 of tinyencoder.py
def test_roberta_sequence_head_drops_its_input_before_the_dense_layer_too():
    """RoBERTa's sequence head (transformers' RobertaClassificationHead) drops its input before
    the dense layer and again before the output layer: two masks, drawn in that order."""
    cfg = tiny("roberta", nsp=False, classifier="sequence", num_labels=3, classifier_dropout=0.5)
    head = perturb(tinyencoder.Classifier(cfg)).train()
    x = torch.randn(4, cfg.hidden)
    torch.manual_seed(1)
    got = head(x)
    torch.manual_seed(1)
    inner = torch.tanh(head.dense(tinyencoder.drop(x, 0.5)))
    assert_close(got, head.out(tinyencoder.drop(inner, 0.5)), 0)


@pytest.mark.parametrize("preset", PRESETS)
def test_one_label_makes_a_regression_of_rows_not_of_tokens(preset):
    """num_labels=1 makes a sequence head a regression; a token classifier of one class still
    takes class ids (padding's -100), and its cross-entropy over a single class is 0."""
    model = TinyEncoder(tiny(preset, nsp=False, classifier="token", num_labels=1))
    ids, mask = batch()
    labels = torch.zeros_like(ids).masked_fill(mask == 0, IGNORE_INDEX)
    out = model(ids, mask, labels=labels)
    assert out.logits.shape == (*ids.shape, 1) and out.loss.item() == 0


def test_a_bf16_models_loss_is_fp32_cross_entropy():
    """A model cast to bf16 (no autocast) gives bf16 logits; its MLM loss is taken in fp32."""
    model = perturb(TinyEncoder(tiny("roberta"))).eval().bfloat16()
    ids, mask = batch()
    inputs, labels = mask_tokens(ids, model.cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(inputs, mask, labels=labels)
    expected = F.cross_entropy(out.logits.float(), labels[labels != IGNORE_INDEX])
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert_close(out.loss, expected, 1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pool_reads_any_nonzero_document_id_as_real(pooling):
    """pool takes forward's doc_ids: a row whose document id is 7 (or 2) pools its real tokens as
    a 0/1 mask's does: the first one, or their mean."""
    hidden = torch.randn(2, 6, 4)
    ones = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    ids = ones * torch.tensor([[7], [2]])
    expected = {"cls": hidden[[0, 1], [1, 0]]}
    expected["mean"] = torch.stack([hidden[0, 1:4].mean(0), hidden[1, :5].mean(0)])
    assert_close(tinyencoder.pool(hidden, ids, pooling), expected[pooling], 1e-6)


def test_span_loss_counts_the_first_token_and_ignores_negative_positions():
    """A span at position 0 (transformers' "no answer", [CLS]) counts; a negative position, which
    forward's value checks let through off a CPU, is ignored as -100 is."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 2, generator=g)
    doc = torch.ones(2, 6, dtype=torch.long)
    spans = torch.tensor([[0, 0], [2, 4]])
    start = F.cross_entropy(logits[..., 0], spans[:, 0])
    end = F.cross_entropy(logits[..., 1], spans[:, 1])
    assert_close(tinyencoder.span_loss(logits, spans, doc), (start + end) / 2, 1e-6)
    negative = torch.tensor([[-1, -1], [2, 4]])
    start = F.cross_entropy(logits[1:, :, 0], spans[1:, 0])
    end = F.cross_entropy(logits[1:, :, 1], spans[1:, 1])
    assert_close(tinyencoder.span_loss(logits, negative, doc), (start + end) / 2, 1e-6)


CONFIG_REFUSALS = [
    ("layers", True, "Config.layers=True is not of type int"),
    ("layers", 0, "Config.layers=0 must be above 0"),
    ("max_len", 0, "Config.max_len=0 must be above 0"),
    ("rope_theta", 0.0, "Config.rope_theta=0.0 must be above 0"),
    ("rope_theta_local", 0.0, "Config.rope_theta_local=0.0 must be above 0"),
    ("classifier_dropout", 1.0, "Config.classifier_dropout=1.0 must be below 1"),
    ("mask_id", 320, "Config.mask_id=320 must be below vocab_size=320"),
]


@pytest.mark.parametrize("field,value,match", CONFIG_REFUSALS)
def test_config_refuses_each_field_out_of_its_range(field, value, match):
    """Each field's type and range: a bool is no int, sizes and thetas above 0, every dropout
    (the classifier's too) below 1, every special id below vocab_size."""
    with pytest.raises(ValueError, match=match):
        tiny("modernbert", **{field: value})


def test_learned_positions_take_an_odd_head_dim():
    """RoPE turns pairs of a head's dimensions: an odd head_dim is ModernBERT's problem alone;
    learned positions take any (BERT of hidden 40 and 8 heads: head_dim 5)."""
    model = TinyEncoder(tiny("bert", hidden=40, heads=8)).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert model(ids, mask).logits.isfinite().all()


@pytest.mark.parametrize("preset", PRESETS)
def test_a_document_of_exactly_max_len_tokens_runs(preset):
    """max_len bounds a document's length: one of exactly max_len tokens fits."""
    model = TinyEncoder(tiny(preset)).eval()
    ids = torch.randint(0, 256, (1, model.cfg.max_len))
    with torch.no_grad():
        assert model(ids).logits.shape == (1, model.cfg.max_len, VOCAB_SIZE)


def test_flash_unpads_rows_that_are_each_one_whole_document(monkeypatch):
    """Whole rows stay batched rows on a CPU (SDPA); flash attends to unpadded tokens whatever
    the rows hold, so that the kernel runs on them too."""
    monkeypatch.setattr(tinyencoder, "pick_backend", lambda cfg, device, dtype: "flash")
    whole = torch.ones(3, 24, dtype=torch.long)
    layout = tinyencoder.make_layout(tiny("modernbert"), whole, torch.bfloat16)
    assert isinstance(layout, tinyencoder.Unpadded) and layout.backend == "flash"


def checked_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, window_size):
    """stand_in_flash, after what the varlen kernels require and it does not: a contiguous last
    dimension, int32 cu_seqlens, and a max_seqlen no shorter than any document."""
    assert all(t.stride(-1) == 1 for t in (q, k, v)), [t.stride() for t in (q, k, v)]
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32, cu_q.dtype
    assert min(max_q, max_k) >= int(cu_q.diff().max()), (max_q, max_k, cu_q)
    return stand_in_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, window_size)


def stand_in_flash_op(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, debug, **sides):
    """torch's _flash_attention_forward as attend calls it, by checked_flash: not causal, no
    debug mask, the same window each side; the output first."""
    assert not is_causal and not debug, (is_causal, debug)
    window = (sides["window_size_left"], sides["window_size_right"])
    return (checked_flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, window),)


@pytest.mark.parametrize("kernel", ["flash-attn", "torch flash op"])
@pytest.mark.parametrize("half_window", [None, 4])
def test_the_flash_call_is_what_each_kernel_takes(kernel, half_window, monkeypatch):
    """Either kernel's call, through a stand-in that checks it: packed documents of up to 24
    tokens in 3 rows, q, k, v strided (a last dimension that is not contiguous), and the output
    eager attention's on the same rows."""
    doc = packed_batch()[1]
    eager = tiny("modernbert", attn_backend="eager", unpad=False)
    rows = tinyencoder.make_layout(eager, doc, torch.float32)
    monkeypatch.setattr(tinyencoder, "FLASH", kernel)
    monkeypatch.setattr(tinyencoder, "flash_attn_varlen_func", checked_flash)
    monkeypatch.setattr(tinyencoder, "FLASH_OP", stand_in_flash_op)
    monkeypatch.setattr(tinyencoder, "pick_backend", lambda cfg, device, dtype: "flash")
    layout = tinyencoder.make_layout(tiny("modernbert"), doc, torch.bfloat16)
    q, k, v = (torch.randn(len(layout.indices), 16, 2).transpose(1, 2) for _ in range(3))
    out = tinyencoder.attend(q, k, v, layout, half_window, 0.0)
    padded = (layout.scatter(t) for t in (q, k, v))
    expected = tinyencoder.attend(*padded, rows, half_window, 0.0)
    assert_close(layout.scatter(out), expected.masked_fill((doc == 0)[..., None, None], 0), 1e-5)


BACKEND_PICKS = [  # a GPU's compute capability, the dtype, hidden (2 heads), autocast's dtype
    ((8, 0), torch.bfloat16, 512, None, "flash"),  # head_dim 256, the kernels' largest
    ((9, 0), torch.float16, 16, None, "flash"),  # head_dim 8, their smallest
    ((7, 5), torch.bfloat16, 64, None, "sdpa"),  # before Ampere
    ((8, 0), torch.float32, 64, None, "sdpa"),
    ((8, 0), torch.float32, 64, torch.bfloat16, "flash"),  # fp32 weights, bf16 matmuls
    ((8, 0), torch.bfloat16, 528, None, "sdpa"),  # head_dim 264
    ((8, 0), torch.bfloat16, 20, None, "sdpa"),  # head_dim 10, not a multiple of 8
]


@pytest.mark.parametrize("capability,dtype,hidden,autocast,expected", BACKEND_PICKS)
def test_auto_picks_flash_on_sm80_in_half_precision(
    capability, dtype, hidden, autocast, expected, monkeypatch
):
    """attn_backend="auto" on a CUDA device (its capability and autocast stood in for): flash
    where a kernel is found, the GPU is sm80 or later, the matmuls run in fp16 or bf16 (autocast's
    dtype where it is on) and head_dim is 8, 16, ..., 256; else SDPA."""
    monkeypatch.setattr(tinyencoder, "FLASH", "flash-attn")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type: autocast is not None)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: autocast)
    cfg = tiny("bert", hidden=hidden, heads=2)
    assert tinyencoder.pick_backend(cfg, torch.device("cuda"), dtype) == expected


def test_sdpa_off_a_cpu_gets_the_attention_dropout(monkeypatch):
    """A CPU drops attention probabilities in eager attention; elsewhere (here the meta device)
    SDPA runs them, given the dropout rate."""
    rates = []

    def spy(q, k, v, attn_mask=None, dropout_p=0.0):
        rates.append(dropout_p)
        return q

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    whole = torch.ones(2, 8, dtype=torch.long)
    layout = tinyencoder.make_layout(tiny("bert"), whole, torch.float32)  # rows, no mask
    q, k, v = (torch.empty(2, 8, 2, 16, device="meta") for _ in range(3))
    assert tinyencoder.attend(q, k, v, layout, None, 0.1).is_meta
    assert rates == [0.1]


def test_unpad_is_a_cpus_a_gpu_without_flash_runs_rows(monkeypatch):
    """cfg.unpad asks a CPU to unpad; a GPU that cannot run flash (sm75 here, stood in for) runs
    SDPA on padded rows under the document mask, unpad or not."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    cfg = tiny("modernbert", unpad=True)
    layout = tinyencoder.make_layout(cfg, packed_batch()[1], torch.bfloat16, "cuda")
    assert isinstance(layout, tinyencoder.Padded) and layout.backend == "sdpa"


# Tests from a mutation run over pipelines.py and data/tasks.py (each fails on its mutant)
def test_encode_takes_a_compiled_model_as_the_model_it_compiled():
    """torch.compile's wrapper is a TinyEncoder underneath: encode takes it and embeds as the
    model itself does (a training loop that compiled its model can embed with it)."""
    model = perturb(TinyEncoder(tiny("bert"))).eval()
    texts = ["def f(x): return x", "import os"]
    compiled = torch.compile(model)
    assert torch.equal(pipelines.encode(compiled, texts), pipelines.encode(model, texts))


@pytest.mark.parametrize("field", ["cls_id", "sep_id"])
def test_a_special_id_of_255_is_a_byte_and_refused(field):
    """Bytes are 0-255: a [CLS] or [SEP] at 255, the last byte, would read that byte of a text
    as a special token, so check_bytes refuses it as it refuses a [SEP] at a newline."""
    cfg = tiny("bert", **{field: 255})
    with pytest.raises(ValueError, match="not a byte-level model"):
        pipelines.check_bytes(cfg)
    pipelines.check_bytes(tiny("bert"))


def test_padded_fills_with_the_pad_id_and_segment_zero():
    """padded right-pads input_ids with the pad id it is given (a checkpoint's own, or the
    ignore index for a tagger's labels), never with 0, a byte; token types pad with 0."""
    batch = pipelines.padded([[5, 6, 7], [8]], 300, token_types=[[0, 1, 1], [1]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 300, 300]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 1, 1], [1, 0, 0]]
    labels = pipelines.padded([[1, 2], [3]], IGNORE_INDEX)["input_ids"]
    assert labels.tolist() == [[1, 2], [3, IGNORE_INDEX]]
    cfg = tiny("roberta", nsp=False, classifier="choice")
    inputs = pipelines.choice_batch(cfg, ["q"], [["a", "bbb"]])
    assert inputs["input_ids"][0, 0, -2:].tolist() == [cfg.pad_id, cfg.pad_id]


def test_span_text_takes_characters_whole_at_the_ends_of_bare_bytes():
    """span_text on ids with no special token around them: a character cut at the first byte
    or the last is still taken whole, neither dropped as U+FFFD nor read past the end."""
    ids = byte_ids("é€")
    assert pipelines.span_text(ids, 1, 1) == "é"
    assert pipelines.span_text(ids, 0, 3) == "é€"
    assert pipelines.span_text(byte_ids("aé"), 0, 1) == "aé"


def test_answer_gives_a_two_segment_model_the_context_as_segment_one():
    """answer feeds a BERT span model its token types, 0 for [CLS] question [SEP] and 1 for the
    context and its [SEP], as transformers' tokenizer does; a model of one segment gets zeros."""
    seen = []

    def forward(ids, attention_mask=None, token_type_ids=None, layout=None):
        seen.append(token_type_ids)
        return tinyencoder.Output(hidden=None, logits=torch.zeros(*ids.shape, 2))

    for preset, second in (("bert", 1), ("roberta", 0)):
        model = TinyEncoder(tiny(preset, nsp=False, classifier="span"))
        model.forward = forward
        assert pipelines.answer(model, "ab", "cde") == "c"
        assert seen[-1].tolist() == [[0] * 4 + [second] * 4]


def test_choice_batch_refuses_questions_and_choices_of_different_counts():
    """Each question needs its list of choices: two questions and one list (or a list of no
    choices) is a one-line error, not a question dropped silently by zip or max()'s error."""
    cfg = tiny("bert", nsp=False, classifier="choice")
    with pytest.raises(ValueError, match="2 questions and 1 lists of choices"):
        pipelines.choice_batch(cfg, ["q", "r"], [["a", "b"]])
    with pytest.raises(ValueError, match=r"choices\[0\] must be a list of one choice or more"):
        pipelines.choice_batch(cfg, ["q"], [[]])
