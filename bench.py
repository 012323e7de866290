"""bench.py: tinyencoder against transformers on the same weights and batches, alternating the two.

    python bench.py                    # CPU: 3 layers, 768 wide, seq 512 (--steps 10: ~14 min)
    python bench.py --arch modernbert --layers 4 --batch 8 --steps 5 --json out.json
    python bench.py --device cuda      # bf16, torch.compile (both libraries; --no-compile-hf)
    python bench.py --encode --threads 1  # pipelines.encode on texts of 16-510 bytes, vs AutoModel
    python bench.py --dropout          # F.dropout against tinyencoder's drop, on a CPU
    python bench.py --linear           # nn.Linear against tinyencoder's Linear, on a CPU
    python bench.py --attention        # bf16 attention cast to fp32 against kept in bf16, on a CPU
    python bench.py --arch bert --profile  # and each case's ops by self time, per model

The one-run GPU check (numerics, speed against transformers compiled and eager, profile, memory,
train.py) is gpu_check.py, which uses this file as a library: base_model, Stepper, hf_steppers,
make_batches, alternate, compare. As in train.py, each batch comes with its layout made ahead on the
CPU (te.make_layout) for tinyencoder's steps, so that a timed GPU step never waits for the host.

Throughput counts real (non-pad) tokens only. MFU = real tokens x flops_per_token / time / peak,
with the peak measured here: the best of a few large matmuls in the run's dtype, taken at the start
and after each architecture, since on a shared machine other jobs come and go. Inference uses a
third of the training FLOPs. For a batch of documents the attention term uses each document's own
length (sum of l * flops_per_token(l)).
"""

import argparse
import dataclasses
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import unittest.mock

import torch

import pipelines
import tinyencoder as te
import tinyencoder_hf
from data.rows import to_device
from mfu import autocast, flops_per_token, measured_peak, synchronize
from runs import COUNT, Parser, device_or_die, given_flags, number, output_file

try:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
except ImportError:
    transformers = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the masking rate of each family's recipe (train.py's RECIPES): the MLM head runs on these bytes
MLM_RATES = {"bert": 0.15, "roberta": 0.15, "modernbert": 0.30}


def layout_key(cfg):
    """What a batch's layout depends on besides the batch: the Config fields make_layout reads."""
    return f"{cfg.attn_backend}, unpad={cfg.unpad}, half_window={cfg.half_window}"


