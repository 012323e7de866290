"""gpu_check.py: the one-run GPU check, with bench.py's pieces.

    python gpu_check.py --json gpu_check.json   # on a GPU: bf16, a few minutes
    python gpu_check.py --tiny --device cpu     # the same code at small sizes, in about a minute

Five sections, each recorded in the JSON even when another fails: (a) numerics: every backend in
fp32 and bf16 against fp32 eager, logits and every parameter's gradient; (b) speed: ModernBERT-base
training on variable-length rows of up to 1024 tokens, eager and compiled, next to transformers;
(c) profile: the ten most expensive kernels of one step; (d) memory: the peak of a training step at
8192 tokens; (e) train.py: its tok/s and MFU lines over 100 steps. --tiny shrinks every size so that
a CPU runs the same code in about a minute.
"""

import argparse
import dataclasses
import gc
import json
import operator
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import tinyencoder as te
from bench import DTYPES, Sizes, Stepper, add_mfu, autocast, bench_case, default_dtype, hf_twin
from bench import make_batches, print_setup, print_table, transformers, variant
from mfu import measured_peak, spec_peak, synchronize

# (a)'s backends, each in the dtype it runs in; flash runs in half precision only
BACKENDS = ("eager fp32", "eager bf16", "sdpa fp32", "sdpa bf16", "flash bf16")


def train_memory(dev, dtype, seq=8192, compile_=False, hf=False, **overrides):
    """Peak memory of a ModernBERT-base training step (batch 1, seq tokens) with AdamW state."""
    torch.manual_seed(0)
    model = te.TinyEncoder(te.Config.from_preset("modernbert", **overrides)).to(dev)
    if hf:
        model = hf_twin(model, dev)
    step = Stepper(model, True, dtype, compile_)
    b = make_batches(te.Config.from_preset("modernbert"), 1, 1, seq, False, dev)[0]
    # allocates AdamW state (and compiles)
    step(b)
    synchronize(dev)
    if dev.type != "cuda":
        return dict(seq=seq, peak_gib=None, note="peak memory is only measured on CUDA")
    # earlier sections' cyclic garbage must not count
    gc.collect()
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
    # after every section, so that a run cut short keeps what it measured
    if report.get("json"):
        write_report(report)


def write_report(report):
    """The report as JSON, to the path it names."""
    with open(report["json"], "w") as f:
        json.dump(report, f, indent=1, default=str)


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


def judge(arch, key, err, tolerance, eager_bf16):
    """Print one backend's figures and verdict; its entry in the report.

    Absolute: logits within tolerance, every gradient within 0.2 of its largest fp32 entry. For
    bf16, relative as well: at most twice eager's own bf16 error (plus 1e-3 on logits, 1e-2 on
    gradients), since eager bf16 shows what rounding alone costs."""
    line = f"   {arch:<11}{key:<11} max|diff| vs fp32 eager: "
    if isinstance(err, str):
        print(line + err)
        return dict(err=None, note=err)
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
    results = {key: judge(arch, key, err, tolerance, eager_bf16) for key, err in errors.items()}
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


def check_speed(dev, dtype, peak, spec, tiny, dtype_name):
    """ModernBERT-base training on variable-length rows of up to 1024 tokens: tokens/s and MFU of
    tinyencoder (eager and compiled) and transformers (sdpa), same weights and batches."""
    layers = te.Config.from_preset("modernbert").layers
    sizes = Sizes(layers=layers, batch=16, seq=1024, steps=10, warmup=3)
    if tiny:
        sizes = Sizes(layers=1, batch=2, seq=128, steps=2, warmup=3)
    rows = []
    for compile_ in (False, True):
        for row in bench_case("modernbert", "var", "train", sizes, dev, dtype, compile_=compile_):
            row["compiled"] = compile_
            if compile_:
                row["variant"] = "compiled"
            rows.append(row)
    add_mfu(rows, peak)
    print_table(rows, peak, dtype_name)
    # MFU against the data sheet as well, as papers quote it
    for row in rows:
        row["te_mfu_spec"] = row["te_flop_s"] / spec if spec else None
        print(f"   compiled={row['compiled']}: te MFU {row['te_mfu_spec'] or 0:.1%} of the spec")
    return rows


def profile_step(dev, dtype, tiny):
    """The ten most expensive kernels of one ModernBERT-base training step, from the profiler."""
    sizes = dict(layers=te.Config.from_preset("modernbert").layers, batch=8, seq=1024)
    if tiny:
        sizes = dict(layers=2, batch=2, seq=256)
    torch.manual_seed(0)
    model = te.TinyEncoder(te.Config.from_preset("modernbert", layers=sizes["layers"])).to(dev)
    step = Stepper(model, True, dtype)
    b = make_batches(model.cfg, 1, sizes["batch"], sizes["seq"], True, dev)[0]
    # allocates the optimizer state, so that the profiled step is a steady one
    step(b)
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
    size = ["--max-steps", "100"]
    if tiny:
        size = ["--size", "tiny", "--max-steps", "5"]
    gc.collect()
    # hand the earlier sections' cached memory back for train.py
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "train.py", "--arch", "modernbert", "--device", dev.type]
        command += size + ["--out-dir", out]
        done = subprocess.run(command, capture_output=True, text=True, cwd=here, timeout=300)
    lines = [line for line in done.stdout.splitlines() if "tok/s" in line or "MFU" in line]
    print("\n".join(lines) or done.stderr[-2000:])
    return dict(returncode=done.returncode, lines=lines)


def run(report, dev, dtype_name, peak, tiny):
    """Sections (a) to (e); the report holds each one's figures, or its error."""
    start = time.perf_counter()
    dtype = DTYPES[dtype_name]
    spec = spec_peak(dev)
    report["spec_peak_flops"] = spec
    measured = f"matmul peak ({dtype_name}, measured): {peak / 1e12:.2f} TFLOP/s"
    print(f"{measured}; the card's dense bf16 spec: {spec / 1e12:.0f} TFLOP/s (0: not known)")
    section("numerics", report, check_numerics, dev)
    section("speed", report, check_speed, dev, dtype, peak, spec, tiny, dtype_name)
    section("profile", report, profile_step, dev, dtype, tiny)
    mem = {}
    if tiny:
        mem = dict(seq=1024, layers=2)
    section("memory", report, train_memory, dev, dtype, **mem)
    if transformers is not None:
        section("memory transformers", report, train_memory, dev, dtype, hf=True, **mem)
    memory = {k: v for k, v in report.items() if k.startswith("memory")}
    print(json.dumps(memory, indent=1))
    section("train.py", report, train_lines, dev, tiny)
    report["seconds"] = time.perf_counter() - start


def parse_args():
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    p.add_argument("--tiny", action="store_true", help="every size small, for a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dtypes = "the speed, profile and memory sections' dtype; default bf16 on CUDA, fp32 on CPU"
    p.add_argument("--dtype", choices=DTYPES, help=dtypes)
    p.add_argument("--json", help="write the results here, after every section")
    return p.parse_args()


def main():
    args = parse_args()
    dev = torch.device(args.device)
    dtype_name = args.dtype or default_dtype(dev)
    # not a switch here (speed runs both), but recorded as bench.py records it: compiled by default
    compile_ = dev.type == "cuda"
    print_setup(dev, dtype_name, compile_)
    peak = measured_peak(dev, DTYPES[dtype_name])
    report = dict(device=str(dev), dtype=dtype_name, compile=compile_, peak_flops=peak)
    report["json"] = args.json
    run(report, dev, dtype_name, peak, args.tiny)
    if args.json:
        write_report(report)


if __name__ == "__main__":
    main()
