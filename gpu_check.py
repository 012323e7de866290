"""gpu_check.py: the one-run GPU check, with bench.py's pieces.

    python gpu_check.py --json gpu_check.json   # on a GPU: bf16, about 7.5 minutes (--budget)
    python gpu_check.py --tiny --device cpu     # the same code at small sizes, in about 2 minutes

Each section is recorded in the JSON, which is rewritten after every one (and after each of (b)'s
batch sizes), even when another fails; each recompile's reason is logged as it happens:

(a) numerics: every backend in fp32 and bf16 against fp32 eager, logits and every parameter's
    gradient, on padded and packed rows.
(b) speed: ModernBERT-base (rows of 64-1024 tokens), BERT-base and RoBERTa-base (64-512) training as
    published (BERT's and RoBERTa's dropout 0.1 included) at 16, 32 and 48 rows per batch:
    tinyencoder compiled, its layouts made ahead, against transformers compiled (the peer a GPU
    user picks) and transformers eager, the same weights and batches. Tokens/s, paired time
    ratios, MFU against the measured matmul peak and the card's data sheet; each step's first call
    (compiling) and the recompiles while timed.
(c) profile: (b)'s compiled ModernBERT step at 16 rows: its kernels, each counted once (device
    events only); the GPU's busy share of a step (kernel time over wall time); host syncs per step
    (the profile's synchronizing runtime calls, and torch.cuda.set_sync_debug_mode's warnings);
    recompiles over 100 steps of fresh batches.
(d) memory: the peak of a ModernBERT-base training step at 8192 tokens, ours and transformers'.
(e) train.py: --arch modernbert --max-steps 100, its tok/s and MFU lines; --arch bert
    --max-steps 40 as well when --budget leaves the time. Each evaluates and saves at its end only.
(f) graphs, only when --sections names it: (e)'s ModernBERT run again under CUDA graphs (inductor's
    TORCHINDUCTOR_CUDAGRAPHS=1, what torch.compile's mode="reduce-overhead" turns on: train.py's
    packed rows and the layouts made ahead keep every step's shapes the same), for where (c)
    shows the GPU idle between kernels.

They run quick ones first, so that a run cut short while (b) compiles keeps them: (a), (d), (e)'s
ModernBERT, (f), (b), (c), (e)'s BERT; (b) times every arch at 16 rows before any at 32. --sections
and --archs pick some: a second run can take the architectures (b) had no time for, and (f)
(--sections speed,graphs --archs bert,roberta --budget 300: no (c), which would compile ModernBERT).

--tiny shrinks every size (2 layers in (b), (c) and (d), 256 wide in (b) and (c)) and compiles
with the aot_eager backend, so that a CPU runs the same code; there (c)'s busy share and syncs are
None, with a note, and its table is of CPU ops by their own time. On a CPU, ModernBERT's unpadded
attention loops over the documents, so a new batch size recompiles it once (a GPU's flash kernel
takes them all in one call).
"""

import argparse
import collections
import dataclasses
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import NamedTuple, Optional

import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType

import tinyencoder as te
from bench import DTYPES, Stepper, add_mfu, alternate, base_model, compare, default_device
from bench import default_dtype, machine
from bench import hf_steppers, hf_twin, make_batches, print_setup, transformers, variant
from mfu import autocast, measured_peak, spec_peak, synchronize
from runs import POSITIVE, Parser, device_or_die, output_file

# (a)'s backends, each in the dtype it runs in; flash runs in half precision only
BACKENDS = ("eager fp32", "eager bf16", "sdpa fp32", "sdpa bf16", "flash bf16")
# (b)'s longest row per arch (ModernBERT's training context; BERT's and RoBERTa's 512 positions)
SPEED_SEQ = {"modernbert": 1024, "bert": 512, "roberta": 512}
# (b)'s peers: transformers through torch.compile (as a GPU user runs it), and eager
PEERS = {"hf": True, "hf_eager": False}
# The GPU run's budget (--budget, from the start of main): a session with 15 minutes of device time
# runs this once under a limit of about 8 minutes. Planned on an H100/H200: (a) 15 s; (b) about
# 4.5 minutes, mostly compiling (6 models, 30-60 s each); (c) 15 s, on (b)'s compiled step; (d)
# 15 s; (e) about 100 s for ModernBERT (start, compiling, 100 steps of 32 x 1024 tokens), as much
# for BERT. Seen on an H200 (2026-12-04): (a) 5 s, but (b)'s ModernBERT alone, its first calls
# and 16 and 32 rows, took over 8 minutes, so (b) now checks the budget before each batch size,
# saves each one's rows as they come, and counts the frames each step traces (the recompile
# reasons are logged); and (d) and (e)'s ModernBERT run before it. (b) skips what would leave
# less than LATER_S for (c), and (e) runs BERT last, only if BERT_TRAIN_S is left. A second run
# can take what (b) had no time for, and (f): --sections speed,graphs --archs bert,roberta --budget
# 300 ((f) about 100 s, as (e)'s ModernBERT).
BUDGET_S = 450
LATER_S = 40
BERT_TRAIN_S = 100
SECTIONS = ("numerics", "memory", "train", "speed", "profile", "graphs")
# (f) waits to be asked: the one run's budget has no room for it
DEFAULT_SECTIONS = SECTIONS[:-1]


