"""Pretrain a byte-level BERT, RoBERTa or ModernBERT with its paper's recipe: inputs, masking, optimizer, schedule.
Top to bottom: arguments, data, model, optimizer and schedule, the loop (log, evaluate, checkpoint), the demo.
  python train.py --arch modernbert                # Python's own sources, under 10 minutes on 2 CPU cores
  torchrun --standalone --nproc_per_node=2 train.py --arch bert --data 'notes/*.txt' --max-steps 2000 --out-dir b
"""
import time; t0 = time.time()                                   # the time budget counts the imports too
import argparse, functools, glob, hashlib, json, math, os, signal, sys, sysconfig, timeit
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")           # on shared cores, spinning OpenMP threads stall all
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils import clip_grad_norm_

import tinyencoder as te

# ----------------------------------------------------------------------------------------------------------------------
# Arguments. Those left None depend on the device, size or architecture and are filled in below.
SIZES = {"tiny": dict(hidden=128, layers=4, heads=4), "small": dict(hidden=256, layers=6, heads=4), "base": {},
         "large": dict(hidden=1024, layers=24, heads=16)}
LR = {"base": dict(bert=1e-4, roberta=6e-4, modernbert=8e-4), "large": dict(bert=1e-4, roberta=4e-4, modernbert=5e-4),
      **dict.fromkeys(("tiny", "small"), dict(bert=1e-3, roberta=1e-3, modernbert=2e-3))}   # post-LN fails at 2e-3
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--arch", choices=list(te.PRESETS), default="modernbert")
p.add_argument("--size", choices=list(SIZES), help="base is the paper's size (default: base on GPU, tiny on CPU)")
p.add_argument("--data", help="file, folder or glob; each file is one document (default: Python's stdlib sources)")
p.add_argument("--out-dir", default="out", help="checkpoints and metrics.jsonl go here")
p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
p.add_argument("--max-steps", type=int, help="exactly this many optimizer steps (default: what fits --time-budget)")
p.add_argument("--time-budget", type=float, default=9.5, help="minutes for the whole run when --max-steps is absent")
p.add_argument("--lr-steps", type=int, help="length of the LR schedule (default: the run's length under "
               "--time-budget, else 2000; never --max-steps, so a resumed run can go further on the same curve)")
p.add_argument("--context", type=int, help="sequence length (default: 128 on CPU; 512, 1024 for modernbert, on GPU); "
               "modernbert above 1024 is its context extension: global RoPE theta 160k, lr 3e-4, 1-sqrt decay")
p.add_argument("--batch-size", type=int, help="sequences per micro-batch and process")
p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
p.add_argument("--lr", type=float, help="peak learning rate")
p.add_argument("--warmup", type=float, help="fraction of --lr-steps spent warming up")
p.add_argument("--decay", type=float, help="modernbert: fraction of --lr-steps spent decaying at the end")
p.add_argument("--mlm-rate", type=float, help="training masking rate (default: the preset's)")
p.add_argument("--dupe-factor", type=int, default=10, help="bert: distinct static masks per example")
p.add_argument("--dropout", type=float, help="every dropout probability (default: 0 on CPU, the preset's on GPU)")
p.add_argument("--eval-interval", type=int, help="steps between evaluations (default: 4 per run)")
p.add_argument("--eval-seqs", type=int, default=256, help="held-out rows per evaluation (256 bytes at most)")
p.add_argument("--log-interval", type=int, default=20)
p.add_argument("--ckpt-interval", type=int, help="steps between checkpoints (default: at each evaluation)")
p.add_argument("--resume", action="store_true", help="continue exactly from ckpt_last.pt in --out-dir")
p.add_argument("--init-from", help="checkpoint to take the weights from (e.g. before a --context 8192 phase)")
p.add_argument("--compile", action="store_true")
p.add_argument("--peak-tflops", type=float, help="peak for MFU (default: a table on CUDA, a quick matmul on CPU)")
p.add_argument("--seed", type=int, default=1337)
args = p.parse_args()

die = lambda msg: sys.exit(f"error: {msg}")                    # a one-line message, no traceback
ddp = "RANK" in os.environ                                     # launched by torchrun
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
master = rank == 0
log = print if master else (lambda *a, **k: None)
if args.device == "auto":
    args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
