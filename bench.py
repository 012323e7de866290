"""bench.py: tinyencoder against transformers on the same weights and the same batches, alternating the two.

    python bench.py                          # CPU default: 3-layer, 768-wide models at seq 512, ~10 minutes
    python bench.py --arch modernbert --layers 4 --batch 8 --steps 5 --json out.json
    python bench.py --device cuda            # bf16 autocast + torch.compile, plus ModernBERT-base memory at 8192
    python bench.py --gpu-check [--tiny]     # backend numerics, ModernBERT-base tokens/s + MFU, memory at 8192

Throughput counts real (non-pad) tokens only. MFU = real tokens x flops_per_token / time / peak, with the peak
measured here: the best of a few large matmuls in the run's dtype, taken at the start and after each architecture,
since on a shared machine other jobs come and go. Inference uses a third of the training FLOPs.
For a batch of documents the attention term uses each document's own length (sum of l * flops_per_token(l)).
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

import tinyencoder as te

try:
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
except ImportError:
    transformers = None


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(dev, dtype, sizes=None, reps=3):
    """Best FLOP/s of a few square matmuls: the machine's practical matmul peak in this dtype."""
    sizes = sizes or ((4096, 8192) if dev.type == "cuda" else (2048, 3072, 4096))
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
        for _ in range(reps + 1):
            sync(dev)
            t = time.perf_counter()
            a @ b
            sync(dev)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def make_batches(cfg, n, B, T, var, dev, seed=0):
    """n batches of random bytes: full rows of T tokens, or lengths uniform in [64, T] right-padded to T."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = torch.randint(min(64, T), T + 1, (B,), generator=g) if var else torch.full((B,), T)
        am = (torch.arange(T) < lens[:, None]).long()
        ids = torch.where(am.bool(), torch.randint(0, 256, (B, T), generator=g), cfg.pad_id)
        ids[:, 0], ids[torch.arange(B), lens - 1] = cfg.cls_id, cfg.sep_id
        inputs, labels = te.mask_tokens(ids, cfg, g)           # labels are -100 at pads and specials
        out.append(dict(input_ids=inputs.to(dev), attention_mask=am.to(dev), labels=labels.to(dev),
                        lens=lens.tolist()))
    return out


def batch_flops(model, b):
    """Training FLOPs of one batch: every document costs its length times flops_per_token(its length)."""
    return sum(n * model.flops_per_token(n) for n in b["lens"])


def hf_twin(model, dev):
    """The transformers model holding the same weights (save_pretrained -> AutoModelForMaskedLM, sdpa)."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        kw = dict(sparse_prediction=True) if model.cfg.arch == "modernbert" and model.cfg.sparse_prediction else {}
        hf = transformers.AutoModelForMaskedLM.from_pretrained(d, attn_implementation="sdpa", **kw)
    return hf.to(dev)


def variant(model, **changes):
    """A copy of model with some Config fields changed (e.g. unpad); same weights."""
    twin = te.TinyEncoder(dataclasses.replace(model.cfg, **changes)).to(model.tok.weight.device)
    twin.load_state_dict(model.state_dict())
    return twin