def make_batches(cfg, n, B, T, var, dev, *, dtype, seed=0, layout_cfgs=()):
    """n batches of random bytes: full rows of T tokens, or lengths uniform in [64, T] ([T / 2, T]
    below 128), padded to T.

    A batch is the model's keyword arguments, lens (each row's length), and layouts: for cfg and
    each of layout_cfgs, the layout make_layout builds on the CPU for a forward in dtype (the
    compute dtype: bf16 under autocast), by layout_key, so that a timed step never waits for it."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        if var:
            lens = torch.randint(min(64, T // 2), T + 1, (B,), generator=g)
        else:
            lens = torch.full((B,), T)
        am = (torch.arange(T) < lens[:, None]).long()  # (B, T)
        ids = torch.where(am.bool(), torch.randint(0, 256, (B, T), generator=g), cfg.pad_id)
        ids[:, 0] = cfg.cls_id
        ids[torch.arange(B), lens - 1] = cfg.sep_id
        # labels: IGNORE_INDEX at pads and specials; the share masked is each recipe's
        inputs, labels = te.mask_tokens(ids, cfg, g, MLM_RATES[cfg.arch])
        b = dict(input_ids=inputs.to(dev), attention_mask=am.to(dev), labels=labels.to(dev))
        b["lens"] = lens.tolist()
        cfgs = [cfg, *layout_cfgs]
        layouts = {layout_key(c): te.make_layout(c, am, dtype, dev, labels) for c in cfgs}
        b["layouts"] = {key: to_device(layout, dev) for key, layout in layouts.items()}
        batches.append(b)
    return batches


def batch_flops(model, b):
    """Training FLOPs of one batch: each document costs its length x flops_per_token(its length)."""
    return sum(n * flops_per_token(model, n) for n in b["lens"])


def hf_twin(model, dev):
    """The transformers model with our weights: tinyencoder_hf.save, AutoModelForMaskedLM."""
    # not in the saved config: ModernBERT's MLM head runs on labelled tokens only, as ours does
    kw = {"sparse_prediction": True} if model.cfg.arch == "modernbert" else {}
    with tempfile.TemporaryDirectory() as d:
        tinyencoder_hf.save(model, d)
        hf = transformers.AutoModelForMaskedLM.from_pretrained(d, attn_implementation="sdpa", **kw)
    return hf.to(dev)


def variant(model, **changes):
    """A copy of model with some Config fields changed (e.g. unpad); same weights."""
    dev = next(model.parameters()).device
    twin = te.TinyEncoder(dataclasses.replace(model.cfg, **changes)).to(dev)
    twin.load_state_dict(model.state_dict())
    return twin


class Stepper:
    """One call = one training step (forward, backward, AdamW) or one no_grad inference forward.

    On a GPU, and compiled, a tinyencoder model gets the batch's layout made ahead (make_batches'),
    as train.py's batch builder makes it, so that its step never waits for the host nor breaks its
    graph; an eager step on a CPU, where the host is the device, makes its own inside the step, as
    transformers makes its masks inside its own.
    compile_ wraps either in torch.compile, given options (its keywords: dynamic=True traces sizes
    as symbols from the first call). If torch.compile fails, the step runs eager from then on, and
    .note says why.
    """

    def __init__(self, model, train, dtype, compile_=False, options=None):
        self.model = model
        self.train = train
        self.dtype = dtype
        self.dev = next(model.parameters()).device
        self.forward = model
        self.layout_ahead = compile_ or self.dev.type != "cpu"
        if compile_:
            # gpu_check compiles six models in one process, whose forwards share two code objects
            # (tinyencoder's, transformers' wrapper): past dynamo's limit of 8 graphs for one, it
            # would run the next model's step eager, with a warning and no error
            limit = torch._dynamo.config.cache_size_limit
            torch._dynamo.config.cache_size_limit = max(limit, 64)
            self.forward = torch.compile(model, **(options or {}))
        self.opt = None
        if train and self.dev.type == "cuda":
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        elif train:
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.note = None

    def __call__(self, b):
        try:
            self.run(self.forward, b)
        except Exception as e:  # noqa: BLE001 - a compile failure
            if self.forward is self.model:
                raise
            self.note = f"torch.compile failed, ran eager: {type(e).__name__}: {str(e)[:200]}"
            print(self.note, file=sys.stderr)
            self.forward = self.model
            # the failed step may have left gradients behind
            if self.opt is not None:
                self.opt.zero_grad(set_to_none=True)
            self.run(self.forward, b)

    def run(self, forward, b):
        """The step itself, through forward: the compiled model or the eager one."""
        self.model.train(self.train)
        inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        if isinstance(self.model, te.TinyEncoder) and self.layout_ahead:
            inputs["layout"] = b["layouts"][layout_key(self.model.cfg)]
        if not self.train:
            with torch.no_grad(), autocast(self.dev, self.dtype):
                forward(**inputs)
            return
        with autocast(self.dev, self.dtype):
            loss = forward(**inputs, labels=b["labels"]).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def alternate(steps, batches, warmup, dev):
    """Run each step on each batch, rotating their order per batch; seconds of the timed batches."""
    names = list(steps)
    times = {k: [] for k in steps}
    for i, b in enumerate(batches):
        first = i % len(names)
        for k in names[first:] + names[:first]:
            synchronize(dev)
            t = time.perf_counter()
            steps[k](b)
            synchronize(dev)
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return times


def median_rate(amounts, seconds):
    """Median over batches of amount / time: tokens/s, or FLOP/s (MFU once over the peak)."""
    return statistics.median([a / t for a, t in zip(amounts, seconds)])


def timings(who, seconds, tokens, flops):
    """One library's columns of a row: tok/s, FLOP/s, median seconds, every time."""
    return {
        f"{who}_tok_s": median_rate(tokens, seconds),
        f"{who}_flop_s": median_rate(flops, seconds),
        f"{who}_s": statistics.median(seconds),
        f"{who}_times": seconds,
    }