@dataclasses.dataclass
class Setting:
    """What the sections run under: the device, the compute dtype, the matmul peak measured here
    and the card's data-sheet one (FLOP/s, 0: unknown), --tiny, and when the budget runs out (in
    time.perf_counter's seconds)."""

    dev: torch.device
    dtype: torch.dtype
    peak: float
    spec: float
    tiny: bool
    deadline: float

    def left(self):
        """Seconds of the budget left."""
        return self.deadline - time.perf_counter()


def train_memory(dev, dtype, seq=8192, compile_=False, hf=False, **overrides):
    """Peak memory of a ModernBERT-base training step (batch 1, seq tokens) with AdamW state."""
    # earlier sections' cyclic garbage must not count, nor anything they left alive (leftover)
    gc.collect()
    floor = 0
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        floor = torch.cuda.memory_allocated()
    cfg = te.Config.from_preset("modernbert", **overrides)
    torch.manual_seed(0)
    model = te.TinyEncoder(cfg).to(dev)
    if hf:
        model = hf_twin(model, dev)
    step = Stepper(model, True, dtype, compile_)
    b = make_batches(cfg, 1, 1, seq, False, dev, dtype=dtype)[0]
    # allocates AdamW state (and compiles)
    step(b)
    synchronize(dev)
    if dev.type != "cuda":
        return dict(seq=seq, peak_gib=None, note="peak memory is only measured on CUDA")
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() - floor
    step(b)
    synchronize(dev)
    peak = torch.cuda.max_memory_allocated() - floor
    return dict(
        seq=seq, peak_gib=peak / 2**30, static_gib=before / 2**30, leftover_gib=floor / 2**30
    )


def section(name, report, fn, *args, **kwargs):
    """Run one part of a check; an error is printed and recorded, and the rest still runs."""
    print(f"\n== {name}", flush=True)
    t = time.perf_counter()
    try:
        figures = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - keep the other sections
        traceback.print_exc()
        figures = {"error": f"{type(e).__name__}: {e}"}
    seconds = time.perf_counter() - t
    print(f"   ({seconds:.0f} s)", flush=True)
    report.setdefault("section_seconds", {})[name] = seconds
    # after every section, so that a run cut short keeps what it measured
    record(report, name, figures)


