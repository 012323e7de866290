"""What train.py and finetune.py share about a run: vector math that replays, a one-line error,
flags checked as they are parsed, a run's folder never overwritten and its flags kept on resume,
checkpoints written whole and read back, the metrics log, and stopping cleanly on Ctrl-C or
SIGTERM; train.py's closing demo."""

import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
import signal
import sys
import threading
from argparse import SUPPRESS, ArgumentParser, ArgumentTypeError, Namespace
from typing import Optional

import numpy as np
import torch

import tinyencoder as te
from data.corpus import TEMPORARY, printable, renamed_into_place

try:
    import fcntl  # a run's lock on its folder (Metrics)
except ImportError:
    fcntl = None


def settle_vector_math():
    """Pick the CPU's vector math kernels on one thread, before any call that threads share. The
    oneMKL 2024.2 in torch 2.13.0's x86 CPU wheel picks each function's kernel at its first call;
    when two threads make that call together, one thread's share can run a low-accuracy kernel: a
    fresh process's first sin, tanh or sqrt of 8192 values was off by over 1e-6 (sin: 1.5e-4) in
    up to 11 of 30 processes here (none in some tries: a race), and a run no longer replayed
    (pytorch/pytorch#188792). A one-element call of each picks the right kernel first: RoPE's and
    train.py's sin and cos, the poolers' tanh, AdamW's sqrt, and exp and log."""
    for dtype in (torch.float32, torch.float64):
        for function in (torch.sin, torch.cos, torch.tanh, torch.sqrt, torch.exp, torch.log):
            function(torch.ones(1, dtype=dtype))


def die(message: str):
    """Stop with one line on stderr and no traceback: bad input is the user's to fix, not a bug."""
    sys.exit(printable(f"error: {message}"))  # a path's bytes that are not UTF-8 as \x escapes


class Parser(ArgumentParser):
    """argparse's, but a bad flag is one line on stderr, as every other error of a run is."""

    def error(self, message: str):
        die(f"{message} (--help lists the flags)")


def number(kind, low, high=math.inf, low_open=False, high_open=False):
    """An argparse type: a kind (int or float) from low to high, an open end leaving that bound
    out. argparse reports a value outside as a one-line usage error that names the flag."""
    wanted = f"at least {low}"
    if low_open:
        wanted = f"above {low}"
    if high_open:
        wanted += f" and below {high}"
    elif high < math.inf:
        wanted += f" and at most {high}"

    def convert(text: str):
        value = kind(text)
        too_low = value < low or (low_open and value == low)
        too_high = value > high or (high_open and value == high)
        if too_low or too_high or (kind is float and not math.isfinite(value)):
            raise ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    # argparse's "invalid int value" where the text does not parse
    convert.__name__ = kind.__name__
    return convert


# The flags' kinds of number. A count (of steps, rows, an interval) stays below 10^12, where a
# float still holds it exactly; a length leaves a row room for a sentence pair's three specials.
COUNT = number(int, 1, 10**12)
POSITIVE = number(float, 0, low_open=True)
# a learning rate, which an optimizer step takes as a float32: AdamW's first step divides it by
# 1 - beta1 (0.1), and past float32's 3.4e38 the step fails inside
LR = number(float, 0, 1e37, low_open=True)
# minutes: up to ~19 years, whose steps a run can still plan (as an int64 count)
MINUTES = number(float, 0, 10**7, low_open=True)
FRACTION = number(float, 0, 1)
RATE = number(float, 0, 1, low_open=True)
DROPOUT = number(float, 0, 1, high_open=True)
LENGTH = number(int, 16)
# numpy's generators take no seed below 0, and torch's none from 2^64 on, which train.py's seed of
# a step (seed + 1,000,003 x step + rank) must stay under for 10^12 steps: a seed below 2^32 does
SEED = number(int, 0, 2**32 - 1)