def stepper(model, train, amp, compile_=False):
    """One call = one training step (forward, backward, AdamW) or one no_grad inference forward."""
    fwd = torch.compile(model) if compile_ else model
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused) if train else None

    def run(f, b):
        model.train(train)
        if train:
            with amp():
                loss = f(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), amp():
                f(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    def step(b):
        nonlocal fwd
        try:
            run(fwd, b)
        except Exception as e:                                 # noqa: BLE001 - a compile failure: say so, go eager
            if fwd is model:
                raise
            step.note = f"torch.compile failed, ran eager: {type(e).__name__}: {str(e)[:200]}"
            print(step.note, file=sys.stderr)
            fwd = model
            if opt:
                opt.zero_grad(set_to_none=True)
            run(fwd, b)
    step.note = None
    return step


def alternate(steps, batches, warmup, dev):
    """Run every step function on every batch, rotating the order each batch; seconds per timed batch."""
    names, times = list(steps), {k: [] for k in steps}
    for i, b in enumerate(batches):
        for k in names[i % len(names):] + names[:i % len(names)]:
            sync(dev)
            t = time.perf_counter()
            steps[k](b)
            sync(dev)
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return times


def bench_case(arch, var, train, args, dev, amp):
    """Rows for one (arch, batch type, train/infer): each tinyencoder variant against transformers."""
    cfg = te.Config.from_preset(arch, layers=args.layers, nsp=False)   # MLM only, as AutoModelForMaskedLM
    torch.manual_seed(0)
    base = te.TinyEncoder(cfg).to(dev)
    models = {"published": base}
    if var and not cfg.unpad:                                  # BERT/RoBERTa: also with unpadding switched on
        models["unpad"] = variant(base, unpad=True, sparse_prediction=True)
    steps = {k: stepper(m, train, amp, args.compile) for k, m in models.items()}
    if transformers is not None and not args.no_hf:
        steps["hf"] = stepper(hf_twin(base, dev), train, amp, args.compile and args.compile_hf)
    batches = make_batches(cfg, args.warmup + args.steps, args.batch, args.seq, var, dev)
    times = alternate(steps, batches, args.warmup, dev)
    timed = batches[args.warmup:]
    tok = [int(b["attention_mask"].sum()) for b in timed]
    flops = [batch_flops(base, b) / (1 if train else 3) for b in timed]
    med = lambda xs: statistics.median(xs)
    rate = lambda k: med([n / t for n, t in zip(tok, times[k])])
    achieved = lambda k: med([f / t for f, t in zip(flops, times[k])])   # FLOP/s; MFU once the peak is known
    rows = []
    for k in models:
        row = dict(arch=arch, batch="var" if var else "full", step="train" if train else "infer", variant=k,
                   te_tok_s=rate(k), te_flop_s=achieved(k), te_s=med(times[k]), te_times=times[k], tokens=tok)
        if "hf" in times:                                      # paired per batch: same batch, same moment
            row.update(hf_tok_s=rate("hf"), hf_flop_s=achieved("hf"), hf_s=med(times["hf"]), hf_times=times["hf"],
                       ratio=med([h / t for h, t in zip(times["hf"], times[k])]))
        rows.append(dict(row, note=steps[k].note) if steps[k].note else row)
    return rows


def train_memory(dev, amp, seq=8192, compile_=False, hf=False, **overrides):
    """Peak memory of one ModernBERT-base training step (batch 1, seq tokens), after the optimizer state exists."""
    torch.manual_seed(0)
    model = te.TinyEncoder(te.Config.from_preset("modernbert", **overrides)).to(dev)
    if hf:
        model = hf_twin(model, dev)
    step = stepper(model, True, amp, compile_)
    b = make_batches(te.Config.from_preset("modernbert"), 1, 1, seq, False, dev)[0]
    step(b)                                                    # allocates AdamW state (and compiles)
    sync(dev)
    if dev.type != "cuda":
        return dict(seq=seq, peak_gib=None, note="peak memory is only measured on CUDA")
    gc.collect()                                               # cyclic garbage of earlier sections must not count
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(b)
    sync(dev)
    return dict(seq=seq, peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30, static_gib=before / 2 ** 30)


def print_table(rows, peak, dtype):
    for r in rows:
        r.update({f"{w}_mfu": r[f"{w}_flop_s"] / peak for w in ("te", "hf") if f"{w}_flop_s" in r})
    print(f"\nmatmul peak ({dtype}, measured): {peak / 1e9:,.1f} GFLOP/s; tok/s = real tokens; "
          f"hf/te = transformers time / tinyencoder time (median of paired steps)")
    head = f"{'arch':<11}{'batch':<6}{'step':<6}{'variant':<10}{'te tok/s':>10}{'hf tok/s':>10}{'hf/te':>7}" \
           f"{'te MFU':>8}{'hf MFU':>8}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        hf = (f"{r['hf_tok_s']:>10,.0f}{r['ratio']:>6.2f}x" if "ratio" in r else f"{'-':>10}{'-':>7}")
        hm = f"{r['hf_mfu']:>8.1%}" if "hf_mfu" in r else f"{'-':>8}"
        print(f"{r['arch']:<11}{r['batch']:<6}{r['step']:<6}{r['variant']:<10}{r['te_tok_s']:>10,.0f}{hf}"
              f"{r['te_mfu']:>8.1%}{hm}")


def section(name, report, fn):
    """Run one part of a check; an error is printed and recorded, and the rest still runs."""
    print(f"\n== {name}", flush=True)
    t = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as e:                                     # noqa: BLE001 - keep the other sections
        traceback.print_exc()
        report[name] = {"error": f"{type(e).__name__}: {e}"}
    print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)


