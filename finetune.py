"""Fine-tune a pretrained tinyencoder to classify texts, tag their bytes or answer questions.

  python finetune.py --task tags --init out/ckpt_best.pt --out-dir out-tags  # bytes' token classes
  python finetune.py --task packages --init out/ckpt_best.pt --from-scratch --out-dir out-packages
  python finetune.py --task qa --init out/ckpt_best.pt --out-dir out-qa  # questions on functions
  python finetune.py --train mine.jsonl --val held.jsonl --init path/to/hf-model --out-dir out-mine

--init takes a train.py checkpoint or a transformers folder; --from-scratch keeps its architecture
and draws fresh weights, to measure what pretraining buys. A JSONL line is {"text": ..., "label":
...} to classify the text, or {"text": ..., "tags": [one per UTF-8 byte]} or {"text": ..., "spans":
[[first char, end char, tag], ...]} to tag it (untagged bytes are "O"; spans may not overlap), or
{"question": ..., "context": ..., "answers": [{"text": ..., "start": first char}, ...]} to answer
from the context (trained on the first answer; scored by exact match and token F1 against all).
Writes ckpt_last.pt, ckpt_best.pt (best held-out accuracy, or exact match) and metrics.jsonl to
--out-dir; --resume goes on from ckpt_last.pt exactly. Built-in tasks come from Python's standard
library: data/tasks.py.
"""

import codecs
import collections
import functools
import hashlib
import json
import os
import re
import time
from argparse import RawDescriptionHelpFormatter
from dataclasses import asdict, replace
from operator import itemgetter
from typing import NamedTuple, Union

import torch

import pipelines
import tinyencoder as te
import tinyencoder_hf
from data.corpus import printable
from data.tasks import exact_match, token_f1, write_task
from runs import COUNT, LR, Metrics, Parser, StopSignals, device_or_die, die
from runs import (
    SEED,
    check_resumed,
    check_step_fits,
    load_checkpoint,
    refuse_to_overwrite,
    resumed_args,
    save_checkpoint,
    stop_if_diverged,
)
from runs import make_out_dir, settle_vector_math, step_seed, stops_plainly

parser = Parser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
add = parser.add_argument
add("--task", choices=["tags", "packages", "qa"], help="a built-in task from the standard library")
add("--train", help="JSONL to train on (instead of --task)")
add("--val", help="JSONL to evaluate on, held out from --train")
add("--init", help="a train.py checkpoint (.pt) or a transformers folder")
add("--from-scratch", action="store_true", help="--init's architecture with fresh weights")
add("--out-dir", default="out-finetune", help="checkpoints and metrics.jsonl go here")
add("--resume", action="store_true", help="go on from --out-dir's ckpt_last.pt")
add("--train-examples", type=COUNT, help="train on this many of --train's, spread through the file")
add("--max-steps", type=COUNT, default=600)
add("--batch-size", type=COUNT, default=32)
add("--lr", type=LR, default=3e-4, help="peak learning rate: 6%% warmup, then linear decay")
add("--eval-interval", type=COUNT, default=200)
add("--log-interval", type=COUNT, default=50)
add("--seed", type=SEED, default=0)
add("--max-answer", type=COUNT, default=40, help="the longest answer a span model gives, in bytes")
add("--device", choices=["cpu", "cuda", "mps"], help="default: cuda where there is one, else cpu")
args = parser.parse_args()
if args.task and (args.train or args.val):
    die("give --task, or --train and --val, not both: --task names its own files")
if os.environ.get("WORLD_SIZE", "1") != "1":  # each process would run the whole job, racing
    several = f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for several (torchrun sets it)"
    die(f"finetune.py runs as one process: {several}; start it with python alone")
# each vector math kernel chosen before threads share a call, or a run may not replay (runs.py)
settle_vector_math()
# Ctrl-C, SIGTERM, from here on (setup too): the loop saves and stops after the step in flight
stop = StopSignals()
t0 = time.time()


def log(message):
    print(printable(message), flush=True)