def output_file(text: str) -> str:
    """An argparse type: a file to write results to, checked before the work that fills it: a
    file's name (not "", nor one ending in a slash), not a folder, in a folder that exists and takes
    files."""
    folder = os.path.dirname(os.path.abspath(text))
    not_a_file = not os.path.basename(text) or os.path.isdir(text)
    if not_a_file or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ArgumentTypeError(f"cannot write a file at {text}")
    return text


def given_flags(parser: ArgumentParser) -> set:
    """The flags (as args' names) that the command line gives, rather than leaves to a default."""
    defaults = {action.dest: action.default for action in parser._actions}
    for action in parser._actions:
        action.default = SUPPRESS
    try:
        return set(vars(parser.parse_args()))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]


def resumed_args(parser: ArgumentParser, args: Namespace, saved: dict, keep: tuple, fixed: tuple):
    """A resumed run goes on with the flags it was started with (saved), but for keep (what this
    machine decides) and those given again (one given as "auto" takes the run's); those that
    differ are returned, for the log. One of fixed (what the checkpoint itself holds) may not."""
    given = given_flags(parser)
    changed = []
    for name, value in saved.items():
        if name in keep or not hasattr(args, name):
            continue
        if name not in given or getattr(args, name) == "auto":
            setattr(args, name, value)
            continue
        if getattr(args, name) == value:
            continue
        # None: the run left it to its default
        if value is None:
            value = "its default"
        change = f"--{name.replace('_', '-')} {getattr(args, name)} (the run's: {value})"
        if name in fixed:
            die(f"--resume goes on with the run's own model and data, not {change}")
        changed.append(change)
    return changed