if not {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[args.device]:
    die(f"--device {args.device} is not available here")
device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0)) if args.device == "cuda" else None)
if ddp:
    if device.type == "cuda":                                  # one GPU per process, chosen before NCCL starts
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
gpu, mb = device.type != "cpu", args.arch == "modernbert"
args.size = args.size or ("base" if gpu else "tiny")
args.context = args.context or ((1024 if mb else 512) if gpu else 128)
ext = mb and args.context > 1024
args.batch_size = args.batch_size or max(1, (32768 if gpu else 2048) // args.context)   # CPU: many small steps
args.lr = args.lr or (3e-4 if ext else LR[args.size][args.arch])
args.warmup = (0.01 if args.arch == "bert" else 0.05) if args.warmup is None else args.warmup   # 10k/1M, 24k/500k
args.decay = (1 / 6 if ext else 0.2) if args.decay is None else args.decay
T, B, A = args.context, args.batch_size, args.grad_accum
G = B * world * A                                              # sequences per optimizer step, over all processes

# ----------------------------------------------------------------------------------------------------------------------
# Data. A corpus is two byte arrays (train, val) with document offsets. A document goes to validation by a hash of its
# name, so the split stays put when documents come and go. The default corpus is prepared once into data/.
def read_docs():
    """(name, bytes) for each document: the files --data names, or the stdlib's .py files and pydoc's topics."""
    if not args.data:
        from pydoc_data.topics import topics
        yield from ((f"pydoc_data/{k}", v.encode()) for k, v in sorted(topics.items()))
    spec = args.data or sysconfig.get_paths()["stdlib"]
    roots = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
    if not any(os.path.exists(r) for r in roots):
        die(f"--data {spec}: no such file or folder")
    for root in roots:
        for d, dirs, files in os.walk(root) if os.path.isdir(root) else [("", [], [root])]:
            dirs[:] = sorted(x for x in dirs if args.data or x not in ("site-packages", "test", "tests", "idle_test"))
            for path in (os.path.join(d, f) for f in sorted(files) if args.data or f.endswith(".py")):
                yield path if args.data else os.path.relpath(path, root), open(path, "rb").read()   # bytes are bytes

def split(docs):
    docs = [(n, b) for n, b in docs if b]
    if not docs:
        die(f"--data {args.data}: no data, every file is empty")
    held = [hashlib.md5(n.encode()).digest()[0] % 25 == 0 for n, _ in docs]   # about 4% of the documents
    if all(held) or not any(held):                             # too few documents: hold out the last tenth of each
        parts = dict(train=[b[:len(b) * 9 // 10] for _, b in docs], val=[b[len(b) * 9 // 10:] for _, b in docs])
    else:
        parts = dict(train=[b for (_, b), h in zip(docs, held) if not h], val=[b for (_, b), h in zip(docs, held) if h])
    if sum(map(len, parts["val"])) < 100:                      # 15% of fewer bytes scores too few to mean anything
        die(f"--data {args.data}: {sum(len(b) for _, b in docs)} bytes is too little to train on and hold some "
            "out; give it 1 KB or more")
    return {k: (np.frombuffer(b"".join(v), np.uint8), np.cumsum([0, *map(len, v)])) for k, v in parts.items()}

def load_corpus():
    if args.data:
        return split(read_docs())
    stem = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stdlib-py%d%d" % sys.version_info[:2])
    if master and not os.path.exists(f"{stem}-val.idx"):
        for k, (data, offs) in split(read_docs()).items():
            for suffix, arr in (("bin", data), ("idx", offs.astype(np.int64))):   # val.idx last: it marks "done"
                arr.tofile(f"{stem}-{k}.{suffix}.tmp")
                os.replace(f"{stem}-{k}.{suffix}.tmp", f"{stem}-{k}.{suffix}")
    if ddp:
        dist.barrier()
    return {k: (np.fromfile(f"{stem}-{k}.bin", np.uint8), np.fromfile(f"{stem}-{k}.idx", np.int64))
            for k in ("train", "val")}

(train, train_offs), (val, val_offs) = load_corpus().values()
log(f"data: {len(train_offs) - 1} documents ({len(train) / 1e6:.2f} MB) to train on, {len(val_offs) - 1} held out "
    f"({len(val) / 1e6:.2f} MB), from {args.data or 'the Python stdlib'}; {time.time() - t0:.1f}s")

def pad(x, value=te.PAD):
    return np.concatenate([x, np.full(T - len(x), value)]).astype(np.int64)

def bert_pair(data, offs, k, rng):
    """CLS A SEP B SEP from one place in the corpus; B follows A (label 0) or is a random span elsewhere (label 1)."""
    s = k * (T - 3) % len(data)
    d = np.searchsorted(offs, s, "right") - 1
    e = min(s + T - 3, offs[d + 1])
    chunk = data[max(offs[d], e - T + 3):e]                    # near a document's end, start earlier instead
    lines = np.flatnonzero(chunk[:-1] == 10) + 1               # split after a newline: code's nearest sentence end
    cut = lines[rng.integers(len(lines))] if len(lines) else rng.integers(1, max(2, len(chunk)))
    a, b, nsp = chunk[:cut], chunk[cut:], int(rng.random() < 0.5)
    if nsp:
        q = rng.integers(len(data))
        b = data[q:min(q + len(b), offs[np.searchsorted(offs, q, "right")])]
    ids = np.concatenate([[te.CLS], a, [te.SEP], b, [te.SEP]])
    return pad(ids), pad(np.r_[np.zeros(len(a) + 2), np.ones(len(b) + 1)], 0), pad(np.ones(len(ids)), 0), nsp

# Training examples are a pure function of their global index i: example i of epoch e is slot perm_e[i mod N]. So a
# resumed run, and any split of a global batch over processes and micro-batches, sees the same rows and masks.
if args.arch != "bert":                                        # one stream of documents, SEP after each
    stream = np.concatenate([np.r_[[te.CLS] * mb, train[a:b], [te.SEP]].astype(np.uint16)
                             for a, b in zip(train_offs, train_offs[1:])])
    row = T - (not mb)                                         # RoBERTa puts one CLS in front of each row
N = max(1, len(train) // (T - 3) if args.arch == "bert" else len(stream) // row)
perm = functools.lru_cache(1)(lambda e: np.random.default_rng([args.seed, e]).permutation(N))

def example(i):
    e, j = divmod(i, N)
    k = int(perm(e)[j])
    key = [args.seed, k, e % args.dupe_factor] if cfg.static_masking else [args.seed, i]   # BERT: dupe_factor masks
    if args.arch == "bert":
        return (*bert_pair(train, train_offs, k, np.random.default_rng(key)), key)
    ids = stream[(k * row + np.arange(row)) % len(stream)].astype(np.int64)
    if not mb:                                                 # FULL-SENTENCES: attends across documents
        return np.r_[[te.CLS], ids], np.zeros(T, np.int64), np.ones(T, np.int64), -1, key
    return ids, np.zeros(T, np.int64), np.cumsum(ids == te.CLS) + (ids[0] != te.CLS), -1, key   # doc ids 1, 2, ...

def collate(rows, rate):
    """(ids, types, doc ids, nsp label, mask seed) rows to tensors; each row is masked by its own seeded generator."""
    seed = lambda key: int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)
    ids, labels = zip(*(te.mask_tokens(torch.from_numpy(r[0]), cfg, torch.Generator().manual_seed(seed(r[4])), rate)
                        for r in rows))
    types, docs, nsp = (torch.from_numpy(np.stack(x)) for x in zip(*(r[1:4] for r in rows)))
    to = lambda t, keep=True: t.to(device) if keep else None   # ModernBERT has no segment embeddings to index
    return to(torch.stack(ids)), to(docs), to(types, cfg.type_vocab), to(torch.stack(labels)), to(nsp, nsp[0] >= 0)

def get_batch(step, micro):
    first = step * G + (micro * world + rank) * B              # this process's rows of the global batch
    return collate([example(i) for i in range(first, first + B)], args.mlm_rate)

# Evaluation: the same plain rows for every arch (CLS, up to 254 bytes of one held-out document, SEP), masked 15% with
# fixed seeds, so that the three recipes' accuracies compare directly.
L = max(1, min(256, T) - 2)
spans = [(s, min(s + L, e)) for s0, e in zip(val_offs, val_offs[1:]) for s in range(s0, e, L)]
spans = [spans[i] for i in np.unique(np.linspace(0, len(spans) - 1, args.eval_seqs).round().astype(int))]
eval_rows = [(pad(np.r_[[te.CLS], val[s:e], [te.SEP]]), pad([], 0), pad(np.ones(e - s + 2), 0), -1, [0, 0, 0, j])
             for j, (s, e) in enumerate(spans)]
nsp_rows = [(*bert_pair(val, val_offs, j * 7919, np.random.default_rng([0, 0, 1, j])), [0, 0, 1, j])
            for j in range(len(eval_rows) * (args.arch == "bert"))]

# ----------------------------------------------------------------------------------------------------------------------
# Model
ck, ck_path = None, os.path.join(args.out_dir, "ckpt_last.pt")
if args.resume:
    ck = torch.load(ck_path, map_location="cpu", weights_only=True) if os.path.exists(ck_path) else die(
        f"--resume: no checkpoint at {ck_path}")
    if ck["cfg"]["arch"] != args.arch:
        die(f"--resume: {ck_path} is a {ck['cfg']['arch']} run, not {args.arch}")
    cfg = te.Config(**ck["cfg"])
else:
    over = dict(SIZES[args.size], **(dict(layers=28, intermediate=2624) if mb and args.size == "large" else {}))
    over.update(rope_theta=160000.0 if ext else 10000.0) if mb else over.update(max_len=T)   # phase 1: 10k everywhere
    if mb and not gpu:   # packed rows hold no padding to strip, and tinyencoder's unpadded CPU path attends one
        over["unpad"] = False   # document at a time: one masked call per batch is 1.4x faster here, same attention
    drop = 0.0 if args.dropout is None and not gpu else args.dropout   # short CPU runs cannot overfit
    over.update({f.name: drop for f in fields(te.Config) if f.name.endswith("dropout") and drop is not None})
    cfg = te.Config.from_preset(args.arch, **over)
args.mlm_rate = args.mlm_rate or cfg.mlm_rate
torch.manual_seed(args.seed)
model = raw = te.TinyEncoder(cfg).to(device)                   # checkpoints hold raw's names, never a wrapper's
if args.init_from:
    raw.load_state_dict(torch.load(args.init_from, map_location=device, weights_only=True)["model"])
model = torch.compile(model) if args.compile else model
model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
log(f"model: {args.arch} {args.size}, {raw.num_params() / 1e6:.2f}M parameters, {cfg.layers} layers of {cfg.hidden}; "
    f"{G} x {T} tokens per step ({B} per micro-batch x {world} processes x {A} accumulated)")

# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule. No weight decay on biases and norms. ModernBERT decouples decay from the learning rate
# (StableAdamW: p -= lr_t / lr_max * 1e-5 * p), which AdamW's p -= lr_t * wd * p matches with wd = 1e-5 / lr_max.
groups = [{"params": [q for q in raw.parameters() if q.ndim >= 2], "weight_decay": 1e-5 / args.lr if mb else 0.01},
          {"params": [q for q in raw.parameters() if q.ndim < 2], "weight_decay": 0.0}]
opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999) if args.arch == "bert" else (0.9, 0.98), eps=1e-6)

def lr_at(step):
    """BERT, RoBERTa: linear warmup, linear decay to 0. ModernBERT: warmup, stable, decay (1-sqrt in extension)."""
    warm = max(1, round(args.warmup * H))
    if step < warm:
        return args.lr * (step + 1) / warm
    start = H * (1 - args.decay) if mb else warm
    frac = min(1.0, max(0.0, (step - start) / max(1, H - start)))
    return args.lr * (1 - (math.sqrt(frac) if ext else frac))

def mlm_stats(out, labels):
    """Summed loss, correct and count over the masked bytes (the model's own loss is a mean: NaN when none are)."""
    sel = labels != -100
    tgt, logits = labels[sel], (out.logits if out.logits.dim() == 2 else out.logits[sel]).float()
    return torch.stack([F.cross_entropy(logits, tgt, reduction="sum"), (logits.argmax(-1) == tgt).sum(), sel.sum()])

@torch.no_grad()
def evaluate():
    raw.eval()
    tot = torch.zeros(5, device=device)                        # loss, correct, count, nsp correct, nsp count
    for rows, part in ((eval_rows, slice(0, 3)), (nsp_rows, slice(3, 5))):
        for s in range(0, len(rows), B):
            ids, docs, types, labels, nsp = collate(rows[s:s + B], 0.15)
            with amp:
                out = raw(ids, attention_mask=docs, token_type_ids=types, labels=labels)
            tot[part] += mlm_stats(out, labels) if nsp is None else torch.stack([(out.nsp_logits.argmax(-1) == nsp)
                                                                                 .sum(), nsp.new_tensor(len(nsp))])
    raw.train()
    res = dict(val_loss=(tot[0] / tot[2]).item(), val_acc=(tot[1] / tot[2]).item())
    res.update(val_bpb=res["val_loss"] / math.log(2), **({"nsp_acc": (tot[3] / tot[4]).item()} if nsp_rows else {}))
    return {k: round(v, 5) for k, v in res.items()}

def save(path):
    """Atomic: a kill at any moment leaves the previous file whole. Only tensors and plain values (weights_only)."""
    state = dict(model=raw.state_dict(), optim=opt.state_dict(), step=step, lr_steps=H, max_steps=max_steps,
                 best=best, cfg=asdict(cfg), args=vars(args))
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)

step, best, max_steps, H = 0, float("inf"), args.max_steps, args.lr_steps
if ck:
    raw.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optim"])
    step, best, H, max_steps = ck["step"], ck["best"], ck["lr_steps"], max_steps or ck["max_steps"]
    log(f"resumed at step {step} from {ck_path}")
os.makedirs(args.out_dir, exist_ok=True)

# ----------------------------------------------------------------------------------------------------------------------
# The loop. A step builds this process's micro-batches and counts the masked bytes of the whole global batch: each
# micro-batch's summed loss over that count adds up to the global mean however the batch is split.
stop = []                                                      # Ctrl-C, SIGTERM: finish the step, save, leave
for sig in (signal.SIGINT, signal.SIGTERM):                    # a second one stops at once
    signal.signal(sig, lambda s, frame: (stop.append(s), signal.signal(s, signal.SIG_DFL)))

def train_step(step):
    torch.manual_seed(args.seed + 1_000_003 * step + rank)     # dropout, like the data, is a function of the step
    batches = [get_batch(step, m) for m in range(A)]           # (and here of the process): resumes draw the same
    n = sum((b[3] != -100).sum() for b in batches).float()
    if ddp:
        dist.all_reduce(n)
    stats = torch.zeros(4, device=device)                      # loss, correct, count, real tokens
    for m, (ids, docs, types, labels, nsp) in enumerate(batches):
        if ddp:
            model.require_backward_grad_sync = m == A - 1      # all-reduce gradients once, after the last
        with amp:
            out = model(ids, attention_mask=docs, token_type_ids=types, labels=labels)
        mlm = mlm_stats(out, labels)
        loss = mlm[0] / n.clamp(min=1) + (F.cross_entropy(out.nsp_logits.float(), nsp, reduction="sum") / G
                                          if nsp is not None else 0)
        (loss * world).backward()                              # DDP averages gradients over processes
        stats += torch.stack([loss.detach(), mlm[1], mlm[2], (docs != 0).sum()])
    return stats

def fit(step, dt, evals):                                      # the last step that fits the time left, on every process
    n = torch.tensor(step + max(1, int((end - time.time() - evals * t_eval) / dt)), device=device)
    if ddp:
        dist.broadcast(n, 0)
    return int(n)

t_eval, res, end = 0.0, {}, t0 + args.time_budget * 60 - 15   # 15 s for the demo and the last checkpoint
if max_steps is None:                                          # time an evaluation and a step, to fit the run
    tm = time.time()
    res = evaluate() if master else {}
    t_eval = time.time() - tm
    for _ in range(2):                                         # the first warms up, the second is timed
        tm = time.time()
        train_step(0)
        opt.zero_grad(set_to_none=True)
    max_steps = fit(0, time.time() - tm, 4)
    log(f"time budget {args.time_budget:g} min: ~{max_steps} steps of {time.time() - tm:.2f}s; step 0: {res}")
H = H or (max_steps if args.max_steps is None else 2000)
eval_every = args.eval_interval or max(1, math.ceil(max_steps / 4))
peak = (args.peak_tflops or 0) * 1e12
if not peak and device.type == "cuda":
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}.items() if k in name), 0)
elif not peak and device.type == "cpu":                        # the fastest of ten fp32 matmuls on this machine
    peak = 2 * 1024**3 / min(timeit.repeat(lambda a=torch.randn(1024, 1024): a @ a, number=1, repeat=10))