def check_numerics(dev):
    """Every backend in bf16 against fp32 eager, on padded, packed and (ModernBERT) windowed batches.

    bf16 keeps 8 significant bits (unit roundoff 2^-8 ~ 4e-3 per rounding), so a few layers of rounded matmuls
    give ~1e-2 relative error; on logits of size O(1) we accept max |diff| <= 5e-2 * max(1, max |logit|). Because that
    bound is loose, the sharper test is relative: a fast backend's error may be at most 2x eager's own bf16 error."""
    runs = [[(1, 256)], [(1, 200), (0, 56)], [(1, 100), (2, 90), (0, 66)], [(1, 30), (2, 150), (3, 76)]]
    am = torch.tensor([sum(([d] * n for d, n in r), []) for r in runs])   # full, padded, packed + pad, packed
    g = torch.Generator().manual_seed(0)
    ids = torch.where(am > 0, torch.randint(0, 256, am.shape, generator=g), te.PAD).to(dev)
    am, real = am.to(dev), (am > 0).to(dev)
    out = {}
    for arch in te.PRESETS:
        cfg = te.Config.from_preset(arch, hidden=256, heads=4, layers=3, attn_backend="eager")
        torch.manual_seed(0)
        ref_model = te.TinyEncoder(cfg).to(dev).eval()
        with torch.no_grad():
            ref = ref_model(ids, am).logits[real]
        scale, res = max(1.0, ref.abs().max().item()), {}
        for backend in ("eager", "sdpa", "flash"):
            for dt in (torch.float32, torch.bfloat16):
                if backend == "flash" and dt == torch.float32:
                    continue
                key = f"{backend} {'bf16' if dt == torch.bfloat16 else 'fp32'}"
                try:
                    m = variant(ref_model, attn_backend=backend).eval()
                    with torch.no_grad(), torch.autocast(dev.type, dt, enabled=dt != torch.float32):
                        err = (m(ids, am).logits[real].float() - ref).abs().max().item()
                    res[key] = err
                except Exception as e:                         # noqa: BLE001 - e.g. flash on CPU
                    res[key] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
        eager_bf16 = res.get("eager bf16")
        for key, err in res.items():
            ok = isinstance(err, float) and err <= 5e-2 * scale and (
                not isinstance(eager_bf16, float) or "bf16" not in key or err <= 2 * eager_bf16 + 1e-3)
            print(f"   {arch:<11}{key:<11} max|diff| vs fp32 eager: " +
                  (f"{err:.2e}  {'ok' if ok else 'FAIL'}" if isinstance(err, float) else err))
            res[key] = dict(err=err, ok=ok) if isinstance(err, float) else dict(err=None, note=err)
        out[arch] = dict(tolerance=5e-2 * scale, max_abs_ref=scale, results=res)
    return out