def record(report, name, figures):
    """Put a section's figures (so far) in the report, and write it to its file, if it names one."""
    report[name] = figures
    if report.get("json"):
        # whole or not at all: a kill while writing leaves the last whole file
        with open(report["json"] + ".part", "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(report["json"] + ".part", report["json"])


@dataclasses.dataclass
class NumericsBatch:
    """The rows (a) compares on, and the generator its probes are drawn from next."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    real: torch.Tensor
    generator: torch.Generator


@dataclasses.dataclass
class Outputs:
    """Logits at the real tokens, and every parameter's gradient (by name), in fp32."""

    logits: torch.Tensor
    grads: dict


def numerics_batch(dev):
    """Four rows of 256 tokens: full, padded, two documents packed and padded, three packed."""
    # document ids, 0 = padding
    full = [1] * 256
    padded = [1] * 200 + [0] * 56
    packed_and_pad = [1] * 100 + [2] * 90 + [0] * 66
    packed = [1] * 30 + [2] * 150 + [3] * 76
    am = torch.tensor([full, padded, packed_and_pad, packed])
    g = torch.Generator().manual_seed(0)
    ids = torch.where(am > 0, torch.randint(0, 256, am.shape, generator=g), te.PAD)
    return NumericsBatch(
        ids=ids.to(dev), attention_mask=am.to(dev), real=(am > 0).to(dev), generator=g
    )


def logits_and_grads(model, batch, probe, dtype):
    """Logits at the real tokens, and every parameter's gradient of a fixed projection of them."""
    model.zero_grad(set_to_none=True)
    with autocast(batch.ids.device, dtype):
        logits = model(batch.ids, batch.attention_mask).logits[batch.real].float()
    (logits * probe).sum().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return Outputs(logits=logits.detach(), grads=grads)


def worst_grad_error(grads, ref):
    """The largest max |diff| of any parameter's gradient, over that gradient's largest entry."""
    errors = [(grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12) for n, g in ref.items()]
    return max(errors).item()


def backend_error(ref_model, key, batch, probe, ref):
    """One backend ("sdpa bf16") against fp32 eager: max |diff| of the logits and the worst
    gradient's relative error, or why it cannot run here."""
    backend, dtype_name = key.split()
    try:
        model = variant(ref_model, attn_backend=backend).eval()
        out = logits_and_grads(model, batch, probe, DTYPES[dtype_name])
    except Exception as e:  # noqa: BLE001 - e.g. flash on CPU
        return f"unavailable: {type(e).__name__}: {str(e)[:120]}"
    logit_err = (out.logits - ref.logits).abs().max().item()
    return dict(err=logit_err, grad_err=worst_grad_error(out.grads, ref.grads))


def judge(arch, key, err, tolerance, eager_bf16, must_run=False):
    """Print one backend's figures and verdict; its entry in the report. A backend that cannot
    run here is a note, or a FAIL where it must_run (flash, where `auto` would pick it).

    Absolute: logits within tolerance, every gradient within 0.2 of its largest fp32 entry. For
    bf16, relative as well: at most twice eager's own bf16 error (plus 1e-3 on logits, 1e-2 on
    gradients), since eager bf16 shows what rounding alone costs."""
    line = f"   {arch:<11}{key:<11} max|diff| vs fp32 eager: "
    if isinstance(err, str):
        verdict = "  FAIL" if must_run else ""
        print(line + err + verdict)
        return dict(err=None, note=err, ok=not must_run)
    ok = err["err"] <= tolerance and err["grad_err"] <= 0.2
    if "bf16" in key and isinstance(eager_bf16, dict):
        ok = ok and err["err"] <= 2 * eager_bf16["err"] + 1e-3
        ok = ok and err["grad_err"] <= 2 * eager_bf16["grad_err"] + 1e-2
    verdict = "ok" if ok else "FAIL"
    figures = f"logits {err['err']:.2e}, gradients {err['grad_err']:.2e} (relative)"
    print(f"{line}{figures}  {verdict}")
    return dict(err, ok=ok)


def check_arch(arch, batch, dev):
    """Every backend of one arch (3 layers, 256 wide) against its fp32 eager self."""
    cfg = te.Config.from_preset(arch, hidden=256, heads=4, layers=3, attn_backend="eager")
    torch.manual_seed(0)
    ref_model = te.TinyEncoder(cfg).to(dev).eval()
    probe = torch.randn(int(batch.real.sum()), cfg.vocab_size, generator=batch.generator).to(dev)
    ref = logits_and_grads(ref_model, batch, probe, torch.float32)
    scale = max(1.0, ref.logits.abs().max().item())
    tolerance = 5e-2 * scale
    errors = {key: backend_error(ref_model, key, batch, probe, ref) for key in BACKENDS}
    eager_bf16 = errors.get("eager bf16")
    flash_here = te.pick_backend(dataclasses.replace(cfg, attn_backend="auto"), dev, torch.bfloat16)
    results = {}
    for key, err in errors.items():
        must_run = key.startswith("flash") and flash_here == "flash"
        results[key] = judge(arch, key, err, tolerance, eager_bf16, must_run)
    return dict(tolerance=tolerance, max_abs_ref=scale, results=results)


def check_numerics(dev):
    """Every backend in fp32 and bf16 against fp32 eager, forward and backward, on padded and
    packed rows of 256 tokens with ModernBERT's 128-token window.

    bf16 keeps 8 significant bits (unit roundoff 2^-8 ~ 4e-3 per rounding), so a few layers of
    rounded matmuls give ~1e-2 relative error. Logits: max |diff| <= 5e-2 * max(1, max |logit|).
    Gradients: for every parameter, max |diff| <= 0.2 * max |its fp32 gradient|. The sharper test
    is relative: a fast backend's error may be at most 2x eager's own bf16 error (plus 1e-3 on
    logits, 1e-2 on gradients)."""
    batch = numerics_batch(dev)
    return {arch: check_arch(arch, batch, dev) for arch in te.PRESETS}


@dataclasses.dataclass
class SpeedPlan:
    """(b)'s sizes: encoder layers (None: each preset's), the longest row per arch, the rows per
    batch, and at each batch size how many batches are timed after how many untimed warm-up ones;
    and torch.compile's keywords, for (b) and (c)."""

    layers: Optional[int]
    hidden: int
    seq: dict
    batches: tuple
    steps: int
    warmup: int
    compile: dict


def speed_plan(tiny):
    """The GPU's sizes, or --tiny's: two layers (ModernBERT's global one and a local one), short
    rows, two small batch sizes, and the aot_eager backend (Dynamo and AOTAutograd as on the GPU,
    without generating C++ for the CPU: a third of the compile time, and the GPU's code is not the
    CPU's anyway)."""
    if tiny:
        seq = {arch: n // 4 for arch, n in SPEED_SEQ.items()}
        options = dict(dynamic=True, backend="aot_eager")
        sizes = dict(layers=2, hidden=256, batches=(2, 4), steps=2, warmup=1)
        return SpeedPlan(**sizes, seq=seq, compile=options)
    # dynamic=True: the first call traces sizes as symbols, so that no new batch recompiles;
    # warm-up: a new batch size might still, or pick new cuBLAS kernels
    sizes = dict(layers=None, hidden=768, batches=(16, 32, 48), steps=6, warmup=1)
    return SpeedPlan(**sizes, seq=SPEED_SEQ, compile=dict(dynamic=True))


def compiled_frames():
    """Frames torch.compile has traced in this process so far: a rise while timing, a recompile."""
    return counters["frames"]["total"]


def first_calls(steps, b, dev):
    """Each step's first call, on one batch, in seconds: mostly compiling, where it compiles."""
    seconds = {}
    for name, step in steps.items():
        synchronize(dev)
        t = time.perf_counter()
        step(b)
        synchronize(dev)
        seconds[name] = time.perf_counter() - t
    return seconds


class Counted:
    """A step that counts the frames torch.compile traces in its calls (after its first call: its
    recompiles) and the seconds of its slowest call, where a compile shows."""

    def __init__(self, step):
        self.step = step
        self.frames = 0
        self.slowest = 0.0

    def __call__(self, b):
        frames = compiled_frames()
        t = time.perf_counter()
        self.step(b)
        self.frames += compiled_frames() - frames
        self.slowest = max(self.slowest, time.perf_counter() - t)


class Started(NamedTuple):
    """An arch of (b), compiled: its steps by name, the model whose weights they share, figures."""

    steps: dict
    base: te.TinyEncoder
    info: dict


def start_arch(arch, plan, setting, kept) -> Started:
    """(b)'s steps for one arch, compiled once by their first call (plan.compile), with its base
    model and its figures so far. kept[arch] keeps the compiled tinyencoder step for (c)."""
    dev = setting.dev
    base = base_model(arch, dev, plan.layers or te.Config.from_preset(arch).layers, plan.hidden)
    steps = {"published": Stepper(base, True, setting.dtype, compile_=True, options=plan.compile)}
    if transformers is not None:
        steps.update(hf_steppers(base, True, setting.dtype, PEERS, options=plan.compile))
    kept[arch] = steps["published"]
    seq = plan.seq[arch]
    b = make_batches(base.cfg, 1, plan.batches[0], seq, True, dev, dtype=setting.dtype, seed=99)
    info = dict(first_call_s=first_calls(steps, b[0], dev), attn_dropout=base.cfg.attn_dropout)
    info.update(backend=te.pick_backend(base.cfg, dev, setting.dtype), rows=[], per_batch_size=[])
    print(f"   {arch} first calls (s): {info['first_call_s']}", flush=True)
    return Started(steps, base, info)


def speed_at(arch, B, started: Started, plan, setting):
    """(b) for one started arch (start_arch's) at B rows: its figures so far."""
    info = started.info
    case = dict(arch=arch, rows=B, seq=plan.seq[arch])
    rows, seen = time_batch_size(started.steps, started.base, plan, setting, case)
    info["rows"] += rows
    info["per_batch_size"].append(seen)
    frames = [sum(seen["frames"].values()) for seen in info["per_batch_size"]]
    info["recompiles_while_timed"] = sum(frames)
    return info


def time_batch_size(steps, base, plan, setting, case):
    """(b) at one batch size (case's rows): fresh batches through every step, alternating; the
    rows, and what was seen: the seconds it took, the frames each step traced (recompiles) and
    each step's slowest call (where a compile shows)."""
    n = plan.warmup + plan.steps
    dev, dtype = setting.dev, setting.dtype
    batches = make_batches(
        base.cfg, n, case["rows"], case["seq"], True, dev, dtype=dtype, seed=case["rows"]
    )
    counted = {k: Counted(s) for k, s in steps.items()}
    t = time.perf_counter()
    times = alternate(counted, batches, plan.warmup, dev)
    rows = compare(base, steps, times, batches[plan.warmup :], True, case)
    seen = dict(rows=case["rows"], seconds=time.perf_counter() - t)
    seen.update(frames={k: c.frames for k, c in counted.items()})
    seen.update(slowest_s={k: round(c.slowest, 2) for k, c in counted.items()})
    print(f"   {case['arch']} {seen}", flush=True)
    return rows, seen


def record_arch(report, arch, save, figures):
    """An arch's figures so far into (b)'s report, saved: a run cut short keeps its rows."""
    report[arch] = figures
    save(report)


def add_mfus(rows, peak, spec):
    """Each step's MFU against the measured peak (te_mfu, hf_mfu, ...) and the data sheet's
    (te_mfu_spec, ...: None where the card is not in mfu.py's table)."""
    add_mfu(rows, peak)
    for row in rows:
        for key in [k for k in row if k.endswith("_flop_s")]:
            row[key.removesuffix("_flop_s") + "_mfu_spec"] = row[key] / spec if spec else None


def check_speed(setting, kept, save, archs):
    """(b) for archs, a batch size at a time: every arch at the first (16 rows) before any at the
    next, so that a run the budget cuts short holds each arch's first figures. Each arch's figures
    are saved as they come (save: the report so far, to its file), its first calls' seconds too;
    an arch that fails is recorded and the others go on; what the budget has no time for is
    skipped. Then the table."""
    plan = speed_plan(setting.tiny)
    report = dict(flash=te.FLASH, plan=dataclasses.asdict(plan))
    started, failed = {}, set()
    start_s = 0.0  # the last arch's start, mostly compiling: what the next one's may take
    for B in plan.batches:
        for arch in [arch for arch in archs if arch not in failed]:
            left, need = setting.left(), LATER_S
            if arch not in started:
                need += start_s
            if left < need:
                skipped = f"{B} rows and more: {left:.0f} s of the budget left"
                report.setdefault(arch, {}).setdefault("skipped", skipped)
                continue
            t = time.perf_counter()
            try:
                if arch not in started:
                    started[arch] = start_arch(arch, plan, setting, kept)
                    start_s = time.perf_counter() - t
                    record_arch(report, arch, save, started[arch].info)
                report[arch] = speed_at(arch, B, started[arch], plan, setting)
            except Exception as e:  # noqa: BLE001 - keep the other archs
                traceback.print_exc()
                # the batch sizes timed before the error keep their rows
                report[arch] = dict(report.get(arch, {}), error=f"{type(e).__name__}: {e}")
                failed.add(arch)
                started.pop(arch, None)
            report[arch]["seconds"] = report[arch].get("seconds", 0.0) + time.perf_counter() - t
            save(report)
    rows = [row for arch in archs for row in report.get(arch, {}).get("rows", [])]
    add_mfus(rows, setting.peak, setting.spec)
    save(report)
    print_speed(rows, setting.peak, setting.spec)
    return report


def cell(row, key, spec):
    """One figure of the speed table, formatted by spec, or a dash where it is missing."""
    value = row.get(key)
    if value is None:
        return "-"
    return format(value, spec)


def print_speed(rows, peak, spec):
    """(b)'s table: tok/s of real tokens, their time over ours (vs), MFU of the measured peak."""
    print(f"\nmeasured peak {peak / 1e12:.2f} TFLOP/s, data sheet {spec / 1e12:.0f} (0: unknown)")
    print("hf = transformers compiled, eager = transformers not compiled; vs = its time / ours")
    columns = ("te tok/s", "hf tok/s", "eager tok/s", "vs hf", "vs eager", "te MFU", "of sheet")
    head = f"{'arch':<11}{'rows':>5}" + "".join(f"{c:>12}" for c in columns)
    print(head + f"{'hf MFU':>9}{'eager MFU':>10}\n" + "-" * (len(head) + 19))
    for r in rows:
        figures = [cell(r, "te_tok_s", ",.0f"), cell(r, "hf_tok_s", ",.0f")]
        figures += [cell(r, "hf_eager_tok_s", ",.0f"), cell(r, "ratio", ".2f")]
        figures += [cell(r, "hf_eager_ratio", ".2f"), cell(r, "te_mfu", ".1%")]
        figures.append(cell(r, "te_mfu_spec", ".1%"))
        line = f"{r['arch']:<11}{r['rows']:>5}" + "".join(f"{f:>12}" for f in figures)
        print(line + f"{cell(r, 'hf_mfu', '.1%'):>9}{cell(r, 'hf_eager_mfu', '.1%'):>10}")
        for key in [k for k in r if k.endswith("note")]:
            print(f"   {key}: {r[key]}")


def profiled_step(setting, kept):
    """(b)'s compiled ModernBERT step, or a fresh one, compiled as (b)'s, where (b) made none."""
    if "modernbert" in kept:
        return kept["modernbert"]
    plan = speed_plan(setting.tiny)
    layers = plan.layers or te.Config.from_preset("modernbert").layers
    base = base_model("modernbert", setting.dev, layers, plan.hidden)
    return Stepper(base, True, setting.dtype, compile_=True, options=plan.compile)


def profile_step(setting, kept):
    """(c): the compiled ModernBERT step at (b)'s first batch size, on fresh batches: 100 steps
    timed with no sync between them, the recompiles among them counted; then a few profiled, and
    a few under the sync debug mode."""
    dev = setting.dev
    plan = speed_plan(setting.tiny)
    n = 100
    if setting.tiny:
        n = 10
    step = profiled_step(setting, kept)
    rows = plan.batches[0]
    seq = plan.seq["modernbert"]
    batches = make_batches(step.model.cfg, n, rows, seq, True, dev, dtype=setting.dtype, seed=7)
    # compiles, where (b) did not
    step(batches[0])
    synchronize(dev)
    frames = compiled_frames()
    t = time.perf_counter()
    for b in batches:
        step(b)
    synchronize(dev)
    step_s = (time.perf_counter() - t) / n
    figures = dict(rows=rows, seq=seq, steps=n, step_ms=step_s * 1e3)
    figures["recompiles"] = compiled_frames() - frames
    figures["compile_note"] = step.note
    figures.update(kernel_profile(step, batches[:3], dev, step_s))
    figures["sync_warnings_per_step"] = sync_warnings(step, batches[:3], dev)
    print_profile(figures)
    return figures


def time_by_name(events):
    """Seconds and calls per event name, each event counted once: a kernel by its own duration,
    a CPU op by its self time (its children's excluded)."""
    seconds, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.device_type == DeviceType.CPU:
            seconds[e.name] += e.self_cpu_time_total / 1e6
        else:
            seconds[e.name] += e.time_range.elapsed_us() / 1e6
        calls[e.name] += 1
    return dict(seconds=seconds, calls=calls)


def top_table(events, steps, limit=15):
    """The most expensive names, per step: milliseconds, share of the total, calls."""
    by_name = time_by_name(events)
    total = sum(by_name["seconds"].values()) or 1.0
    table = []
    for name, seconds in by_name["seconds"].most_common(limit):
        calls = by_name["calls"][name] / steps
        table.append(dict(name=name, ms=seconds * 1e3 / steps, share=seconds / total, calls=calls))
    return table


def kernel_profile(step, batches, dev, step_s):
    """A few steps under the profiler: gpu_figures on CUDA; on a CPU, the ops by self time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for b in batches:
            step(b)
        synchronize(dev)
    if dev.type == "cuda":
        return gpu_figures(prof.events(), len(batches), step_s)
    table = top_table([e for e in prof.events() if e.device_type == DeviceType.CPU], len(batches))
    note = "CPU: the table is of ops by self time; busy share and syncs are GPU figures"
    return dict(kernels=table, busy_share=None, syncs_per_step=None, note=note)


def gpu_figures(events, steps, step_s):
    """From the profile of some steps: the kernels (device events only, since the profiler also
    lists each op with its kernels' time), their time per step over step_s (the GPU's busy share),
    and the runtime calls per step that make the host wait (a stream or device synchronize, a
    synchronous cudaMemcpy), besides the device synchronize that ends the profile."""
    kernels = [e for e in events if e.device_type != DeviceType.CPU and not annotation(e)]
    kernel_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / steps
    names = collections.Counter(e.name for e in events if e.device_type == DeviceType.CPU)
    waits = names["cudaStreamSynchronize"] + names["cudaEventSynchronize"] + names["cudaMemcpy"]
    waits += max(0, names["cudaDeviceSynchronize"] - 1)
    figures = dict(kernels=top_table(kernels, steps), kernel_ms=kernel_s * 1e3)
    figures.update(busy_share=kernel_s / step_s, syncs_per_step=waits / steps)
    copies_back = [e for e in kernels if "DtoH" in e.name]
    figures["copies_to_host_per_step"] = len(copies_back) / steps
    return figures


def annotation(event) -> bool:
    """Whether a device event is a region's span (a compiled graph's call, the optimizer's step),
    which covers the kernels inside it, rather than a kernel: torch's own tables skip these
    (pytorch#130730); the attribute is missing before torch 2.5."""
    return getattr(event, "is_user_annotation", False)


def sync_warnings(step, batches, dev):
    """Synchronizing calls per step, as torch.cuda.set_sync_debug_mode("warn") reports them; None
    on a CPU."""
    if dev.type != "cuda":
        return None
    synchronize(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for b in batches:
                step(b)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(dev)
    found = [w for w in caught if "synchroniz" in str(w.message)]
    for w in found[:3]:
        print(f"   sync: {w.filename}:{w.lineno}: {str(w.message)[:120]}")
    return len(found) / len(batches)


def print_profile(figures):
    """(c)'s summary, then its table."""
    shape = f"{figures['rows']} rows of up to {figures['seq']} tokens"
    print(f"   {shape}: {figures['step_ms']:.1f} ms a step over {figures['steps']} steps", end="")
    print(f" ({figures['recompiles']} recompiles); kernels {cell(figures, 'kernel_ms', '.1f')} ms")
    syncs = f"{cell(figures, 'syncs_per_step', '.1f')} in the profile"
    syncs += f", {cell(figures, 'sync_warnings_per_step', '.1f')} by the sync debug mode"
    print(f"   GPU busy {cell(figures, 'busy_share', '.1%')} of a step; host syncs a step: {syncs}")
    # compile_note: the step ran eager, torch.compile having failed
    for key in ("note", "compile_note"):
        if figures.get(key):
            print(f"   {key}: {figures[key]}")
    for row in figures["kernels"]:
        calls = f"{row['calls']:.1f}x"
        print(f"   {row['ms']:9.3f} ms {row['share']:6.1%} {calls:>7}  {row['name'][:90]}")


def train_run(arch, steps, dev, tiny, timeout, environ=None):
    """python train.py --arch ARCH --max-steps STEPS on this device (--tiny: its tiny size, 5
    steps), evaluating and saving at its end only: its tok/s and MFU lines (the first includes
    compiling; the last is the steady state), those it printed before a timeout, and its error.
    environ: variables set for it."""
    size = ["--max-steps", str(steps), "--eval-interval", str(steps), "--ckpt-interval", str(steps)]
    if tiny:
        size = ["--size", "tiny", "--max-steps", "5"]
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "train.py", "--arch", arch, "--device", dev.type]
        figures = captured(command + size + ["--out-dir", out], timeout, environ)
    figures["lines"] = [line for line in figures.pop("stdout") if "tok/s" in line or "MFU" in line]
    print("\n".join(figures["lines"] + figures["cudagraph_lines"][:20]))
    if figures["returncode"] != 0:
        print(figures["stderr"])
    figures["seconds"] = time.perf_counter() - t
    return figures


def captured(command, timeout, environ=None) -> dict:
    """A command's return code (None: timed out), stdout lines and stderr's last 2,000 characters
    (None where it exited 0), run from this folder with environ's variables set, whatever it
    printed before a timeout too; and its stderr's lines about CUDA graphs, in full (inductor
    warns there of each graph it leaves out of them, and why)."""
    here = os.path.dirname(os.path.abspath(__file__))
    # unbuffered: a pipe holds 8 KB of a child's prints until it exits, and a timeout kills it
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(environ or {}))
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=here, timeout=timeout, env=env
        )
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        # what a timeout caught is bytes, whatever text=True says
        returncode = None
        stdout, stderr = ((part or b"").decode(errors="replace") for part in (e.stdout, e.stderr))
        stderr += f"\ntimed out after {timeout:.0f} s"
    graph_lines = [line for line in stderr.splitlines() if "cudagraph" in line.lower()]
    if returncode == 0:
        stderr = None
    else:
        stderr = stderr[-2000:]
    lines = stdout.splitlines()
    return dict(returncode=returncode, stdout=lines, stderr=stderr, cudagraph_lines=graph_lines)


def train_lines(setting, arch, environ=None):
    """(e): train.py's ModernBERT for 100 steps, within 300 s and the budget; BERT's 40 when the
    budget leaves BERT_TRAIN_S. (f): environ's variables set."""
    dev = setting.dev
    gc.collect()
    # hand the earlier sections' cached memory back for train.py
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    left = setting.left()
    if arch == "modernbert":
        timeout = max(60.0, min(300.0, left))
        return train_run(arch, 100, dev, setting.tiny, timeout, environ)
    if left < BERT_TRAIN_S:
        print(f"   {arch}: skipped, {left:.0f} s of the budget left, under {BERT_TRAIN_S} s")
        return dict(skipped=f"{left:.0f} s of the budget left, under {BERT_TRAIN_S} s")
    return train_run(arch, 40, dev, setting.tiny, timeout=left)


def run(report, setting, sections, archs):
    """The sections asked for, the quick ones first, so that a run that (b)'s compiling cuts short
    keeps them: (a), (d), (e)'s ModernBERT, (f), (b) for archs, (c), (e)'s BERT. The report holds
    each one's figures, or its error."""
    start = time.perf_counter()
    dev = setting.dev
    if "numerics" in sections:
        section("numerics", report, check_numerics, dev)
    if "memory" in sections:
        mem = {}
        if setting.tiny:
            mem = dict(seq=1024, layers=2)
        section("memory", report, train_memory, dev, setting.dtype, **mem)
        if transformers is not None:
            section("memory transformers", report, train_memory, dev, setting.dtype, hf=True, **mem)
        print(json.dumps({k: v for k, v in report.items() if k.startswith("memory")}, indent=1))
    if "train" in sections:
        section("train.py", report, train_lines, setting, "modernbert")
    if "graphs" in sections:
        graphs = dict(TORCHINDUCTOR_CUDAGRAPHS="1")
        section("train.py graphs", report, train_lines, setting, "modernbert", environ=graphs)
    # (b)'s compiled ModernBERT step, for (c)
    kept = {}
    if "speed" in sections:
        save = functools.partial(record, report, "speed")
        section("speed", report, check_speed, setting, kept, save, archs)
    if "profile" in sections:
        section("profile", report, profile_step, setting, kept)
    if "train" in sections:
        kept.clear()
        section("train.py bert", report, train_lines, setting, "bert")
    report["seconds"] = time.perf_counter() - start


def choices_of(allowed: tuple):
    """An argparse type: a comma-separated list of some of allowed, in the order given."""

    def convert(text: str) -> tuple:
        names = tuple(name.strip() for name in text.split(",") if name.strip())
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}, got {text!r}")
        return names

    return convert