@dataclasses.dataclass
class Sizes:
    """The size of one bench case: encoder layers and width (heads of 64), rows per batch, tokens
    per row, and how many batches are timed after how many untimed warm-up ones."""

    layers: int
    batch: int
    seq: int
    steps: int
    warmup: int
    hidden: int = 768


def base_model(arch, dev, layers, hidden=768):
    """tinyencoder as its preset publishes it (dropout included) at this depth and width (heads of
    64), MLM only (as AutoModelForMaskedLM), from seed 0."""
    width = dict(hidden=hidden, heads=max(1, hidden // 64))
    cfg = te.Config.from_preset(arch, layers=layers, nsp=False, **width)
    torch.manual_seed(0)
    return te.TinyEncoder(cfg).to(dev)


def hf_steppers(base, train, dtype, compiled, options=None):
    """transformers' twin of base (the same weights), one Stepper per name in compiled: a step
    through torch.compile (with options) where its value is True, eager where False. One twin
    serves them all."""
    twin = hf_twin(base, next(base.parameters()).device)
    return {
        name: Stepper(twin, train, dtype, compile_, options) for name, compile_ in compiled.items()
    }


def ratio_key(peer):
    """The row's key for the paired ratio against a peer: "ratio" for "hf", as bench.py names it."""
    return {"hf": "ratio"}.get(peer, f"{peer}_ratio")


def compare(base, steps, times, timed, train, case):
    """Rows of the timed batches' seconds (alternate's times): one per tinyencoder step, with the
    case's fields, and the columns of every other step (a peer: transformers) beside it, with the
    median of its paired ratios (peer time / ours, the same batch moments apart)."""
    tokens = [int(b["attention_mask"].sum()) for b in timed]
    flops = [batch_flops(base, b) for b in timed]
    if not train:
        # a forward is a third of forward + backward
        flops = [f / 3 for f in flops]
    ours = [k for k, s in steps.items() if isinstance(s.model, te.TinyEncoder)]
    peers = [k for k in steps if k not in ours]
    rows = []
    for k in ours:
        row = dict(case, variant=k)
        row.update(timings("te", times[k], tokens, flops), tokens=tokens)
        for p in peers:
            row.update(timings(p, times[p], tokens, flops))
            row[ratio_key(p)] = statistics.median([h / t for h, t in zip(times[p], times[k])])
        # why a step ran eager although asked to compile
        notes = {f"{p}_note": steps[p].note for p in peers if steps[p].note}
        if steps[k].note:
            notes["note"] = steps[k].note
        rows.append(dict(row, **notes))
    return rows


def bench_case(
    arch,
    batch,
    step,
    sizes,
    dev,
    dtype,
    *,
    compile_=False,
    compile_hf=False,
    run_hf=True,
    profile=False,
):
    """Rows of one arch, batch ("full", "var") and step ("train", "infer"): each variant, and
    transformers (if run_hf and it is installed; torch.compile'd too if compile_ and compile_hf).
    With profile, each is then profiled on as many new batches (profile_steps)."""
    train = step == "train"
    var = batch == "var"
    base = base_model(arch, dev, sizes.layers, sizes.hidden)
    models = {"published": base}
    # BERT and RoBERTa pad: on padded batches, time them with unpadding switched on as well
    if var and not base.cfg.unpad:
        models["unpad"] = variant(base, unpad=True)
    steps = {k: Stepper(m, train, dtype, compile_) for k, m in models.items()}
    if transformers is not None and run_hf:
        steps.update(hf_steppers(base, train, dtype, {"hf": compile_ and compile_hf}))
    cfgs = [m.cfg for m in models.values()]
    batch_kw = dict(B=sizes.batch, T=sizes.seq, var=var, dev=dev, dtype=dtype, layout_cfgs=cfgs)
    batches = make_batches(base.cfg, sizes.warmup + sizes.steps, **batch_kw)
    times = alternate(steps, batches, sizes.warmup, dev)
    case = dict(arch=arch, batch=batch, step=step)
    if profile:
        # new batches, as each timed one was: the profile then shows kernels built for new shapes
        fresh = make_batches(base.cfg, sizes.steps, seed=1, **batch_kw)
        profile_steps(steps, fresh, dev, " ".join(case.values()))
    return compare(base, steps, times, batches[sizes.warmup :], train, case)


def profile_steps(steps, batches, dev, case, shown=12):
    """--profile: each step over the batches under torch.profiler, its ops by self time (on a
    CPU the time of the op itself; on CUDA, of the host's side of it)."""
    for name, step in steps.items():
        with torch.profiler.profile() as prof:
            for b in batches:
                step(b)
            synchronize(dev)
        print(f"profile: {case}, {name}, {len(batches)} steps", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=shown))


def random_texts(n, lo, hi, seed=0):
    """n texts of lowercase words, lengths uniform in [lo, hi] bytes, in no particular order."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    letters = torch.randint(0, 27, (sum(lengths),), generator=g).tolist()
    text = "".join(" " if c == 26 else chr(97 + c) for c in letters)
    starts = [0, *itertools.accumulate(lengths)]
    return [text[a:b] for a, b in zip(starts, starts[1:])]


def hf_encode(hf, texts, batch_size, by_length, dev):
    """transformers' AutoModel with mean pooling, batch_size texts at a time: in the given order
    (a plain loop) or sorted by length (as sentence-transformers batches)."""
    order = list(range(len(texts)))
    if by_length:
        order.sort(key=[len(t) for t in texts].__getitem__)
    out = torch.zeros(len(texts), hf.config.hidden_size)
    for first in range(0, len(texts), batch_size):
        batch = order[first : first + batch_size]
        rows = [torch.tensor([te.CLS, *te.byte_ids(texts[i]), te.SEP]) for i in batch]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=te.PAD).to(dev)
        mask = (ids != te.PAD).long()
        with torch.no_grad():
            hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out[batch] = pooled.float().cpu()
    return out


def bench_encode(arch, args, dev):
    """pipelines.encode's texts/s against transformers' AutoModel with mean pooling, same weights,
    on texts of 16 to 510 bytes in random order (encode unpads on a CPU whatever the preset)."""
    base = base_model(arch, dev, args.layers, args.hidden).eval()
    models = {"published": base}
    with tempfile.TemporaryDirectory() as d:
        tinyencoder_hf.save(base, d)
        hf = transformers.AutoModel.from_pretrained(d, attn_implementation="sdpa").to(dev).eval()
    texts = random_texts(args.texts, 16, 510)  # a BERT context; ModernBERT's is 8192
    calls = {
        name: functools.partial(pipelines.encode, m, texts, normalize=False)
        for name, m in models.items()
    }
    calls["hf"] = functools.partial(hf_encode, hf, texts, 32, False, dev)
    calls["hf sorted"] = functools.partial(hf_encode, hf, texts, 32, True, dev)
    seconds = {name: [] for name in calls}
    results = {}
    for _ in range(args.steps):  # alternating, so that a change in the machine's load hits all
        for name, call in calls.items():
            t = time.perf_counter()
            results[name] = call()
            seconds[name].append(time.perf_counter() - t)
    error = (results["published"] - results["hf"]).abs().max().item()
    rows = []
    for name in models:
        row = dict(arch=arch, variant=name, texts_s=len(texts) / min(seconds[name]), max_diff=error)
        row["vs_hf"] = min(seconds["hf"]) / min(seconds[name])
        row["vs_hf_sorted"] = min(seconds["hf sorted"]) / min(seconds[name])
        rows.append(row)
        print(
            f"{arch:<11}{name:<10}{row['texts_s']:>9.1f} texts/s  {row['vs_hf']:.2f}x transformers"
            f" in order, {row['vs_hf_sorted']:.2f}x sorted by length; max|diff| {error:.1e}"
        )
    return rows


def add_mfu(rows, peak):
    """te_mfu, and each peer's (hf_mfu, ...) where it ran: FLOP/s over the measured peak."""
    for r in rows:
        for key in [k for k in r if k.endswith("_flop_s")]:
            r[key.removesuffix("_flop_s") + "_mfu"] = r[key] / peak


def print_table(rows, peak, dtype_name):
    peak_note = f"matmul peak ({dtype_name}, measured): {peak / 1e9:,.1f} GFLOP/s"
    ratio_note = "hf/te = transformers time / tinyencoder time (median of paired steps)"
    print(f"\n{peak_note}; tok/s = real tokens (median of steps); {ratio_note}")
    head = f"{'arch':<11}{'batch':<6}{'step':<6}{'variant':<10}"
    head += f"{'te tok/s':>10}{'hf tok/s':>10}{'hf/te':>7}{'te MFU':>8}{'hf MFU':>8}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        case = f"{r['arch']:<11}{r['batch']:<6}{r['step']:<6}{r['variant']:<10}"
        hf_cols = f"{'-':>10}{'-':>7}"
        hf_mfu = f"{'-':>8}"
        if "ratio" in r:
            hf_cols = f"{r['hf_tok_s']:>10,.0f}{r['ratio']:>6.2f}x"
            hf_mfu = f"{r['hf_mfu']:>8.1%}"
        print(f"{case}{r['te_tok_s']:>10,.0f}{hf_cols}{r['te_mfu']:>8.1%}{hf_mfu}")
        # a step asked to compile that ran eager: its figures in the row above are eager ones
        for key in [k for k in r if k.endswith("note")]:
            who = {"note": "te"}.get(key, key.removesuffix("_note"))
            print(f"{'':<33}^ {who}: {r[key]}")


def width(text: str) -> int:
    """An argparse type: a model width, in heads of 64."""
    value = COUNT(text)
    if value % 64:
        raise argparse.ArgumentTypeError(f"must be a multiple of 64 (heads of 64), got {text}")
    return value


def parse_args():
    raw = argparse.RawDescriptionHelpFormatter
    p = Parser(description=__doc__, formatter_class=raw)
    p.add_argument("--arch", default="all", choices=["all", *te.PRESETS])
    depth = "depth (3 keeps ModernBERT's one global attention layer in three)"
    p.add_argument("--layers", type=COUNT, default=3, help=depth)
    p.add_argument("--hidden", type=width, default=768, help="width, in heads of 64")
    p.add_argument("--batch", type=COUNT, default=8)
    p.add_argument("--seq", type=number(int, 16, 8192), default=512)
    steps = "timed steps per case, after --warmup (ratios swing with padding: use several)"
    p.add_argument("--steps", type=COUNT, default=5, help=steps)
    p.add_argument("--warmup", type=number(int, 0), default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device())
    dtypes = "bf16 = autocast; default bf16 on CUDA, fp32 on CPU"
    p.add_argument("--dtype", choices=DTYPES, help=dtypes)
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--compile", action=on_off, help="torch.compile tinyencoder (default on CUDA)")
    p.add_argument("--compile-hf", action=on_off, help="transformers too (default: as --compile)")
    threads = "torch CPU threads; on a shared machine, 1 per free core avoids waiting on each other"
    p.add_argument("--threads", type=COUNT, help=threads)
    p.add_argument("--no-hf", action="store_true", help="tinyencoder alone")
    p.add_argument("--profile", action="store_true", help="each case's ops by self time, too")
    p.add_argument("--json", type=output_file, help="also write the results here")
    p.add_argument("--encode", action="store_true", help="pipelines.encode against AutoModel")
    texts = "--encode: texts per pass (of 16-510 bytes, 32 a batch)"
    p.add_argument("--texts", type=COUNT, default=256, help=texts)
    p.add_argument("--dropout", action="store_true", help="F.dropout against tinyencoder's drop")
    p.add_argument("--linear", action="store_true", help="nn.Linear against tinyencoder's Linear")
    p.add_argument("--attention", action="store_true", help="CPU attention in fp32 against bf16")
    args = p.parse_args()
    device_or_die(args.device)
    check_flags(p, args)
    return args


def check_flags(p, args):
    """One line for flags that do not go together: --encode's batches are 32 texts of 16-510 bytes,
    in fp32, eager; --seq within each arch's positions."""
    ignored = {"batch", "seq", "warmup", "dtype", "compile", "compile_hf"} & given_flags(p)
    if args.encode and ignored:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(ignored))
        p.error(f"{flags}: not for --encode, which times batches of 32 texts in fp32, eager")
    archs = te.PRESETS if args.arch == "all" else [args.arch]
    for arch in archs:
        longest = te.Config.from_preset(arch).max_len
        if args.seq > longest:
            p.error(f"--seq {args.seq}: {arch} reads at most {longest} tokens a row")


