"""gpu_check.py: the one-run GPU check that `python bench.py --gpu-check --json PATH` runs.

Five sections, each recorded in the JSON even when another fails: (a) numerics: every backend in
fp32 and bf16 against fp32 eager, logits and every parameter's gradient; (b) speed: ModernBERT-base
training on variable-length rows of up to 1024 tokens, eager and compiled, next to transformers;
(c) profile: the ten most expensive kernels of one step; (d) memory: the peak of a training step at
8192 tokens; (e) train.py: its tok/s and MFU lines over 100 steps. --tiny shrinks every size so that
`python bench.py --gpu-check --tiny --device cpu` runs the same code on a CPU in about a minute.
"""

import argparse
import gc
import json
import os
import operator
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import tinyencoder as te
from bench import DTYPES, add_mfu, autocast, bench_case, hf_twin, make_batches, print_table
from bench import stepper, transformers, variant
from mfu import spec_peak, synchronize


def train_memory(dev, dtype, seq=8192, compile_=False, hf=False, **overrides):
    """Peak memory of a ModernBERT-base training step (batch 1, seq tokens) with AdamW state."""
    torch.manual_seed(0)
    model = te.TinyEncoder(te.Config.from_preset("modernbert", **overrides)).to(dev)
    if hf:
        model = hf_twin(model, dev)
    step = stepper(model, True, dtype, compile_)
    b = make_batches(te.Config.from_preset("modernbert"), 1, 1, seq, False, dev)[0]
    step(b)  # allocates AdamW state (and compiles)
    synchronize(dev)
    if dev.type != "cuda":
        return dict(seq=seq, peak_gib=None, note="peak memory is only measured on CUDA")
    gc.collect()  # earlier sections' cyclic garbage must not count
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(b)
    synchronize(dev)
    peak = torch.cuda.max_memory_allocated()
    return dict(seq=seq, peak_gib=peak / 2**30, static_gib=before / 2**30)


def section(name, report, fn, *args, **kwargs):
    """Run one part of a check; an error is printed and recorded, and the rest still runs."""
    print(f"\n== {name}", flush=True)
    t = time.perf_counter()
    try:
        report[name] = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - keep the other sections
        traceback.print_exc()
        report[name] = {"error": f"{type(e).__name__}: {e}"}
    print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
    if report.get("json"):  # after every section, so that a run cut short keeps what it measured
        with open(report["json"], "w") as f:
            json.dump(report, f, indent=1, default=str)


def logits_and_grads(model, ids, am, real, probe, dtype):
    """Logits at the real tokens, and every parameter's gradient of a fixed projection of them."""
    model.zero_grad(set_to_none=True)
    with autocast(ids.device, dtype):
        logits = model(ids, am).logits[real].float()
    (logits * probe).sum().backward()
    return logits.detach(), {
        n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None
    }


def worst_grad_error(grads, ref):
    """The largest max |diff| of any parameter's gradient, over that gradient's largest entry."""
    errors = [(grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12) for n, g in ref.items()]
    return max(errors).item()


def check_numerics(dev):
    """Every backend in fp32 and bf16 against fp32 eager, forward and backward, on padded and
    packed rows of 256 tokens with ModernBERT's 128-token window.

    bf16 keeps 8 significant bits (unit roundoff 2^-8 ~ 4e-3 per rounding), so a few layers of
    rounded matmuls give ~1e-2 relative error. Logits: max |diff| <= 5e-2 * max(1, max |logit|).
    Gradients: for every parameter, max |diff| <= 0.2 * max |its fp32 gradient|. The sharper test
    is relative: a fast backend's error may be at most 2x eager's own bf16 error (plus 1e-3 on
    logits, 1e-2 on gradients)."""
    # document ids, 0 = padding
    full = [1] * 256
    padded = [1] * 200 + [0] * 56
    packed_and_pad = [1] * 100 + [2] * 90 + [0] * 66
    packed = [1] * 30 + [2] * 150 + [3] * 76
    am = torch.tensor([full, padded, packed_and_pad, packed])  # (4, 256)
    g = torch.Generator().manual_seed(0)
    ids = torch.where(am > 0, torch.randint(0, 256, am.shape, generator=g), te.PAD).to(dev)
    real = (am > 0).to(dev)
    am = am.to(dev)
    out = {}
    for arch in te.PRESETS:
        cfg = te.Config.from_preset(arch, hidden=256, heads=4, layers=3, attn_backend="eager")
        torch.manual_seed(0)
        ref_model = te.TinyEncoder(cfg).to(dev).eval()
        probe = torch.randn(int(real.sum()), cfg.vocab_size, generator=g).to(dev)
        ref, ref_grads = logits_and_grads(ref_model, ids, am, real, probe, torch.float32)
        scale = max(1.0, ref.abs().max().item())
        tolerance = 5e-2 * scale
        errors = {}
        # flash runs in half precision only
        for key in ("eager fp32", "eager bf16", "sdpa fp32", "sdpa bf16", "flash bf16"):
            backend, dtype_name = key.split()
            try:
                m = variant(ref_model, attn_backend=backend).eval()
                logits, grads = logits_and_grads(m, ids, am, real, probe, DTYPES[dtype_name])
                logit_err = (logits - ref).abs().max().item()
                errors[key] = dict(err=logit_err, grad_err=worst_grad_error(grads, ref_grads))
            except Exception as e:  # noqa: BLE001 - e.g. flash on CPU
                errors[key] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"

        eager_bf16 = errors.get("eager bf16")
        results = {}
        for key, err in errors.items():
            line = f"   {arch:<11}{key:<11} max|diff| vs fp32 eager: "
            if isinstance(err, str):
                print(line + err)
                results[key] = dict(err=None, note=err)
                continue
            ok = err["err"] <= tolerance and err["grad_err"] <= 0.2
            if "bf16" in key and isinstance(eager_bf16, dict):
                ok = ok and err["err"] <= 2 * eager_bf16["err"] + 1e-3
                ok = ok and err["grad_err"] <= 2 * eager_bf16["grad_err"] + 1e-2
            verdict = "ok" if ok else "FAIL"
            figures = f"logits {err['err']:.2e}, gradients {err['grad_err']:.2e} (relative)"
            print(f"{line}{figures}  {verdict}")
            results[key] = dict(err, ok=ok)
        out[arch] = dict(tolerance=tolerance, max_abs_ref=scale, results=results)
    return out