def parse_args():
    raw = argparse.RawDescriptionHelpFormatter
    p = Parser(description=__doc__, formatter_class=raw)
    p.add_argument("--tiny", action="store_true", help="every size small, for a CPU")
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    dtypes = "the speed, profile and memory sections' dtype; default bf16 on CUDA, fp32 on CPU"
    p.add_argument("--dtype", choices=DTYPES, help=dtypes)
    p.add_argument("--json", type=output_file, help="write the results here, after every section")
    budget = "seconds the whole check may take: (e) runs BERT only if this leaves time for it"
    p.add_argument("--budget", type=POSITIVE, default=BUDGET_S, help=budget)
    sections = f"which to run, comma-separated, of {','.join(SECTIONS)} (default: all but graphs)"
    p.add_argument("--sections", type=choices_of(SECTIONS), default=DEFAULT_SECTIONS, help=sections)
    archs = f"(b)'s architectures, in this order, comma-separated (default {','.join(SPEED_SEQ)})"
    p.add_argument(
        "--archs", type=choices_of(tuple(SPEED_SEQ)), default=tuple(SPEED_SEQ), help=archs
    )
    args = p.parse_args()
    device_or_die(args.device)
    return args


def main():
    args = parse_args()
    # each line out as it is printed: a run that its limit kills keeps what it printed
    sys.stdout.reconfigure(line_buffering=True)
    # each recompile's reason, printed as it happens: what a short GPU run most needs to show
    torch._logging.set_logs(recompiles=True)
    deadline = time.perf_counter() + args.budget
    dev = torch.device(args.device)
    dtype_name = args.dtype or default_dtype(dev)
    # not a switch here ((b) and (c) compile, (d) does not), but recorded as bench.py records it
    compile_ = dev.type == "cuda"
    print_setup(dev, dtype_name, compile_)
    peak = measured_peak(dev, DTYPES[dtype_name])
    spec = spec_peak(dev)
    measured = f"matmul peak ({dtype_name}, measured): {peak / 1e12:.2f} TFLOP/s"
    print(f"{measured}; the card's dense bf16 spec: {spec / 1e12:.0f} TFLOP/s (0: not known)")
    report = dict(device=str(dev), dtype=dtype_name, compile=compile_, peak_flops=peak)
    report.update(machine(dev), tiny=args.tiny, budget=args.budget)
    report.update(sections=args.sections, archs=args.archs)
    report.update(spec_peak_flops=spec, flash=te.FLASH, json=args.json)
    setting = Setting(dev, DTYPES[dtype_name], peak, spec, tiny=args.tiny, deadline=deadline)
    run(report, setting, args.sections, args.archs)
    record(report, "seconds", report["seconds"])


if __name__ == "__main__":
    main()
