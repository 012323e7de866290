"""mfu.py: model FLOPs utilisation, one definition for train.py and bench.py.

MFU is the share of a peak FLOP rate that the model's own arithmetic fills:
tokens per second x flops_per_token / peak. Two peaks: the rate this machine reaches on large
matmuls in the run's dtype (measured), and the card's dense bf16 figure from its data sheet (what
papers quote). Inference does a third of the training FLOPs. Also the dtype a run computes in:
whether bf16 pays on this device (measured on a CPU), and its autocast context.
"""

import contextlib
import itertools
import time

import torch

import tinyencoder

# Dense bf16 TFLOP/s from the vendors' data sheets (without sparsity), by a part of the name that
# torch.cuda.get_device_name gives; the first match counts, so the PCIe and NVL cards come first.
SPEC_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H200 NVL": 835}
SPEC_TFLOPS.update({"H100": 989, "H200": 989, "A100": 312, "L4": 121})


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token of a seq_len-token document: 6 per weight outside the embedding
    tables (2 forward, 4 backward), plus 12 * hidden per key each layer attends (q k^T and
    probabilities @ v, 2 each forward, 4 each backward). A sliding-window layer attends to at most
    window + 1 keys, whatever the length."""
    weights = sum(p.numel() for p in model.parameters()) - model.tok_embed.weight.numel()
    if model.pos_embed is not None:
        weights -= model.pos_embed.weight.numel()
    keys = 0
    for layer in model.layers:
        window = layer.attn.half_window
        if window is None:
            keys += seq_len
        else:
            keys += min(seq_len, 2 * window + 1)
    return 6 * weights + 12 * model.cfg.hidden * keys


def onednn_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T by oneDNN's linear, the kernel of tinyencoder's fp32 linears where it takes it."""
    return tinyencoder.ONEDNN_LINEAR(a, b, None, "none", [], "")


def measured_peak(device: torch.device, dtype: torch.dtype, reps: int = 3) -> float:
    """Best FLOP/s of a few square matmuls: the machine's practical matmul peak in this dtype, by
    torch.matmul and, where tinyencoder's Linear takes it, by oneDNN's linear too."""
    # on a 2-core CPU, products of 1024 and 2048 reach the FLOP/s of 4096's (150-175 GFLOP/s each,
    # one check) in under a second per kernel; 4096's took about 10 s of a 5-minute run
    sizes = (1024, 2048)
    if device.type == "cuda":
        sizes = (4096, 8192)
    products = [torch.matmul]
    # oneDNN's fp16 linear fails on this CPU
    fp32_or_bf16 = dtype in (torch.float32, torch.bfloat16)
    if device.type == "cpu" and fp32_or_bf16 and tinyencoder.ONEDNN_LINEAR is not None:
        products.append(onednn_matmul)
    best = 0.0
    for n, product in itertools.product(sizes, products):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(reps + 1):  # one more product than reps: the first warms up
            synchronize(device)
            started = time.perf_counter()
            product(a, b)
            synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


def bf16_pays(device: torch.device) -> bool:
    """Whether bf16 autocast speeds this device up: on CUDA, yes; on a CPU, where its bf16 matmuls
    measure at least 1.5x its fp32 ones (AVX512-BF16 or AMX units: 2.0x on a 2-core AMD EPYC;
    without them bf16 is emulated, and slower)."""
    if device.type != "cpu":
        return device.type == "cuda"
    return measured_peak(device, torch.bfloat16) >= 1.5 * measured_peak(device, torch.float32)


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to dtype (bf16); in fp32, no context at all."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype)


def spec_peak(device: torch.device) -> float:
    """The card's dense bf16 FLOP/s, from SPEC_TFLOPS; 0 for a CPU or a card not in the table."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for card, tflops in SPEC_TFLOPS.items():
        if card in name:
            return tflops * 1e12
    return 0.0


def synchronize(device: torch.device):
    """Wait for the device's queued work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