def check_speed(dev, dtype, peak, spec, tiny, dtype_name):
    """ModernBERT-base training on variable-length rows of up to 1024 tokens: tokens/s and MFU of
    tinyencoder (eager and compiled) and transformers (sdpa), same weights and batches."""
    sizes = dict(layers=te.Config.from_preset("modernbert").layers, batch=16, seq=1024, steps=10)
    if tiny:
        sizes = dict(layers=1, batch=2, seq=128, steps=2)
    rows = []
    for compile_ in (False, True):
        args = argparse.Namespace(
            **sizes, warmup=3, compile=compile_, compile_hf=False, no_hf=False
        )
        for row in bench_case("modernbert", "var", "train", args, dev, dtype):
            row["compiled"] = compile_
            if compile_:
                row["variant"] = "compiled"
            rows.append(row)
    add_mfu(rows, peak)
    print_table(rows, peak, dtype_name)
    for row in rows:  # MFU against the data sheet as well, as papers quote it
        row["te_mfu_spec"] = row["te_flop_s"] / spec if spec else None
        print(f"   compiled={row['compiled']}: te MFU {row['te_mfu_spec'] or 0:.1%} of the spec")
    return rows


def profile_step(dev, dtype, tiny):
    """The ten most expensive kernels of one ModernBERT-base training step, from the profiler."""
    layers, batch, seq = (
        (2, 2, 256) if tiny else (te.Config.from_preset("modernbert").layers, 8, 1024)
    )
    torch.manual_seed(0)
    model = te.TinyEncoder(te.Config.from_preset("modernbert", layers=layers)).to(dev)
    step = stepper(model, True, dtype)
    b = make_batches(model.cfg, 1, batch, seq, True, dev)[0]
    step(b)  # allocates the optimizer state
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step(b)
        synchronize(dev)
    sort = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=10))
    events = sorted(prof.key_averages(), key=operator.attrgetter(sort), reverse=True)[:10]
    return [dict(kernel=e.key, us=getattr(e, sort), calls=e.count) for e in events]


def train_lines(dev, tiny):
    """python train.py --arch modernbert --max-steps 100 on this device: its tok/s and MFU lines
    (the first includes compiling; the last is the steady state)."""
    size = ["--size", "tiny", "--max-steps", "5"] if tiny else ["--max-steps", "100"]
    gc.collect()
    if dev.type == "cuda":  # hand the earlier sections' cached memory back for train.py
        torch.cuda.empty_cache()
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "train.py", "--arch", "modernbert", "--device", dev.type]
        command += size + ["--out-dir", out]
        done = subprocess.run(command, capture_output=True, text=True, cwd=here, timeout=300)
    lines = [line for line in done.stdout.splitlines() if "tok/s" in line or "MFU" in line]
    print("\n".join(lines) or done.stderr[-2000:])
    return dict(returncode=done.returncode, lines=lines)


def run(args, dev, dtype, peak, report):
    """Sections (a) to (e); the report holds each one's figures, or its error."""
    start = time.perf_counter()
    spec = spec_peak(dev)
    report["spec_peak_flops"] = spec
    measured = f"matmul peak ({args.dtype}, measured): {peak / 1e12:.2f} TFLOP/s"
    print(f"{measured}; the card's dense bf16 spec: {spec / 1e12:.0f} TFLOP/s (0: not known)")
    section("numerics", report, check_numerics, dev)
    section("speed", report, check_speed, dev, dtype, peak, spec, args.tiny, args.dtype)
    section("profile", report, profile_step, dev, dtype, args.tiny)
    mem = dict(seq=1024, layers=2) if args.tiny else {}
    section("memory", report, train_memory, dev, dtype, **mem)
    if transformers is not None:
        section("memory transformers", report, train_memory, dev, dtype, hf=True, **mem)
    memory = {k: v for k, v in report.items() if k.startswith("memory")}
    print(json.dumps(memory, indent=1))
    section("train.py", report, train_lines, dev, args.tiny)
    report["seconds"] = time.perf_counter() - start