def refuse_to_overwrite(out_dir: str):
    """A fresh run never writes over another run's checkpoints: a one-line error, the way on. An
    --out-dir that cannot be a folder (a file, one inside a file, a link to nothing, a name too
    long) is refused before any work."""
    if not out_dir:
        die("--out-dir '' names no folder")
    existing = os.path.abspath(out_dir)
    # lexists: a link to nothing is there, and no folder (exists would walk past it)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        die(f"--out-dir {out_dir!r} cannot be made a folder here: {existing} is not a writable one")
    # a name longer than the file system takes (255 bytes, most often) fails only as it is made
    name_max = os.pathconf(existing, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    names = os.path.relpath(os.path.abspath(out_dir), existing).split(os.sep)
    if any(len(os.fsencode(name)) > name_max for name in names):
        die(f"--out-dir {out_dir!r} cannot be made a folder here: a name over {name_max} bytes")
    anew = "to start anew, remove it or choose another --out-dir"
    if os.path.exists(os.path.join(out_dir, "ckpt_last.pt")):
        die(f"--out-dir {out_dir} holds a run (ckpt_last.pt): --resume continues it; {anew}")
    # a best checkpoint alone (the last one removed) is a run's result, and nothing to resume
    if os.path.exists(os.path.join(out_dir, "ckpt_best.pt")):
        die(f"--out-dir {out_dir} holds a run's ckpt_best.pt, no ckpt_last.pt to resume: {anew}")


def make_out_dir(out_dir: str):
    """--out-dir made, or a one-line error where the file system will not (no space, no inodes,
    /proc): refuse_to_overwrite has checked all that a look can tell."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        die(f"--out-dir {out_dir!r} cannot be made a folder here ({e.strerror})")


# check_step_fits' and stops_plainly's advice, where a step does not fit
LOWER = "lower them (--grad-accum adds up steps)"


def check_step_fits(sizes, tokens, cfg, device, advice=LOWER, held=1):
    """A one-line error, before any work, where a training step over tokens cannot fit in the
    device's memory: each layer keeps at least its input, tokens x hidden values of 2 bytes or
    more, for the backward. (Without it, a mistyped --batch-size swaps the machine for minutes.)
    held: the micro-batches a step holds at once (train.py's --grad-accum), each token's id, label
    and document id at least (8 bytes each): 10^8 of them ended in an allocator's traceback."""
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    elif "SC_PHYS_PAGES" in getattr(os, "sysconf_names", {}):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    inputs = tokens * held * 24
    if held > 1 and inputs > memory:
        kept = beyond(inputs, memory)
        die(
            f"--grad-accum {held}: a step holds its micro-batches' inputs at once, {kept}; lower it"
        )
    floor = tokens * cfg.hidden * cfg.layers * 2
    if floor > memory:
        die(f"{sizes}: a training step keeps {beyond(floor, memory)}; {advice}")


def torchrun_ranks() -> tuple[int, int]:
    """This process's rank and the number of processes, as torchrun sets them (RANK, WORLD_SIZE),
    0 and 1 without torchrun; a one-line error where they, or where to meet (MASTER_ADDR,
    MASTER_PORT), are missing, or they are not whole numbers that fit."""
    if "RANK" not in os.environ:
        return 0, 1
    # PyTorch's env:// start reads all four
    missing = [
        name for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ
    ]
    if missing:
        die(f"RANK is set, but not {', '.join(missing)}: torchrun sets them all")
    rank, world = os.environ["RANK"], os.environ["WORLD_SIZE"]
    if not (rank.isdigit() and world.isdigit() and int(rank) < int(world)):
        die(f"RANK={rank!r} and WORLD_SIZE={world!r}: torchrun sets 0 <= RANK < WORLD_SIZE")
    if int(rank) > 0:
        sys.excepthook = functools.partial(peer_stopped, sys.excepthook)
    return int(rank), int(world)


def peer_stopped(python_hook, kind, error, trace):
    """An error past rank 0 that says another process is gone: one line, not gloo's traceback.
    Rank 0 alone evaluates and writes, and stops with its own line where that fails (a NaN, a
    full disk); the others learn of it at their next collective. Any other error as Python shows
    it (NCCL's collectives wait instead, until torchrun stops the others)."""
    gone = ("closed by peer", "reset by peer", "Broken pipe")  # gloo's words
    if issubclass(kind, RuntimeError) and any(words in str(error) for words in gone):
        # gloo's own sentence, without the source file it starts with: which peer, which address
        said = str(error).split("] ", 1)[-1].split(". ")[0]
        also = "its own error, where it printed one, is above"
        print(
            f"error: another process is gone ({said}); this one stops too ({also})", file=sys.stderr
        )
        return
    python_hook(kind, error, trace)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """What a step seeds torch with before it draws (its dropout): a function of the run's --seed,
    the step and the process alone, so that a resumed run draws what the uninterrupted one would,
    and no two steps or processes draw alike (1,000,003: a prime above any process count)."""
    return seed + 1_000_003 * step + rank


def beyond(needed: int, memory: int) -> str:
    """check_step_fits' figures: "N GiB or more, over the M GiB here"."""
    return f"{needed / 2**30:,.0f} GiB or more, over the {memory / 2**30:,.0f} GiB here"


def stops_plainly(sizes: str, advice=LOWER):
    """A decorator for a run's step: where the step fails for want of memory (past
    check_step_fits' floor), or torch.compile fails (inductor needs a working C++ compiler, and
    triton on a GPU), a one-line error that names the cause and the flag to change, not a
    traceback from inside. The step's own errors go on up. sizes: the flags that size a step, and
    advice what to do with them, as check_step_fits'."""

    def decorate(step):
        @functools.wraps(step)
        def step_or_die(*args, **kwargs):
            try:
                return step(*args, **kwargs)
            except RuntimeError as error:
                if is_out_of_memory(error):
                    cause = gist(str(error))
                    die(f"{sizes}: a training step does not fit in memory here ({cause}); {advice}")
                # inductor's errors are of this class (torch._dynamo is imported by then)
                from torch._dynamo.exc import BackendCompilerFailed

                if isinstance(error, BackendCompilerFailed):
                    # what the compiler raised; the error's own first line names only the backend
                    inner = error.inner_exception
                    cause = gist(f"{type(inner).__name__}: {inner}")
                    die(f"torch.compile failed ({cause}); --no-compile trains eager")
                raise

        return step_or_die

    return decorate


def gist(message: str) -> str:
    """An error's first two sentences (CUDA's go on for a paragraph), without the CPU allocator's
    "[enforce fail at alloc_cpu.cpp:127] err == 0"."""
    sentences = message.splitlines()[0].split(". ")
    return ". ".join([s for s in sentences if not s.startswith("[enforce")][:2])


def is_out_of_memory(error: RuntimeError) -> bool:
    """CUDA's OutOfMemoryError, or another allocator's RuntimeError: the CPU's, MPS's, CUDA's."""
    # the CPU's allocator says the first; MPS's and a CUDA library's (cuBLAS...) the second
    said = ("can't allocate memory", "out of memory")
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(s in text for s in said)


def device_or_die(name: str) -> str:
    """name, or for "auto" the first of cuda, mps and cpu that this machine has; a one-line error
    where it lacks the one named."""
    available = dict(
        cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True
    )
    if name == "auto":
        return next(kind for kind, here in available.items() if here)
    if not available[name]:
        die(f"--device {name} is not available here")
    return name


def stop_if_diverged(figures: dict, step: int, ckpt_path: str) -> dict:
    """figures (a step's loss, or an evaluation's results), unless a number among them is not
    finite: then the run stops, naming the checkpoint to go back to, if any. Read before the step
    writes any checkpoint: a held-out loss that is not finite is an update that broke the weights,
    which the training loss, computed before it, does not show."""
    broken = [f"{name} {value}" for name, value in figures.items() if not_finite(value)]
    if broken:
        kept = "no checkpoint yet"
        if os.path.exists(ckpt_path):
            kept = f"the last good checkpoint is {ckpt_path}"
        die(f"{', '.join(broken)} at step {step}: stopped; {kept}")
    return figures


def not_finite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def save_checkpoint(path: str, state: dict):
    """Atomic: a kill at any moment leaves the old file whole. state holds only tensors and plain
    values, so that it loads with weights_only=True (no code runs on load)."""
    try:
        with renamed_into_place(path) as temporary, open(temporary, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        # a full disk: torch.save's own error says "enforce fail at inline_container.cc"
        reason = (str(e) or type(e).__name__).splitlines()[0][:160]
        if isinstance(e, RuntimeError) and "inline_container" not in reason:
            raise
        die(f"could not write {path} (is the disk full? {type(e).__name__}: {reason})")


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
    try:
        return state, config_from_saved(state["cfg"])
    except (TypeError, ValueError) as e:  # a field this version lacks, or a value it refuses
        die(f"{flag} {path}: its config is not one this tinyencoder.py takes ({e})")


def load_weights(model, path: str, flag: str):
    """A checkpoint's weights into model, or one line where they are another architecture's or
    size's: torch's last line names a parameter that differs."""
    source, _ = load_checkpoint(path, flag)
    try:
        model.load_state_dict(source["model"])
    except RuntimeError as e:
        reason = str(e).splitlines()[-1].strip()
        if len(reason) > 240:  # a list of keys: its first ones, each whole
            reason = reason[:240].rsplit(", ", 1)[0] + ", ..."
        die(f"{flag} {path}: not this model's weights ({reason})")


def check_resumed(checkpoint: dict, global_batch: int, split: str, max_steps, given=()):
    """A resumed run takes as many rows a step as the run did (the step numbers the rows), and
    stops at --max-steps, if given again, no earlier than the step it resumes at; a run that stops
    at --max-steps takes no --time-budget (given: given_flags'), even the default's 9.5, nor one
    that took every step its budget planned. A fresh run's checkpoint is {}."""
    rows = checkpoint.get("global_batch", global_batch)
    if rows != global_batch:
        how = "resume with the run's processes, --batch-size and --grad-accum"
        die(f"--resume: the run took {rows} rows a step, this one {global_batch} ({split}): {how}")
    step = checkpoint.get("step", 0)
    if max_steps is not None and max_steps < step:
        die(f"--resume: the run is at step {step}, past --max-steps {max_steps}")
    budget_again = "time_budget" in given
    if max_steps is not None and budget_again:
        die(f"--resume: the run stops at --max-steps {max_steps}, and reads no --time-budget")
    # a fitted run that took every step it planned has no budget left to plan: its LR is at 0
    if max_steps is None and budget_again and step and step == checkpoint.get("max_steps"):
        further = "--max-steps takes it further (with --lr-steps; past its schedule, LR 0)"
        die(f"--resume: the run took all {step} steps it planned, its schedule over; {further}")


# Fields that older checkpoints record and Config no longer has; none changed a weight
# (sparse_prediction only the speed; nothing read static_masking; mlm_rate is the recipe's now), so
# such a checkpoint loads as it was.
RETIRED_FIELDS = ("sparse_prediction", "static_masking", "mlm_rate")


def config_from_saved(saved: dict) -> te.Config:
    """The Config a checkpoint recorded (asdict(cfg)), less the retired fields."""
    return te.Config(**{name: value for name, value in saved.items() if name not in RETIRED_FIELDS})


def dropouts(arch: str, rate: float) -> dict:
    """train.py's --dropout: rate for each dropout of the family's transformers model. BERT's and
    RoBERTa's MLP has none of its own: mlp_dropout stays 0, or the model could not be exported."""
    names = [
        field.name for field in dataclasses.fields(te.Config) if field.name.endswith("dropout")
    ]
    if arch != "modernbert":
        names.remove("mlp_dropout")
    return dict.fromkeys(names, rate)


def sinusoids(table, offset, amplitude=0.1):
    """Vaswani et al.'s sinusoids, scaled, into a learned position table from row offset on."""
    position = torch.arange(table.shape[0] - offset, device=table.device)[:, None]
    rate = 10000.0 ** (-torch.arange(0, table.shape[1], 2, device=table.device) / table.shape[1])
    with torch.no_grad():
        table[offset:, 0::2] = amplitude * torch.sin(position * rate)
        table[offset:, 1::2] = amplitude * torch.cos(position * rate)


class Metrics:
    """metrics.jsonl in the run's folder, a JSON object a line: a fresh run starts it anew, a
    resumed one appends to it. The run holds it open and locked while it lives, so that a second
    run on the same --out-dir (started before the first has saved a checkpoint, or a second
    --resume) is refused before it writes anything, instead of writing over the first."""

    def __init__(self, out_dir: str, resumed_step: Optional[int]):
        """resumed_step: the checkpoint's step, where the run resumes; None for a fresh run."""
        self.path = os.path.join(out_dir, "metrics.jsonl")
        try:
            self.file = open(self.path, "a")
        except OSError as e:  # before any work: the checkpoints could not be written either
            die(f"cannot write {self.path} ({e.strerror})")
        lock_run_folder(self.file, out_dir)
        if resumed_step is None:  # a run that saved and ended since this one's first check
            refuse_to_overwrite(out_dir)
        if not os.access(out_dir, os.W_OK):  # a resumed run would lose its steps at its first save
            die(f"--out-dir {out_dir} is not writable: no checkpoint could be saved in it")
        # what a run killed as it saved left (no other run writes in a folder this one has locked)
        checkpoints = os.path.join(glob.escape(out_dir), "ckpt_*.pt")
        for leftover in glob.glob(TEMPORARY.format(path=checkpoints, pid="*")):
            os.remove(leftover)
        kept = 0
        if resumed_step is not None:
            with open(self.path, "rb") as f:
                kept = kept_bytes(f.read().splitlines(keepends=True), resumed_step)
        self.file.truncate(kept)

    def write(self, record: dict):
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk, a read-only folder: the checkpoint's write says more
            print(f"could not write {self.path} ({e.strerror}); going on", file=sys.stderr)


def kept_bytes(lines: list, resumed_step: int) -> int:
    """How much of metrics.jsonl a run resumed at resumed_step keeps: up to its last whole record
    of a step at most that. A line cut short by a kill goes, and so do the records written after
    the checkpoint (a kill before its save): the resumed run writes them again."""
    for i in reversed(range(len(lines))):
        if lines[i].endswith(b"\n") and record_step(lines[i]) <= resumed_step:
            return sum(len(line) for line in lines[: i + 1])
    return 0


def record_step(line: bytes) -> float:
    """The step of one line of metrics.jsonl; inf where the line is no record of a step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def lock_run_folder(file, out_dir: str):
    """An advisory lock on the open file: the system drops it when the process ends, however it
    ends, so a run that crashed never leaves its folder locked. Where there is no flock
    (Windows) or the file system has no locks, runs go unguarded, as before."""
    if fcntl is None:
        return
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        die(f"--out-dir {out_dir} is in use: another run is writing {file.name}")
    except OSError:
        pass


class StopSignals:
    """Ctrl-C and SIGTERM ask the loop to stop after the step in flight, so that it can save first;
    a second stops as soon as Python runs, a third at once."""

    def __init__(self):
        self.received = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.on_signal)
        self.wakeup = self.watch()

    def watch(self) -> Optional[int]:
        """Python runs a handler only once the native call in flight returns (one attention call
        over a long row, a collective that waits for a process that is gone): a thread hears each
        signal as it comes, through the number that signal.set_wakeup_fd's file gets, and ends the
        process at the third. Returns that file's write end; None off POSIX (no watcher)."""
        if os.name != "posix":  # Windows: os.set_blocking on a pipe from Python 3.12 on only
            return None
        read, write = os.pipe()
        os.set_blocking(write, False)
        self.previous = signal.set_wakeup_fd(write)
        # a forked child (a DataLoader's worker) gets the same Ctrl-C: its own, not one more here.
        # Held back across fork: a child that took one before letting go of the wakeup file
        # would write it into this process's count (one Ctrl-C and two workers made three).
        os.register_at_fork(
            before=self.hold, after_in_parent=self.release, after_in_child=self.forget
        )
        threading.Thread(target=self.count, args=(read,), daemon=True).start()
        return write

    def hold(self):
        """Before fork: SIGINT and SIGTERM wait (pending, not lost) in the thread that forks."""
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))

    def release(self):
        """After fork: the signals held back arrive, in the parent or (after forget) the child."""
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)

    def forget(self):
        """In a forked child: the parent's wakeup file no longer, where it still is the one set."""
        try:
            with contextlib.suppress(ValueError):  # forked from a thread other than the main one
                current = signal.set_wakeup_fd(-1)
                if current != self.wakeup:
                    signal.set_wakeup_fd(current)
        finally:
            self.release()

    def count(self, read: int):
        """The watcher: each signal's number as it comes, the third SIGINT or SIGTERM the end."""
        # none is delivered to this thread: the main thread gets each, and a blocking call of its
        # that a signal interrupts lets Python run the handler (here it would wait for the next)
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        heard = 0
        while number := os.read(read, 1):
            if number[0] in (signal.SIGINT, signal.SIGTERM):
                heard += 1
            if heard == 3:
                name = signal.Signals(number[0]).name
                # os.write and os._exit: whatever the main thread holds, nothing waits for it
                os.write(2, f"error: stopped at once by a third signal ({name})\n".encode())
                os._exit(128 + number[0])
        os.close(read)

    def close(self):
        """No watcher any more (its thread ends), the wakeup file set before back: for a test's
        StopSignals. Twice is once."""
        if self.wakeup is not None:
            signal.set_wakeup_fd(self.previous)
            os.close(self.wakeup)
            self.wakeup = None

    def on_signal(self, signum, frame):
        self.received.append(signum)
        name = signal.Signals(signum).name
        if len(self.received) == 1:
            print(
                f"{name}: stopping after the step in flight; a second stops sooner", file=sys.stderr
            )
            return
        # a third stops the process whatever it runs (a collective, a compile); this second one
        # stops when Python next runs, through `finally` blocks that remove half-written files
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, signal.SIG_DFL)
        die(f"stopped by a second signal ({name}); the checkpoints on disk are whole")


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
    print(printable(f"demo, held out : {show(ids, hide)}"))
    print(printable(f"     model fills: {show(guess, torch.zeros_like(hide))}"))
    print(printable(f"     original   : {show(ids, torch.zeros_like(hide))}"))
