r"""Pretrain a byte-level BERT, RoBERTa or ModernBERT with its paper's recipe: inputs, masking,
optimizer, schedule. Top to bottom: recipes, arguments and config, model, data, optimizer, the
functions of a step, the loop (log, evaluate, checkpoint), the demo.
  python train.py --arch modernbert      # Python's own sources, under 10 minutes on 2 CPU cores
  torchrun --standalone --nproc_per_node=2 train.py --arch bert --data 'notes/*.txt' \
      --max-steps 2000 --out-dir b
"""

# ruff: noqa: E402 (the clock starts before the imports: the time budget counts them too)
import time

t0 = time.time()
import math
import os
import sys
from argparse import BooleanOptionalAction, RawDescriptionHelpFormatter
from dataclasses import asdict
from typing import NamedTuple

import torch
import torch.distributed as dist

import tinyencoder as te
from mfu import autocast, bf16_pays, flops_per_token, measured_peak, spec_peak
from runs import COUNT, DROPOUT, FRACTION, LENGTH, LR, MINUTES, RATE, Metrics, Parser, StopSignals
from runs import check_step_fits, demo, device_or_die, die, load_checkpoint, stop_if_diverged
from runs import dropouts, load_weights, make_out_dir, refuse_to_overwrite
from runs import SEED, check_resumed, resumed_args, save_checkpoint, settle_vector_math, sinusoids
from runs import given_flags, step_seed, stops_plainly, torchrun_ranks
from data.corpus import check_data, describe, load_corpus, printable
from data.rows import HELD_OUT_RATE, TrainingRows, collate, held_out_pairs, held_out_rows
from data.rows import correct_bytes, masked_bytes

# Recipes: how each paper trained, the training twin of tinyencoder's PRESETS. Sizes override the
# presets' (the papers' base).
SIZES = {
    "tiny": dict(hidden=128, layers=4, heads=4),
    "small": dict(hidden=256, layers=6, heads=4),
    "base": {},
    "large": dict(hidden=1024, layers=24, heads=16),
}


class Recipe(NamedTuple):  # the defaults are BERT's
    inputs: str = "pairs"  # for next-sentence prediction; "full-sentences"; "packed" documents
    masking: str = "static"  # --dupe-factor masks per example, drawn once; "dynamic": new each time
    context: int = 512  # sequence length on GPU
    mlm_rate: dict = dict(tiny=0.3, small=0.3, base=0.15, large=0.15)  # the share of bytes masked
    lr: dict = dict(tiny=2e-3, small=2e-3, base=1e-4, large=1e-4)  # peak, per size
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.01
    decoupled_decay: bool = False  # StableAdamW's: it does not scale with the learning rate
    schedule: str = "linear"  # warmup, then down to 0; "wsd": warmup, stable, decay at the end
    warmup: dict = dict(tiny=0.2, small=0.2, base=0.01, large=0.01)  # 10k of 1M steps at base


# The papers' recipes at base and large. At the CPU sizes a run lasts minutes, not days: BERT and
# RoBERTa mask 30 % there, as ModernBERT does, and warm up over a fifth of the run to a peak of
# 2e-3, which post-LN survives only with that warmup (README: "Recipes for a run of minutes").
RECIPES = {
    "bert": Recipe(),
    "roberta": Recipe(
        inputs="full-sentences",
        masking="dynamic",
        lr=dict(tiny=2e-3, small=2e-3, base=6e-4, large=4e-4),
        betas=(0.9, 0.98),
        warmup=dict(tiny=0.2, small=0.2, base=0.048, large=0.06),  # 24k, 30k of 500k steps
    ),
    "modernbert": Recipe(
        inputs="packed",
        masking="dynamic",
        context=1024,
        mlm_rate=dict.fromkeys(SIZES, 0.30),
        lr=dict(tiny=2e-3, small=2e-3, base=8e-4, large=5e-4),
        betas=(0.9, 0.98),
        weight_decay=1e-5,
        decoupled_decay=True,
        schedule="wsd",
        warmup=dict.fromkeys(SIZES, 0.05),  # ours, as the decay: the paper's is 3B of 1.7T tokens
    ),
}