def default_device() -> str:
    """cuda where this machine has it, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def default_dtype(dev):
    """The --dtype when none is given: bf16 on CUDA, fp32 elsewhere."""
    if dev.type == "cuda":
        return "bf16"
    return "fp32"


def machine(dev) -> dict:
    """What the figures ran on: the card's name (a GPU's, or the CPU's type) and the versions."""
    name = platform.processor() or platform.machine()
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    elif os.path.exists("/proc/cpuinfo"):  # Linux names the CPU there, not in platform
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        name = models[0] if models else name
    hf_version = getattr(transformers, "__version__", "not installed")
    return dict(
        device_name=name, torch=torch.__version__, cuda=torch.version.cuda, transformers=hf_version
    )


def print_setup(dev, dtype_name, compile_):
    """The versions, device, dtype and the machine's load, to read every later figure beside."""
    named = machine(dev)
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    versions = (
        f"torch {named['torch']} (CUDA {named['cuda']}), transformers {named['transformers']}"
    )
    setup = f"{dev} ({named['device_name']}), {dtype_name}, compile={compile_}, threads={threads}"
    print(f"{versions}, {setup}, load average {load:.1f} on {os.cpu_count()} CPUs", flush=True)
    if dev.type == "cpu" and threads > 1 and load > 0.5:
        busy = "note: other jobs are using the CPUs, so threads wait on each other;"
        print(busy, "--threads 1 is steadier")