log(f"training steps {step + 1}..{max_steps}, peak lr {args.lr:g} on a {H}-step schedule; MFU against "
    f"{peak / 1e12:.2f} TFLOP/s per process")
dt_avg = None
while step < max_steps:
    tm = time.time()
    for g in opt.param_groups:
        g["lr"] = lr_at(step)
    late = args.max_steps is None and time.time() > end
    stats = torch.cat([train_step(step), torch.tensor([len(stop), late], device=device)])
    if ddp:                                                    # every process must agree on the loss and on stopping
        dist.all_reduce(stats)
    loss, gnorm, interrupted, late = stats[0].item(), clip_grad_norm_(raw.parameters(), 1.0).item(), stats[4], stats[5]
    if not math.isfinite(loss + gnorm):                        # checked before the update: weights stay finite
        die(f"loss {loss}, grad norm {gnorm} at step {step + 1}: stopped; last good checkpoint in {args.out_dir}")
    opt.step()
    opt.zero_grad(set_to_none=True)
    step += 1
    dt_avg = time.time() - tm if dt_avg is None else 0.9 * dt_avg + 0.1 * (time.time() - tm)
    if step % args.log_interval == 0 or step == max_steps:
        tok, eta = stats[3].item() / (time.time() - tm), (max_steps - step) * dt_avg
        mfu = raw.flops_per_token(T) * tok / world / peak if peak else 0
        log(f"step {step:5d}/{max_steps} | loss {loss:.6f} | acc {stats[1].item() / max(1, stats[2].item()):6.1%} | lr "
            f"{lr_at(step - 1):.2e} | {tok / 1e3:6.1f}k tok/s | mfu {mfu:5.1%} | eta {eta / 60:4.1f} min")
    if interrupted:
        if master:
            save(ck_path)
        log(f"interrupted after step {step}; saved {ck_path}; continue with --resume")
        sys.exit(0)
    if master and (step % eval_every == 0 < max_steps - step - eval_every // 2 or step == max_steps or late):
        res = evaluate()
        log(f"eval step {step}: " + " ".join(f"{k} {v}" for k, v in res.items()))
        with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(dict(step=step, arch=args.arch, train_loss=loss, tokens=step * G * T,
                                    elapsed_s=round(time.time() - t0, 1), **res)) + "\n")
        if res["val_loss"] < best:
            best = res["val_loss"]
            save(os.path.join(args.out_dir, "ckpt_best.pt"))
    if master and (step % (args.ckpt_interval or eval_every) == 0 or step == max_steps or late):
        save(ck_path)
    if late:
        log(f"time budget reached: stopping after step {step} of {max_steps}")
        break
    if args.max_steps is None and step % args.log_interval == 0 < max_steps - step:   # others' load varies: re-fit
        max_steps = fit(step, dt_avg, 1 + (max_steps - step) // eval_every)
        H = H if args.lr_steps else max_steps

# ----------------------------------------------------------------------------------------------------------------------
# The demo: a held-out line with three masked spans, what the model writes into them, and the original.
if master:
    res = res or evaluate()                                    # a resumed run that had nothing left to do
    s, e = spans[len(spans) // 2]
    s += int(np.argmax(val[s:e] == 10)) + 1 if (val[s:(s + e) // 2] == 10).any() else 0   # from a line's start
    ids = torch.tensor(np.r_[[te.CLS], val[s:min(e, s + 64)], [te.SEP]], device=device)
    hide = torch.zeros_like(ids, dtype=torch.bool)
    hide[[min(c + o, len(ids) - 2) for c in (len(ids) // 5, len(ids) // 2, 4 * len(ids) // 5) for o in range(3)]] = True
    raw.eval()
    with torch.no_grad(), amp:
        guess = torch.where(hide, raw(torch.where(hide, te.MASK, ids)[None]).logits[0].argmax(-1), ids)
    show = lambda t, h=torch.zeros_like(hide): "".join("_" if m else "⏎" if b == 10 else chr(b) if 32 <= b < 127
                                                       else "·" for b, m in zip(t[1:-1].tolist(), h[1:-1].tolist()))
    print(f"demo, held out : {show(ids, hide)}\n     model fills: {show(guess)}\n     original   : {show(ids)}")
    print(f"final: held-out masked-byte accuracy {res['val_acc']:.2%} (15% masking, {args.arch}), loss "
          f"{res['val_loss']:.4f}, {res['val_bpb']:.3f} bits/byte" + (f", NSP accuracy {res['nsp_acc']:.1%}" if
          "nsp_acc" in res else "") + f"; {step} steps, {time.time() - t0:.0f}s")
if ddp:
    dist.destroy_process_group()