def check_speed(dev, amp, peak, tiny, compile_, dtype):
    """ModernBERT-base training at seq 1024: tokens/s and MFU, tinyencoder (compiled) next to transformers."""
    over = dict(layers=2) if tiny else {}
    B, T, steps = (2, 256, 3) if tiny else (16, 1024, 10)
    args = argparse.Namespace(layers=te.Config.from_preset("modernbert", **over).layers, batch=B, seq=T,
                              steps=steps, warmup=3, compile=compile_, compile_hf=False,
                              no_hf=False)
    rows = bench_case("modernbert", False, True, args, dev, amp)
    print_table(rows, peak, dtype)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="all", choices=["all", *te.PRESETS])
    p.add_argument("--layers", type=int, default=3, help="depth override (3 keeps ModernBERT's one global "
                   "attention layer in three); width stays the preset's 768")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (after --warmup); variable-length "
                   "ratios swing with each batch's padding, so fewer steps give noisier medians")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="bf16 = autocast; default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile tinyencoder "
                   "(default on CUDA)")
    p.add_argument("--compile-hf", action="store_true", help="with --compile, compile transformers too")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); on a shared machine "
                   "1 thread per free core avoids threads waiting on each other")
    p.add_argument("--no-hf", action="store_true", help="tinyencoder alone")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--gpu-check", action="store_true", help="numerics of every backend, ModernBERT-base speed "
                   "and memory; writes $OUT/gpu_check.json when $OUT is set")
    p.add_argument("--tiny", action="store_true", help="--gpu-check with small sizes (to try it on a CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    args.compile = dev.type == "cuda" if args.compile is None else args.compile
    args.warmup = max(args.warmup, 3) if args.compile else args.warmup   # compile, then recompile for dynamic shapes
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    amp = lambda: torch.autocast(dev.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    print(f"torch {torch.__version__}, transformers {getattr(transformers, '__version__', 'not installed')}, "
          f"{dev}, {args.dtype}, compile={args.compile}, threads={torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    if dev.type == "cpu" and torch.get_num_threads() > 1 and os.getloadavg()[0] > 0.5:
        print("note: other jobs are using the CPUs, so threads wait on each other; --threads 1 is steadier")
    peak = peak_flops(dev, dtype)
    report = dict(device=str(dev), dtype=args.dtype, compile=args.compile, peak_flops=peak)

    if args.gpu_check:
        start = time.perf_counter()
        print(f"matmul peak ({args.dtype}): {peak / 1e12:.2f} TFLOP/s")
        section("numerics", report, lambda: check_numerics(dev))
        section("speed", report, lambda: check_speed(dev, amp, peak, args.tiny, args.compile, args.dtype))
        mem = dict(seq=1024, layers=2) if args.tiny else {}
        section("memory", report, lambda: train_memory(dev, amp, **mem))
        if transformers is not None:
            section("memory transformers", report, lambda: train_memory(dev, amp, hf=True, **mem))
        if time.perf_counter() - start < 240:                 # compiling 22 layers for a new shape takes a while
            section("memory compiled", report, lambda: train_memory(dev, amp, compile_=True, **mem))
        print(json.dumps({k: v for k, v in report.items() if k.startswith("memory")}, indent=1))
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
                json.dump(report, f, indent=1, default=str)
        return

    rows, peaks = [], [peak]
    for arch in (te.PRESETS if args.arch == "all" else [args.arch]):
        for var in (False, True):
            for train in (True, False):
                rows += bench_case(arch, var, train, args, dev, amp)
                print(f"  {arch} {rows[-1]['batch']} {rows[-1]['step']}: done", file=sys.stderr, flush=True)
        peaks.append(peak_flops(dev, dtype))
    report.update(peak_flops=max(peaks), peaks=peaks, rows=rows)
    print_table(rows, max(peaks), args.dtype)
    if dev.type == "cuda":
        section("ModernBERT-base training step at 8192, batch 1", report,
                lambda: train_memory(dev, amp, compile_=args.compile))
        print(report["ModernBERT-base training step at 8192, batch 1"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
