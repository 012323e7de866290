"""What train.py and finetune.py share about a run: vector math that replays, a one-line error,
checkpoints written whole and read back, the metrics log, and stopping cleanly on Ctrl-C or
SIGTERM; train.py's closing demo."""

import json
import os
import signal
import sys

import numpy as np
import torch

import tinyencoder as te
from data.corpus import renamed_into_place


def settle_vector_math():
    """Pick the CPU's vector math kernels on one thread, before any call that threads share. The
    oneMKL 2024.2 in torch 2.13.0's x86 CPU wheel picks each function's kernel at its first call;
    when two threads make that call together, one thread's share can run a low-accuracy kernel: a
    fresh process's first sin, tanh or sqrt of 8192 values was off by over 1e-6 (sin: 1.5e-4) in
    7 to 11 of 30 processes here, and a run no longer replayed (pytorch/pytorch#188792). A
    one-element call of each picks the right kernel first: RoPE's and train.py's sin and cos, the
    poolers' tanh, AdamW's sqrt, and exp and log."""
    for dtype in (torch.float32, torch.float64):
        for function in (torch.sin, torch.cos, torch.tanh, torch.sqrt, torch.exp, torch.log):
            function(torch.ones(1, dtype=dtype))


def die(message: str):
    """Stop with one line on stderr and no traceback: bad input is the user's to fix, not a bug."""
    sys.exit(f"error: {message}")


def save_checkpoint(path: str, state: dict):
    """Atomic: a kill at any moment leaves the old file whole. state holds only tensors and plain
    values, so that it loads with weights_only=True (no code runs on load)."""
    with renamed_into_place(path) as temporary, open(temporary, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str, flag: str) -> tuple[dict, te.Config]:
    """A checkpoint of train.py or finetune.py and the Config it recorded; a one-line error that
    names flag where there is none."""
    if not os.path.exists(path):
        die(f"{flag}: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever makes a file unreadable, the user's fix is one
        die(f"{flag} {path}: not a readable checkpoint ({type(e).__name__})")
    if not isinstance(state, dict) or "model" not in state or "cfg" not in state:
        die(f"{flag} {path}: not a checkpoint of train.py or finetune.py")
    return state, config_from_saved(state["cfg"])


# Fields that older checkpoints record and Config no longer has; none changed a weight
# (sparse_prediction only the speed; nothing read static_masking; mlm_rate is the recipe's now), so
# such a checkpoint loads as it was.
RETIRED_FIELDS = ("sparse_prediction", "static_masking", "mlm_rate")


def config_from_saved(saved: dict) -> te.Config:
    """The Config a checkpoint recorded (asdict(cfg)), less the retired fields."""
    return te.Config(**{name: value for name, value in saved.items() if name not in RETIRED_FIELDS})


class Metrics:
    """metrics.jsonl in the run's folder, a JSON object a line: a fresh run starts it anew, a
    resumed one appends to it."""

    def __init__(self, out_dir: str, fresh: bool):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if fresh:
            open(self.path, "w").close()

    def write(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class StopSignals:
    """Ctrl-C and SIGTERM ask the loop to stop after the step in flight, so that it can save first;
    a second one stops at once."""

    def __init__(self):
        self.received = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum, frame):
        self.received.append(signum)
        signal.signal(signum, signal.SIG_DFL)


# Newlines show as ⏎, other unprintable bytes and special ids as ·.
CHARS = {10: "⏎", **{byte: chr(byte) for byte in range(32, 127)}}


def show(ids, hidden):
    """The bytes between CLS and SEP as text, hidden ones as _."""
    pairs = zip(ids[1:-1].tolist(), hidden[1:-1].tolist())
    return "".join("_" if is_hidden else CHARS.get(byte, "·") for byte, is_hidden in pairs)


@torch.no_grad()
def demo(model, val_data, spans, amp):
    """train.py's demo: a held-out line (from the middle span, at a line's start) with three masked
    spans, what the model writes into them, and the original."""
    start, end = spans[len(spans) // 2]
    if (val_data[start : (start + end) // 2] == 10).any():  # from a line's start
        start += int(np.argmax(val_data[start:end] == 10)) + 1
    line = val_data[start : min(end, start + 64)]
    ids = torch.tensor(np.r_[[te.CLS], line, [te.SEP]], device=model.tok_embed.weight.device)
    n = len(ids)
    hide = torch.zeros_like(ids, dtype=torch.bool)
    # three spans of three bytes, at a fifth, a half and four fifths; never the final SEP
    for start in (n // 5, n // 2, 4 * n // 5):
        hide[start : min(start + 3, n - 1)] = True
    model.eval()
    with amp:
        logits = model(torch.where(hide, te.MASK, ids)[None]).logits[0]
    guess = torch.where(hide, logits.argmax(-1), ids)
    print(f"demo, held out : {show(ids, hide)}")
    print(f"     model fills: {show(guess, torch.zeros_like(hide))}")
    print(f"     original   : {show(ids, torch.zeros_like(hide))}")