# Arguments. Those left None depend on the device, size or architecture and are filled in below.
parser = Parser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
add = parser.add_argument
add("--arch", choices=list(te.PRESETS), default="modernbert")
add("--size", choices=list(SIZES), help="base is the paper's (default: base on GPU, tiny on CPU)")
add("--data", help="file, folder or glob, a document per file (default: Python's stdlib sources)")
add("--out-dir", default="out", help="checkpoints and metrics.jsonl go here")
add("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
ends = parser.add_mutually_exclusive_group()  # a run ends at a step or at a time, not both
ends.add_argument("--max-steps", type=COUNT, help="optimizer steps (default: what fits the time)")
ends.add_argument("--time-budget", type=MINUTES, default=9.5, help="minutes for the run")
# the LR schedule: never cut to --max-steps below 2000, so that a resumed run can go on along it
add("--lr-steps", type=COUNT, help="schedule length (default: the run's; >= 2000 with --max-steps)")
# ModernBERT above 1024 is its context extension: global RoPE theta 160k, lr 3e-4, 1-sqrt decay
add("--context", type=LENGTH, help="sequence length (default: 128 on CPU, the paper's on GPU)")
add("--batch-size", type=COUNT, help="sequences per micro-batch and process")
add("--grad-accum", type=COUNT, default=1, help="micro-batches per optimizer step")
add("--lr", type=LR, help="peak learning rate")
add("--warmup", type=FRACTION, help="fraction of --lr-steps spent warming up")
add("--decay", type=FRACTION, help="modernbert: fraction of --lr-steps spent decaying at the end")
add("--mlm-rate", type=RATE, help="training masking rate (default: the recipe's)")
add("--dupe-factor", type=COUNT, default=10, help="bert: distinct static masks per example")
add("--dropout", type=DROPOUT, help="the family's dropouts (default: 0 on CPU, as preset on GPU)")
add("--eval-interval", type=COUNT, help="steps between evaluations (default: 4 per run)")
add("--eval-seqs", type=COUNT, default=256, help="held-out rows per evaluation (254 bytes at most)")
add("--log-interval", type=COUNT, default=20)
add("--ckpt-interval", type=COUNT, help="steps between checkpoints (default: at each evaluation)")
add("--resume", action="store_true", help="continue exactly from ckpt_last.pt in --out-dir")
add("--init-from", help="checkpoint to take the weights from (e.g. before a --context 8192 phase)")
add("--compile", action=BooleanOptionalAction, help="torch.compile the model (default: on CUDA)")
add("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="bf16 where it pays")
add("--position-init", choices=["sinusoids", "normal"], default="sinusoids", help="see README")
add("--seed", type=SEED, default=1337)
args = parser.parse_args()
# each vector math kernel chosen before threads share a call, or a run may not replay (runs.py)
settle_vector_math()
# Ctrl-C, SIGTERM, from here on (setup too): finish the step (DDP: within ~10 s), save, leave
stop = StopSignals()
# A resumed run goes on with its own flags, but those given again; a fresh one never overwrites one.
checkpoint, ckpt_path, changed = {}, os.path.join(args.out_dir, "ckpt_last.pt"), []
if args.resume:
    checkpoint, resumed_cfg = load_checkpoint(ckpt_path, "--resume")
    if "lr_steps" not in checkpoint:
        die(f"--resume: {ckpt_path} is not a train.py checkpoint")
    # this machine decides its device (--compile stays the run's); the checkpoint holds the model
    keep = ("resume", "out_dir", "device")
    fixed = ("arch", "size", "dropout", "position_init", "init_from")
    changed = resumed_args(parser, args, checkpoint["args"], keep, fixed)
else:
    refuse_to_overwrite(args.out_dir)

# Config: processes, device, and the defaults that depend on them (checkpoints record the args).
ddp = "RANK" in os.environ  # launched by torchrun
rank, world = torchrun_ranks()
master = rank == 0


def log(message):
    if master:
        print(printable(message))


args.device = device_or_die(args.device)
device = torch.device(args.device)
if args.device == "cuda":
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
if ddp:
    # one GPU per process, chosen before NCCL starts
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

# A GPU run trains the paper's size and context; a CPU one a tiny model on short rows, many steps.
on_gpu = device.type != "cpu"  # CUDA or MPS
recipe = RECIPES[args.arch]
args.size = args.size or ("base" if on_gpu else "tiny")
args.context = args.context or (recipe.context if on_gpu else 128)
T = args.context  # sequence length, as in tinyencoder
args.batch_size = args.batch_size or max(1, (32768 if on_gpu else 2048) // T)
B = args.batch_size  # sequences per micro-batch and process, as in tinyencoder
global_batch = B * world * args.grad_accum  # sequences per optimizer step, over all processes
split = f"{B} per micro-batch x {world} processes x {args.grad_accum} accumulated"
check_resumed(checkpoint, global_batch, split, args.max_steps, given_flags(parser))
# ModernBERT's context extension: global RoPE theta 160k, lr 3e-4, a 1-sqrt decay over the last 1/6
extension = args.arch == "modernbert" and T > 1024
args.lr = args.lr or (3e-4 if extension else recipe.lr[args.size])
args.warmup = recipe.warmup[args.size] if args.warmup is None else args.warmup
if args.decay is None:
    args.decay = 1 / 6 if extension else 0.2
# overlapping, the rate would start to drop before warmup ends
if recipe.schedule == "wsd" and args.warmup + args.decay > 1:
    die(f"--warmup {args.warmup:g} and --decay {args.decay:g} overlap: together at most 1")
args.mlm_rate = args.mlm_rate or recipe.mlm_rate[args.size]
# a resumed run's budget is what the run left of it; 15 s stay for the demo and the last checkpoint
spent = checkpoint.get("elapsed_s", 0.0)
deadline = t0 + args.time_budget * 60 - 15 - spent


# Model. A learned position table starts as sinusoids (runs.sinusoids), not as noise (README:
# "Learning word order").
if checkpoint:
    cfg = resumed_cfg
else:
    overrides = dict(SIZES[args.size])
    if args.arch == "modernbert":
        overrides["rope_theta"] = 160000.0 if extension else 10000.0  # phase 1: 10k everywhere
        if args.size == "large":
            overrides.update(layers=28, intermediate=2624)
        # Packed rows hold no padding to strip, and on a CPU one masked call over a short row
        # beats a call per document (tiny, rows of 128: 83 against 93 ms a step).
        if not on_gpu:
            overrides["unpad"] = False
    else:
        overrides["max_len"] = T  # learned positions
    # no dropout on a CPU by default: its short runs cannot overfit
    if args.dropout is None and not on_gpu:
        args.dropout = 0.0
    if args.dropout is not None:  # each of the family's (runs.dropouts)
        overrides.update(dropouts(args.arch, args.dropout))
    cfg = te.Config.from_preset(args.arch, **overrides)
if T > cfg.max_len:
    die(f"--context {T}: this {args.arch} reads documents of at most {cfg.max_len} bytes")
torch.manual_seed(args.seed)
check_step_fits(f"--batch-size {B} x --context {T}", B * T, cfg, device, held=args.grad_accum)
# the bare model: checkpoints hold its parameter names, never a wrapper's
model = te.TinyEncoder(cfg).to(device)
# a resumed run loads its own table below
if model.pos_embed is not None and args.position_init == "sinusoids":
    sinusoids(model.pos_embed.weight, cfg.pos_offset)
if args.init_from and not args.resume:
    load_weights(model, args.init_from, "--init-from")

# Data: two byte arrays (train, val) with document offsets (data/corpus.py), cut into rows as the
# recipe says (data/rows.py).
loading = time.time()
corpus = load_corpus(args.data, args.out_dir, wait=dist.barrier if ddp else None)
check_data(checkpoint, corpus, args.data)
train_data, train_offsets = corpus["train"]
val_data, val_offsets = corpus["val"]
log(f"data: {describe(corpus, args.data)}; {time.time() - loading:.1f}s")
train_rows = TrainingRows(recipe, train_data, train_offsets, T, args.seed, args.dupe_factor)
# Evaluation: the same plain rows for every arch, masked 15% with fixed seeds, so that the three
# recipes' accuracies compare directly; for BERT, sentence pairs too.
eval_spans, eval_rows = held_out_rows(val_data, val_offsets, T, args.eval_seqs, cfg)
nsp_rows = []
if recipe.inputs == "pairs":
    nsp_rows = held_out_pairs(val_data, val_offsets, T, len(eval_rows))

# bf16 autocast on CUDA, and on a CPU whose bf16 matmuls measure 1.5x its fp32 ones or more
# (README: "bf16 on a CPU"); a resumed run keeps its own, to resume exactly
if args.dtype == "auto":
    args.dtype = "bfloat16" if bf16_pays(device) else "float32"
compute_dtype = getattr(torch, args.dtype)
amp = autocast(device, compute_dtype)
backend = te.pick_backend(cfg, device, compute_dtype)  # what the forward picks here, for the log
# DDP wraps the model, and torch.compile wraps DDP, as PyTorch documents
train_model = model
if ddp:
    device_ids = [device.index] if device.type == "cuda" else None
    ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    train_model = ddp_model
args.compile = device.type == "cuda" if args.compile is None else args.compile
if args.compile:
    train_model = torch.compile(train_model)
n_params = sum(p.numel() for p in model.parameters())
shape = f"{n_params / 1e6:.2f}M parameters, {cfg.layers} layers of {cfg.hidden}"
log(f"model: {args.arch} {args.size}, {shape}; {global_batch} x {T} tokens per step ({split})")
attention = f"{backend} attention"
if backend == "flash":
    attention = f"flash attention ({te.FLASH})"
attention += f", {args.dtype}, torch.compile {args.compile}"

# Optimizer, no weight decay on biases and norms. ModernBERT decays as StableAdamW, apart from the
# learning rate (p -= lr_t / lr_max * 1e-5 * p): AdamW's p -= lr_t * wd * p with wd = 1e-5 / lr_max.
weight_decay = recipe.weight_decay
if recipe.decoupled_decay:
    weight_decay = recipe.weight_decay / args.lr
matrices = [p for p in model.parameters() if p.ndim >= 2]
vectors = [p for p in model.parameters() if p.ndim < 2]
groups = [dict(params=matrices, weight_decay=weight_decay), dict(params=vectors, weight_decay=0.0)]
# one kernel for all parameters, rather than a few per parameter
fused = device.type == "cuda"
opt = torch.optim.AdamW(groups, lr=args.lr, betas=recipe.betas, eps=1e-6, fused=fused)

# Progress: a resumed run takes the checkpoint's, the schedule's length too unless given again.
step, best, max_steps, lr_steps = 0, float("inf"), args.max_steps, args.lr_steps
if checkpoint:
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optim"])
    # ModernBERT's decay is 1e-5 / lr: it follows an --lr given again
    opt.param_groups[0]["weight_decay"] = weight_decay
    step, best = checkpoint["step"], checkpoint["best"]
    lr_steps = args.lr_steps or checkpoint["lr_steps"]
    max_steps = max_steps or checkpoint["max_steps"]
    log(f"resumed at step {step} from {ckpt_path}")
    if changed:
        log(f"flags changed from the run's own: {', '.join(changed)}")
make_out_dir(args.out_dir)
metrics = Metrics(args.out_dir, checkpoint.get("step")) if master else None


# The functions of a step: the schedule, evaluation, checkpoints, training, fitting the run.
def lr_at(step, lr_steps):
    """Warmup, then down to 0 ("linear"), or stable, then down over the last --decay ("wsd")."""
    warmup_steps = max(1, round(args.warmup * lr_steps))
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    decay_start = warmup_steps
    if recipe.schedule == "wsd":
        decay_start = lr_steps * (1 - args.decay)
    # the rate is 0 from lr_steps on, even where warmup fills the whole schedule
    decay_start = min(decay_start, lr_steps - 1)
    progress = min(1.0, max(0.0, (step - decay_start) / max(1, lr_steps - decay_start)))
    if extension:
        progress = math.sqrt(progress)
    return args.lr * (1 - progress)


@torch.no_grad()
def evaluate():
    """Held-out MLM loss and accuracy at 15 % masking for every architecture, so that the three
    recipes compare; for BERT, next-sentence accuracy on sentence pairs too."""
    model.eval()
    mlm_totals = torch.zeros(3, device=device)  # summed loss, correct, count
    nsp_totals = torch.zeros(2, device=device)  # correct, count
    for rows in (eval_rows, nsp_rows):
        for start in range(0, len(rows), B):
            batch = collate(rows[start : start + B], cfg, device, HELD_OUT_RATE, compute_dtype)
            with amp:
                out = model(**batch)
            nsp_labels = batch.get("next_sentence_label")
            if nsp_labels is None:
                count = masked_bytes(batch)
                mlm_totals += torch.stack([out.mlm_loss * count, correct_bytes(out, batch), count])
            else:
                nsp_totals[0] += (out.nsp_logits.argmax(-1) == nsp_labels).sum()
                nsp_totals[1] += len(nsp_labels)
    model.train()
    loss, correct, count = mlm_totals.tolist()
    val_loss = loss / count  # nats per masked byte; bits per byte below
    results = dict(val_loss=val_loss, val_acc=correct / count, val_bpb=val_loss / math.log(2))
    if nsp_rows:
        results["nsp_acc"] = (nsp_totals[0] / nsp_totals[1]).item()
    return {name: round(value, 5) for name, value in results.items()}


def save(path):
    state = dict(model=model.state_dict(), optim=opt.state_dict(), step=step, lr_steps=lr_steps)
    state.update(max_steps=max_steps, best=best, cfg=asdict(cfg), args=vars(args))
    state.update(global_batch=global_batch, elapsed_s=spent + time.time() - t0)
    state.update(data_sha256=corpus["sha256"])  # a resumed run checks that it reads the same
    save_checkpoint(path, state)


@stops_plainly(f"--batch-size {B} x --context {T}")
def train_step(step):
    """Forward and backward over the step's micro-batches; on the device, unread: the summed loss,
    correct and masked bytes, and real tokens."""
    # dropout, like the data, is a function of the step (and of the process): resumes draw the same
    torch.manual_seed(step_seed(args.seed, step, rank))
    batches = []
    for micro in range(args.grad_accum):
        first = step * global_batch + (micro * world + rank) * B
        rows = [train_rows[i] for i in range(first, first + B)]
        batches.append(collate(rows, cfg, device, args.mlm_rate, compute_dtype))
    # the global batch's masked bytes: each micro-batch's mean loss, weighted by its share of them,
    # adds up to the global batch's mean (exact accumulation); NSP's rows weigh alike
    masked = sum(masked_bytes(batch) for batch in batches).float()
    if ddp:
        dist.all_reduce(masked)
    stats = torch.zeros(4, device=device)
    for micro, batch in enumerate(batches):
        # DDP all-reduces the gradients once, after the last micro-batch
        if ddp:
            ddp_model.require_backward_grad_sync = micro == args.grad_accum - 1
        with amp:
            out = train_model(**batch)
        count = masked_bytes(batch)
        loss = out.mlm_loss * count / masked.clamp(min=1)
        if out.nsp_loss is not None:
            loss = loss + out.nsp_loss * B / global_batch
        # DDP averages the gradients over processes, where the loss wants their sum
        (loss * world).backward()
        real_tokens = (batch["attention_mask"] != 0).sum()
        stats += torch.stack([loss.detach(), correct_bytes(out, batch), count, real_tokens])
    return stats


def fit(step, step_time, eval_time, eval_every):
    """The last step that fits the time left, the same on every process: its steps, the final
    evaluation, and one every eval_every steps (None: three more in all)."""
    time_left = deadline - time.time() - eval_time
    if eval_every is None:
        time_left -= 3 * eval_time
    else:  # however many steps fit, an evaluation comes with every eval_every of them
        step_time += eval_time / eval_every
    last = torch.tensor(step + max(1, int(time_left / step_time)), device=device)
    if ddp:
        dist.broadcast(last, 0)
    return int(last)


# The loop
# Without --max-steps, time a step and an evaluation to fit the run. The steps of two batches go
# first: a compiled model compiles on the first and recompiles for the second's shapes.
fits_budget = args.max_steps is None
eval_time, step_time, results = 0.0, 0.0, {}
# A resumed run times them too, as its plan counts the evaluations. .item() waits for the device.
if fits_budget and (max_steps is None or step < max_steps):
    for warm_up in (0, 1, 0):
        started = time.time()
        train_step(warm_up)[0].item()
        opt.zero_grad(set_to_none=True)
    step_time = time.time() - started
    started = time.time()
    if master:
        results = evaluate()
    eval_time = time.time() - started
    max_steps = fit(step, step_time, eval_time, args.eval_interval)
    log(f"time budget {args.time_budget:g} min: ~{max_steps} steps of {step_time:.2f}s; {results}")
if not lr_steps:
    lr_steps = max_steps if fits_budget else max(max_steps, 2000)
# a resumed run taken further than its schedule, or an --lr-steps below --max-steps
if max_steps > lr_steps:
    log(f"note: the LR schedule ends at step {lr_steps}; steps after it train at LR 0")
eval_every = args.eval_interval or max(1, math.ceil(max_steps / 4))
ckpt_every = args.ckpt_interval or eval_every
# MFU against this machine's measured matmul peak, and on a GPU against its data sheet's dense bf16
peak_flops = measured_peak(device, compute_dtype)
spec_flops = spec_peak(device)  # 0 on a CPU or a card mfu.py does not list
schedule = f"peak lr {args.lr:g} on a {lr_steps}-step schedule, masking {args.mlm_rate * 100:g}%"
peaks = f"measured peak {peak_flops / 1e12:.2f} TFLOP/s, spec {spec_flops / 1e12:.0f} TFLOP/s"
log(f"training steps {step + 1}..{max_steps}, {schedule}; {attention}; MFU against the {peaks}")

read_step, read_time = step, time.time()  # when the host last read the device
# DDP's processes read together every agree_every steps (the same on each), to stop within ~10 s
agree_every = 1
while step < max_steps:
    for group in opt.param_groups:
        group["lr"] = lr_at(step, lr_steps)
    stats = train_step(step)  # loss, correct, count, real tokens: on the device, unread
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    step += 1
    is_last = step == max_steps
    is_log_step = step % args.log_interval == 0 or is_last
    # no evaluation within half an interval of the final one
    is_eval_step = step % eval_every == 0 and max_steps - step > eval_every // 2
    is_ckpt_step = step % ckpt_every == 0 or is_last
    late = fits_budget and time.time() > deadline
    # one process reads when it stops; DDP's read (and agree to stop) every agree_every steps
    stop_now = (not ddp and (len(stop.received) > 0 or late)) or (ddp and step % agree_every == 0)
    if not (is_log_step or is_eval_step or is_ckpt_step or stop_now):
        continue  # the host waits for nothing: the device runs on while the next batch is built
    # The host reads the device, once: the step's figures, and whether every process agrees to stop
    flags = torch.tensor([len(stop.received), late, step_time], device=device)
    figures = torch.cat([stats, grad_norm[None], flags])
    if ddp:
        dist.all_reduce(figures)
    loss, correct, masked, real_tokens, grad_norm, signals, lates, step_times = figures.tolist()
    grad_norm = grad_norm / world  # every process's is the same
    interrupted, late = signals > 0, lates > 0
    # step_times: the processes' step times at the previous read, summed; reads come ~10 s apart
    if step_times > 0:
        agree_every = max(1, int(10 * world / step_times))
    stop_if_diverged(dict(loss=loss, grad_norm=grad_norm), step, ckpt_path)
    step_time = (time.time() - read_time) / (step - read_step)  # the mean since the last read
    if is_log_step:
        tokens_per_s = real_tokens / step_time
        flops_per_s = flops_per_token(model, T) * tokens_per_s / world  # per process
        mfu = f"mfu {flops_per_s / peak_flops:5.1%}"
        if spec_flops:
            mfu += f" ({flops_per_s / spec_flops:.1%} of spec)"
        accuracy = correct / max(1, masked)
        minutes_left = (max_steps - step) * step_time / 60
        progress = f"step {step:5d}/{max_steps} | loss {loss:.6f} | acc {accuracy:6.1%}"
        speed = f"{tokens_per_s / 1e3:6.1f}k tok/s | {mfu} | eta {minutes_left:4.1f} min"
        log(f"{progress} | lr {lr_at(step - 1, lr_steps):.2e} | {speed}")
    # an interrupted step is evaluated first where one is due, as it would be uninterrupted
    if master and (is_eval_step or is_last or late):
        results = stop_if_diverged(evaluate(), step, ckpt_path)
        log(f"eval step {step}: " + " ".join(f"{name} {value}" for name, value in results.items()))
        record = dict(step=step, arch=args.arch, train_loss=loss, tokens=step * global_batch * T)
        metrics.write(dict(record, elapsed_s=round(spent + time.time() - t0, 1), **results))
        if results["val_loss"] < best:
            best = results["val_loss"]
            save(os.path.join(args.out_dir, "ckpt_best.pt"))
    if master and (is_ckpt_step or late or interrupted):
        save(ckpt_path)
    if interrupted:
        log(f"interrupted after step {step}; saved {ckpt_path}; continue with --resume")
        sys.exit(0)
    if late:
        log(f"time budget reached: stopping after step {step} of {max_steps}")
        break
    # the machine's other load varies: fit the run again whenever the host reads the device
    if fits_budget and step < max_steps:
        max_steps = fit(step, step_time, eval_time, eval_every)
        if not args.lr_steps:
            lr_steps = max_steps
    read_step, read_time = step, time.time()  # evaluations and checkpoints are not step time


if master:
    if not results:  # a resumed run that had nothing left to do
        results = evaluate()
    demo(model, val_data, eval_spans, amp)  # a held-out line, three spans masked and filled in
    accuracy = f"held-out masked-byte accuracy {results['val_acc']:.2%} (15% masking, {args.arch})"
    bits = f"{results['val_bpb']:.3f} bits/byte"
    summary = f"final: {accuracy}, loss {results['val_loss']:.4f}, {bits}"
    if "nsp_acc" in results:
        summary += f", NSP accuracy {results['nsp_acc']:.1%}"
    print(f"{summary}; {step} steps, {time.time() - t0:.0f}s")
# the processes end together: a rank that tore gloo down while rank 0 still evaluated once aborted
if ddp:
    dist.barrier()
    dist.destroy_process_group()