# -------------------------------------------------------------------------------------------------
# Data: JSONL lines -> examples
class Example(NamedTuple):
    ids: list  # [CLS] bytes [SEP], or [CLS] question [SEP] context [SEP]
    # a class index, one tag index per id (IGNORE_INDEX at CLS, SEP), or a span's first and last
    target: Union[int, list, tuple]
    # a question's: its token types (0 up to the first [SEP], then its second segment), its
    # context's tokens, and its answers as text
    token_types: tuple = ()
    context: range = range(0)
    answers: tuple = ()


class Task(NamedTuple):
    kind: str  # "sequence", "token" or "span"
    labels: list  # the label names, sorted; a label's index is its class
    examples: list


class Line(NamedTuple):
    number: int
    record: dict


@functools.cache  # a pipe (bash's <(...)) reads once: a second open would wait for a writer
def file_lines(path) -> tuple[bytes, ...]:
    """A file's lines, with a one-line error for a folder, a missing file or one it cannot read (a
    pipe reads too)."""
    if os.path.isdir(path):
        die(f"{path}: a folder, not a JSONL file")
    if not os.path.exists(path):
        die(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # no permission, an I/O error
        die(f"{path}: cannot read it ({e.strerror})")
    # a byte-order mark, as Windows tools write, is no part of the first line
    return tuple(data.removeprefix(codecs.BOM_UTF8).splitlines())


def read_jsonl(path, questions=None):
    """The file's Lines, with a one-line error for a missing file or a line that is not a JSON
    object with a "text" string, or in a file of questions (questions, or else its first line,
    says which), with "question" and "context" strings."""
    records = []
    for number, raw in enumerate(file_lines(path), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            die(f"{path} line {number}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:  # also: 4,301 digits, 1,000 brackets deep
            die(f"{path} line {number}: not JSON ({getattr(e, 'msg', e)})")
        try:  # JSON's "\ud800" escape reads as a lone surrogate, which no UTF-8 byte holds
            json.dumps(record, ensure_ascii=False).encode()
        except UnicodeEncodeError as e:
            die(
                f"{path} line {number}: {e.object[e.start : e.end]!r} is a lone surrogate, not text"
            )
        if questions is None and isinstance(record, dict):
            questions = "question" in record
        texts, needs = ("text",), 'a "text" string'
        if questions:
            texts, needs = ("question", "context"), '"question" and "context" strings'
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in texts):
            die(f"{path} line {number}: needs an object with {needs}")
        records.append(Line(number, record))
    if not records:
        die(f"{path}: no examples")
    return records


def is_whole(value) -> bool:
    """A JSON whole number: true and false are not (Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_tags(tags, where):
    """Tags are strings or whole numbers, as labels are: true, null or 1.5 would be a class each."""
    odd = [tag for tag in tags if not (isinstance(tag, str) or is_whole(tag))]
    if odd:
        die(f"{where}: a tag must be a string or a whole number, got {odd[0]!r}")


def byte_tags(record, where):
    """The tag of each UTF-8 byte of record["text"], from "tags" or from character "spans"."""
    text = record["text"]
    if "tags" in record:
        tags = record["tags"]
        if not isinstance(tags, list) or len(tags) != len(text.encode()):
            die(f'{where}: "tags" must be a list with one tag per UTF-8 byte of "text"')
        check_tags(tags, where)
        return [str(tag) for tag in tags]
    # character offsets -> byte offsets: where each character's bytes start
    starts = [0]
    for character in text:
        starts.append(starts[-1] + len(character.encode()))
    tags = ["O"] * starts[-1]
    if not isinstance(record["spans"], list):
        die(f'{where}: "spans" must be a list of [first char, end char, tag]')
    for span in record["spans"]:
        shaped = isinstance(span, list) and len(span) == 3
        offsets = shaped and all(is_whole(i) and 0 <= i <= len(text) for i in span[:2])
        if not offsets or span[0] > span[1]:
            die(f'{where}: each of "spans" must be [first char, end char, tag] within "text"')
        first, end, tag = span
        check_tags([tag], where)
        tags[starts[first] : starts[end]] = [str(tag)] * (starts[end] - starts[first])
    # a byte takes one tag: a later span would overwrite part of an earlier one unseen
    tagging = sorted((span for span in record["spans"] if span[0] < span[1]), key=itemgetter(0))
    for earlier, later in zip(tagging, tagging[1:]):
        if later[0] < earlier[1]:
            pair = f"{json.dumps(earlier)} and {json.dumps(later)}"
            die(f"{where}: spans {pair} overlap; a byte takes one tag")
    return tags


def same_kind(values, noun, path, line, first):
    """Read as names, 1 and "1" would be one class (and true a third): the labels, or the tags, of
    the training and held-out files are all of the type of the first, which first records as
    (type, its file, its line)."""
    for value in values:
        kind, seen_path, seen_line = first.setdefault(noun, (type(value), path, line.number))
        if type(value) is not kind:
            seen = f"line {seen_line}"
            if seen_path != path:
                seen = f"{seen_path} {seen}"
            of = f"of type {type(value).__name__}, {seen}'s of {kind.__name__}"
            die(f"{path} line {line.number}: {noun} {value!r} is {of}")


def line_targets(path, lines, kind, first):
    """Each line's label (sequence) or list of byte tags (token), as names; first: same_kind's."""
    targets = []
    for line in lines:
        where = f"{path} line {line.number}"
        if kind == "sequence" and "label" not in line.record:
            die(f'{where}: needs a "label" (the task classifies texts)')
        if kind == "token" and "tags" not in line.record and "spans" not in line.record:
            die(f'{where}: needs "tags" or "spans" (the task tags bytes)')
        if kind == "sequence":
            label = line.record["label"]
            if not (isinstance(label, str) or is_whole(label)):
                die(f'{where}: "label" must be a string or a whole number, got {label!r}')
            same_kind([label], "label", path, line, first)
            targets.append(str(label))
        else:
            tags = byte_tags(line.record, where)
            given = line.record.get("tags")
            if given is None:  # the "O" between spans is no tag of the file's
                given = [span[2] for span in line.record["spans"]]
            same_kind(given, "tag", path, line, first)
            targets.append(tags)
    return targets


def question_examples(path, lines, cfg) -> list:
    """Each line's Example of [CLS] question [SEP] context [SEP], its target the first answer's
    first and last token, with one-line errors for answers that are not the context's text."""
    examples = []
    for line in lines:
        where = f"{path} line {line.number}"
        question, context, answers = (
            line.record.get(k) for k in ("question", "context", "answers")
        )
        if not isinstance(answers, list) or not answers:
            die(f'{where}: needs "answers", a list of {{"text", "start"}}')
        for i, answer in enumerate(answers):
            if not isinstance(answer, dict):
                die(f'{where}: answers[{i}] must be an object {{"text", "start"}}, got {answer!r}')
            text, start = answer.get("text"), answer.get("start")
            if not (isinstance(text, str) and text and is_whole(start) and start >= 0):
                kinds = '"text" (not empty) and "start" (a whole number from 0)'
                die(f"{where}: answers[{i}] needs {kinds}, got {answer!r}")
            if context[start : start + len(text)] != text:
                die(
                    f'{where}: answers[{i}] is not a "text" of the context at its "start" character'
                )
        try:
            row = pipelines.question_row(cfg, question, context)
        except ValueError as e:
            die(f"{where}: {e}")
        first = row.context.start + len(context[: answers[0]["start"]].encode())
        target = (first, first + len(answers[0]["text"].encode()) - 1)
        texts = tuple(answer["text"] for answer in answers)
        examples.append(Example(row.ids, target, tuple(row.token_types), row.context, texts))
    return examples


def sorted_labels(names) -> list:
    """The distinct names in order: whole numbers as numbers (2 before 10), as transformers'
    scripts order int labels; others as text."""
    distinct = sorted(set(names))  # as text first: "01" before "1", whatever the set's order
    if all(re.fullmatch(r"-?[0-9]+", name) for name in distinct):
        return sorted(distinct, key=int)
    return distinct


def framed_text(path, line, cfg) -> list:
    """[CLS] text [SEP] of one line, or an error naming it where the model cannot read it all
    (transformers' scripts would cut it at max_seq_length)."""
    ids = [cfg.cls_id, *te.byte_ids(line.record["text"]), cfg.sep_id]
    if len(ids) > cfg.max_len:
        room = f"this model reads at most {cfg.max_len - 2}"
        die(f"{path} line {line.number}: text is {len(ids) - 2} bytes; {room}")
    return ids


def file_kind(path, first: Line) -> str:
    """A file's task from its first line: "span" (questions), "sequence" (labels) or "token"."""
    if not {"label", "tags", "spans", "question"} & set(first.record):
        needs = 'needs "label", "tags", "spans" or "question" (see --help)'
        die(f"{path} line {first.number}: {needs}")
    if "question" in first.record:
        return "span"
    if "label" in first.record:
        return "sequence"
    return "token"


def read_task(path, cfg, first, kind=None, labels=None) -> Task:
    """A JSONL file's task: kind "sequence", "token" or "span" from its first line when not given,
    labels the sorted label names (the training file's, when given); ids use cfg's special ids;
    first: the type of the first label or tag read (same_kind's), {} for the first file."""
    questions = None
    if kind is not None:
        questions = kind == "span"
    lines = read_jsonl(path, questions)
    if kind is None:
        kind = file_kind(path, lines[0])
    # the two labels of every span: where it starts and where it ends
    if kind == "span":
        return Task(kind, ["start", "end"], question_examples(path, lines, cfg))
    targets = line_targets(path, lines, kind, first)
    if kind == "token" and not any(targets):  # nothing to learn or score
        die(f"{path}: no tags at all (every text is empty)")
    if labels is None:
        names = targets if kind == "sequence" else [tag for tags in targets for tag in tags]
        labels = sorted_labels(names)
        if len(labels) < 2:
            die(
                f"{path}: every example has the label {labels[0]!r}; a classifier needs two or more"
            )
    index = {label: i for i, label in enumerate(labels)}
    examples = []
    for line, target in zip(lines, targets):
        unknown = set(target if kind == "token" else [target]) - set(index)
        if unknown:
            where = f"{path} line {line.number}"
            die(f"{where}: label {sorted(unknown)[0]!r} is not among the training labels {labels}")
        ids = framed_text(path, line, cfg)
        if kind == "sequence":
            examples.append(Example(ids, index[target]))
        else:  # [CLS] and [SEP] carry no tag
            tags = [te.IGNORE_INDEX, *(index[t] for t in target), te.IGNORE_INDEX]
            examples.append(Example(ids, tags))
    return Task(kind, labels, examples)


def collate(batch, kind, cfg, device):
    """Examples -> a padded batch: input_ids, attention_mask and labels (and a question's
    token_type_ids, where the model has segments)."""
    token_types = None
    if kind == "span" and cfg.type_vocab:
        token_types = [example.token_types for example in batch]
    inputs = pipelines.padded([example.ids for example in batch], cfg.pad_id, token_types)
    if kind == "token":  # IGNORE_INDEX at padding
        tags = [example.target for example in batch]
        inputs["labels"] = pipelines.padded(tags, te.IGNORE_INDEX)["input_ids"]
    else:  # a class, or a span's first and last token, per row
        inputs["labels"] = torch.tensor([example.target for example in batch])
    return {name: tensor.to(device) for name, tensor in inputs.items()}


# -------------------------------------------------------------------------------------------------
# The pretrained model, or a checkpoint of this script to resume
ckpt_path = os.path.join(args.out_dir, "ckpt_last.pt")
checkpoint = {}
changed = []
if args.resume:  # the run's own flags, but those given again
    checkpoint, base_cfg = load_checkpoint(ckpt_path, "--resume")
    if "labels" not in checkpoint:
        die(f"--resume: {ckpt_path} is not a finetune.py checkpoint")
    # and the batch size: the step numbers the rows, so the data would shift. --train and --val
    # may name the files anew (moved, or by another path): their examples are checked below
    fixed = ("task", "init", "from_scratch", "train_examples", "batch_size")
    changed = resumed_args(parser, args, checkpoint["args"], ("resume", "out_dir", "device"), fixed)
    check_resumed(checkpoint, args.batch_size, f"--batch-size {args.batch_size}", args.max_steps)
else:
    refuse_to_overwrite(args.out_dir)
# what is missing, before any work, and before --out-dir is made: an error leaves no empty folder
if not (args.task or (args.train and args.val)):
    die("give --task, or --train and --val (JSONL files)")
if not args.init:
    die("give --init: a train.py checkpoint or a transformers folder to start from")
if args.task:
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    try:
        paths = write_task(args.task, here)
    except OSError as e:  # a read-only checkout, a full disk: as train.py's default corpus
        die(f"cannot write the {args.task} task into {here} ({e.strerror}): make it writable")
    args.train, args.val = paths["train"], paths["val"]
init_labels = None  # the class names of the classifier it starts from, where it has its own
if checkpoint:  # its own config and weights: --init is not read again (it may have moved)
    weights, init_labels = checkpoint["model"], checkpoint["labels"]
elif os.path.isdir(args.init):
    try:
        pretrained = tinyencoder_hf.load(args.init)
    except (ValueError, OSError, ImportError) as e:
        die(f"--init {args.init}: {e}")
    base_cfg, weights = pretrained.cfg, pretrained.state_dict()
    init_labels = getattr(pretrained, "label_names", None)
elif os.path.exists(args.init):
    state, base_cfg = load_checkpoint(args.init, "--init")
    weights, init_labels = state["model"], state.get("labels")
else:
    die(f"--init {args.init}: no such file or folder")
try:
    pipelines.check_bytes(base_cfg)
except ValueError as e:
    die(f"--init {args.init}: {e}")
label_types = {}  # the training file's first label's or tag's, which the held-out file's share
task = read_task(args.train, base_cfg, label_types)
# --init's classifier of these labels keeps its class numbers, as transformers' scripts map them;
# one of other labels gives way to a fresh head (LABEL_0, LABEL_1...: transformers' "no names")
head_labels = None
unnamed = [f"LABEL_{i}" for i in range(base_cfg.num_labels)]
# a span head's two outputs are a start and an end, whatever names its config gives them
named = init_labels and list(init_labels) != unnamed and task.kind != "span"
if named and base_cfg.classifier == task.kind:
    head_labels = list(init_labels)
if head_labels and set(head_labels) == set(task.labels):
    task = read_task(args.train, base_cfg, label_types, task.kind, head_labels)
kind, labels, train_examples = task.kind, task.labels, task.examples
val_examples = read_task(args.val, base_cfg, label_types, kind, labels).examples
file_lines.cache_clear()  # every file read: their lines need not stay in memory for the run
if args.train_examples is not None:
    if not 0 < args.train_examples <= len(train_examples):
        die(f"--train-examples {args.train_examples}: {args.train} has {len(train_examples)}")
    # evenly spaced, so that a file grouped by label or kind keeps each group's share
    spread = torch.linspace(0, len(train_examples) - 1, args.train_examples).round().long()
    train_examples = [train_examples[i] for i in spread.tolist()]
# a resumed run reads the labels and examples it started on (its checkpoint keeps their SHA-256)
data_sha256 = hashlib.sha256(repr((labels, train_examples, val_examples)).encode()).hexdigest()
if checkpoint and checkpoint["labels"] != labels:
    die(f"--resume: {args.train} has the labels {labels}, the run {checkpoint['labels']}")
if checkpoint and checkpoint.get("data_sha256", data_sha256) != data_sha256:
    die(f"--resume: {args.train} or {args.val} holds other examples than the run read")

# The pretrained encoder with the family's classifier in place of its MLM (and NSP) head. Padded
# batches of texts: unpadding saves the work on padding.
cfg = replace(base_cfg, classifier=kind, num_labels=len(labels), nsp=False, unpad=True)
args.device = device_or_die(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
device = torch.device(args.device)
longest = max(len(example.ids) for example in train_examples)  # a mistyped --batch-size: no swap
check_step_fits(
    f"--batch-size {args.batch_size}", args.batch_size * longest, cfg, device, "lower it"
)
torch.manual_seed(args.seed)
model = te.TinyEncoder(cfg)
other_labels = head_labels is not None and head_labels != labels
if base_cfg.classifier != kind or base_cfg.num_labels != len(labels) or other_labels:
    # another task's head (or other labels) in --init: a fresh one, as in transformers
    weights = {name: w for name, w in weights.items() if not name.startswith("classifier.")}
if other_labels:
    log(f"--init's classifier knows the labels {head_labels}, not these: a fresh head")
if not args.from_scratch:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    fresh = [name for name in missing if not name.startswith(("classifier.", "pooler."))]
    if fresh:
        die(f"--init {args.init}: it lacks {fresh[:4]} of the encoder")
model.to(device)
decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on biases and norms
rest = [p for p in model.parameters() if p.dim() < 2]
groups = [dict(params=decay, weight_decay=0.01), dict(params=rest, weight_decay=0.0)]
opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
step, best, spent = 0, -1.0, 0.0
if checkpoint:
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optim"])
    # elapsed_s counts the run's time over its processes, as train.py's
    step, best, spent = checkpoint["step"], checkpoint["best"], checkpoint.get("elapsed_s", 0.0)
    log(f"resumed at step {step}")
    if changed:
        log(f"flags changed from the run's own: {', '.join(changed)}")
make_out_dir(args.out_dir)
metrics = Metrics(args.out_dir, checkpoint.get("step"))
start = "random init" if args.from_scratch else f"from {args.init}"
# the held-out figure that picks ckpt_best.pt
score_name = "val_acc"
if kind == "span":
    score_name = "val_exact"
log(
    f"{kind} classification, {len(labels)} labels; {len(train_examples)} training and "
    f"{len(val_examples)} held-out examples; {cfg.arch} {start}"
)


def lr_at(step):
    """6 % linear warmup (RoBERTa's fine-tuning), then linear decay to 0 (transformers' default)."""
    warmup = max(1, int(0.06 * args.max_steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * max(0.0, (args.max_steps - step) / max(1, args.max_steps - warmup))


@functools.lru_cache(maxsize=2)  # steps read the passes in order: this one and the next
def shuffled(epoch: int) -> list:
    """The order of the training examples in pass epoch: a function of epoch alone."""
    generator = torch.Generator().manual_seed(epoch)
    return torch.randperm(len(train_examples), generator=generator).tolist()


def batch_at(step):
    """The training examples of a step: a fresh shuffle per pass, a function of the step alone, so
    that a resumed run reads what the uninterrupted one would have."""
    first = step * args.batch_size
    batch = []
    for i in range(first, first + args.batch_size):
        epoch, position = divmod(i, len(train_examples))
        batch.append(train_examples[shuffled(epoch)[position]])
    return batch


@stops_plainly(f"--batch-size {args.batch_size}", "lower it")
def train_step(step) -> torch.Tensor:
    """Forward, backward and update over the step's batch; its loss, on the device."""
    torch.manual_seed(step_seed(args.seed, step))  # dropout, like the data, follows the step
    batch = collate(batch_at(step), kind, cfg, device)
    for group in opt.param_groups:
        group["lr"] = lr_at(step)
    out = model(**batch)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return out.loss.detach()


@torch.no_grad()
def evaluate_answers():
    """Held-out loss, exact match and token F1 (data/tasks.py) of the best span of at most
    --max-answer bytes in each context; and exact match by the question's first word, which
    names the kind of question in the built-in task."""
    model.eval()
    loss, exact, f1 = 0.0, 0.0, 0.0
    by_word = collections.defaultdict(list)
    for first in range(0, len(val_examples), 64):
        examples = val_examples[first : first + 64]
        out = model(**collate(examples, kind, cfg, device))
        loss += out.loss.item() * len(examples)
        for example, logits in zip(examples, out.logits.cpu()):
            allowed = torch.zeros(len(logits), dtype=torch.bool)
            allowed[example.context.start : example.context.stop] = True
            start, last = pipelines.best_span(logits, allowed, args.max_answer)
            answer = pipelines.span_text(example.ids, start, last)
            right = exact_match(answer, example.answers)
            exact += right
            f1 += token_f1(answer, example.answers)
            question = pipelines.span_text(example.ids, 1, example.context.start - 2)
            by_word[question.split(" ")[0]].append(right)
    model.train()
    results = dict(val_loss=loss, val_exact=exact, val_token_f1=f1)
    results = {name: round(value / len(val_examples), 6) for name, value in results.items()}
    by_word = {word: round(sum(v) / len(v), 4) for word, v in sorted(by_word.items())}
    results["val_exact_by_word"] = by_word
    return results


@torch.no_grad()
def evaluate():
    """Held-out loss, accuracy (over texts or tagged bytes), and F1: each label's and their mean;
    for questions, evaluate_answers'."""
    if kind == "span":
        return evaluate_answers()
    model.eval()
    loss, correct, count = 0.0, 0, 0
    # per label: right guesses, guesses, gold (not a gold x guess table: labels^2 of memory)
    n = len(labels)
    true_positives, predicted, gold_count = (torch.zeros(n, dtype=torch.long) for _ in range(3))
    for first in range(0, len(val_examples), 64):
        batch = collate(val_examples[first : first + 64], kind, cfg, device)
        out = model(**batch)
        gold = batch["labels"].flatten().cpu()
        guess = out.logits.argmax(-1).flatten().cpu()
        keep = gold != te.IGNORE_INDEX
        loss += out.loss.item() * int(keep.sum())
        gold, guess = gold[keep], guess[keep]
        true_positives += torch.bincount(gold[gold == guess], minlength=n)
        predicted += torch.bincount(guess, minlength=n)
        gold_count += torch.bincount(gold, minlength=n)
        correct += int((gold == guess).sum())
        count += len(gold)
    model.train()
    precision = true_positives / predicted.clamp(min=1)
    recall = true_positives / gold_count.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    present = (predicted + gold_count) > 0  # labels seen in gold or predictions
    results = dict(val_loss=loss / count, val_acc=correct / count)
    results["val_macro_f1"] = f1[present].mean().item()
    results = {name: round(value, 6) for name, value in results.items()}
    results["val_f1"] = {
        labels[i]: round(f1[i].item(), 4) for i in range(len(labels)) if present[i]
    }
    return results


def save(path):
    state = dict(model=model.state_dict(), optim=opt.state_dict(), step=step, best=best)
    state.update(cfg=asdict(cfg), args=vars(args), labels=labels, data_sha256=data_sha256)
    state["elapsed_s"] = spent + time.time() - t0
    save_checkpoint(path, state)


results = evaluate() if step >= args.max_steps else None  # a finished run, resumed
model.train()
step_time, timed_from, timed_step = 0.0, time.time(), step
while step < args.max_steps:
    loss = train_step(step).item()
    step += 1
    stop_if_diverged(dict(loss=loss), step, ckpt_path)
    if step % args.log_interval == 0 or step == args.max_steps:
        # the steps since the clock started: evaluations and saves restart it, and a run's last
        # log line may come sooner than --log-interval
        step_time = (time.time() - timed_from) / (step - timed_step)
        minutes_left = (args.max_steps - step) * step_time / 60
        examples_per_s = args.batch_size / step_time
        progress = f"step {step:5d}/{args.max_steps} | loss {loss:.6f}"
        speed = f"{examples_per_s:6.1f} examples/s | eta {minutes_left:4.1f} min"
        log(f"{progress} | lr {lr_at(step - 1):.2e} | {speed}")
        timed_from, timed_step = time.time(), step
    is_eval_step = step % args.eval_interval == 0 or step == args.max_steps
    if is_eval_step:
        results = stop_if_diverged(evaluate(), step, ckpt_path)
        # the per-label and per-word figures go to metrics.jsonl and the final lines
        figures = " ".join(f"{k} {v}" for k, v in results.items() if not isinstance(v, dict))
        log(f"eval step {step}: {figures}")
        metrics.write(dict(step=step, elapsed_s=round(spent + time.time() - t0, 1), **results))
        if results[score_name] > best:
            best = results[score_name]
            save(os.path.join(args.out_dir, "ckpt_best.pt"))
    # an interrupted step is saved after its evaluation, where one is due, as uninterrupted
    if is_eval_step or stop.received:
        save(ckpt_path)
        timed_from, timed_step = time.time(), step
    if stop.received:
        log(f"interrupted after step {step}; saved {ckpt_path}; continue with --resume")
        raise SystemExit(0)


def kinds_of_tag(example):
    return len(set(example.target))


def demo_answer():
    """A held-out question, its context, the model's answer and the right ones; final figures."""
    # the first question of each kind (its first word): --task qa's three, or a file's first three
    kinds = {}
    for example in val_examples:
        question = bytes(example.ids[1 : example.context.start - 1])
        kinds.setdefault(question.split(b" ")[0], example)
    for example in list(kinds.values())[:3]:
        question = pipelines.span_text(example.ids, 1, example.context.start - 2)
        context = pipelines.span_text(example.ids, example.context.start, example.context.stop - 1)
        log(f"demo, held out: {question!r} in {context.replace(chr(10), '⏎')}")
        answer = pipelines.answer(model, question, context, args.max_answer)
        log(f"     model says: {answer!r}; the answer: {example.answers[0]!r}")
    shares = results["val_exact_by_word"].items()
    shares = ", ".join(f"{word} {share:.1%}" for word, share in shares)
    log(f"held-out exact match by the question's first word: {shares}")
    log(
        f"final: held-out exact match {results['val_exact']:.2%}, token F1 "
        f"{results['val_token_f1']:.2%} ({args.task or args.train}, {cfg.arch} {start}); best "
        f"{best:.2%}; {step} steps, {time.time() - t0:.0f}s"
    )


if kind == "span":
    demo_answer()
    raise SystemExit(0)

# The demo: a held-out example of printable ASCII (for tags, the one with most kinds of tag), with
# the model's answer under it; a line break shows as one character, so that the columns line up
ascii_only = [e for e in val_examples if all(32 <= b < 127 or b == 10 for b in e.ids[1:-1])]
candidates = ascii_only or val_examples
demo = candidates[0]
if kind == "token":
    demo = max(candidates, key=kinds_of_tag)
with torch.no_grad():
    guess = model.eval()(**collate([demo], kind, cfg, device)).logits.argmax(-1)[0].tolist()
text = bytes(demo.ids[1:-1]).decode(errors="replace").replace("\n", "⏎")
log(f"demo, held out: {text}")
if kind == "sequence":
    log(f"     model says: {labels[guess]}; the answer: {labels[demo.target]}")
elif len(labels) <= 10:  # a digit per byte: the index of its tag
    log(f"     model tags: {''.join(str(g) for g in guess[1:-1])}")
    log(f"     the answer: {''.join(str(t) for t in demo.target[1:-1])}")
    log("     tags: " + ", ".join(f"{i} {label}" for i, label in enumerate(labels)))
log("held-out F1 per label: " + ", ".join(f"{k} {v:.3f}" for k, v in results["val_f1"].items()))
f1 = f", macro-F1 {results['val_macro_f1']:.2%}"
log(
    f"final: held-out accuracy {results['val_acc']:.2%}{f1} ({args.task or args.train}, {cfg.arch} "
    f"{start}); best {best:.2%}; {step} steps, {time.time() - t0:.0f}s"
)