def run_cases(args, dev, dtype, peak):
    """Every arch x batch x step, the table printed; the report's peaks and rows."""
    archs = te.PRESETS if args.arch == "all" else [args.arch]
    warmup = args.warmup
    if args.compile:
        # compile, then recompile for dynamic shapes
        warmup = max(warmup, 3)
    sizes = Sizes(args.layers, args.batch, args.seq, args.steps, warmup, hidden=args.hidden)
    switches = dict(compile_=args.compile, compile_hf=args.compile_hf, run_hf=not args.no_hf)
    switches.update(profile=args.profile)
    peaks = [peak]
    rows = []
    for arch in archs:
        for batch in ("full", "var"):
            for step in ("train", "infer"):
                rows += bench_case(arch, batch, step, sizes, dev, dtype, **switches)
                print(f"  {arch} {batch} {step}: done", file=sys.stderr, flush=True)
        # other jobs on a shared machine come and go: measure the peak again after each arch
        peaks.append(measured_peak(dev, dtype))
    add_mfu(rows, max(peaks))
    print_table(rows, max(peaks), args.dtype)
    return dict(peak_flops=max(peaks), peaks=peaks, rows=rows)


def run_encode(args, dev):
    """--encode: each arch's model.encode against AutoModel; the report's rows."""
    archs = te.PRESETS if args.arch == "all" else [args.arch]
    print("arch       variant    texts/s; time of transformers' AutoModel (mean pooling) / ours")
    return [row for arch in archs for row in bench_encode(arch, args, dev)]


def median_ms(steps, args, dev) -> dict:
    """Each step's median milliseconds over --steps alternating runs, after --warmup."""
    times = alternate(steps, [None] * (args.warmup + args.steps), args.warmup, dev)
    return {k: 1e3 * statistics.median(t) for k, t in times.items()}


def dropout_pass(dropout, x, _batch=None):
    """One forward and backward of dropout(x) at BERT's rate, 0.1."""
    dropout(x, 0.1).backward(x.detach())


def bernoulli_draws(x, _batch=None):
    """The mask F.dropout draws on a CPU: bernoulli_, a number per value."""
    torch.empty_like(x).bernoulli_(0.9)


def int64_draws(x, _batch=None):
    """The random bits drop draws for the same mask: a 64-bit number per four values."""
    torch.empty(x.numel() // 4 + 1, dtype=torch.int64).random_(-(2**63), None)


def bench_dropout(args, dev):
    """--dropout: F.dropout against tinyencoder's drop (forward and backward) on the attention
    probabilities and on the hidden states of --batch rows of --seq at --hidden, and their masks'
    draws alone; median milliseconds of --steps alternating runs."""
    heads = max(1, args.hidden // 64)
    shapes = dict(probs=(args.batch, heads, args.seq, args.seq))
    shapes["hidden"] = (args.batch, args.seq, args.hidden)
    print(
        "dropout 0.1   shape                    F.dropout   drop  ratio  bernoulli_  int64  ratio"
    )
    rows = []
    for name, shape in shapes.items():
        x = torch.randn(shape, device=dev, requires_grad=True)
        steps = {
            "F.dropout": functools.partial(dropout_pass, torch.nn.functional.dropout, x),
            "drop": functools.partial(dropout_pass, te.drop, x),
            "bernoulli_": functools.partial(bernoulli_draws, x),
            "int64": functools.partial(int64_draws, x),
        }
        ms = median_ms(steps, args, dev)
        rows.append(dict(name=name, shape=shape, **ms))
        line = f"{name:13} {str(shape):22} {ms['F.dropout']:9.1f} {ms['drop']:6.1f} "
        line += f"{ms['F.dropout'] / ms['drop']:5.2f}x {ms['bernoulli_']:10.1f} {ms['int64']:6.1f} "
        print(line + f"{ms['bernoulli_'] / ms['int64']:5.1f}x", flush=True)
    return rows


def forward_pass(function, inputs, grad, _batch=None):
    """function(*inputs) without gradients, or with them and its backward of grad where given."""
    if grad is None:
        with torch.no_grad():
            function(*inputs)
    else:
        function(*inputs).backward(grad)


def bench_linear(args, dev):
    """--linear: nn.Linear (F.linear: the BLAS) against tinyencoder's Linear with oneDNN's kernel
    switched on, whatever its choice on this CPU (printed), on a layer's shapes at --hidden (the
    GeGLU down projection's too), for --batch x --seq tokens and for a variable batch's odd count;
    a forward alone and a forward and backward, median milliseconds of --steps alternating runs."""
    own = "oneDNN" if te.ONEDNN_LINEAR is not None else "F.linear"
    print(f"Linear's own choice here, from 2^29 multiply-adds a call: {own}")
    kernel = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    with unittest.mock.patch.object(te, "ONEDNN_LINEAR", kernel):
        return linear_rows(args, dev)


class OneDNNAtAnySize(torch.nn.Linear):
    """te.Linear's oneDNN route for every call: te.Linear itself takes it from 2^29 multiply-adds
    a call, and F.linear below, which would time F.linear against itself at small widths."""

    def forward(self, x):
        return te.OneDNNLinear.apply(x, self.weight, self.bias)


def linear_rows(args, dev):
    """bench_linear's table: its rows, printed as they come."""
    H = args.hidden
    shapes = dict(qkv=(H, 3 * H), out=(H, H), up=(H, 4 * H), down=(4 * H, H))
    shapes["geglu down"] = (3 * H // 2, H)
    counts = [args.batch * args.seq, args.batch * (args.seq + 64) // 2 + 1]
    header = (
        "linear      tokens   in -> out   forward: F.linear oneDNN ratio  +backward: nn  te  ratio"
    )
    print(header)
    rows = []
    for (name, (fan_in, fan_out)), tokens in itertools.product(shapes.items(), counts):
        reference = torch.nn.Linear(fan_in, fan_out).to(dev)
        layer = OneDNNAtAnySize(fan_in, fan_out).to(dev)
        layer.load_state_dict(reference.state_dict())
        x = torch.randn(tokens, fan_in, device=dev, requires_grad=True)
        grad = torch.randn(tokens, fan_out, device=dev)
        steps = {}
        for key, module in (("nn", reference), ("te", layer)):
            steps[f"{key} forward"] = functools.partial(forward_pass, module, [x], None)
            steps[f"{key} train"] = functools.partial(forward_pass, module, [x], grad)
        ms = median_ms(steps, args, dev)
        rows.append(dict(name=name, tokens=tokens, fan_in=fan_in, fan_out=fan_out, **ms))
        forward = ms["nn forward"] / ms["te forward"]
        train = ms["nn train"] / ms["te train"]
        line = f"{name:11} {tokens:6} {fan_in:5} -> {fan_out:<5} {ms['nn forward']:17.1f} "
        line += f"{ms['te forward']:7.1f} {forward:5.2f}x {ms['nn train']:13.1f} "
        print(line + f"{ms['te train']:5.1f} {train:5.2f}x", flush=True)
    return rows


def bench_attention(args, dev):
    """--attention: bf16 queries, keys and values that need gradients, so that te.attend runs its
    fp32 route on a CPU even in the no_grad forward (cast up, and the output back down), against
    SDPA kept in bf16 (te.padded_attention, no casts), on --batch rows of --seq at --hidden (heads
    of 64, a document a row) and on train.py's CPU rows (16 of 128 bytes, 3 documents packed in
    each, 4 heads of 32); a forward alone and a forward and backward, median milliseconds of
    --steps alternating runs."""
    if dev.type != "cpu":
        sys.exit("bench.py: --attention times a CPU's two routes; on a GPU, attend casts nothing")
    shapes = {"bench rows": (args.batch, args.seq, max(1, args.hidden // 64), 64)}
    shapes["train.py rows"] = (16, 128, 4, 32)
    # ratio: bf16's time over fp32's, above 1 where fp32 (attend's for training on a CPU) is faster
    print("attention     (B, T, heads, head_dim)  forward: fp32  bf16 ratio", end="")
    print("  +backward: fp32  bf16 ratio")
    rows = []
    for name, shape in shapes.items():
        B, T = shape[:2]
        doc_ids = torch.ones(B, T, dtype=torch.long)
        if name == "train.py rows":
            doc_ids += (torch.arange(T) >= T // 3).long() + (torch.arange(T) >= 2 * T // 3).long()
        layout = te.make_layout(te.Config(attn_backend="sdpa"), doc_ids.to(dev), torch.bfloat16)
        q, k, v = (
            torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        grad = torch.randn(shape, device=dev, dtype=torch.bfloat16)
        steps = {}
        inputs = [q, k, v, layout, None, 0.0]  # no window, no dropout
        for key, route in (("fp32", te.attend), ("bf16", te.padded_attention)):
            steps[f"{key} forward"] = functools.partial(forward_pass, route, inputs, None)
            steps[f"{key} train"] = functools.partial(forward_pass, route, inputs, grad)
        ms = median_ms(steps, args, dev)
        rows.append(dict(name=name, shape=shape, **ms))
        forward = ms["bf16 forward"] / ms["fp32 forward"]
        train = ms["bf16 train"] / ms["fp32 train"]
        line = f"{name:13} {str(shape):24} {ms['fp32 forward']:15.1f} {ms['bf16 forward']:5.1f} "
        line += f"{forward:4.2f}x {ms['fp32 train']:16.1f} {ms['bf16 train']:5.1f} {train:4.2f}x"
        print(line, flush=True)
    return rows


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.dtype is None:
        args.dtype = default_dtype(dev)
    if args.compile is None:
        args.compile = dev.type == "cuda"
    if args.compile_hf is None:  # the peer a GPU user picks: transformers compiled as well
        args.compile_hf = args.compile
    print_setup(
        dev, args.dtype, f"{args.compile} (transformers: {args.compile and args.compile_hf})"
    )
    dtype = DTYPES[args.dtype]
    peak = measured_peak(dev, dtype)
    report = dict(device=str(dev), dtype=args.dtype, compile=args.compile, peak_flops=peak)
    report.update(machine(dev))
    report["compile_hf"] = args.compile and args.compile_hf
    # the report names the file it is written to, as it always has
    report["json"] = args.json
    if args.encode:
        report["encode"] = run_encode(args, dev)
    elif args.dropout:
        report["dropout"] = bench_dropout(args, dev)
    elif args.linear:
        report["linear"] = bench_linear(args, dev)
    elif args.attention:
        report["attention"] = bench_attention(args, dev)
    else:
        report.update(run_cases(args, dev, dtype, peak))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
