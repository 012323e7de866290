"""train.py end to end: exact resume, torchrun against one process, one-line errors, and learned
positions that learn word order."""

import contextlib
import dataclasses
import errno
import io
import json
import math
import os
import random
import re
import signal
import string
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_python, run_without, tiny_checkpoint


# -------------------------------------------------------------------------------------------------
# train.py end to end: exact resume; two processes under torchrun match one with the same batch
def _corpus(tmp_path):
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        for i in range(6):  # six small documents; train.py holds some out
            (corpus / f"doc{i}.txt").write_bytes(
                (f"document {i}: " + "the quick brown fox. " * 60).encode()
            )
    return corpus


def _launch(tmp_path, *args, torchrun=False, popen=False):
    """train.py on the small corpus (roberta, fp32, unless args say otherwise): the finished run,
    or with popen the running process."""
    corpus = _corpus(tmp_path)
    launcher = [sys.executable]
    if torchrun:  # torchrun's module, so that it is this Python's with or without its venv on PATH
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = launcher + [
        "train.py",
        "--arch",
        "roberta",
        "--data",
        str(corpus),
        "--log-interval",
        "1",
        "--eval-seqs",
        "4",
        "--dtype",
        "float32",  # unless args say otherwise
        *map(str, args),
    ]
    here = str(Path(__file__).parent)
    if popen:  # running, its output to be read line by line
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=here)
    if torchrun:
        # torchrun keeps its processes' logs in a folder of TMPDIR's, and leaves it behind
        env = {**os.environ, "TMPDIR": str(tmp_path)}
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=here, env=env)
    else:
        run = run_python(cmd)
    return run


def _train(tmp_path, *args, torchrun=False, popen=False):
    """_launch's run, which must end well: its step losses (popen: the running process)."""
    run = _launch(tmp_path, *args, torchrun=torchrun, popen=popen)
    if popen:
        return run
    assert run.returncode == 0, run.stderr[-2000:]
    return step_losses(run.stdout)


def step_losses(stdout) -> list:
    """The training losses a train.py or finetune.py run printed, step by step."""
    return [float(x) for x in re.findall(r"^step\s+\d+/\d+ \| loss (\S+)", stdout, re.M)]


def step_lrs(stdout) -> list:
    """The learning rates a train.py or finetune.py run printed, step by step."""
    return [float(x) for x in re.findall(r"^step .*\| lr (\S+) \|", stdout, re.M)]


def test_an_interrupted_step_is_evaluated_before_the_run_stops(tmp_path):
    """Ctrl-C on a step due an evaluation: the run evaluates it, then saves and stops; resumed, it
    has the metrics and best checkpoint of a run never interrupted."""
    # no checkpoint due before the end: the interrupted run saves because it is interrupted
    flags = ["--max-steps", 16, "--eval-interval", 1, "--ckpt-interval", 100]
    flags += ["--batch-size", 3, "--context", 32]
    _train(tmp_path, *flags, "--out-dir", tmp_path / "a")
    proc = _train(tmp_path, *flags, "--out-dir", tmp_path / "b", popen=True)
    stopped = False
    for line in proc.stdout:
        if re.match(r"step\s+3/16", line):  # one Ctrl-C: a second one stops sooner, unsaved
            proc.send_signal(signal.SIGINT)
        stopped = stopped or line.startswith("interrupted after step")
    assert proc.wait(timeout=120) == 0 and stopped
    # as if killed after one more evaluation's record, before its checkpoint, and in the next's
    saved = torch.load(tmp_path / "b" / "ckpt_last.pt", weights_only=True)["step"]
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": saved + 1, "val_loss": 0.0}) + '\n{"step": 5, "val_lo')
    (tmp_path / "b" / "ckpt_last.pt.99999.tmp").write_bytes(b"half a checkpoint")
    _train(tmp_path, "--resume", "--out-dir", tmp_path / "b")
    assert not list((tmp_path / "b").glob("*.tmp"))
    assert_same_evaluations(tmp_path / "a", tmp_path / "b", "val_loss")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_resume_is_exact(tmp_path, dtype):  # with dropout on: its masks must replay too
    import tinyencoder as te
    import tinyencoder_hf

    flags = ["--dropout", 0.1, "--dtype", dtype]
    whole = _train(tmp_path, "--max-steps", 4, *flags, "--out-dir", tmp_path / "a")
    first = _train(tmp_path, "--max-steps", 2, *flags, "--out-dir", tmp_path / "b")
    # with --dtype auto, the resumed run takes its dtype from the checkpoint
    rest = _train(
        tmp_path, "--max-steps", 4, "--dtype", "auto", "--out-dir", tmp_path / "b", "--resume"
    )
    assert len(whole) == 4 and first + rest == whole
    # --dropout: each of RoBERTa's dropouts, none in its MLP (transformers' has none): it exports
    cfg = te.Config(**torch.load(tmp_path / "a" / "ckpt_last.pt", weights_only=True)["cfg"])
    assert (cfg.attn_dropout, cfg.resid_dropout, cfg.mlp_dropout) == (0.1, 0.1, 0.0)
    assert tinyencoder_hf.config_to_hf(cfg)["attention_probs_dropout_prob"] == 0.1
    # the evaluation's figures: an accuracy in [0, 1], bits per byte as the loss in nats / ln 2
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert records and all(0 <= r["val_acc"] <= 1 for r in records), records
    assert all(r["val_bpb"] == pytest.approx(r["val_loss"] / np.log(2), rel=1e-4) for r in records)


@pytest.mark.parametrize(
    "arch, lrs, over",
    [
        # 2 steps of warmup to 1e-3, then down to 0 at step 10 (the LR each step trains at)
        (
            "roberta",
            [5e-4, 1e-3, 1e-3, 8.75e-4, 7.5e-4, 6.25e-4, 5e-4, 3.75e-4, 2.5e-4, 1.25e-4],
            [],
        ),
        # warmup, stable, then down over the last 20 % (the default --decay): WSD
        ("modernbert", [5e-4] + [1e-3] * 8 + [5e-4], []),
        # past the schedule's end, LR 0, also where warmup fills it (step 10 trained at the peak)
        ("bert", [i * 1e-4 for i in range(1, 11)] + [0, 0], ["--warmup", 1, "--max-steps", 12]),
        # and where the decay is shorter than a step (step 10 trained at half the peak), with
        # 1.5 steps of warmup rounded to 2
        (
            "modernbert",
            [5e-4] + [1e-3] * 9 + [0],
            ["--decay", 0.05, "--max-steps", 11, "--warmup", 0.15],
        ),
    ],
)
def test_the_lr_schedule_step_by_step(tmp_path, arch, lrs, over):
    flags = ["--arch", arch, "--max-steps", 10, "--lr-steps", 10, "--lr", "1e-3", "--warmup", 0.2]
    # ModernBERT's --decay is left to its default, the last 20 %
    flags += ["--batch-size", 2, "--context", 32, "--out-dir", tmp_path / "run"]
    flags += over  # argparse keeps a flag's last value
    proc = _train(tmp_path, *flags, popen=True)
    printed = proc.stdout.read()
    logged = step_lrs(printed)
    assert proc.wait(timeout=120) == 0
    # every recipe masks 30 % of the bytes at the CPU sizes, ModernBERT's at every size
    assert "-step schedule, masking 30%;" in printed, printed[-2000:]
    assert logged == pytest.approx(lrs, rel=1e-3), logged


def train_recipes() -> dict:
    """train.py's SIZES and RECIPES, run from its source above its flags: importing train.py would
    run a training job."""
    source = (Path(__file__).parent / "train.py").read_text()
    names = {}
    exec(source.split("\n# Arguments.")[0], names)
    return names


def test_the_recipes_are_the_papers_at_base_and_large():
    """BERT: peak 1e-4, 1 % warmup, betas (0.9, 0.999), decay 0.01, 15 % masking; RoBERTa: its
    peaks and 24k and 30k of 500k steps warming up, betas (0.9, 0.98); ModernBERT: 30 % masking,
    StableAdamW's 1e-5, WSD, 1024 bytes. Tiny, the CPU's size, is 4 layers of 128."""
    names = train_recipes()
    recipes = names["RECIPES"]
    papers = {
        "bert": dict(lr=dict(base=1e-4, large=1e-4), warmup=dict(base=0.01, large=0.01)),
        "roberta": dict(lr=dict(base=6e-4, large=4e-4), warmup=dict(base=0.048, large=0.06)),
        "modernbert": dict(lr=dict(base=8e-4, large=5e-4), warmup=dict(base=0.05, large=0.05)),
    }
    for arch, tables in papers.items():
        for name, paper in tables.items():
            table = getattr(recipes[arch], name)
            assert {size: table[size] for size in paper} == paper, (arch, name, table)
    for arch, rate in dict(bert=0.15, roberta=0.15, modernbert=0.3).items():
        assert recipes[arch].mlm_rate["base"] == rate, arch
        assert recipes[arch].mlm_rate["large"] == rate, arch
    bert, roberta, modern = recipes["bert"], recipes["roberta"], recipes["modernbert"]
    assert bert.betas == (0.9, 0.999)
    assert roberta.betas == (0.9, 0.98) and modern.betas == (0.9, 0.98)
    assert bert.weight_decay == 0.01 and roberta.weight_decay == 0.01
    assert modern.weight_decay == 1e-5 and modern.decoupled_decay and modern.schedule == "wsd"
    assert bert.context == 512 and modern.context == 1024
    assert names["SIZES"]["tiny"] == dict(hidden=128, layers=4, heads=4)


def planned(proc) -> str:
    """The line a running train.py plans its steps in (empty where it stopped first); the run is
    stopped there."""
    plan = next((line for line in proc.stdout if line.startswith("training steps")), "")
    proc.kill()
    proc.wait(timeout=60)
    return plan


def test_modernbert_past_1024_bytes_extends_its_context_as_the_paper_does(tmp_path):
    """ModernBERT's context extension, past --context 1024 only: RoPE theta 160k, a peak of 3e-4
    and a 1-sqrt decay (half the schedule decaying: the last of 4 steps at 1 - sqrt(1/2) of the
    peak). At 1024, phase 1's peak, and warmup and decay that fill the schedule are no overlap."""
    flags = ["--arch", "modernbert", "--batch-size", 1, "--max-steps", 4, "--lr-steps", 4]
    flags += ["--warmup", 0.25, "--decay", 0.5]
    run = _launch(tmp_path, *flags, "--context", 1025, "--out-dir", tmp_path / "long")
    assert run.returncode == 0, run.stderr[-2000:]
    lrs = step_lrs(run.stdout)
    assert lrs == pytest.approx([3e-4] * 3 + [3e-4 * (1 - math.sqrt(0.5))], rel=1e-3), lrs
    cfg = torch.load(tmp_path / "long" / "ckpt_last.pt", weights_only=True)["cfg"]
    assert cfg["rope_theta"] == 160000.0
    # warmup and decay together the whole schedule
    at_1024 = ["--context", 1024, "--warmup", 0.5, "--out-dir", tmp_path / "o"]
    proc = _train(tmp_path, *flags, *at_1024, popen=True)
    assert "peak lr 0.002 on a 4-step schedule" in planned(proc)


def test_gradient_accumulation_matches_one_batch(tmp_path):
    """Two micro-batches of 4 step as one batch of 8: each micro-batch's loss weighs by its share
    of the masked bytes (NSP's rows under DDP: test_torchrun_two_processes_match_one)."""
    flags = ["--max-steps", 2, "--context", 32]
    one = _train(tmp_path, *flags, "--batch-size", 8, "--out-dir", tmp_path / "a")
    two = _train(
        tmp_path, *flags, "--batch-size", 4, "--grad-accum", 2, "--out-dir", tmp_path / "b"
    )
    assert len(one) == 2 and one == pytest.approx(two, abs=1e-5), (one, two)


def test_a_finished_run_resumed_has_nothing_left_to_do(tmp_path):
    """--resume of a run at its --max-steps: no step more, its final line, and its best
    checkpoint's record kept (a resumed run's best loss is the run's, not infinity)."""
    run_dir = tmp_path / "run"
    _train(tmp_path, "--max-steps", 2, "--context", 32, "--batch-size", 2, "--out-dir", run_dir)
    state = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    state.update(best=-1.0)  # as if a better one had been seen
    torch.save(state, run_dir / "ckpt_last.pt")
    (run_dir / "ckpt_best.pt").write_bytes(b"the run's best")
    resumed = _train(tmp_path, "--resume", "--out-dir", run_dir, "--max-steps", 3)
    assert len(resumed) == 1
    assert (run_dir / "ckpt_best.pt").read_bytes() == b"the run's best"  # -1 beats any loss
    cmd = [sys.executable, "train.py", "--resume", "--out-dir", run_dir, "--max-steps", 3]
    again = run_python(cmd)
    assert again.returncode == 0 and "; 3 steps, " in again.stdout, again.stderr[-2000:]
    assert not re.search(r"^step ", again.stdout, re.M)


def test_a_run_logs_evaluates_and_saves_on_its_intervals_and_at_its_end(tmp_path):
    """10 steps: logged every --log-interval and at the last; evaluated every ceil(10 / 4) steps,
    none within half an interval of the last, which is; saved at the last, its best the least
    val_loss; tokens counted over micro-batches; on a CPU, 128 bytes and no dropout. Resumed: at
    --max-steps, past its time budget it still takes every step, along its saved schedule."""
    run_dir = tmp_path / "run"
    flags = ["--max-steps", 10, "--batch-size", 2, "--grad-accum", 2, "--log-interval", 3]
    run = _launch(tmp_path, *flags, "--ckpt-interval", 4, "--out-dir", run_dir)
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.findall(r"^step\s+(\d+)/10 \|", run.stdout, re.M) == ["3", "6", "9", "10"]
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [record["step"] for record in records] == [3, 6, 10], records
    assert all(record["tokens"] == record["step"] * 4 * 128 for record in records), records
    state = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    assert state["step"] == 10 and state["best"] == min(r["val_loss"] for r in records)
    assert state["args"]["context"] == 128
    dropouts = [state["cfg"][name] for name in ("embed_dropout", "attn_dropout", "resid_dropout")]
    assert dropouts == [0.0, 0.0, 0.0]
    # as if the run had spent far more than its budget, --max-steps alone ends it; and as if it
    # had fitted an 11-step schedule, the resumed run keeps it: its step 12 trains at LR 0
    state.update(elapsed_s=1e9, lr_steps=11)
    torch.save(state, run_dir / "ckpt_last.pt")
    cmd = [sys.executable, "train.py", "--resume", "--out-dir", run_dir, "--max-steps", 12]
    resumed = run_python(cmd)
    assert resumed.returncode == 0 and "; 12 steps, " in resumed.stdout, resumed.stderr[-2000:]
    assert re.search(r"^step\s+12/12 .*\| lr 0\.00e\+00 \|", resumed.stdout, re.M), resumed.stdout


def test_an_evaluation_is_the_same_at_any_batch_size_and_training_rate(tmp_path):
    """Held-out figures of two BERT runs whose rate leaves the weights as they were: the same with
    --batch-size 2 or 4 (each row read once, batches weighed by masked bytes, NSP by rows), dropout
    off, at 15 % whatever --mlm-rate. AdamW: betas (0.9, 0.999), eps 1e-6, decay 0.01 on matrices
    only."""
    import tinyencoder as te

    flags = ["--arch", "bert", "--max-steps", 1, "--lr", 1e-12, "--dropout", 0.1, "--context", 32]
    runs = {"a": ["--batch-size", 2], "b": ["--batch-size", 4, "--mlm-rate", 0.6]}
    for name, given in runs.items():
        _train(tmp_path, *flags, "--eval-seqs", 5, *given, "--out-dir", tmp_path / name)
    a, b = (json.loads((tmp_path / name / "metrics.jsonl").read_text()) for name in runs)
    for key in ("val_loss", "val_acc", "nsp_acc"):
        assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a, b)
    state = torch.load(tmp_path / "a" / "ckpt_last.pt", weights_only=True)
    parameters = list(te.TinyEncoder(te.Config(**state["cfg"])).parameters())
    matrices = [p for p in parameters if p.ndim >= 2]
    decayed, plain = state["optim"]["param_groups"]
    assert len(decayed["params"]) == len(matrices)
    assert len(plain["params"]) == len(parameters) - len(matrices)
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert tuple(decayed["betas"]) == (0.9, 0.999) and decayed["eps"] == 1e-6


def test_bert_s_dupe_factor_reaches_its_static_masks(tmp_path):
    """BERT's static masks: with --dupe-factor 1 the second epoch repeats the first's masks, with
    the default it draws others; the first epoch is the same either way. Of the small corpus's
    200 to 300 pairs, two steps read the first epoch, the third into the second."""
    flags = ["--arch", "bert", "--max-steps", 3, "--batch-size", 100, "--context", 32]
    once = _train(tmp_path, *flags, "--dupe-factor", 1, "--out-dir", tmp_path / "once")
    default = _train(tmp_path, *flags, "--out-dir", tmp_path / "default")
    assert once[:2] == default[:2] and once[2] != default[2], (once, default)


# the suite runs scripts in children of a fork server (conftest.run_python): as a fresh Python would
SHOW = """import os, sys
print(sys.argv, os.getcwd(), os.environ.get("PROBE"), sys.path[0], __name__)
print("to stderr", file=sys.stderr)
if sys.argv[1] == "raise":
    raise ValueError("raised")
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("how", ["3", "raise"])
def test_a_script_run_forked_runs_as_in_a_fresh_python(tmp_path, monkeypatch, how):
    """Arguments, folder, environment, import path, output and exit code as `python script args`
    gives them; an uncaught error ends in the same traceback line."""
    (tmp_path / "show.py").write_text(SHOW)
    monkeypatch.setenv("PROBE", how)  # set after the fork server started, in the child all the same
    command = [sys.executable, tmp_path / "show.py", how]
    forked = run_python(command, cwd=tmp_path)
    fresh = subprocess.run(list(map(str, command)), capture_output=True, text=True, cwd=tmp_path)
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout), (forked, fresh)
    assert forked.returncode == {"3": 3, "raise": 1}[how] and str(tmp_path) in forked.stdout
    assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1], (forked, fresh)


# a fresh process: its first threaded sin, cos, tanh and sqrt, after runs.settle_vector_math
FIRST_CALLS = """
import torch
from runs import settle_vector_math

settle_vector_math()
inputs = {"sin": (0, 300), "cos": (0, 300), "tanh": (-3, 3), "sqrt": (0, 300)}
for name, (low, high) in inputs.items():
    x = torch.linspace(low, high, 8192)  # four chunks of 2048 values: every thread takes a share
    function = getattr(torch, name)
    first = function(x)  # the call that may race
    error = (first.double() - function(x.double())).abs().max().item()
    print(name, error, torch.equal(first, function(x)))
"""


def test_a_fresh_process_first_vector_math_is_accurate():
    """runs.settle_vector_math: without it, about one fresh process in ten here got a first sin
    off by 1.5e-4 (pytorch/pytorch#188792), and train.py's resumed runs stopped replaying. The
    first call gives what every later call gives; the kernels' own accuracy varies by CPU (an AMD
    EPYC's fp32 sqrt is off by 1.4e-6, 0.74 of a unit in the last place, at every call)."""
    for _ in range(6):  # one process at a time: the error needs two threads starting together
        run = subprocess.run(
            [sys.executable, "-c", FIRST_CALLS],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        found = {name: rest for name, *rest in map(str.split, run.stdout.splitlines())}
        assert len(found) == 4, run.stdout
        assert all(float(error) < 1e-5 and same == "True" for error, same in found.values()), found


def test_bf16_autocast_where_the_machine_measures_it_faster(monkeypatch):
    """train.py's --dtype auto: bf16 on a CPU whose bf16 matmuls measure 1.5x its fp32 ones."""
    import mfu

    peaks = {torch.float32: 100e9, torch.bfloat16: 210e9}  # a 2-core AMD EPYC's, roughly

    def measured(device, dtype):
        return peaks[dtype]

    monkeypatch.setattr(mfu, "measured_peak", measured)
    assert mfu.bf16_pays(torch.device("cpu"))
    peaks[torch.bfloat16] = 40e9  # emulated: no AVX512-BF16 or AMX
    assert not mfu.bf16_pays(torch.device("cpu"))
    assert mfu.bf16_pays(torch.device("cuda")) and not mfu.bf16_pays(torch.device("mps"))


def test_torchrun_two_processes_match_one(tmp_path):  # in fp32: bf16 rounds splits apart
    """BERT: its MLM's masked bytes and NSP's rows weigh alike split over two processes."""
    flags = ["--arch", "bert", "--max-steps", 2]
    one = _train(tmp_path, *flags, "--batch-size", 8, "--out-dir", tmp_path / "a")
    two = _train(tmp_path, *flags, "--batch-size", 4, "--out-dir", tmp_path / "b", torchrun=True)
    assert len(one) == 2 and all(abs(a - b) < 1e-5 for a, b in zip(one, two)), (one, two)


def test_a_stdout_that_cannot_encode_the_demo_still_gets_the_final_line(tmp_path):
    """Windows' cp1252, output into a file: the demo's ⏎ comes out as an escape, where it raised
    UnicodeEncodeError after the last checkpoint and the final line was lost."""
    corpus = tmp_path / "lines"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i}\n" + "a short line\n" * 80)
    flags = ["--max-steps", 2, "--batch-size", 2, "--context", 64, "--out-dir", tmp_path / "o"]
    cmd = [sys.executable, "train.py", "--data", str(corpus)]
    cmd += [*map(str, flags), "--eval-seqs", "4"]
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    here = str(Path(__file__).parent)
    run = subprocess.run(cmd, capture_output=True, timeout=300, cwd=here, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert b"\\u23ce" in run.stdout and b"final: held-out masked-byte accuracy" in run.stdout


def test_a_gone_peer_is_one_line_and_other_errors_are_pythons():
    """peer_stopped, torchrun's processes past rank 0: gloo's error that a peer is gone as one line
    with gloo's own sentence; any other error, an OSError that says "Broken pipe" too, to Python."""
    import runs

    passed = []

    def python_hook(*args):
        passed.append(args[0])

    gone = RuntimeError("[/gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:3. GLHF")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        runs.peer_stopped(python_hook, RuntimeError, gone, None)
    assert err.getvalue().startswith("error: another process is gone (Connection closed by peer [")
    assert err.getvalue().count("\n") == 1 and passed == []
    for error in (BrokenPipeError(32, "Broken pipe"), RuntimeError("CUDA error")):
        runs.peer_stopped(python_hook, type(error), error, None)
    assert passed == [BrokenPipeError, RuntimeError]


def test_torchrun_stops_the_other_process_with_one_line_too(tmp_path):
    """Rank 0 alone evaluates: a NaN there stops it with one line, and the other process, whose
    next collective then fails inside gloo, says so in one line rather than gloo's traceback."""
    flags = ["--max-steps", 5, "--batch-size", 2, "--context", 64, "--eval-seqs", 8]
    flags += ["--eval-interval", 1, "--lr", 1e37, "--warmup", 0, "--out-dir", tmp_path / "o"]
    run = _launch(tmp_path, *flags, torchrun=True)
    assert run.returncode != 0
    assert run.stderr.count("error: val_loss nan, val_bpb nan at step 1: stopped") == 1, run.stderr
    assert "[rank1]: Traceback" not in run.stderr, run.stderr[-3000:]


def byte_corpus(docs):
    """The arrays data/corpus.py makes of documents: their bytes side by side, and where each
    starts (and the last ends)."""
    data = np.frombuffer(b"".join(docs), np.uint8)
    return data, np.cumsum([0] + [len(d) for d in docs])


def test_bert_pairs_take_a_random_b_from_a_line_of_another_document():
    """B starts a line either way, so its first bytes never tell the NSP label: a random B from
    another document, a real one from A's. A one-byte document still gets a B, a random one."""
    from data.rows import sentence_pair

    docs = [b"x"] + [b"".join(b"doc%d line%d\n" % (d, j) for j in range(6)) for d in range(1, 9)]
    data, offsets = byte_corpus(docs)
    labels = []
    for slot in range(40):
        start = slot * 61 % len(data)  # pairs of 61 bytes, from the start of the corpus on
        row = sentence_pair(data, offsets, 64, start, [slot])
        b = bytes(row.ids[row.token_types == 1][:-1].tolist())  # B, its final SEP left out
        a_doc = np.searchsorted(offsets, start, "right") - 1
        b_doc = 0  # the one-byte document, b"x"
        if b != b"x":
            assert re.match(rb"doc\d line", b), (slot, b)
            b_doc = int(b[3:4])
        assert (b_doc != a_doc) == bool(row.nsp_label), (slot, a_doc, b, row.nsp_label)
        labels.append(row.nsp_label)
    assert labels[0] == 1 and 0 in labels  # slot 0: A is the one-byte document


def test_a_random_b_is_as_long_as_a_real_one():
    """Where every document is longer than a pair, no pair is padded: a random B too fills its
    row (it was cut short where its document ended, so that a padded pair was a random one), and
    it still starts a line, as a real B does."""
    from data.rows import sentence_pair

    lines = [
        b"doc%02d line %d %s\n" % (d, j, b"x" * (j * 7 % 13)) for d in range(40) for j in range(12)
    ]
    docs = [b"".join(lines[12 * d : 12 * d + 12]) for d in range(40)]  # 242 bytes and more
    data, offsets = byte_corpus(docs)
    labels = []
    for i in range(600):
        row = sentence_pair(data, offsets, 64, i * 61 % len(data), [7, i])
        b = bytes(row.ids[row.token_types == 1][:-1].tolist())
        assert (row.doc_ids == 1).all(), (i, row.nsp_label, b)
        assert b"\n" + b in data.tobytes(), (i, row.nsp_label, b)  # B starts a line
        labels.append(row.nsp_label)
    assert 0.4 < np.mean(labels) < 0.6


def test_half_of_bert_pairs_have_a_random_second():
    """NSP's labels: B follows A or is random, each half the time, as BERT draws them."""
    from data.rows import sentence_pair

    docs = [b"line %02d of doc\n" % k * 4 for k in range(40)]
    data, offsets = byte_corpus(docs)
    labels = [sentence_pair(data, offsets, 64, 0, [1337, i]).nsp_label for i in range(400)]
    assert 0.4 < np.mean(labels) < 0.6 and set(labels) == {0, 1}


def test_bert_pairs_read_every_document():
    """Each document is cut into pairs on its own: forty of 64 bytes, under pairs of 125 bytes,
    make forty pairs, one from each (on one grid over all bytes, 21 of them were never an A)."""
    from types import SimpleNamespace

    from data.rows import TrainingRows

    docs = [b"line %02d of doc\n" % k * 4 for k in range(40)]
    data, offsets = byte_corpus(docs)
    recipe = SimpleNamespace(inputs="pairs", masking="static")
    rows = TrainingRows(recipe, data, offsets, 128, 1337, 10)
    first = [bytes(rows[i].ids[1:9].tolist()) for i in range(rows.count)]  # A's first bytes
    assert rows.count == 40 and sorted(first) == [b"line %02d " % k for k in range(40)]


def test_packed_rows_hold_no_padding_and_number_their_documents():
    """ModernBERT's packed rows: every token real, document ids from 1, one more at each CLS (a
    row that starts inside a document counts that part as document 1, not as padding)."""
    from types import SimpleNamespace

    from data.rows import CLS, TrainingRows

    docs = [b"document %d. " % k * (3 + k % 5) for k in range(30)]  # 12-90 bytes, rows of 32
    data, offsets = byte_corpus(docs)
    rows = TrainingRows(
        SimpleNamespace(inputs="packed", masking="dynamic"), data, offsets, 32, 0, 1
    )
    starts_inside = 0
    for i in range(rows.count):
        row = rows[i]
        opens = np.cumsum(row.ids == CLS)
        starts_inside += row.ids[0] != CLS
        assert (row.doc_ids > 0).all() and row.doc_ids[0] == 1, row.doc_ids
        assert (np.diff(row.doc_ids) == np.diff(opens)).all(), (row.ids, row.doc_ids)
    assert starts_inside > 0  # the case that keeps its leading part a document


def test_static_masks_repeat_every_dupe_factor_epochs():
    """BERT's static masking: a slot's mask is one of dupe_factor, drawn once: the same in epochs
    e and e + dupe_factor, another in epoch e + 1."""
    from types import SimpleNamespace

    from data.rows import TrainingRows

    docs = [b"line %02d of a document\n" % k * 6 for k in range(12)]
    data, offsets = byte_corpus(docs)
    rows = TrainingRows(SimpleNamespace(inputs="pairs", masking="static"), data, offsets, 64, 7, 3)
    keys = {}  # (epoch, slot) -> mask key
    for i in range(5 * rows.count):
        epoch, j = divmod(i, rows.count)
        keys[epoch, int(rows.order(epoch)[j])] = rows[i].mask_key
    for slot in range(rows.count):
        assert keys[0, slot] == keys[3, slot] and keys[1, slot] == keys[4, slot]
        assert len({tuple(keys[epoch, slot]) for epoch in range(3)}) == 3


# two processes whose nodes hold other files under the same --data: their digests differ
OTHER_DATA = """
import torch.distributed as dist
from data.corpus import check_data

dist.init_process_group("gloo")
check_data({}, {"sha256": str(dist.get_rank())}, "corpus")
"""


def test_processes_that_read_other_data_stop(tmp_path):
    (tmp_path / "check.py").write_text(OTHER_DATA)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "TMPDIR": str(tmp_path)}
    run = subprocess.run(
        [*torchrun, tmp_path / "check.py"], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode != 0
    assert "error: --data corpus holds other bytes on some processes' nodes" in run.stderr


TRAIN_BAD_INPUT = [
    (["--data", "{tmp}/missing"], "no such file or folder"),
    (["--data", ""], "--data '' names no file, folder or glob"),
    (["--data", "{tmp}/empty.txt"], "every file is empty"),
    (["--data", "{tmp}/tiny.txt"], "too few to measure on; give it 1 KB or more"),
    # --data is --out-dir: its files were skipped as the run's own ("no files there")
    (
        ["--data", "{tmp}/held", "--out-dir", "{tmp}/held"],
        "that is --out-dir, where the run writes",
    ),
    (["--data", "{tmp}/held/*.txt", "--out-dir", "{tmp}/held"], "that is --out-dir, where the run"),
    # files of one byte each, held out whole: a ValueError from numpy as the rows were cut
    (["--data", "{tmp}/bytes"], "nothing left to train on, its 120 bytes all held out"),
    # one held-out row, of one byte, which its fixed mask leaves alone: a ZeroDivisionError at the
    # first evaluation, with no checkpoint yet
    (
        ["--data", "{tmp}/held", "--eval-seqs", "1", "--max-steps", "2"],
        "--eval-seqs 1: none of the 1 bytes of 1 held-out rows is masked at 15%: ask more",
    ),
    (["--data", "{tmp}/no-files"], "no files there"),
    # past check_step_fits' floor, which is linear in the tokens: BERT's (B, T, T) mask, 1 TB, was
    # an allocator's traceback (a machine with under 10 GiB stops at the floor, in one line too)
    (
        ["--arch", "bert", "--context", "100000", "--batch-size", "100", "--max-steps", "1"],
        "--batch-size 100 x --context 100000: a training step",
    ),
    (["--data", "{tmp}/links"], "cannot read {tmp}/links/gone.txt (No such file"),
    (["--data", "{tmp}/ok.txt", "--resume", "--out-dir", "{tmp}/none"], "no checkpoint"),
    (
        ["--batch-size", "0"],
        "argument --batch-size: must be at least 1 and at most 1000000000000, got 0",
    ),
    (["--lr", "0"], "argument --lr: must be above 0 and at most 1e+37, got 0"),
    # a run ends at its step count or its time, never the budget ignored in silence
    (["--max-steps", "3", "--time-budget", "1"], "--time-budget: not allowed with argument --max"),
    (["--lr", "inf"], "argument --lr: must be above 0 and at most 1e+37, got inf"),
    # past float32's range (the optimizer step failed), and a budget whose steps overflow an int64
    (["--lr", "1e300"], "argument --lr: must be above 0 and at most 1e+37, got 1e300"),
    (
        ["--time-budget", "1e20"],
        "argument --time-budget: must be above 0 and at most 10000000, got",
    ),
    # at the bound, AdamW's first step (the rate over 1 - beta1) stays in float32's range
    (
        ["--data", "{tmp}/ok.txt", "--lr", "1e37", "--warmup", "0", "--max-steps", "1"],
        "val_loss nan",
    ),
    (["--max-steps", "1" + "0" * 400], "argument --max-steps: must be at least 1 and at most"),
    (["--mlm-rate", "1.5"], "argument --mlm-rate: must be above 0 and at most 1, got 1.5"),
    (["--dropout", "nan"], "argument --dropout: must be at least 0 and below 1, got nan"),
    (["--eval-seqs", "x"], "argument --eval-seqs: invalid int value: 'x'"),
    (["--seed", "-1"], "argument --seed: must be at least 0 and at most 4294967295, got -1"),
    (["--out-dir", "{tmp}/ok.txt"], "--out-dir '{tmp}/ok.txt' cannot be made a folder here"),
    (["--out-dir", "{tmp}/ok.txt/run"], "{tmp}/ok.txt is not a writable one"),
    (["--out-dir", ""], "--out-dir '' names no folder"),
    # a link to nothing, and a name over 255 bytes: tracebacks once the data was read
    (["--out-dir", "{tmp}/dangling"], "{tmp}/dangling is not a writable one"),
    (["--out-dir", "{tmp}/" + "x" * 300], "cannot be made a folder here: a name over 255 bytes"),
    # a path past PATH_MAX, which no look tells: make_out_dir's line, once the model was made
    (
        ["--data", "{tmp}/ok.txt", "--out-dir", "{tmp}/" + "/".join(["d" * 200] * 21)],
        "cannot be made a folder here (File name too long)",
    ),
    (
        ["--data", "{tmp}/missing", "--init-from", "{tmp}/future.pt"],
        "future.pt: its config is not one this tinyencoder.py takes (",
    ),
    # the model's flags are checked before any data is read: --data names nothing here
    (["--data", "{tmp}/missing", "--context", "9000"], "at most 8192 bytes"),
    (["--data", "{tmp}/missing", "--warmup", "0.9"], "--warmup 0.9 and --decay 0.2 overlap"),
    (
        ["--data", "{tmp}/missing", "--batch-size", "100000000", "--context", "32"],
        "--batch-size 100000000 x --context 32: a training step keeps 3,052 GiB or more, over",
    ),
    (
        ["--data", "{tmp}/missing", "--grad-accum", "100000000", "--context", "32"],
        "--grad-accum 100000000: a step holds its micro-batches' inputs at once, 4,578 GiB or more",
    ),
    (["--data", "{tmp}/missing", "--init-from", "{tmp}/none.pt"], "--init-from: no checkpoint"),
    (["--data", "{tmp}/missing", "--init-from", "{tmp}/bert.pt"], "not this model's weights"),
]


def test_an_out_dir_the_file_system_will_not_make_is_one_line(tmp_path, monkeypatch):
    """What no look ahead can tell (a disk out of space or inodes, /proc): one line, not makedirs'
    traceback after the data and the model were made."""
    import runs

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.os, "makedirs", no_space)
    made_here = f"--out-dir '{tmp_path / 'run'}' cannot be made a folder here"
    with pytest.raises(SystemExit, match=re.escape(f"{made_here} (No space left on device)")):
        runs.make_out_dir(str(tmp_path / "run"))


@pytest.mark.parametrize("other", [dict(intermediate=48), dict(layers=1), dict(layers=3)])
def test_weights_of_another_size_are_named_whole(tmp_path, other):
    """--init-from another size: torch's line names a parameter and both shapes (it was cut at 160
    characters, mid-shape) or lists the keys that differ, the first ones whole."""
    from dataclasses import asdict

    from runs import load_weights
    from tinyencoder import Config, TinyEncoder

    sizes = dict(hidden=32, layers=2, heads=2, max_len=64)
    model = TinyEncoder(Config.from_preset("roberta", **sizes))
    cfg = Config.from_preset("roberta", **{**sizes, **other})
    path = tmp_path / "other.pt"
    torch.save(dict(model=TinyEncoder(cfg).state_dict(), cfg=asdict(cfg)), path)
    with pytest.raises(SystemExit) as stop:
        load_weights(model, str(path), "--init-from")
    line = str(stop.value)
    assert line.startswith(f"error: --init-from {path}: not this model's weights"), line
    if "intermediate" in other:
        assert "torch.Size([32, 48]) from checkpoint" in line, line
        assert line.endswith("the shape in current model is torch.Size([32, 128]).)"), line
    else:
        keys = r'("[\w.]+", )+(\.\.\.|"[\w.]+"\.)\)'
        assert re.fullmatch(r".*key\(s\) in state_dict: " + keys, line), line


def test_data_reads_each_file_once_and_names_it_from_its_folder(tmp_path, monkeypatch):
    """--data: a file reached by a folder, a link and a glob's ** is one document, named from the
    folder spec starts at however spelled (the held-out split hashes the name); a walk or a glob
    into a link back up ends; a pipe and hidden files are skipped; a name that is not UTF-8 and
    one with glob characters are read."""
    from data.corpus import read_documents, split_documents

    root = tmp_path / "corp"
    (root / "sub").mkdir(parents=True)
    for i in range(30):
        (root / "sub" / f"doc{i}.txt").write_bytes(b"text %d " % i * 40)
    (root / "linked").symlink_to(root / "sub")  # the same files again, walked first
    os.mkfifo(root / "pipe")
    # hidden files and folders (a .git) are no documents, as a glob's ** skips them too
    (root / ".git").mkdir()
    (root / ".git" / "objects").write_bytes(b"\x00binary")
    (root / "sub" / ".notes.txt").write_bytes(b"hidden " * 40)
    (root / os.fsdecode(b"caf\xe9[1].txt")).write_bytes(b"latin-1 name " * 10)
    monkeypatch.chdir(tmp_path)
    spellings = ["corp", "./corp", str(root), "corp/**", "corp/**/*", str(root) + "/**/*.txt"]
    names = [sorted(name for name, _ in read_documents(spec)) for spec in spellings]
    assert names[0] == sorted(
        [f"linked/doc{i}.txt" for i in range(30)] + [os.fsdecode(b"caf\xe9[1].txt")]
    )
    assert all(found == names[0] for found in names[1:])
    split = split_documents(read_documents("corp"), "corp")
    assert len(split["train"][1]) + len(split["val"][1]) == 31 + 2  # offsets: one more each
    literal = str(root / os.fsdecode(b"caf\xe9[1].txt"))  # not read as a glob
    assert [data for _, data in read_documents(literal)] == [b"latin-1 name " * 10]
    # links back up: a folder walk ends, and a ** glob (glob.glob's took time 2^40 with two)
    (root / "sub" / "back").symlink_to(root)
    (root / "sub" / "again").symlink_to(root)
    for spec in ("corp", "corp/**/*.txt"):
        assert sorted(name for name, _ in read_documents(spec)) == names[0]


def test_a_data_glob_finds_what_python_s_glob_finds(tmp_path, monkeypatch):
    """--data's own glob (it does not follow a link round) finds the paths glob.glob finds where
    no link leads back up: **, *, ?, [...], hidden names, links to folders, folders only ("/")."""
    import glob

    from data.corpus import glob_paths

    monkeypatch.chdir(tmp_path)
    for name in ("c/a.txt", "c/b.py", "c/sub/x.txt", "c/sub/deep/y.txt", "c/.git/o/z.txt"):
        os.makedirs(os.path.dirname(name), exist_ok=True)
        Path(name).write_text("text")
    for name in ("c/sub/.h.txt", "c/other/w.TXT", "c/q[1].txt"):
        os.makedirs(os.path.dirname(name), exist_ok=True)
        Path(name).write_text("text")
    os.symlink("sub", "c/linked")
    os.symlink("../other", "c/sub/to_other")
    patterns = ["c/**", "c/**/*", "c/**/*.txt", "c/*/", "c/*", "c/s*/*.txt", "c/**/deep/*"]
    patterns += ["c/.git/**", "c/**/.*", "*/sub/*", "c/?.txt", "c/[ab].*", "c/**/", "**", "*"]
    patterns += [str(tmp_path / "c" / "**" / "*.txt"), "c/*/*/*", "c/**/**/*.py"]
    # "." and "..": a part no folder's listing holds
    patterns += ["c/*/../a.txt", "c/s*/../*.txt", "c/*/./*.txt", "c/sub/../s*/x.*", "c/*/deep/../*"]
    patterns += ["c/*/../**/*.txt"]
    for pattern in patterns:
        found = sorted(glob.glob(pattern, recursive=True))
        if pattern.endswith("/"):  # glob spells the folders it names with their "/"
            found = [path if path == "c/" else path.rstrip("/") for path in found]
        assert glob_paths(pattern) == found, pattern
    for pattern in ("c/**/../a.txt", "c/**/./x.txt"):
        with pytest.raises(SystemExit, match="a '.' or '..' after '[*][*]' is not supported"):
            glob_paths(pattern)


def test_held_out_documents_are_no_copies_of_training_ones():
    """A document held out by its name's hash goes to training instead where most of its bytes lie
    in lines a training document holds too (as the stdlib's code pages share theirs); one that
    shares a few lines stays held out."""
    from data.corpus import split_documents

    def lines(doc, count):
        return b"".join(b"line %d of document %d\n" % (i, doc) for i in range(count))

    # of doc0.txt ... doc59.txt, doc8 and doc42 are held out by their names' hash
    documents = [(f"doc{i}.txt", lines(i, 20)) for i in range(60)]
    documents[8] = ("doc8.txt", lines(3, 20).replace(b"line 7 ", b"changed line 7 "))
    documents[42] = ("doc42.txt", lines(42, 20) + lines(5, 4))  # 4 of 24 lines shared
    val_bytes, val_offsets = split_documents(documents, "corp")["val"]
    assert val_bytes.tobytes() == documents[42][1] and len(val_offsets) == 2
    documents[8] = ("doc8.txt", lines(8, 20))  # no copy: held out again
    val_bytes, _ = split_documents(documents, "corp")["val"]
    assert val_bytes.tobytes() == documents[8][1] + documents[42][1]


def test_a_held_out_copy_of_a_copy_trains_too():
    """doc8, held out by name, is mostly doc3's lines and trains; doc83, held out too, is mostly
    doc8's own lines: it was kept held out (one pass), its text trained on by way of doc8."""
    from data.corpus import split_documents

    def lines(doc, count):
        return b"".join(b"line %d of document %d\n" % (i, doc) for i in range(count))

    # of doc0.txt ... doc89.txt, doc8, doc42 and doc83 are held out by their names' hash
    documents = [(f"doc{i}.txt", lines(i, 20)) for i in range(90)]
    documents[8] = ("doc8.txt", lines(3, 12) + lines(8, 8))  # 12 of 20 lines doc3's
    documents[83] = ("doc83.txt", lines(8, 8) + lines(83, 2))  # 8 of 10 lines doc8's own
    val_bytes, val_offsets = split_documents(documents, "corp")["val"]
    assert val_bytes.tobytes() == documents[42][1] and len(val_offsets) == 2


def test_held_out_copies_count_text_not_indentation(capsys):
    """A copy that is mostly indentation is a copy (the share counts bytes, whitespace aside);
    where every file held out by name is a copy, the last tenth of each is held out, said so."""
    from data.corpus import split_documents

    indented = b"".join(b" " * 40 + b"%d\n" % i for i in range(50))  # 86 % indentation
    documents = [(f"doc{i}.txt", b"document %d\n" % i * 30) for i in range(60)]
    documents[3] = ("doc3.txt", indented)
    documents[8] = ("doc8.txt", indented)  # held out by its name, a copy of doc3
    documents[42] = ("doc42.txt", b"the other held-out document, its own text\n" * 30)
    val_bytes, val_offsets = split_documents(documents, "corp")["val"]
    assert val_bytes.tobytes() == documents[42][1]
    documents[42] = ("doc42.txt", documents[41][1])  # now both held-out files are copies
    val_bytes, val_offsets = split_documents(documents, "corp")["val"]
    assert len(val_offsets) == 61  # the last tenth of each of the 60
    assert "each file held out by name copies another: the last tenth" in capsys.readouterr().out
    # a path's bytes that are not UTF-8 are escaped, as train.py's log escapes them
    split_documents(documents, "corp\udcfe")
    assert "--data corp\\xfe: each file held out" in capsys.readouterr().out


def test_a_one_byte_file_is_held_out_whole(tmp_path):
    """Where the last tenth of each file is held out, a file of one byte left an empty training
    document, whose sentence pair BERT's rows read past the last document (an IndexError)."""
    from types import SimpleNamespace

    from data.corpus import load_corpus
    from data.rows import TrainingRows

    (tmp_path / "a.txt").write_bytes(b"a sentence of the first file. " * 70)
    (tmp_path / "b.txt").write_bytes(b"b")  # neither name held out by its hash
    corpus = load_corpus(str(tmp_path))
    (train, train_offsets), (val, val_offsets) = corpus["train"], corpus["val"]
    assert len(train_offsets) == 2 and val.tobytes().endswith(b"b") and len(val_offsets) == 3
    pairs = SimpleNamespace(inputs="pairs", masking="static")
    rows = TrainingRows(pairs, train, train_offsets, 32, 1337, 10)
    assert all(len(rows[i].ids) == 32 for i in range(rows.count))


def test_the_stdlib_corpus_is_made_on_every_machine_and_a_lost_file_named(tmp_path, monkeypatch):
    """torchrun's first process on each machine (LOCAL_RANK 0) makes the default corpus, not
    only RANK 0's machine (the others read files that were not there); a file of it deleted by
    hand is named, not a traceback."""
    from data import corpus

    made = []
    monkeypatch.setattr(corpus, "prepare_stdlib", lambda: made.append(True))
    monkeypatch.setattr(corpus, "STDLIB_STEM", str(tmp_path / "stdlib"))
    for local_rank, makes in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", "3")
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        made.clear()
        with pytest.raises(SystemExit, match=f"{tmp_path / 'stdlib'}-train.bin is missing: del"):
            corpus.load_corpus(None)
        assert made == [True] * makes


def test_a_prepared_corpus_cut_short_is_named(tmp_path, monkeypatch):
    """A .bin that no longer holds what its .idx counts (cut short, emptied by hand) stops with one
    line; it trained on 0 bytes, at a loss of 0, with no error."""
    import numpy as np

    from data import corpus

    monkeypatch.setattr(corpus, "STDLIB_STEM", str(tmp_path / "stdlib"))
    for part in ("train", "val"):
        np.frombuffer(b"two documents", np.uint8).tofile(tmp_path / f"stdlib-{part}.bin")
        np.array([0, 3, 13], np.int64).tofile(tmp_path / f"stdlib-{part}.idx")
    assert [len(data) for data, _ in corpus.load_stdlib().values()] == [13, 13]
    # emptied; offsets not from 0, going back, or none but the start; bytes past the last offset
    cases = [(b"", [0, 3, 13]), (b"two documents", [1, 3, 13]), (b"two documents", [0, 9, 3, 13])]
    cases += [(b"two documents", [0]), (b"two documents!", [0, 3, 13])]
    for data, offsets in cases:
        np.frombuffer(data, np.uint8).tofile(tmp_path / "stdlib-train.bin")
        np.array(offsets, np.int64).tofile(tmp_path / "stdlib-train.idx")
        match = f"{tmp_path / 'stdlib'}-train.bin and .idx do not match \\({len(data)} bytes\\)"
        with pytest.raises(SystemExit, match=match):
            corpus.load_stdlib()


def test_data_inside_the_output_folder_is_read(tmp_path):
    """The run's own files are skipped where --out-dir lies inside the data's folder; a file
    named inside --out-dir, or a folder there, is the user's data (it read as no files)."""
    from data.corpus import read_documents

    (tmp_path / "notes").mkdir()
    for path in (tmp_path / "corpus.txt", tmp_path / "notes" / "n.txt"):
        path.write_bytes(b"text")
    (tmp_path / "ckpt_last.pt").write_bytes(b"the run's")
    for spec, names in (("corpus.txt", ["corpus.txt"]), ("notes", ["n.txt"])):
        read = read_documents(str(tmp_path / spec), out_dir=str(tmp_path))
        assert [name for name, _ in read] == names, spec
    # the folder that holds --out-dir: its files, the run's own not
    read = read_documents(str(tmp_path / "notes" / ".."), out_dir=str(tmp_path / "notes"))
    assert sorted(name for name, _ in read) == ["ckpt_last.pt", "corpus.txt"]


def test_a_held_out_row_masks_as_it_did_at_earlier_commits():
    """A held-out row's masks come from its key alone, the same from commit to commit and on NumPy
    1 and 2 (and torch 2.4 to 2.13), so that the accuracies the README quotes compare: these
    positions are what commit a2783de's code labels, as the code before it did on NumPy 2."""
    import tinyencoder as te
    from data.rows import Example, masked_row

    cfg = te.Config.from_preset("roberta", hidden=32, layers=1, heads=2, max_len=128)
    text = np.frombuffer(b"def f(x):\n    return x + 1  # the held-out row's bytes\n" * 2, np.uint8)
    ids = np.r_[[te.CLS], text, [te.SEP]].astype(np.int64)
    row = Example(ids, np.zeros_like(ids), np.ones_like(ids), -1, [0, 0, 1, 7])
    _, labels = masked_row(row, cfg, 0.15)
    labelled = (labels != te.IGNORE_INDEX).nonzero().flatten().tolist()
    assert labelled == [7, 16, 21, 40, 57, 83, 98, 110]


def test_held_out_rows_mask_alike_at_any_context():
    """A held-out row's masks are drawn for its real tokens: at --context 256, 512 and 1024 the
    same 254 bytes get the same masked inputs (they were drawn over the padded row, so 35 % of the
    picked bytes got another replacement at each context: ~0.5 points of accuracy apart), in rows
    256 wide at every context (padded to it, an evaluation at 1024 took ~5x the time)."""
    import tinyencoder as te
    from data.rows import collate, held_out_rows

    data = np.frombuffer(bytes(range(256)) * 40, np.uint8)
    offsets = np.array([0, 4000, len(data)])
    cfg = te.Config.from_preset("roberta", hidden=64, layers=1, heads=2, max_len=1024)
    seen = []
    for context in (256, 512, 1024):
        _, rows = held_out_rows(data, offsets, context, 16, cfg)
        batch = collate(rows, cfg, torch.device("cpu"), 0.15)
        assert batch["input_ids"].shape == (16, 256)
        seen.append((batch["input_ids"][:, :256], batch["labels"][:, :256]))
    for inputs, labels in seen[1:]:
        assert torch.equal(inputs, seen[0][0]) and torch.equal(labels, seen[0][1])
    assert (seen[0][1] != te.IGNORE_INDEX).sum() > 400  # 15 % of 16 rows of 254 bytes: ~610


def test_every_step_and_process_draws_its_own_dropout():
    """runs.step_seed, which train.py's and finetune.py's steps seed torch with: the same for the
    same step and process (a resumed run replays its masks), and never the same for two of them
    (a seed without the step replayed one step's masks at every step, and resumed exactly)."""
    from runs import step_seed

    seeds = {step_seed(1337, step, rank) for step in range(2000) for rank in range(8)}
    assert len(seeds) == 2000 * 8
    assert step_seed(1337, 5, 3) == step_seed(1337, 5, 3)
    assert step_seed(1337, 5, 3) != step_seed(1338, 5, 3)


def test_collate_never_labels_padding():
    """Rows padded to the longest: every real byte masked at rate 1 but CLS and SEP, and padding
    keeps PAD for input and IGNORE_INDEX for label (a label there would be a byte to predict)."""
    import tinyencoder as te
    from data.rows import collate, held_out_rows

    data = np.frombuffer(b"short text. " * 3 + b"a longer line of text, " * 5, np.uint8)
    cfg = te.Config.from_preset("roberta", hidden=64, layers=1, heads=2)
    _, rows = held_out_rows(data, np.array([0, 36, len(data)]), 128, 4, cfg)
    batch = collate(rows, cfg, torch.device("cpu"), 1.0)
    padding = batch["attention_mask"] == 0
    assert padding.sum() == 101
    assert (batch["labels"][padding] == te.IGNORE_INDEX).all()
    assert (batch["input_ids"][padding] == te.PAD).all()
    assert (batch["labels"][~padding] != te.IGNORE_INDEX).sum() == (~padding).sum() - 2 * len(rows)


def test_correct_bytes_of_unpadded_held_out_rows():
    """ModernBERT unpads padded held-out rows: correct_bytes takes each labelled byte's own target,
    in the order of the model's logits (a perfect prediction counts every masked byte)."""
    import torch.nn.functional as F

    import tinyencoder as te
    from data.rows import collate, correct_bytes, held_out_rows, masked_bytes

    data = np.frombuffer(b"short text. " * 3 + b"a longer line of text, " * 5, np.uint8)
    cfg = te.Config.from_preset("modernbert", hidden=64, layers=3, heads=2, max_len=128)
    _, rows = held_out_rows(data, np.array([0, 36, len(data)]), 128, 4, cfg)
    batch = collate(rows, cfg, torch.device("cpu"), 0.5)
    assert isinstance(batch["layout"], te.Unpadded) and (batch["attention_mask"] == 0).any()
    labelled = batch["labels"] != te.IGNORE_INDEX
    model = te.TinyEncoder(cfg).eval()
    with torch.no_grad():
        sparse = model(**batch).logits
        dense = model(batch["input_ids"], batch["attention_mask"]).logits
    # the labelled bytes' logits, in row order
    assert torch.allclose(sparse, dense[labelled], atol=1e-4)
    out = types.SimpleNamespace(logits=F.one_hot(batch["labels"][labelled], cfg.vocab_size))
    assert labelled.any() and masked_bytes(batch) == labelled.sum()
    assert correct_bytes(out, batch) == labelled.sum()


def test_more_held_out_rows_asked_than_spans_gives_each_span_once():
    """--eval-seqs 10**12: every span once, as any count from their number up (np.linspace listed
    10**12 indices first: a MemoryError of terabytes)."""
    import tinyencoder as te
    from data.rows import held_out_rows

    data = np.frombuffer(bytes(range(256)) * 40, np.uint8)
    offsets = np.array([0, 4000, len(data)])
    cfg = te.Config.from_preset("roberta", hidden=64, layers=1, heads=2)
    spans, rows = held_out_rows(data, offsets, 128, 10**12, cfg)
    assert len(spans) == 82 and len(rows) == 82  # 4000 and 6240 bytes in spans of 126
    assert held_out_rows(data, offsets, 128, 82, cfg)[0] == spans


def test_the_default_corpus_reads_pydocs_topics_once():
    """pydoc's topics are documents of text; pydoc_data/topics.py, the same text quoted, is not."""
    from data.corpus import stdlib_documents

    names = [name for name, _ in stdlib_documents()]
    assert "pydoc_data/if" in names and "os.py" in names
    assert os.path.join("pydoc_data", "topics.py") not in names


def test_a_resumed_run_reads_the_data_it_started_on(tmp_path):
    """A run's own files in an --out-dir inside --data are not data, resumed or not; a file added
    to --data since the run started stops --resume with one line, not another corpus."""
    run_dir = _corpus(tmp_path) / "run"  # inside the data folder
    started = []
    for step in (1, 2, 3):
        resume = ["--resume"] if step > 1 else ["--data", tmp_path / "corpus", "--context", 32]
        cmd = [sys.executable, "train.py", *resume, "--max-steps", step, "--out-dir", run_dir]
        run = run_python(cmd)
        started.append(run)
        if step == 2:  # now one more file
            (tmp_path / "corpus" / "new.txt").write_bytes(b"another document. " * 40)
    assert started[1].returncode == 0, started[1].stderr[-2000:]
    data = [re.search(r"^data: .* from .*;", run.stdout, re.M).group(0) for run in started[:2]]
    assert data[0] == data[1] and "6 documents" in data[0], data
    refused = started[2]
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert "is not the data the run trained on (files added, removed" in refused.stderr


def test_the_default_corpus_is_prepared_once_per_python_build():
    """Two builds of one minor version (3.11.2 and 3.11.7) ship different stdlibs: a checkout that
    both run prepares a corpus for each, not whichever ran first."""
    show = "import sys; {}; import data.corpus; print(data.corpus.STDLIB_STEM)"
    here = str(Path(__file__).parent)
    stems = []
    for change in ("pass", "sys.version = sys.version.replace('.', '!', 2)"):
        cmd = [sys.executable, "-c", show.format(change)]
        stems.append(subprocess.run(cmd, capture_output=True, text=True, cwd=here).stdout)
    assert stems[0] != stems[1] and all(f"stdlib-py{sys.version.split()[0]}-" in s for s in stems)


def test_metrics_that_cannot_be_written_say_so_and_go_on(tmp_path, capsys):
    """A full disk or a read-only folder at an evaluation: one line, and the run goes on to its
    checkpoint, whose write stops it with its own line if it cannot be written either."""
    from runs import Metrics

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full to stand for a full disk here")
    metrics = Metrics(str(tmp_path), None)
    metrics.file = open("/dev/full", "a")  # every write: no space left on device
    metrics.write({"step": 1})
    assert "could not write" in capsys.readouterr().err


def test_a_folder_in_use_is_refused(tmp_path):
    """A second run on the folder of a live one that has no checkpoint yet is refused before it
    writes anything; once the first ends, the folder is free again."""
    from runs import Metrics, fcntl

    if fcntl is None:
        pytest.skip("no flock here: runs go unguarded")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    live = Metrics(str(run_dir), None)
    live.write({"step": 1})
    flags = ["--size", "tiny", "--max-steps", "1", "--batch-size", "2", "--context", "32"]
    cmd = [sys.executable, "train.py", "--data", str(_corpus(tmp_path)), *flags]
    second = run_python([*cmd, "--out-dir", run_dir], timeout=120)
    assert second.returncode != 0, second.stdout[-2000:]
    assert f"--out-dir {run_dir} is in use: another run is writing" in second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    live.file.close()  # the first run ends
    Metrics(str(run_dir), None).write({"step": 1})


def test_a_run_that_saved_while_this_one_set_up_is_not_overwritten(tmp_path):
    """A fresh run checks its folder for checkpoints when it starts and again once it holds the
    folder's lock: a run that saved and ended in between (another fresh run, started earlier) kept
    its checkpoints, where they were replaced and its metrics.jsonl emptied."""
    from runs import Metrics

    (tmp_path / "ckpt_last.pt").write_bytes(b"the other run's")
    (tmp_path / "metrics.jsonl").write_text('{"step": 3}\n')
    with pytest.raises(SystemExit, match="holds a run \\(ckpt_last.pt\\): --resume continues it"):
        Metrics(str(tmp_path), None)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 3}\n'
    Metrics(str(tmp_path), 3).write({"step": 4})  # a resumed run goes on


def test_a_folder_that_cannot_take_a_checkpoint_stops_a_resumed_run_at_once(tmp_path, monkeypatch):
    """A resumed run in a folder it cannot write (its files still can be) stops before its first
    step, not at its first save with the steps since lost."""
    import runs

    def access(path, mode):  # a read-only folder, as root cannot make one
        return not (os.path.samefile(path, tmp_path) and mode == os.W_OK)

    (tmp_path / "metrics.jsonl").write_text('{"step": 3}\n')
    monkeypatch.setattr(runs.os, "access", access)
    with pytest.raises(SystemExit, match=f"--out-dir {tmp_path} is not writable: no checkpoint"):
        runs.Metrics(str(tmp_path), 3)


def test_a_data_folder_it_cannot_list_is_said(tmp_path, monkeypatch, capsys):
    """A subfolder of --data that cannot be listed (no permission: lost+found, to all but root) is
    left out with a line that says so, where it was passed over in silence; the rest is read. A
    glob's search passes such folders over, as Python's glob does (it lists some no match needs)."""
    from data import corpus

    (tmp_path / "sub").mkdir()
    for name in ("a.txt", "sub/b.txt"):
        (tmp_path / name).write_bytes(b"text " * 50)
    listed = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", path)
        return listed(path)

    monkeypatch.setattr(os, "scandir", scandir)
    read = list(corpus.read_documents(str(tmp_path)))
    assert [name for name, _ in read] == ["a.txt"]
    said = (
        f"--data: cannot read the folder {tmp_path / 'sub'} (Permission denied): its files left out"
    )
    assert capsys.readouterr().out == said + "\n"
    assert [name for name, _ in corpus.read_documents(f"{tmp_path}/**/*.txt")] == ["a.txt"]


def test_log_lines_and_errors_show_paths_that_are_not_utf8():
    """os.fsdecode's surrogates of a path's bytes that are not UTF-8, as escapes a strict UTF-8
    stdout can write (print raised UnicodeEncodeError on the data: line); errors showed \\udce9."""
    import runs
    from data import corpus
    from data.corpus import printable

    name = os.fsdecode(b"/data/caf\xe9")
    assert printable(f"data: {name}; 1 file") == "data: /data/caf\\xe9; 1 file"
    printable(f"data: {name}").encode("utf-8")
    assert printable("data: /data/café") == "data: /data/café"
    # a lone surrogate that no path byte makes (JSON's "\ud800" escape reads as one) as \u escapes
    assert printable("a\ud800 b\udc7f c\udd00 \udce9") == "a\\ud800 b\\udc7f c\\udd00 \\xe9"
    # and so do the one-line errors, of train.py's data and of every script
    for die in (runs.die, corpus.die):
        with pytest.raises(SystemExit) as stopped:
            die(f"--data: cannot read {name}")
        assert stopped.value.code == "error: --data: cannot read /data/caf\\xe9"


@pytest.mark.parametrize("args, message", TRAIN_BAD_INPUT)
def test_train_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "tiny.txt").write_bytes(b"hello world, this is a tiny file.\n")
    (tmp_path / "ok.txt").write_bytes(b"the quick brown fox. " * 200)
    (tmp_path / "no-files").mkdir()
    # f26.txt and f63.txt are held out (by their names' hash), f1.txt trained on
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "f26.txt").write_bytes(b"\n")
    (tmp_path / "held" / "f63.txt").write_bytes(b"the quick brown fox. " * 150)
    (tmp_path / "held" / "f1.txt").write_bytes(b"the quick brown fox. " * 200)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "bytes").mkdir()
    for i in range(120):
        (tmp_path / "bytes" / f"{i}.txt").write_bytes(b"a")
    tiny_checkpoint(tmp_path / "bert.pt")
    future = torch.load(tiny_checkpoint(tmp_path / "future.pt"), weights_only=True)
    future["cfg"]["a_field_of_a_later_version"] = True
    torch.save(future, tmp_path / "future.pt")
    cmd = [sys.executable, "train.py", *(a.format(tmp=tmp_path) for a in args)]
    if "--out-dir" not in args:
        cmd += ["--out-dir", str(tmp_path / "out")]
    run = run_python(cmd, timeout=120)
    assert run.returncode != 0 and message.format(tmp=tmp_path) in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr[-2000:]


@pytest.mark.parametrize(
    "environ, args, message",
    [
        # RANK without WORLD_SIZE was a KeyError, without MASTER_ADDR a ValueError from torch
        (dict(RANK="0"), [], "RANK is set, but not WORLD_SIZE, MASTER_ADDR, MASTER_PORT: torch"),
        (dict(RANK="0", WORLD_SIZE="1"), [], "RANK is set, but not MASTER_ADDR, MASTER_PORT"),
        (
            dict(RANK="2", WORLD_SIZE="2", MASTER_ADDR="localhost", MASTER_PORT="29500"),
            [],
            "RANK='2' and WORLD_SIZE='2': torchrun sets 0 <= RANK < WORLD_SIZE",
        ),
        # no working C++ compiler: inductor's traceback at the first step
        (dict(CXX="/bin/false"), ["--compile"], "torch.compile failed ("),
    ],
)
def test_train_bad_surroundings_are_one_line(tmp_path, monkeypatch, environ, args, message):
    for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    flags = ["--data", str(_corpus(tmp_path)), "--max-steps", "1", "--out-dir", tmp_path / "out"]
    run = run_python([sys.executable, "train.py", *flags, *args], timeout=120)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
    # one line of ours; torch 2.4's compiler logs warnings of its own (W1207 12:00:00...) first
    ours = [line for line in run.stderr.splitlines() if not re.match(r"[WI]\d{4} ", line)]
    assert "Traceback" not in run.stderr and len(ours) == 1, run.stderr[-2000:]


def test_a_step_that_fails_for_want_of_memory_or_of_a_compiler_stops_in_one_line():
    """runs.stops_plainly on what a CPU cannot raise for real: CUDA's OutOfMemoryError (its message
    cut to two sentences) and a compile failure; any other error goes on up, as it was."""
    from torch._dynamo.exc import BackendCompilerFailed

    from runs import stops_plainly

    class InvalidCxxCompiler(RuntimeError):
        pass

    class NoCompiler(BackendCompilerFailed):
        """BackendCompilerFailed names its backend first; InductorError, its subclass, the cause"""

        def __init__(self):
            self.inner_exception = InvalidCxxCompiler("No working C++ compiler found\n\nSet")
            RuntimeError.__init__(self, f"backend='inductor' raised:\n{self.inner_exception}")

    cuda = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"
    raised = dict(
        oom=torch.cuda.OutOfMemoryError(cuda),
        compiler=NoCompiler(),
        other=RuntimeError("index 9 is out of range"),
    )

    @stops_plainly("--batch-size 9 x --context 9")
    def step(kind):
        raise raised[kind]

    with pytest.raises(SystemExit) as stopped:
        step("oom")
    cut = "CUDA out of memory. Tried to allocate 2.00 GiB"
    said = f"a training step does not fit in memory here ({cut}); lower them (--grad-accum adds"
    assert stopped.value.code == f"error: --batch-size 9 x --context 9: {said} up steps)"
    with pytest.raises(SystemExit) as stopped:
        step("compiler")
    said = "InvalidCxxCompiler: No working C++ compiler found"
    assert stopped.value.code == f"error: torch.compile failed ({said}); --no-compile trains eager"
    with pytest.raises(RuntimeError, match="out of range"):
        step("other")


def test_a_run_is_never_overwritten_and_resumes_with_its_own_flags(tmp_path):
    run_dir = tmp_path / "run"
    flags = ["--batch-size", 3, "--context", 32, "--lr", "1e-3", "--out-dir", run_dir]
    assert len(_train(tmp_path, "--max-steps", 2, *flags)) == 2
    saved = (run_dir / "ckpt_last.pt").read_bytes()
    again = [sys.executable, "train.py", "--data", str(tmp_path / "corpus"), "--out-dir", run_dir]
    fresh = run_python(again, timeout=120)
    assert fresh.returncode != 0, fresh.stdout[-2000:]
    assert "holds a run (ckpt_last.pt): --resume continues it" in fresh.stderr
    assert (run_dir / "ckpt_last.pt").read_bytes() == saved
    # only the best checkpoint kept: no --resume to offer, since it needs ckpt_last.pt
    from runs import refuse_to_overwrite

    best_only = tmp_path / "best-only"
    best_only.mkdir()
    (best_only / "ckpt_best.pt").write_bytes(saved)
    with pytest.raises(SystemExit, match="ckpt_best.pt, no ckpt_last.pt to resume"):
        refuse_to_overwrite(str(best_only))
    # --resume alone: the run's arch, data, sizes and rate; a flag given again wins, logged
    cmd = [sys.executable, "train.py", "--resume", "--out-dir", run_dir, "--max-steps", 3]
    resumed = run_python([*cmd, "--lr", "2e-3"], timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "model: roberta tiny" in resumed.stdout and "3 x 32 tokens per step" in resumed.stdout
    changes = "--max-steps 3 (the run's: 2), --lr 0.002 (the run's: 0.001)"
    assert f"flags changed from the run's own: {changes}" in resumed.stdout
    assert f"from {tmp_path / 'corpus'}" in resumed.stdout  # the run's --data, not the stdlib
    assert re.search(r"^step\s+3/3 \| loss", resumed.stdout, re.M), resumed.stdout[-2000:]


def test_a_resumed_modernbert_decays_by_its_new_lr(tmp_path):
    """StableAdamW's decay, lr_t / lr_max * 1e-5, is AdamW's with wd = 1e-5 / --lr: a run resumed
    with another --lr decays by it (the checkpoint's optimizer kept the first run's wd)."""
    run_dir = tmp_path / "run"
    flags = ["--arch", "modernbert", "--batch-size", 2, "--context", 32, "--out-dir", run_dir]
    _train(tmp_path, "--max-steps", 1, "--lr", "2e-3", *flags)
    cmd = ["train.py", "--resume", "--out-dir", run_dir, "--max-steps", 2, "--lr", "1e-3"]
    resumed = run_python([sys.executable, *cmd], text=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    saved = torch.load(run_dir / "ckpt_last.pt", weights_only=False)
    decays = [group["weight_decay"] for group in saved["optim"]["param_groups"]]
    assert decays == [pytest.approx(1e-5 / 1e-3), 0.0] and saved["step"] == 2


def refused_resume(run_dir, *flags) -> str:
    """What train.py --resume of run_dir with these flags prints as it stops with an error."""
    cmd = [sys.executable, "train.py", "--resume", "--out-dir", run_dir, *flags]
    run = run_python(cmd, timeout=120)
    assert run.returncode != 0, run.stdout[-2000:]
    return run.stderr


def test_a_resumed_run_keeps_what_its_checkpoint_holds(tmp_path):
    run_dir = tmp_path / "run"
    sizes = ["--batch-size", 3, "--context", 32]
    assert len(_train(tmp_path, "--max-steps", 2, *sizes, "--out-dir", run_dir)) == 2
    # the model's flags: --init-from was ignored in a resume, so it is refused too
    stderr = refused_resume(run_dir, "--max-steps", 4, "--size", "small")
    assert "not --size small (the run's: tiny)" in stderr
    # nor its dropout, which its config holds (0 on a CPU by default)
    stderr = refused_resume(run_dir, "--max-steps", 4, "--dropout", 0.1)
    assert "not --dropout 0.1 (the run's: 0.0)" in stderr
    stderr = refused_resume(run_dir, "--max-steps", 4, "--init-from", tmp_path / "other.pt")
    assert "not --init-from " in stderr and "(the run's: its default)" in stderr
    # nor the rows a step (processes x --batch-size x --grad-accum), which number the data
    stderr = refused_resume(run_dir, "--max-steps", 4, "--batch-size", 2)
    assert "the run took 3 rows a step, this one 2 (2 per micro-batch x 1" in stderr
    # and a run at step 2 does not stop at step 1
    assert "the run is at step 2, past --max-steps 1" in refused_resume(run_dir, "--max-steps", 1)
    # nor, stopping at its --max-steps, at a --time-budget (which went unread)
    stderr = refused_resume(run_dir, "--time-budget", 1)
    assert "the run stops at --max-steps 2, and reads no --time-budget" in stderr
    # the default's 9.5 too, which the run recorded: it went unread as well, with no word
    stderr = refused_resume(run_dir, "--time-budget", 9.5)
    assert "the run stops at --max-steps 2, and reads no --time-budget" in stderr
    # a run from another's weights (--init-from) resumes from its own, that file gone or not
    init, started = tmp_path / "init.pt", tmp_path / "started"
    init.write_bytes((run_dir / "ckpt_last.pt").read_bytes())
    _train(
        tmp_path, "--init-from", init, *sizes, "--max-steps", 1, "--lr", 1e-12, "--out-dir", started
    )
    weights = [torch.load(f, weights_only=True)["model"] for f in (init, started / "ckpt_last.pt")]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])
    init.unlink()
    _train(tmp_path, "--resume", "--out-dir", started, "--max-steps", 2)


# -------------------------------------------------------------------------------------------------
# Learned positions learn word order under the default recipes
def word_corpus(folder, documents=20, words_per_document=1000):
    """Twenty made-up five-letter words in random order. A masked letter is decided by its
    neighbours within the word; a model blind to order sees only letter counts and stays near
    what letter counts give (both recipes sat at 24 % after 300 steps on 128-byte rows)."""
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(5)) for _ in range(20)]
    folder.mkdir()
    for d in range(documents):
        text = " ".join(rng.choice(words) for _ in range(words_per_document))
        (folder / f"doc{d:02d}.txt").write_text(text)
    return folder


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_learned_positions_learn_word_order(tmp_path, arch):
    """400 steps of an 800-step schedule on 32-byte rows, in fp32 (auto picks by a timing): with
    seeds 1337, 1 and 2, roberta 95.00, 95.71 and 93.21 %, bert at a peak of 1e-3 84.64, 82.14 and
    82.86 %. At bert's CPU peak, 2e-3 (the better on the stdlib), this corpus's plateau held some
    seeds through the 400 steps: 75.00, 24.64 and 35.71 %."""
    corpus = word_corpus(tmp_path / "words")
    flags = ["--context", 32, "--batch-size", 32, "--max-steps", 400, "--lr-steps", 800]
    flags += ["--dtype", "float32"]
    if arch == "bert":
        flags += ["--lr", "1e-3"]
    cmd = [sys.executable, "train.py", "--arch", arch, "--data", corpus, "--eval-seqs", 64]
    cmd += flags + ["--out-dir", tmp_path / "out"]
    run = run_python(cmd, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    accuracy = float(re.search(r"held-out masked-byte accuracy (\S+)%", run.stdout).group(1))
    assert accuracy >= 75, run.stdout[-1500:]
    table = [sys.executable, "docs/position_table.py", str(tmp_path / "out" / "ckpt_last.pt")]
    described = run_python(table, timeout=120)
    assert "step 400: position rows norm" in described.stdout, described.stderr[-2000:]


# -------------------------------------------------------------------------------------------------
# The GPU check's numerics, run on the CPU: every backend's logits and gradients are compared
def test_gpu_check_numerics_run_on_cpu():
    """The part of `gpu_check.py` that decides whether a backend is right runs here too:
    on a CPU, eager and sdpa in fp32 and bf16 pass against fp32 eager, forward and backward, and
    flash is reported unavailable rather than failing the check."""
    import torch

    import gpu_check

    report = gpu_check.check_numerics(torch.device("cpu"))
    for arch in ("bert", "roberta", "modernbert"):
        results = report[arch]["results"]
        for key in ("eager bf16", "sdpa fp32", "sdpa bf16"):
            assert results[key]["ok"], (arch, key, results[key])
            assert results[key]["grad_err"] > 0  # the gradients were compared
        assert results["sdpa fp32"]["err"] < 1e-5 and results["sdpa fp32"]["grad_err"] < 1e-5
        assert "unavailable" in results["flash bf16"]["note"]


class Event:
    """A profiler event as gpu_check reads one: a kernel, or a region's span over kernels."""

    def __init__(self, name, device_type, us, is_user_annotation=False):
        self.name, self.device_type, self.us = name, device_type, us
        self.is_user_annotation = is_user_annotation
        self.self_cpu_time_total = us
        self.time_range = self

    def elapsed_us(self):
        return self.us


def test_gpu_check_counts_each_kernel_once_and_keeps_what_a_timeout_printed(monkeypatch):
    """A compiled graph's span on the GPU covers its kernels: counted as a kernel, it doubled the
    kernel time and the busy share. A train.py run that times out keeps the lines it printed."""
    from torch.autograd import DeviceType

    import gpu_check

    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    events = [Event("gemm", cuda, 300), Event("softmax", cuda, 100)]
    events += [Event("## Call CompiledFxGraph ##", cuda, 400, is_user_annotation=True)]
    events += [Event("cudaStreamSynchronize", cpu, 5), Event("cudaLaunchKernel", cpu, 2)]
    figures = gpu_check.gpu_figures(events, steps=2, step_s=1e-3)
    assert figures["kernel_ms"] == pytest.approx(0.2) and figures["busy_share"] == pytest.approx(
        0.2
    )
    assert [row["name"] for row in figures["kernels"]] == ["gemm", "softmax"]
    assert figures["syncs_per_step"] == 0.5
    slow = [
        sys.executable,
        "-c",
        "import time; print('step 1 | 9k tok/s'); time.sleep(60)",
    ]
    # unflushed, as train.py's log lines are: a pipe held them until the child exited
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    done = gpu_check.captured(slow, timeout=3)
    assert done["returncode"] is None and done["stdout"] == ["step 1 | 9k tok/s"]
    assert "timed out after 3 s" in done["stderr"]
    failed = gpu_check.captured([sys.executable, "-c", "raise SystemExit('error: no GPU')"], 60)
    assert failed["returncode"] == 1 and failed["stderr"] == "error: no GPU\n"
    # a run that ends well keeps no stderr, but inductor's word on each graph CUDA graphs leave out
    skip = "W1207 [__cudagraphs] skipping cudagraphs due to mutated inputs (1 instances)"
    warned = f"import sys; print('chatter', file=sys.stderr); print({skip!r}, file=sys.stderr)"
    done = gpu_check.captured(
        [sys.executable, "-c", warned], 60, dict(TORCHINDUCTOR_CUDAGRAPHS="1")
    )
    assert done["returncode"] == 0 and done["stderr"] is None and done["cudagraph_lines"] == [skip]


def test_gpu_check_profile_says_when_its_step_ran_eager(capsys):
    """The profiled step's figures are an eager step's where torch.compile failed: said there."""
    import gpu_check

    figures = dict(rows=2, seq=64, step_ms=3.0, steps=10, recompiles=0, kernels=[])
    figures["compile_note"] = "torch.compile failed, ran eager: RuntimeError: no compiler"
    gpu_check.print_profile(figures)
    printed = capsys.readouterr().out
    assert "   compile_note: torch.compile failed, ran eager: RuntimeError: no compiler" in printed


def test_bench_compiles_every_model_past_dynamos_eight_graphs_per_code_object():
    """gpu_check compiles one model after another in one process, and their forwards share a code
    object: past torch._dynamo's limit of 8 graphs for one, a model's compiled step ran eager,
    with a warning. A ninth and tenth model's steps are traced as the first's."""
    import bench
    import tinyencoder as te
    from conftest import tiny
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    traced = []
    for layers in range(1, 11):
        cfg = tiny("bert", layers=layers)
        model = te.TinyEncoder(cfg)
        [batch] = bench.make_batches(cfg, 1, 2, 16, False, torch.device("cpu"), dtype=torch.float32)
        step = bench.Stepper(
            model, False, torch.float32, compile_=True, options=dict(backend="eager")
        )
        frames = counters["frames"]["total"]
        step(batch)
        traced.append(counters["frames"]["total"] > frames)
    torch._dynamo.reset()
    assert traced == [True] * 10


def test_gpu_check_times_every_arch_before_a_larger_batch_and_keeps_a_failure(monkeypatch):
    """(b) times every arch at its first batch size before any at the next, so that a run the
    budget cuts short holds each arch's first figures; an arch that fails (out of memory) keeps
    what it timed beside its error while the others go on; with no time left, each is skipped.
    Flash that cannot run where `auto` would pick it is a FAIL."""
    import gpu_check

    timed = []

    def start(arch, plan, setting, kept):
        return gpu_check.Started({}, None, dict(first_call_s=1.0, rows=[], per_batch_size=[]))

    def time_batch_size(steps, base, plan, setting, case):
        timed.append((case["arch"], case["rows"]))
        if case["arch"] == "bert" and case["rows"] == 4:
            raise RuntimeError("CUDA out of memory (simulated)")
        return [dict(case)], dict(rows=case["rows"], frames={"published": 0})

    monkeypatch.setattr(gpu_check, "start_arch", start)
    monkeypatch.setattr(gpu_check, "time_batch_size", time_batch_size)
    setting = gpu_check.Setting(torch.device("cpu"), torch.float32, 1e12, 0.0, True, 1e12)
    saved, archs = [], ("modernbert", "bert", "roberta")
    report = gpu_check.check_speed(setting, {}, saved.append, archs)
    # --tiny's batch sizes are 2 and 4
    assert timed == [(arch, 2) for arch in archs] + [(arch, 4) for arch in archs]
    assert [seen["rows"] for seen in report["bert"]["per_batch_size"]] == [2]
    assert report["bert"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert [row["rows"] for row in report["roberta"]["rows"]] == [2, 4]
    assert saved[-1] is report and len(saved) >= 6
    out_of_time = dataclasses.replace(setting, deadline=0.0)
    report = gpu_check.check_speed(out_of_time, {}, saved.append, archs)
    assert all(report[arch]["skipped"].startswith("2 rows and more: ") for arch in archs)
    judged = gpu_check.judge("bert", "flash bf16", "unavailable: no kernel", 1.0, None, True)
    assert judged["ok"] is False


def test_gpu_check_runs_train_py_under_cuda_graphs_only_when_asked(monkeypatch):
    """(f) runs (e)'s train.py again with inductor's CUDA graphs on (TORCHINDUCTOR_CUDAGRAPHS=1, as
    mode="reduce-overhead" sets them), only when --sections names it, and before (b), whose
    budget it would otherwise find spent."""
    import gpu_check

    ran = []

    def captured(command, timeout, environ=None):
        ran.append(dict(arch=command[command.index("--arch") + 1], environ=environ))
        lines = ["step 5/5 | 1.0k tok/s | mfu 1.0%"]
        return dict(returncode=0, stdout=lines, stderr=None, cudagraph_lines=[])

    monkeypatch.setattr(gpu_check, "captured", captured)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert "graphs" not in gpu_check.parse_args().sections
    setting = gpu_check.Setting(torch.device("cpu"), torch.float32, 1e12, 0.0, True, 1e12)
    report = {}
    gpu_check.run(report, setting, ("train", "graphs"), ("modernbert",))
    graphs = dict(TORCHINDUCTOR_CUDAGRAPHS="1")
    assert ran == [
        dict(arch="modernbert", environ=None),
        dict(arch="modernbert", environ=graphs),
        dict(arch="bert", environ=None),
    ]
    assert report["train.py graphs"]["lines"] == ["step 5/5 | 1.0k tok/s | mfu 1.0%"]


def test_the_measured_peak_counts_two_flops_a_multiply_add(monkeypatch):
    """An n x n product is 2 n^3 FLOPs: with every timed product taking 1 s on a fake clock, the
    best rate is 2 * 2048^3 FLOP/s, the CPU's larger size (each MFU quoted is over this figure)."""
    from types import SimpleNamespace

    import mfu

    clock = iter(range(10**6))
    monkeypatch.setattr(mfu, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    monkeypatch.setattr(torch, "matmul", lambda a, b: None)
    monkeypatch.setattr(mfu.tinyencoder, "ONEDNN_LINEAR", None)
    assert mfu.measured_peak(torch.device("cpu"), torch.float32, reps=1) == 2 * 2048**3


def test_the_data_sheet_peak_is_the_cards_own(monkeypatch):
    """An H100 PCIe is not an H100 SXM: 756 TFLOP/s, not 989 (MFU of the spec would read low)."""
    import mfu

    cards = {"NVIDIA H100 PCIe": 756, "NVIDIA H100 80GB HBM3": 989, "NVIDIA H200 NVL": 835}
    cards.update({"NVIDIA H200": 989, "NVIDIA A100-SXM4-80GB": 312, "Tesla T4": 0})
    for name, tflops in cards.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert mfu.spec_peak(torch.device("cuda")) == tflops * 1e12, name


def _bench(*args):
    """bench.py at a tiny size (BERT, 1 layer of 64, 2 rows of 64, 1 timed step, one thread) with
    args; it must exit 0."""
    command = [sys.executable, "bench.py", "--arch", "bert", "--layers", "1", "--hidden", "64"]
    command += ["--batch", "2", "--seq", "64", "--steps", "1", "--threads", "1", *map(str, args)]
    run = run_python(command)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.mark.parametrize(
    "script,flags,message",
    [
        ("bench", ["--steps", "0"], "argument --steps: must be at least 1"),
        ("bench", ["--json", "{tmp}/no/such/out.json"], "argument --json: cannot write a file at"),
        ("bench", ["--arch", "bert", "--seq", "600"], "--seq 600: bert reads at most 512 tokens"),
        ("bench", ["--hidden", "100"], "must be a multiple of 64 (heads of 64), got 100"),
        ("gpu_check", ["--json", "{tmp}"], "argument --json: cannot write a file at"),
        # no file's name: bench ran, then raised IsADirectoryError; "" ran and wrote nothing
        ("bench", ["--json", "{tmp}/out.json/"], "argument --json: cannot write a file at"),
        ("gpu_check", ["--json", ""], "argument --json: cannot write a file at"),
        ("gpu_check", ["--budget", "0"], "argument --budget: must be above 0, got 0"),
        (
            "bench",
            ["--encode", "--dtype", "bf16"],
            "--dtype: not for --encode, which times batches",
        ),
        ("gpu_check", ["--sections", "speed,mfu"], "choose from numerics,memory,train,speed,"),
        ("gpu_check", ["--archs", "electra"], "choose from modernbert,bert,roberta, got 'electra'"),
    ],
)
def test_bench_and_gpu_check_refuse_bad_flags_before_any_work(
    monkeypatch, tmp_path, script, flags, message
):
    """One line as the flags are read, not a traceback (or a lost --json) after the work."""
    import importlib

    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [script, *(flag.format(tmp=tmp_path) for flag in flags)])
    with pytest.raises(SystemExit, match=re.escape(message)):
        module.parse_args()


def test_bench_marks_a_step_that_failed_to_compile_and_ran_eager(monkeypatch, capsys):
    """torch.compile failing (no compiler on the machine): the step runs eager, and the table
    says so under the row whose figures are then eager ones, as the JSON's note does."""
    import bench

    def no_compiler(model, **options):
        def compiled(**inputs):
            raise RuntimeError("no C++ compiler found")

        return compiled

    monkeypatch.setattr(bench.torch, "compile", no_compiler)
    sizes = types.SimpleNamespace(layers=1, hidden=64, batch=2, seq=32, warmup=1, steps=1)
    case = ("bert", "full", "train", sizes, torch.device("cpu"), torch.float32)
    rows = bench.bench_case(*case, compile_=True, run_hf=False)
    note = "torch.compile failed, ran eager: RuntimeError: no C++ compiler found"
    assert [row["note"] for row in rows] == [note]
    bench.add_mfu(rows, peak=1e12)
    bench.print_table(rows, 1e12, "fp32")
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].strip() == f"^ te: {note}", lines
    assert lines[-2].startswith("bert       full  train published")


def test_bench_encode_runs_on_cpu():
    """`bench.py --encode`, at a tiny size: a row (encode unpads on a CPU, so one variant), and
    pipelines.encode's vectors the same as transformers' mean-pooled AutoModel's."""
    pytest.importorskip("transformers", reason="bench.py compares against transformers")
    command = [sys.executable, "bench.py", "--encode", "--arch", "bert", "--layers", "1"]
    command += ["--hidden", "64", "--texts", "8", "--steps", "1", "--threads", "1"]
    run = run_python(command)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = re.findall(r"^bert +(\w+) .* max\|diff\| (\S+)$", run.stdout, re.M)
    assert [name for name, _ in rows] == ["published"], run.stdout
    assert all(float(diff) < 1e-4 for _, diff in rows), run.stdout


def test_bench_profiles_every_step(tmp_path):
    """`bench.py --profile`, at a tiny size: the table's rows (each variant beside transformers),
    and after each case a profile of each model's steps, ops by self time, matmuls among them."""
    pytest.importorskip("transformers", reason="bench.py compares against transformers")
    json_path = tmp_path / "bench.json"
    run = _bench("--profile", "--json", json_path)
    rows = json.loads(json_path.read_text())["rows"]
    assert len(rows) == 6  # full train, full infer; var train and infer, published and unpad
    cases = [f"{batch} {step}" for batch in ("full", "var") for step in ("train", "infer")]
    for case in cases:
        names = ["published", "hf"] if case.startswith("full") else ["published", "unpad", "hf"]
        for name in names:
            table = run.stdout.split(f"profile: bert {case}, {name}, 1 steps\n")[1]
            assert "Self CPU time total" in table.split("profile:")[0], (case, name)
            assert "mm " in table.split("profile:")[0], (case, name)  # aten::mm or aten::addmm
    assert run.stdout.count("profile: ") == 10


STEPS = ("forward", "train")


def test_bench_attention_times_both_routes(tmp_path):
    """`bench.py --attention`, at a tiny size: a row for bench's rows and one for train.py's, each
    with both routes' times, forward and with the backward, and their ratio (bf16's over fp32's)."""
    json_path = tmp_path / "attention.json"
    run = _bench("--attention", "--warmup", "0", "--json", json_path)
    rows = json.loads(json_path.read_text())["attention"]
    assert [row["name"] for row in rows] == ["bench rows", "train.py rows"]
    assert rows[0]["shape"] == [2, 64, 1, 64] and rows[1]["shape"] == [16, 128, 4, 32]
    for row in rows:
        assert all(row[f"{dtype} {step}"] > 0 for dtype in ("fp32", "bf16") for step in STEPS)
        ratios = [row[f"bf16 {step}"] / row[f"fp32 {step}"] for step in STEPS]
        assert f"{ratios[0]:4.2f}x" in run.stdout and f"{ratios[1]:4.2f}x" in run.stdout


# -------------------------------------------------------------------------------------------------
# finetune.py end to end: it learns, resumes exactly after Ctrl-C, exports, and names bad input
def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def digit_spans(n, seed):
    """Texts of letters and digits whose digits are tagged "digit" by character spans."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        text = "".join(rng.choice("abcxyz0123456789 ") for _ in range(rng.randint(5, 40)))
        spans = [[i, i + 1, "digit"] for i, c in enumerate(text) if c.isdigit()]
        records.append({"text": text, "spans": spans})
    return records


def assert_same_evaluations(whole, interrupted, key):
    """The runs' metrics.jsonl hold the same steps, each once, with the same figures (key within
    1e-5), the time counted on over the interruption, and their ckpt_best.pt the same step."""
    runs = [[json.loads(line) for line in open(d / "metrics.jsonl")] for d in (whole, interrupted)]
    assert [r["step"] for r in runs[0]] == [r["step"] for r in runs[1]], runs
    elapsed = [r["elapsed_s"] for r in runs[1]]
    assert elapsed == sorted(elapsed), runs[1]
    assert all(abs(a[key] - b[key]) <= 1e-5 for a, b in zip(*runs)), runs
    best = [torch.load(d / "ckpt_best.pt", weights_only=True)["step"] for d in (whole, interrupted)]
    assert best[0] == best[1]


def finetune(tmp_path, *args, run=True):
    cmd = [sys.executable, "finetune.py", *map(str, args)]
    if "--out-dir" not in args:  # not the repository's out-finetune: a run never overwrites one
        cmd += ["--out-dir", str(tmp_path / "out-finetune")]
    here = str(Path(__file__).parent)
    if not run:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=here)
    return run_python(cmd)


def losses_until_ctrl_c(proc, steps=3) -> list:
    """The losses a running finetune.py prints until it stops, given a Ctrl-C at steps."""
    losses = []
    for line in proc.stdout:
        steps_before = len(losses)
        losses += re.findall(r"^step\s+\d+/\d+ \| loss (\S+)", line)
        if steps_before < steps <= len(losses):  # one Ctrl-C: a second one stops sooner, unsaved
            proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    return losses


def assert_resume_refuses_changes(tmp_path, init, train, val):
    """finetune.py --resume of tmp_path/b, a finished run of 40 steps from init on train and val:
    it reads no --init again, and refuses other data, batch size, examples or labels."""
    init.rename(tmp_path / "moved.pt")
    again = finetune(tmp_path, "--out-dir", tmp_path / "b", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    other = finetune(tmp_path, "--out-dir", tmp_path / "b", "--resume", "--val", train)
    assert other.returncode != 0 and "holds other examples than the run read" in other.stderr
    # the same files by other paths (here relative, and moved) are the run's data
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in (train, val):
        path.rename(moved / path.name)
    here = Path(__file__).parent
    files = ["--train", os.path.relpath(moved / train.name, here)]
    files += ["--val", os.path.relpath(moved / val.name, here)]
    again = finetune(tmp_path, "--out-dir", tmp_path / "b", "--resume", *files)
    assert again.returncode == 0, again.stderr[-2000:]
    for path in (train, val):
        (moved / path.name).rename(path)
    # the step numbers the rows: another batch size would shift the data
    fewer = finetune(tmp_path, "--out-dir", tmp_path / "b", "--resume", "--batch-size", 8)
    assert fewer.returncode != 0 and "not --batch-size 8 (the run's: 32)" in fewer.stderr
    early = finetune(tmp_path, "--out-dir", tmp_path / "b", "--resume", "--max-steps", 10)
    assert early.returncode != 0 and "the run is at step 40, past --max-steps 10" in early.stderr
    # nor the same files holding other examples, or other labels (each would mean another class)
    write_jsonl(train, digit_spans(200, 2))
    edited = finetune(tmp_path, "--out-dir", tmp_path / "b", "--resume", "--max-steps", 41)
    assert edited.returncode != 0 and "holds other examples than the run read" in edited.stderr
    for path, records in ((train, digit_spans(200, 0)), (val, digit_spans(50, 1))):
        for record in records:  # the tag "digit" renamed "number", in both files
            record["spans"] = [[first, end, "number"] for first, end, _ in record["spans"]]
        write_jsonl(path, records)
    edited = finetune(tmp_path, "--out-dir", tmp_path / "b", "--resume", "--max-steps", 41)
    assert edited.returncode != 0 and "has the labels ['O', 'number']," in edited.stderr


def test_finetune_keeps_the_class_numbers_of_its_init_classifier(tmp_path):
    """--init a classifier of labels ["pos", "neg"] that says "pos": fine-tuned on those labels, a
    step at lr 1e-12 still says "pos" (they were renumbered by sorted name, so it said "neg");
    other labels get a fresh head, whole-number labels go in their order, a BOM is no text."""
    pytest.importorskip("safetensors", reason="the classifier is saved as transformers saves it")
    import tinyencoder as te
    import tinyencoder_hf

    small = dict(hidden=32, layers=1, heads=2, max_len=64, classifier="sequence", num_labels=2)
    model = te.TinyEncoder(te.Config.from_preset("modernbert", **small))
    with torch.no_grad():
        model.classifier.out.weight.zero_()
        model.classifier.out.bias.copy_(torch.tensor([10.0, -10.0]))  # class 0 always
    tinyencoder_hf.save(model, str(tmp_path / "hf"), labels=["pos", "neg"])
    texts = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]
    train = write_jsonl(tmp_path / "train.jsonl", texts)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": f"c{i}", "label": "pos"} for i in range(4)])
    common = ["--init", tmp_path / "hf", "--max-steps", 1, "--lr", "1e-12", "--batch-size", 2]
    kept = finetune(tmp_path, "--train", train, "--val", val, *common)
    assert kept.returncode == 0 and "val_acc 1.0" in kept.stdout, kept.stdout[-2000:]
    # F1 is over the labels guessed or gold: "pos", guessed but never gold, counts as 0
    negative = [{"text": f"c{i}", "label": "neg"} for i in range(4)]
    missed = ["--train", train, "--val", write_jsonl(tmp_path / "neg.jsonl", negative)]
    missed = finetune(tmp_path, *missed, *common, "--out-dir", tmp_path / "c")
    assert missed.returncode == 0, missed.stderr[-2000:]
    record = [json.loads(line) for line in open(tmp_path / "c" / "metrics.jsonl")][-1]
    assert record["val_f1"] == {"pos": 0.0, "neg": 0.0} and record["val_acc"] == 0, record
    numbers = write_jsonl(
        tmp_path / "numbers.jsonl", [{"text": "t", "label": i} for i in range(11)]
    )
    numbers.write_bytes(b"\xef\xbb\xbf" + numbers.read_bytes())  # UTF-8's byte-order mark
    files = ["--train", numbers, "--val", numbers]
    fresh = finetune(tmp_path, *files, *common, "--out-dir", tmp_path / "b")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "knows the labels ['pos', 'neg'], not these: a fresh head" in fresh.stdout
    saved = torch.load(tmp_path / "b" / "ckpt_last.pt", weights_only=False)
    assert saved["labels"] == [str(i) for i in range(11)]


def test_finetune_numbers_labels_alike_whatever_the_hash_seed(tmp_path, monkeypatch):
    """Whole-number labels equal as numbers ("01" and "1") go in text order: a set's order, which
    the hash seed decides, numbered them one way or the other from run to run."""
    init = tiny_checkpoint(tmp_path / "init.pt")
    texts = [{"text": "a", "label": "1"}, {"text": "b", "label": "01"}, {"text": "c", "label": "2"}]
    train = write_jsonl(tmp_path / "train.jsonl", texts)
    for seed in ("0", "3"):  # the two orders, seen with these seeds
        monkeypatch.setenv("PYTHONHASHSEED", seed)
        files = ["--train", train, "--val", train, "--init", init, "--max-steps", 1]
        run = finetune(tmp_path, *files, "--out-dir", tmp_path / seed)
        assert run.returncode == 0, run.stderr[-2000:]
        saved = torch.load(tmp_path / seed / "ckpt_last.pt", weights_only=False)
        assert saved["labels"] == ["01", "1", "2"], seed


def assert_rates_and_metrics(stdout, folder):
    """A 40-step run at a peak of 3e-3: the rate each step trained at, 6 % warmup (2 steps) from a
    first step above 0, then from the peak down to 0 at step 40; and per byte, an accuracy of at
    most 1, and macro-F1 the mean of the labels' F1 that it lists."""
    rates = step_lrs(stdout)
    expected = [3e-3 * (s + 1) / 2 for s in range(2)] + [3e-3 * (40 - s) / 38 for s in range(2, 40)]
    assert rates == pytest.approx(expected, rel=6e-3), rates
    for record in map(json.loads, open(folder / "metrics.jsonl")):
        assert 0 <= record["val_acc"] <= 1, record
        f1 = list(record["val_f1"].values())
        assert record["val_macro_f1"] == pytest.approx(sum(f1) / len(f1), abs=1e-4), record


def test_finetune_learns_resumes_and_exports(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the export loads in transformers")
    init = tiny_checkpoint(tmp_path / "init.pt")
    train = write_jsonl(tmp_path / "train.jsonl", digit_spans(200, 0))
    val = write_jsonl(tmp_path / "val.jsonl", digit_spans(50, 1))
    common = ["--train", train, "--val", val, "--init", init, "--max-steps", 40]
    common += ["--lr", "3e-3", "--eval-interval", 1, "--log-interval", 1]
    whole = finetune(tmp_path, *common, "--out-dir", tmp_path / "a")
    assert whole.returncode == 0, whole.stderr[-2000:]
    losses = re.findall(r"^step\s+\d+/40 \| loss (\S+)", whole.stdout, re.M)
    accuracy = float(re.search(r"held-out accuracy (\S+)%", whole.stdout).group(1))
    assert len(losses) == 40 and accuracy >= 90, whole.stdout[-1000:]
    assert_rates_and_metrics(whole.stdout, tmp_path / "a")
    # Ctrl-C after a few steps, then --resume: the same losses, step for step
    first = losses_until_ctrl_c(finetune(tmp_path, *common, "--out-dir", tmp_path / "b", run=False))
    assert 3 <= len(first) < 40
    saved = torch.load(tmp_path / "b" / "ckpt_last.pt", weights_only=False)
    rest = finetune(tmp_path, *common, "--out-dir", tmp_path / "b", "--resume")
    assert rest.returncode == 0, rest.stderr[-2000:]
    # the resumed run's clock goes on from the interrupted one's, as train.py's
    later = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")][saved["step"] :]
    assert later and all(r["elapsed_s"] > saved["elapsed_s"] for r in later), later
    resumed = first + re.findall(r"^step\s+\d+/40 \| loss (\S+)", rest.stdout, re.M)
    # the same losses, step for step; once, in a full-suite run on an Intel CPU, one printed last
    # digit differed (0.480991 against 0.480992; never in 26 runs of the test alone): within 2e-6
    assert len(resumed) == len(losses), (resumed, losses)
    assert all(abs(float(a) - float(b)) <= 2e-6 for a, b in zip(resumed, losses)), (resumed, losses)
    # every step evaluated once, the interrupted one before it stopped: the same metrics and best
    assert_same_evaluations(tmp_path / "a", tmp_path / "b", "val_loss")
    assert_resume_refuses_changes(tmp_path, init, train, val)
    # the best checkpoint exports as a token classifier with its label names
    export = [sys.executable, "tinyencoder_hf.py", tmp_path / "a" / "ckpt_best.pt", tmp_path / "hf"]
    done = run_python(export)
    assert done.returncode == 0, done.stderr[-2000:]
    hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "hf")
    assert hf.config.id2label == {0: "O", 1: "digit"}


def digit_questions(n, seed):
    """Questions whose answer is the context's one run of digits (given at two starts once)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        before = "".join(rng.choice("abc xyz") for _ in range(rng.randint(0, 20)))
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3)))
        after = "".join(rng.choice("abc xyz") for _ in range(rng.randint(0, 20)))
        answers = [{"text": digits, "start": len(before)}]
        records.append(
            {"question": "digits?", "context": before + digits + after, "answers": answers}
        )
    return records


def test_finetune_answers_questions_and_exports(tmp_path):
    """--train of questions: a span model that finds the digits, scored by exact match; its
    best checkpoint exports as a transformers question-answering model."""
    transformers = pytest.importorskip("transformers", reason="the export loads in transformers")
    init = tiny_checkpoint(tmp_path / "init.pt", "modernbert")
    train = write_jsonl(tmp_path / "train.jsonl", digit_questions(300, 0))
    val = write_jsonl(tmp_path / "val.jsonl", digit_questions(50, 1))
    common = ["--train", train, "--val", val, "--init", init, "--max-steps", 80]
    run = finetune(tmp_path, *common, "--lr", "3e-3", "--eval-interval", 40, "--out-dir", tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    exact = float(re.search(r"held-out exact match (\S+)%", run.stdout).group(1))
    assert exact >= 80, run.stdout[-1500:]
    export = [sys.executable, "tinyencoder_hf.py", tmp_path / "ckpt_best.pt", tmp_path / "hf"]
    done = run_python(export)
    assert done.returncode == 0, done.stderr[-2000:]
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "ModernBertForQuestionAnswering"


def test_finetune_keeps_a_span_head_whatever_its_names(tmp_path):
    """A question-answering --init whose config names its two outputs (here "s" and "e") keeps its
    trained head: its names are no classes to match (it was dropped for a fresh one)."""
    pytest.importorskip("safetensors.torch", reason="the --init folder holds model.safetensors")
    import tinyencoder as te
    import tinyencoder_hf

    cfg = te.Config.from_preset("modernbert", hidden=32, layers=2, heads=2, classifier="span")
    tinyencoder_hf.save(te.TinyEncoder(cfg), str(tmp_path / "qa"), labels=["s", "e"])
    train = write_jsonl(tmp_path / "train.jsonl", digit_questions(8, 0))
    flags = ["--train", train, "--val", train, "--init", tmp_path / "qa", "--max-steps", 1]
    run = finetune(tmp_path, *flags)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "a fresh head" not in run.stdout, run.stdout[-2000:]


def test_finetune_shows_three_held_out_answers_at_most(tmp_path):
    """The demo takes the first question of each first word, and three of them at most: a file of
    questions with many first words showed one each (a forward pass and a log block apiece)."""
    init = tiny_checkpoint(tmp_path / "init.pt", "modernbert")
    questions = digit_questions(12, 0)
    for i, record in enumerate(questions):
        record["question"] = f"w{i} digits?"
    train = write_jsonl(tmp_path / "train.jsonl", questions)
    run = finetune(tmp_path, "--train", train, "--val", train, "--init", init, "--max-steps", 1)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("demo, held out") == 3, run.stdout[-2000:]


def test_finetune_train_examples_keeps_every_group(tmp_path):
    """--train-examples N spreads its N through the file: on a file of one label and then the
    other, 8 of 200 hold both, and the model learns both (the first 8 alone would be one label);
    0 or more than the file holds is a one-line error."""
    init = tiny_checkpoint(tmp_path / "init.pt")
    records = [{"text": letter * 12, "label": letter} for letter in "a" * 100 + "z" * 100]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", [records[0], records[-1]])
    common = ["--train", train, "--val", val, "--init", init, "--lr", "3e-3"]
    run = finetune(
        tmp_path, *common, "--train-examples", 8, "--max-steps", 30, "--out-dir", tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "8 training and 2 held-out examples" in run.stdout
    accuracy = float(re.search(r"held-out accuracy (\S+)%", run.stdout).group(1))
    assert accuracy == 100, run.stdout[-1500:]
    messages = {0: "argument --train-examples: must be at least 1 and at most 1000000000000, got 0"}
    messages[201] = f"--train-examples 201: {train} has 200"
    for wrong, message in messages.items():
        out = tmp_path / f"bad-{wrong}"
        bad = finetune(tmp_path, *common, "--train-examples", wrong, "--out-dir", out)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


QUESTION = '{"question": "q", "context": "abc", "answers": [{"text": "b", "start": 1}]}'


@pytest.mark.parametrize(
    "lines, message",
    [
        ([QUESTION.replace('"start": 1', '"start": 2')], "line 1: answers[0] is not a"),
        ([QUESTION.replace('"text": "b"', '"text": "cd"')], "line 1: answers[0] is not a"),
        # true is 1 to Python, not a character offset
        ([QUESTION.replace('"start": 1', '"start": true')], "line 1: answers[0] needs"),
        # an answer without its start, or an empty one: what it lacks, not "not the context's"
        ([QUESTION.replace(', "start": 1', "")], """answers[0] needs "text" (not empty) and"""),
        ([QUESTION.replace('"text": "b"', '"text": ""')], "got {'text': '', 'start': 1}"),
        ([QUESTION.replace('"start": 1', '"start": -1')], "got {'text': 'b', 'start': -1}"),
        ([QUESTION.replace('"q"', '"' + "q" * 70 + '"')], "line 1: question is 70 bytes"),
        ([QUESTION, '{"question": "q", "context": "abc"}'], 'line 2: needs "answers"'),
        (['{"question": "q"}'], '"question" and "context" strings'),
        ([QUESTION.replace('[{"text": "b", "start": 1}]', '["b"]')], "answers[0] must be an"),
        ([QUESTION, '{"text": "caf\xe9"}'], "line 2: not UTF-8 (byte 0xe9 at offset 13)"),
        (
            [QUESTION, '{"text": "x", "answers": []}'],
            'line 2: needs an object with "question" and "context" strings',
        ),
    ],
)
def test_finetune_bad_questions_are_one_line(tmp_path, lines, message):
    init = tiny_checkpoint(tmp_path / "init.pt")
    train = tmp_path / "train.jsonl"
    # latin-1: a UTF-8 line stays as it is; an e-acute alone is a byte UTF-8 cannot start with
    train.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    run = finetune(tmp_path, "--train", train, "--val", train, "--init", init, "--max-steps", 1)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1


def test_runs_of_lines_cut_long_lines_between_characters():
    """tasks.spans: whole lines up to max_bytes a run, a longer line cut before a character that
    would not fit; a budget under 4 bytes is refused (it cut before a 4-byte character forever)."""
    from data.tasks import spans

    data = "ab\n😀😀c\n".encode()
    assert list(spans(data, 4)) == [(0, 3), (3, 7), (7, 11), (11, 13)]
    with pytest.raises(ValueError, match="max_bytes must hold a 4-byte character"):
        list(spans(data, 3))


def test_stdlib_questions_are_spans_held_out_by_file():
    """The QA task: every answer is its context's text at its start, every question of the three
    kinds fits 128 tokens with [CLS] and two [SEP], and no context is in both splits; exact match
    and token F1 as defined."""
    from data.tasks import exact_match, qa_examples, token_f1

    parts = qa_examples()
    for part in parts.values():
        assert {r["question"].split()[0] for r in part} == {"default", "exception", "name"}
        for record in part:
            question, context = record["question"], record["context"]
            assert len(question.encode()) + len(context.encode()) + 3 <= 128
            for answer in record["answers"]:
                start = answer["start"]
                assert context[start : start + len(answer["text"])] == answer["text"]
    assert not {r["context"] for r in parts["train"]} & {r["context"] for r in parts["val"]}
    assert exact_match(" None ", ["x", "None"]) == 1.0 and exact_match("none", ["None"]) == 0.0
    assert token_f1("os.path", ["os.path.join"]) == pytest.approx(2 * 1.0 * 0.6 / 1.6)
    assert token_f1("a", ["b"]) == 0.0 and token_f1("", [""]) == 1.0
    # empty against words shares nothing; the best over the answers, in any order; a word of
    # UTF-8 bytes is one token (café is not caf)
    assert token_f1("", ["x"]) == 0.0 and token_f1("x", [""]) == 0.0
    assert token_f1("a b", ["a b", "a"]) == 1.0 and token_f1("a b", ["a", "a b"]) == 1.0
    assert token_f1("café", ["caf"]) == 0.0 and token_f1("café x", ["café"]) == pytest.approx(2 / 3)


FINETUNE_BAD_INPUT = [
    (None, "no such file"),
    (['{"text": "a", "label": "x"}', "{not json"], "line 2: not JSON"),
    (['["a list"]'], 'line 1: needs an object with a "text" string'),
    (['{"text": "ab", "tags": ["x"]}'], '"tags" must be a list with one tag per UTF-8 byte'),
    (['{"text": "ab", "spans": [[0, 5, "x"]]}'], '"spans" must be [first char, end char'),
    (['{"text": "a", "label": "x"}', '{"text": "b"}'], 'line 2: needs a "label"'),
    (['{"text": "a", "lable": "x"}'], 'line 1: needs "label", "tags", "spans" or "question"'),
    (['{"text": "a", "label": 0}', '{"text": "b", "label": "0"}'], "line 2: label '0' is"),
    # a blank line first: the first record is line 2's
    (["", '{"text": "a", "label": 0}', '{"text": "b", "label": "0"}'], "line 2's of int"),
    (["", '{"text": "a", "lable": "x"}'], 'line 2: needs "label", "tags", "spans" or "q'),
    (['{"text": "a", "label": null}'], '"label" must be a string or a whole number, got None'),
    (['{"text": "a", "label": "x"}'] * 2, "every example has the label 'x'"),
    (['{"text": "a", "spans": 5}'], '"spans" must be a list of [first char, end char, tag]'),
    # true and null would be classes "True" and "None"; true an offset of 1
    (
        ['{"text": "ab", "tags": [true, "x"]}'],
        "a tag must be a string or a whole number, got True",
    ),
    (['{"text": "ab", "spans": [[0, 2, null]]}'], "a tag must be a string or a whole number"),
    (['{"text": "ab", "spans": [[true, 2, "B"]]}'], '"spans" must be [first char, end char'),
    # a byte takes one tag: spans that overlap, given in either order (touching ones do not)
    (
        ['{"text": "abcdef", "spans": [[2, 5, "Y"], [0, 3, "X"], [5, 6, "Z"]]}'],
        'line 1: spans [0, 3, "X"] and [2, 5, "Y"] overlap; a byte takes one tag',
    ),
    # a line of another task's shape, in a classification file
    (
        ['{"text": "a", "label": "x"}', '{"question": "b", "context": "c", "label": "y"}'],
        'line 2: needs an object with a "text" string',
    ),
    # what Python's json refuses besides bad syntax: 4,301 digits, 1,000 brackets deep
    (['{"text": "a", "label": %s}' % ("9" * 5000)], "line 1: not JSON (Exceeds the limit"),
    (['{"text": "a", "label": "x", "m": %s}' % ("[" * 5000 + "]" * 5000)], "line 1: not JSON"),
    # 1 and "1" would be one class: tags are of one type, as labels are
    (['{"text": "ab", "tags": [1, "1"]}'], "line 1: tag '1' is of type str, line 1's of int"),
    (
        ['{"text": "ab", "spans": [[0, 1, "B"]]}', '{"text": "ab", "spans": [[0, 1, 2]]}'],
        "line 2: tag 2 is of type int, line 1's of str",
    ),
    # longer than the model reads: named by its line, in either file
    (
        ['{"text": "b", "label": "y"}', json.dumps({"text": "a" * 70, "label": "x"})],
        "line 2: text is 70 bytes; this model reads at most 62",
    ),
    (
        ['{"text": "a \\udc80", "label": "x"}'],
        "line 1: '\\udc80' is a lone surrogate, not text",
    ),
]


@pytest.mark.parametrize("lines, message", FINETUNE_BAD_INPUT)
def test_finetune_bad_input_is_one_line(tmp_path, lines, message):
    init = tiny_checkpoint(tmp_path / "init.pt")
    train = tmp_path / "train.jsonl"
    if lines is not None:
        train.write_text("\n".join(lines) + "\n")
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a", "label": "x"}])
    run = finetune(tmp_path, "--train", train, "--val", val, "--init", init, "--max-steps", 1)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1


def test_finetune_under_torchrun_is_one_line(tmp_path, monkeypatch):
    """finetune.py is one process: under torchrun each would run the whole job (one of them said
    that another run was writing its folder, the other saved a partial run)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    init = tiny_checkpoint(tmp_path / "init.pt")
    run = finetune(tmp_path, "--task", "tags", "--init", init, "--max-steps", 1)
    several = "runs as one process: WORLD_SIZE=2 asks for several (torchrun sets it)"
    assert run.returncode != 0 and several in run.stderr, run.stderr[-2000:]
    assert run.stderr.count("\n") == 1 and not (tmp_path / "out-finetune").exists()


def test_finetune_task_in_a_read_only_checkout_is_one_line(tmp_path):
    """--task writes its files into data/ once: where that fails (a read-only checkout, a full
    disk), one line as train.py's default corpus gives, not write_task's traceback."""
    code = "import errno, runpy, sys\nimport data.tasks\n\ndef read_only(*args):\n"
    code += "    raise OSError(errno.EROFS, 'Read-only file system')\n\n"
    code += "data.tasks.write_task = read_only\nsys.argv = sys.argv[1:]\n"
    code += "runpy.run_path(sys.argv[0], run_name='__main__')"
    init = tiny_checkpoint(tmp_path / "init.pt")
    flags = ["--task", "tags", "--init", init, "--out-dir", tmp_path / "out"]
    command = [sys.executable, "-c", code, "finetune.py", *map(str, flags)]
    here = Path(__file__).parent
    run = subprocess.run(command, capture_output=True, text=True, cwd=here, timeout=120)
    wanted = f"error: cannot write the tags task into {here / 'data'} (Read-only file system)"
    assert run.returncode != 0 and wanted in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1


@pytest.mark.skipif(
    not Path("/proc/self/mem").exists(), reason="Linux's /proc names the failing file"
)
def test_finetune_reads_a_pipe_and_names_a_file_it_cannot_read(tmp_path):
    """A pipe (bash's <(...)) is read as a file was (it was "no such file"); a file that opens but
    fails to read (/proc/self/mem: an I/O error at offset 0) is one line, not a traceback."""
    init = tiny_checkpoint(tmp_path / "init.pt")
    records = [{"text": c * (1 + i % 3), "label": c} for i in range(6) for c in "ab"]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    pipe = tmp_path / "val.pipe"
    os.mkfifo(pipe)
    writer = subprocess.Popen(["sh", "-c", f"cat {train} > {pipe}"])
    run = finetune(tmp_path, "--train", train, "--val", pipe, "--init", init, "--max-steps", 1)
    writer.wait(timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    # a classifier of these labels as --init: its label order is kept by a second read of --train,
    # which found the pipe empty ("no examples"); each file is read once
    tuned = tmp_path / "out-finetune" / "ckpt_last.pt"
    writer = subprocess.Popen(["sh", "-c", f"cat {train} > {pipe}"])
    again = ["--train", pipe, "--val", train, "--init", tuned, "--out-dir", tmp_path / "a"]
    run = finetune(tmp_path, *again, "--max-steps", 1)
    writer.wait(timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    unreadable = ["--val", "/proc/self/mem", "--out-dir", tmp_path / "b"]
    run = finetune(tmp_path, "--train", train, *unreadable, "--init", init, "--max-steps", 1)
    assert "error: /proc/self/mem: cannot read it (Input/output error)" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1


def test_finetune_that_diverges_keeps_no_broken_weights(tmp_path):
    """A learning rate of 3e4 for 3e-4: an update breaks the weights while its step's loss,
    computed before it, is finite. The evaluation after it finds the held-out loss not finite and
    stops the run before metrics.jsonl or a checkpoint keeps it (both did, and the error named
    that checkpoint as the last good one)."""
    init = tiny_checkpoint(tmp_path / "init.pt")
    records = [{"text": c * (1 + i % 7), "label": c} for i in range(10) for c in "abcd"]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", records[::2])
    flags = ["--max-steps", 30, "--lr", "3e4", "--eval-interval", 2, "--batch-size", 8]
    run = finetune(tmp_path, "--train", train, "--val", val, "--init", init, *flags)
    stopped = (
        r"error: (val_)?loss (nan|inf) at step \d+: stopped; (no checkpoint yet|the last good .*)"
    )
    assert run.returncode == 1 and re.fullmatch(stopped + "\n", run.stderr), run.stderr[-2000:]
    out = tmp_path / "out-finetune"
    evaluated = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(record["val_loss"]) for record in evaluated), evaluated
    for path in out.glob("ckpt_*.pt"):  # each saved at an evaluation that found it sound
        step = torch.load(path, weights_only=True)["step"]
        assert step in [record["step"] for record in evaluated], (path.name, step, evaluated)


def test_finetune_tags_around_empty_texts(tmp_path):
    """An empty text has nothing to tag: a batch of only such texts trains at loss 0 (before, a
    NaN that stopped the run as diverged), and a held-out file of only them is refused."""
    init = tiny_checkpoint(tmp_path / "init.pt")
    texts = [{"text": "ab", "tags": ["X", "Y"]}] * 2 + [{"text": "", "tags": []}] * 6
    train = write_jsonl(tmp_path / "train.jsonl", texts)  # 4 batches of 2: 2 or more all empty
    common = ["--train", train, "--init", init, "--batch-size", 2]
    run = finetune(tmp_path, *common, "--val", train, "--max-steps", 4)
    assert run.returncode == 0, run.stderr[-2000:]
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": "", "tags": []}])
    run = finetune(tmp_path, *common, "--val", empty, "--out-dir", tmp_path / "b")
    assert run.returncode != 0 and f"{empty}: no tags at all" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train", "{tmp}", "--val", "{tmp}/val.jsonl"], "{tmp}: a folder, not a JSONL file"),
        (
            ["--task", "tags", "--train", "{tmp}/val.jsonl"],
            "give --task, or --train and --val, not",
        ),
        (["--task", "tags", "--out-dir", "{tmp}/val.jsonl"], "val.jsonl' cannot be made a folder"),
        (
            [
                "--train",
                "{tmp}/two.jsonl",
                "--val",
                "{tmp}/two.jsonl",
                "--out-dir",
                "{tmp}/" + "/".join(["d" * 200] * 21),
            ],
            "cannot be made a folder here (File name too long)",
        ),
        (
            ["--task", "tags", "--val", "{tmp}/val.jsonl"],
            "give --task, or --train and --val, not",
        ),
        (["--task", "tags", "--seed", "-3"], "argument --seed: must be at least 0"),
    ],
)
def test_finetune_bad_flags_are_one_line(tmp_path, flags, message):
    write_jsonl(tmp_path / "val.jsonl", [{"text": "a", "label": "x"}])
    write_jsonl(tmp_path / "two.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    init = ["--init", tiny_checkpoint(tmp_path / "init.pt"), "--max-steps", 1]
    run = finetune(tmp_path, *(str(flag).format(tmp=tmp_path) for flag in flags), *init)
    assert run.returncode != 0 and message.format(tmp=tmp_path) in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train", "{tmp}/train.jsonl"], "give --task, or --train and --val"),
        (["--task", "tags"], "give --init"),
    ],
)
def test_finetune_names_a_missing_flag_before_making_its_out_dir(tmp_path, flags, message):
    """One line, before any work (--task's files were built first), and no empty --out-dir left."""
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}])
    out = tmp_path / "out"
    run = finetune(tmp_path, *(flag.format(tmp=tmp_path) for flag in flags), "--out-dir", out)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_finetune_init_that_is_not_a_checkpoint_is_one_line(tmp_path, content):
    import torch

    init = tmp_path / "init.pt"
    if content is None:  # a real torch file that train.py did not write
        torch.save({"weights": torch.zeros(2)}, init)
    else:
        init.write_bytes(content)
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}] * 4)
    run = finetune(tmp_path, "--train", train, "--val", train, "--init", init, "--max-steps", 1)
    assert run.returncode != 0 and f"--init {init}: not a" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1


def test_finetune_from_another_tasks_checkpoint_starts_a_fresh_head(tmp_path):
    """A span model's head (2 outputs) into a 3-label classifier: a fresh head, not a size
    mismatch from load_state_dict."""
    init = tiny_checkpoint(tmp_path / "span.pt", classifier="span")
    records = [{"text": text, "label": text} for text in ("a", "b", "c")]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    run = finetune(tmp_path, "--train", train, "--val", train, "--init", init, "--max-steps", 1)
    assert run.returncode == 0 and "3 labels" in run.stdout, run.stderr[-2000:]


def test_finetune_refuses_a_batch_no_memory_holds(tmp_path):
    """--batch-size 100000000 (a typo): one line before any work, as train.py's (it built a list of
    10^8 examples, then died in a traceback or swapped the machine)."""
    init = tiny_checkpoint(tmp_path / "init.pt")
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "ab", "label": "x"}, {"text": "c", "label": "y"}]
    )
    flags = ["--init", init, "--max-steps", 1, "--batch-size", 10**8]
    run = finetune(tmp_path, "--train", train, "--val", train, *flags)
    assert run.returncode != 0 and run.stderr.count("\n") == 1, run.stderr[-2000:]
    assert "--batch-size 100000000: a training step keeps" in run.stderr
    assert run.stderr.strip().endswith("here; lower it"), run.stderr


def test_finetune_held_out_labels_are_of_the_training_labels_type(tmp_path):
    """Labels 0 and 1 to train on and "0" and "1" held out would be read as the same classes; the
    held-out file's are refused, as a mix in one file is (tags alike)."""
    init = tiny_checkpoint(tmp_path / "init.pt")
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    )
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a", "label": "0"}])
    run = finetune(tmp_path, "--train", train, "--val", val, "--init", init, "--max-steps", 1)
    of = f"val.jsonl line 1: label '0' is of type str, {train} line 1's of int"
    assert run.returncode != 0 and of in run.stderr and run.stderr.count("\n") == 1, run.stderr
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "ab", "tags": [1, 2]}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "ab", "spans": [[0, 1, "B"]]}])
    run = finetune(tmp_path, "--train", train, "--val", val, "--init", init, "--max-steps", 1)
    assert "val.jsonl line 1: tag 'B' is of type str, " in run.stderr, run.stderr


def test_finetune_names_a_label_the_training_file_lacks(tmp_path):
    init = tiny_checkpoint(tmp_path / "init.pt")
    records = [{"text": "a", "label": "x"}, {"text": "c", "label": "z"}] * 2
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "b", "label": "y"}])
    run = finetune(tmp_path, "--train", train, "--val", val, "--init", init, "--max-steps", 1)
    assert run.returncode != 0 and "line 1: label 'y' is not among the training" in run.stderr


# -------------------------------------------------------------------------------------------------
# finetune.py's figures, best checkpoint and resume, from heads whose outputs are known
def constant_head_checkpoint(path, classifier, favoured, labels=None):
    """A tiny roberta checkpoint whose head always says class favoured, whatever the text."""
    # zero weights: the logits are the bias, whatever the text and dropout; so are the figures
    tiny_checkpoint(path, classifier=classifier, num_labels=2)
    state = torch.load(path, weights_only=True)
    bias = torch.full((2,), -10.0)
    bias[favoured] = 10.0
    state["model"]["classifier.out.weight"].zero_()
    state["model"]["classifier.out.bias"] = bias
    if labels is not None:
        state["labels"] = labels
    torch.save(state, path)
    return path


def test_finetune_scores_each_byte_of_the_texts_once(tmp_path):
    """Token accuracy and F1 count each UTF-8 byte once, tagged by character spans or "tags"."""
    # no [CLS], [SEP] or padding counts; a span may be empty or reach the text's end
    init = constant_head_checkpoint(tmp_path / "init.pt", "token", favoured=1)
    records = [
        {"text": "éé", "spans": [[1, 2, "X"]]},  # bytes O O X X: the second é is 2 bytes
        {"text": "é", "tags": ["X", "O"]},
        {"text": "ab", "spans": [[0, 2, "X"]]},
        {"text": "abc", "spans": [[1, 1, "X"]]},  # an empty span tags nothing
    ]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    flags = ["--train", train, "--val", train, "--init", init, "--max-steps", 1, "--lr", "1e-12"]
    run = finetune(tmp_path, *flags)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "out-finetune" / "metrics.jsonl").read_text())
    # 5 of the 11 bytes are X, which the head always says: precision 5/11, recall 1, F1 0.625
    assert record["val_acc"] == round(5 / 11, 6), record
    assert record["val_f1"] == {"O": 0.0, "X": 0.625}, record
    assert record["val_macro_f1"] == 0.3125, record


def whole_and_resumed(tmp_path, common, steps, split):
    """The losses, step by step, of finetune.py's run of steps in one go (in tmp_path/a) and of
    the same run stopped after split steps and resumed (in tmp_path/b)."""
    whole = finetune(tmp_path, *common, "--max-steps", steps, "--out-dir", tmp_path / "a")
    first = finetune(tmp_path, *common, "--max-steps", split, "--out-dir", tmp_path / "b")
    rest = finetune(
        tmp_path, *common, "--max-steps", steps, "--out-dir", tmp_path / "b", "--resume"
    )
    for run in (whole, first, rest):
        assert run.returncode == 0, run.stderr[-2000:]
    return step_losses(whole.stdout), step_losses(first.stdout) + step_losses(rest.stdout)


def test_finetune_keeps_the_first_best_and_shuffles_each_pass(tmp_path):
    """ckpt_best.pt is the first of equal scores, whole or resumed; each pass is shuffled anew."""
    # a head that always says "y" scores 0 on held-out "x" texts, at every step
    init = constant_head_checkpoint(tmp_path / "init.pt", "sequence", favoured=1)
    texts = [{"text": text, "label": label} for text, label in zip("abcd", "xxyy")]
    train = write_jsonl(tmp_path / "train.jsonl", texts)
    # 62 bytes: with [CLS] and [SEP], the model's 64 positions
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a" * 62, "label": "x"}])
    common = ["--train", train, "--val", val, "--init", init, "--lr", "1e-12", "--batch-size", 2]
    common += ["--eval-interval", 1, "--log-interval", 1]
    losses, resumed = whole_and_resumed(tmp_path, common, steps=8, split=4)
    for folder in ("a", "b"):
        best = torch.load(tmp_path / folder / "ckpt_best.pt", weights_only=True)
        assert best["step"] == 1 and best["best"] == 0.0, folder
    assert losses == resumed, (losses, resumed)
    # a step's loss is its pair's mean (20 an "x", 0 a "y"): each pass's pair of losses is its order
    passes = {tuple(losses[i : i + 2]) for i in range(0, len(losses), 2)}
    assert len(losses) == 8 and len(passes) > 1, losses
    # refused before any work: before --init (here a missing one) is read
    missing = ["--init", tmp_path / "missing.pt", "--out-dir", tmp_path / "a"]
    again = finetune(tmp_path, *common, "--max-steps", 8, *missing)
    assert again.returncode != 0 and "holds a run (ckpt_last.pt)" in again.stderr, again.stderr


@pytest.mark.parametrize("kind", ["sequence", "span"])
def test_finetune_evaluates_without_dropout_and_trains_with_it(tmp_path, kind):
    """Evaluations run without dropout; a resumed run trains with it, as the whole run did."""
    # at a rate of 1e-12 the weights stay put: every evaluation gives the same held-out loss
    init = tiny_checkpoint(tmp_path / "init.pt")
    records = {"span": digit_questions(8, 0)}
    records["sequence"] = [{"text": letter * 5, "label": letter} for letter in "abcd"]
    train = write_jsonl(tmp_path / "train.jsonl", records[kind])
    common = ["--train", train, "--val", train, "--init", init, "--lr", "1e-12", "--batch-size", 4]
    common += ["--eval-interval", 1, "--log-interval", 1]
    whole, resumed = whole_and_resumed(tmp_path, common, steps=3, split=1)
    assert resumed == pytest.approx(whole, abs=1e-5), (resumed, whole)
    records = [json.loads(line) for d in "ab" for line in open(tmp_path / d / "metrics.jsonl")]
    assert len(records) == 6, records
    losses = [record["val_loss"] for record in records]
    assert losses == pytest.approx([losses[0]] * 6, abs=1e-5), losses


def test_finetune_draws_fresh_weights_where_asked(tmp_path):
    """Other labels get a fresh head, --from-scratch fresh weights; a partial --init is refused."""
    labels = ["pos", "neg"]
    init = constant_head_checkpoint(tmp_path / "init.pt", "sequence", favoured=0, labels=labels)
    texts = [{"text": text, "label": label} for text, label in zip("abcd", "xxyy")]
    train = write_jsonl(tmp_path / "train.jsonl", texts)
    common = ["--train", train, "--val", train, "--max-steps", 1, "--lr", "1e-12"]
    run = finetune(tmp_path, *common, "--init", init, "--out-dir", tmp_path / "a")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "knows the labels ['pos', 'neg'], not these: a fresh head" in run.stdout, run.stderr
    head = torch.load(tmp_path / "a" / "ckpt_last.pt", weights_only=True)["model"]
    assert head["classifier.out.bias"].abs().max() < 1, head["classifier.out.bias"]
    # embeddings of 1 and more: what a fresh draw (of about 0.02) is not
    state = torch.load(init, weights_only=True)
    state["model"]["tok_embed.weight"] += 1.0
    torch.save(state, tmp_path / "shifted.pt")
    flags = ["--init", tmp_path / "shifted.pt", "--from-scratch", "--out-dir", tmp_path / "b"]
    run = finetune(tmp_path, *common, *flags)
    assert run.returncode == 0, run.stderr[-2000:]
    after = torch.load(tmp_path / "b" / "ckpt_last.pt", weights_only=True)["model"]
    assert after["tok_embed.weight"].abs().max() < 0.5, after["tok_embed.weight"]
    del state["model"]["tok_embed.weight"]
    torch.save(state, tmp_path / "partial.pt")
    run = finetune(
        tmp_path, *common, "--init", tmp_path / "partial.pt", "--out-dir", tmp_path / "c"
    )
    assert run.returncode != 0 and "it lacks ['tok_embed.weight'] of" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1


def test_finetune_numbers_negative_labels_and_takes_every_example(tmp_path):
    """Labels -2 before -1; --train-examples may take all; weight decay is on matrices alone."""
    init = tiny_checkpoint(tmp_path / "init.pt")
    texts = [{"text": text, "label": label} for text, label in zip("abcd", (-1, -1, -2, -2))]
    train = write_jsonl(tmp_path / "train.jsonl", texts)
    flags = ["--train", train, "--val", train, "--init", init, "--max-steps", 1]
    run = finetune(tmp_path, *flags, "--train-examples", 4)
    assert run.returncode == 0 and "4 training and 4 held-out" in run.stdout, run.stderr[-2000:]
    saved = torch.load(tmp_path / "out-finetune" / "ckpt_last.pt", weights_only=True)
    assert saved["labels"] == ["-2", "-1"], saved["labels"]
    decays = [group["weight_decay"] for group in saved["optim"]["param_groups"]]
    assert decays == [0.01, 0.0], decays


def test_finetune_saves_a_ctrl_c_between_evaluations(tmp_path):
    """Ctrl-C between evaluations saves ckpt_last.pt at the step it stopped after."""
    init = tiny_checkpoint(tmp_path / "init.pt")
    train = write_jsonl(tmp_path / "train.jsonl", digit_spans(20, 0))
    flags = ["--train", train, "--val", train, "--init", init, "--max-steps", 1000]
    flags += ["--eval-interval", 1000, "--log-interval", 1, "--batch-size", 4]
    losses = losses_until_ctrl_c(finetune(tmp_path, *flags, run=False))
    saved = torch.load(tmp_path / "out-finetune" / "ckpt_last.pt", weights_only=True)
    assert saved["step"] == len(losses), (saved["step"], len(losses))
    assert 3 <= len(losses) < 1000, losses


def accented_questions(n, seed, held_out=False):
    """Questions answered by the digits ending a context of two-byte letters."""
    # held out, a wrong answer (the context's first character) comes before the right one
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        before = "".join(rng.choice("aé xé") for _ in range(rng.randint(1, 20)))
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3)))
        answers = [{"text": digits, "start": len(before)}]
        if held_out:
            answers.insert(0, {"text": before[0], "start": 0})
        records.append({"question": "digits?", "context": before + digits, "answers": answers})
    return records


def test_finetune_answers_at_the_end_of_a_context_of_utf8(tmp_path):
    """A span model learns answers at a UTF-8 context's end; exact match takes any answer given."""
    # byte offsets, not character ones, find the answer; the context's last token may end it
    init = tiny_checkpoint(tmp_path / "init.pt", "modernbert")
    train = write_jsonl(tmp_path / "train.jsonl", accented_questions(300, 0))
    val = write_jsonl(tmp_path / "val.jsonl", accented_questions(50, 1, held_out=True))
    common = ["--train", train, "--val", val, "--init", init, "--max-steps", 100]
    run = finetune(tmp_path, *common, "--lr", "3e-3", "--eval-interval", 100)
    assert run.returncode == 0, run.stderr[-2000:]
    exact = float(re.search(r"held-out exact match (\S+)%", run.stdout).group(1))
    assert exact >= 80, run.stdout[-1500:]


def test_finetune_picks_the_best_answers_by_exact_match(tmp_path):
    """Of questions, ckpt_best.pt is the step of the best exact match, not of the best token F1."""
    init = tiny_checkpoint(tmp_path / "init.pt", "modernbert")
    train = write_jsonl(tmp_path / "train.jsonl", accented_questions(300, 0))
    # the answer is the whole context, a word and digits: a model that gives the digits alone
    # scores no exact match, and a token F1 that grows as it learns them
    decoys = []
    for record in accented_questions(20, 1):
        context = "éa " + record["context"][-3:].lstrip("aé x")
        answers = [{"text": context, "start": 0}]
        decoys.append({"question": "digits?", "context": context, "answers": answers})
    val = write_jsonl(tmp_path / "val.jsonl", decoys)
    flags = ["--train", train, "--val", val, "--init", init, "--max-steps", 60, "--lr", "3e-3"]
    run = finetune(tmp_path, *flags, "--eval-interval", 20)
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for line in open(tmp_path / "out-finetune" / "metrics.jsonl")]
    f1 = [record["val_token_f1"] for record in records]
    assert [record["val_exact"] for record in records] == [0, 0, 0] and max(f1) > f1[0], records
    best = torch.load(tmp_path / "out-finetune" / "ckpt_best.pt", weights_only=True)
    assert best["step"] == 20, (best["step"], records)


def test_stdlib_tasks_tag_bytes_as_tokenize_does():
    """The tagging task's tags come from Python's tokenize; the package task's labels are the
    packages the definitions come from; neither task has a text in both splits."""
    from data.tasks import PACKAGES, TAGS, byte_tags, package_examples, tagging_examples

    source = 'if x:  # é\n    y = f"{x}" + 0x1F\n'
    tags = [TAGS[t] for t in byte_tags(source)]
    data = source.encode()
    assert len(tags) == len(data)
    spelled = {tag: bytes(b for b, t in zip(data, tags) if t == tag).decode() for tag in TAGS}
    assert spelled["keyword"] == "if" and spelled["number"] == "0x1F"
    assert spelled["comment"] == "# é"
    # from 3.12, tokenize splits an f-string: f"{x}"'s x is a name, its braces operators
    fstring = ("xy", ":=+", 'f"{x}"')
    if sys.version_info >= (3, 12):
        fstring = ("xyx", ":={}+", 'f""')
    assert (spelled["name"], spelled["operator"], spelled["string"]) == fstring
    parts = package_examples()
    assert {ex["label"] for ex in parts["val"]} == set(PACKAGES)
    assert not {ex["text"] for ex in parts["train"]} & {ex["text"] for ex in parts["val"]}
    # every training run kept: a held-out run of copied code is in some training file's runs
    parts = tagging_examples(train_every=1)
    assert not {ex["text"] for ex in parts["train"]} & {ex["text"] for ex in parts["val"]}
    assert len(parts["val"]) > 1000


@pytest.mark.parametrize(
    "case, message",
    [
        ("no folder", "no metrics.jsonl (give train.py --out-dir folders)"),
        ("empty", "has no evaluations yet"),
        ("no matplotlib", 'needs matplotlib: pip install -e ".[plot]"'),
        ("finetune.py's", "is not train.py's (no arch and masked-byte accuracy)"),
        # a line cut short by a kill is passed over: the evaluations before it are read
        ("cut line", 'needs matplotlib: pip install -e ".[plot]"'),
    ],
)
def test_plot_metrics_bad_input_is_one_line(tmp_path, case, message):
    """docs/plot_metrics.py: a folder without evaluations, or not train.py's, or no matplotlib
    (the plot extra, hidden here as if not installed), stops with one line that names it."""
    run = tmp_path / "run"
    evaluation = dict(step=10, arch="bert", elapsed_s=6.0, val_acc=0.5)
    lines = {"empty": "", "finetune.py's": json.dumps(dict(step=10, val_macro_f1=0.5)) + "\n"}
    lines["cut line"] = json.dumps(evaluation) + '\n{"step": 20, "arch'
    if case != "no folder":
        run.mkdir()
        (run / "metrics.jsonl").write_text(lines.get(case, json.dumps(evaluation) + "\n"))
    done = run_without("matplotlib", "docs/plot_metrics.py", run)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_position_table_reads_a_finetune_checkpoint(tmp_path):
    """docs/position_table.py on a finetune.py checkpoint (a head, no train.py --context): the
    whole table, not a KeyError."""
    path = tiny_checkpoint(tmp_path / "tagger.pt", "bert", classifier="token", nsp=False)
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, step=3, args=dict(task="tags")), path)
    table = [sys.executable, "docs/position_table.py", str(path)]
    done = run_python(table)
    assert done.returncode == 0 and "step 3: position rows norm" in done.stdout, done.stderr


def test_runs_started_at_once_write_a_task_apart(tmp_path):
    """Two fine-tuning runs started together both write the task files: neither may move the
    other's half-written file away."""
    code = (
        "import sys, data.tasks as t\n"
        "def many(max_bytes):\n"
        "    return {p: [{'text': 'x' * 100, 'label': p}] * 100000 for p in ('train', 'val')}\n"
        "t.tagging_examples = many\n"
        "t.write_task('tags', sys.argv[1])\n"
    )
    command = [sys.executable, "-c", code, str(tmp_path)]
    here = str(Path(__file__).parent)
    runs = [
        subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=here) for _ in range(3)
    ]
    errors = [run.communicate(timeout=120)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], errors
    from data.tasks import task_paths

    made = sorted(path.name for path in tmp_path.iterdir())
    assert made == [os.path.basename(path) for path in task_paths("tags", tmp_path).values()]
    # named for this Python to its patch level (3.11.2's stdlib is not 3.11.7's), and the rules
    assert made[0].startswith("tags-py%d.%d.%d-" % sys.version_info[:3]), made


@pytest.mark.parametrize("steps,schedule", [(300, 2000), (2500, 2500)])
def test_the_lr_schedule_lasts_as_long_as_the_run(tmp_path, steps, schedule):
    """--max-steps below 2000 keeps a 2000-step schedule (a resumed run can go on along it); above,
    the schedule is as long as the run (it ended at 2000, and the steps after trained at LR 0)."""
    cmd = [sys.executable, "train.py", "--data", _corpus(tmp_path), "--max-steps", steps]
    cmd += ["--out-dir", tmp_path / "out", "--eval-seqs", 4]
    here = str(Path(__file__).parent)
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, text=True, cwd=here)
    plan = planned(proc)
    assert f"training steps 1..{steps}, peak lr 0.002 on a {schedule}-step schedule" in plan


def test_a_finished_timed_run_given_a_new_budget_says_what_takes_it_further(tmp_path):
    """A run fitted to --time-budget that took every step it planned: resumed with a larger budget,
    one line says so (it logged the flag as changed, then trained "steps 3..2" and ended)."""
    run_dir = tmp_path / "run"
    _train(tmp_path, "--max-steps", 2, "--context", 32, "--out-dir", run_dir)
    state = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    state["args"].update(max_steps=None, time_budget=0.5)  # as if fitted to half a minute
    torch.save(state, run_dir / "ckpt_last.pt")
    run = run_python(
        [sys.executable, "train.py", "--resume", "--out-dir", run_dir, "--time-budget", 1]
    )
    assert run.returncode == 1, run.stdout[-2000:]
    assert "the run took all 2 steps it planned, its schedule over; --max-steps" in run.stderr


def test_a_resumed_run_has_the_time_budget_the_run_left(tmp_path):
    """A run fitted to --time-budget records the time it has spent; resumed, it plans anew in the
    budget's rest, timing a step and an evaluation as a fresh run does (it counted evaluations as
    free, planned too many steps and squeezed its decay), not a whole budget later."""
    run_dir = tmp_path / "run"
    _train(tmp_path, "--max-steps", 2, "--context", 32, "--out-dir", run_dir)
    state = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    assert 0 < state["elapsed_s"] < 300 and state["global_batch"] == 64
    # as if a run of one minute without --max-steps had used 50 s of it, with 1000 steps planned
    state["args"].update(max_steps=None, time_budget=1.0)
    state.update(max_steps=1000, elapsed_s=50.0)
    torch.save(state, run_dir / "ckpt_last.pt")
    cmd = [sys.executable, "train.py", "--resume", "--out-dir", run_dir]
    run = run_python(cmd)
    # planned again on resuming, its evaluations counted, and ended in the 10 s left
    assert "time budget 1 min: ~" in run.stdout, run.stdout[-2000:]
    steps = int(re.search(r"; (\d+) steps, \d+s$", run.stdout.strip()).group(1))
    assert 3 <= steps < 1000, run.stdout[-2000:]
    spent = torch.load(run_dir / "ckpt_last.pt", weights_only=True)["elapsed_s"]
    # the 50 s spent before and its own 10 s and setup, not a whole minute more
    assert spent > 50, spent
    assert spent < 60 + 20, spent
    last = (run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["elapsed_s"] > 50, last


@pytest.fixture
def signals_kept():
    """SIGINT's and SIGTERM's handlers and the wakeup file, set back after a test that makes a
    StopSignals as they were before it, whatever the test leaves."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    signal.set_wakeup_fd(wakeup)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture
def their_wakeup_file(signals_kept):
    """The write end of another's wakeup pipe (non-blocking, as set_wakeup_fd needs)."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    yield write
    signal.set_wakeup_fd(-1)
    os.close(read)
    os.close(write)


def test_a_second_signal_stops_at_once_and_leaves_no_half_file(tmp_path, capfd, signals_kept):
    """The first Ctrl-C or SIGTERM asks the loop to stop after its step (and says so); a second
    stops as soon as Python runs, through `finally`, so that a checkpoint being written leaves no
    half file; a third would find both signals' default action back."""
    import runs
    from data.corpus import renamed_into_place

    stop = runs.StopSignals()
    try:
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == [signal.SIGTERM]
        assert "SIGTERM: stopping after the step in flight" in capfd.readouterr().err
        with pytest.raises(SystemExit, match=r"stopped by a second signal \(SIGINT\)"):
            with renamed_into_place(str(tmp_path / "ckpt_last.pt")) as temporary:
                Path(temporary).write_bytes(b"half a checkpoint")
                signal.raise_signal(signal.SIGINT)
        assert list(tmp_path.iterdir()) == []
        restored = [signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)]
        assert restored == [signal.SIG_DFL, signal.SIG_DFL]
    finally:
        stop.close()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals, and libc's system()")
def test_a_third_signal_stops_at_once_inside_a_long_native_call(tmp_path):
    """Python's handlers wait for the native call in flight to return (one attention call over
    a 300,000-token row ignored three signals, and eight): a third signal ends the process at
    once all the same. libc's system() stands for that call: it waits through signals."""
    code = "import ctypes, runs; stop = runs.StopSignals(); print('ready', flush=True); "
    code += "ctypes.CDLL(None).system(b'exec sleep 6 </dev/null >/dev/null 2>&1')"
    here = str(Path(__file__).parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=here
    )
    assert proc.stdout.readline() == b"ready\n"
    started = time.time()
    for _ in range(3):
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert err == "error: stopped at once by a third signal (SIGTERM)\n"
    assert time.time() - started < 4


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals, fork and process groups")
def test_only_this_process_s_own_stop_signals_count_as_its_third(tmp_path):
    """What the watcher does not count: another signal that Python handles (SIGUSR1, twice here),
    and the Ctrl-C of forked children (a DataLoader's workers), which the terminal sends their
    whole process group: one Ctrl-C with two children counted three, and ended the run unsaved.
    The children are slow to start (an after-fork hook that sleeps, as on a loaded machine): the
    Ctrl-C reaches them before they have let go of the parent's wakeup file."""
    code = """import os, signal, sys, time, runs
os.register_at_fork(after_in_child=lambda: time.sleep(1))
stop = runs.StopSignals()
signal.signal(signal.SIGUSR1, lambda signum, frame: print("usr1", flush=True))
for _ in range(2):
    if os.fork() == 0:
        time.sleep(1)
        os._exit(0)
print("ready", flush=True)
for line in sys.stdin:
    pass
time.sleep(2)
print("alive", stop.received, flush=True)
"""
    here = str(Path(__file__).parent)
    run = [sys.executable, "-c", code]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(run, **pipes, cwd=here, start_new_session=True)
    # a handler that never runs would leave readline waiting: a minute, then a failure
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    assert proc.stdout.readline() == b"ready\n"
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: every process of the group
    # one at a time: two of the same signal sent back to back can arrive as one
    for _ in range(2):
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.stdout.readline() == b"usr1\n"
    out, err = (text.decode() for text in proc.communicate(b"", timeout=60))
    watchdog.cancel()
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert f"alive [{int(signal.SIGINT)}]" in out, (out, err)


def test_a_closed_stop_signals_sets_back_the_wakeup_file_once(their_wakeup_file):
    """close: the wakeup file set before is back (another's, here), and a second close does
    nothing to a StopSignals made since (it closed the newer one's file, of the same number)."""
    import runs

    signal.set_wakeup_fd(their_wakeup_file)
    first = runs.StopSignals()
    first.close()
    assert signal.set_wakeup_fd(-1) == their_wakeup_file
    second = runs.StopSignals()
    first.close()
    assert signal.set_wakeup_fd(second.wakeup) == second.wakeup
    os.fstat(second.wakeup)  # still open
    second.close()


def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_half_file(tmp_path, monkeypatch):
    """A full disk: torch.save's own error names neither the file nor the cause."""
    import runs

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3005632")

    monkeypatch.setattr(runs.torch, "save", full_disk)
    path = tmp_path / "ckpt_last.pt"
    with pytest.raises(SystemExit, match=r"could not write .*ckpt_last.pt \(is the disk full\?"):
        runs.save_checkpoint(str(path), {"step": 1})
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------------
# Tests from mutation runs over runs.py, data/corpus.py and data/rows.py (each fails on its mutant)
def test_sinusoids_fill_sin_and_cos_from_the_offset_on():
    """Vaswani et al.'s table from row offset on (position 0 there): sin on even dimensions, cos
    on odd ones, both scaled; the rows below the offset are left as they were."""
    from runs import sinusoids

    table = torch.full((6, 4), 7.0)
    sinusoids(table, offset=2, amplitude=0.1)
    position = torch.arange(4.0)[:, None]
    rate = torch.tensor([1.0, 0.01])  # 10000^(-i / 4) for i = 0, 2
    assert torch.equal(table[:2], torch.full((2, 4), 7.0))
    torch.testing.assert_close(table[2:, 0::2], 0.1 * torch.sin(position * rate))
    torch.testing.assert_close(table[2:, 1::2], 0.1 * torch.cos(position * rate))


def test_a_dropout_flag_of_1_is_refused_and_one_just_below_taken():
    """--dropout's range is [0, 1): 1 would zero every activation (and scale by 1 / 0)."""
    from argparse import ArgumentTypeError

    from runs import DROPOUT

    assert DROPOUT("0.999") == 0.999
    assert DROPOUT("0") == 0.0
    with pytest.raises(ArgumentTypeError, match="below 1"):
        DROPOUT("1")


def test_a_resumed_run_keeps_this_machines_flags_and_the_runs_where_auto(monkeypatch):
    """resumed_args: a flag in keep stays this machine's; one not given, or given as "auto", takes
    the run's; one given anew is used and listed; the parser's defaults are its own again after."""
    from runs import Parser, resumed_args

    parser = Parser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=1)
    monkeypatch.setattr(sys, "argv", ["train.py", "--dtype", "auto", "--lr", "0.5"])
    args = parser.parse_args()
    saved = dict(device="cuda", dtype="bfloat16", lr=0.1, seed=7)
    changed = resumed_args(parser, args, saved, keep=("device",), fixed=())
    assert vars(args) == dict(device="auto", dtype="bfloat16", lr=0.5, seed=7)
    assert changed == ["--lr 0.5 (the run's: 0.1)"]
    assert parser.parse_args([]).seed == 1


def test_each_epoch_reads_every_row_once_in_a_new_order_with_new_dynamic_masks():
    """An epoch is a permutation of the corpus's rows, shuffled anew each epoch (as a DataLoader
    with shuffle=True); dynamic masks are keyed by the example, not by its row, so that a row read
    again is masked anew."""
    from types import SimpleNamespace

    from data.rows import TrainingRows

    docs = [b"document %d. " % k * (3 + k % 5) for k in range(30)]
    data, offsets = byte_corpus(docs)
    recipe = SimpleNamespace(inputs="full-sentences", masking="dynamic")
    rows = TrainingRows(recipe, data, offsets, 32, 0, 1)
    first, second = rows.order(0).tolist(), rows.order(1).tolist()
    assert sorted(first) == list(range(rows.count))
    assert sorted(second) == list(range(rows.count))
    assert first != second
    again = rows.count + second.index(first[0])  # epoch 0's first row, read in epoch 1
    assert np.array_equal(rows[0].ids, rows[again].ids)
    assert rows[0].mask_key != rows[again].mask_key


class Unexpected:
    """A class that a pickle names: torch.load with weights_only runs no code a file names."""


def test_a_checkpoint_that_pickles_an_object_is_refused(tmp_path):
    """A checkpoint is loaded with weights_only: a file that pickles an object (code it would
    run) is refused in one line naming the flag."""
    from runs import load_checkpoint

    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "cfg": {}, "extra": Unexpected()}, path)
    with pytest.raises(SystemExit, match=r"--init-from .*: not a readable checkpoint"):
        load_checkpoint(str(path), "--init-from")


def test_a_bert_document_longer_than_a_pair_is_cut_into_pairs_rounded_up():
    """BERT's pairs cut each document in pieces of length - 3 bytes, the last one shorter: a
    document of 1.5 pieces makes two pairs, a short one one."""
    from types import SimpleNamespace

    from data.rows import TrainingRows

    data, offsets = byte_corpus([b"a" * 150, b"b" * 40])
    recipe = SimpleNamespace(inputs="pairs", masking="static")
    rows = TrainingRows(recipe, data, offsets, 103, 1337, 10)
    assert rows.pair_starts.tolist() == [0, 100, 150]


def test_collate_passes_next_sentence_labels_whatever_the_first_rows():
    """BERT's pair rows carry an NSP label, 0 (B follows A) or 1 (a random B): the batch passes
    them all, a first row's 0 included; rows without one (-1) pass none."""
    import tinyencoder as te
    from data.rows import Example, collate

    def row(nsp_label):
        ids = np.array([te.CLS, 104, 105, te.SEP])
        return Example(ids, np.zeros(4, np.int64), np.ones(4, np.int64), nsp_label, [0, 1])

    cfg = te.Config.from_preset("bert", hidden=64, layers=1, heads=2)
    batch = collate([row(0), row(1)], cfg, torch.device("cpu"), 0.5)
    assert batch["next_sentence_label"].tolist() == [0, 1]
    assert "next_sentence_label" not in collate([row(-1)], cfg, torch.device("cpu"), 0.5)


@pytest.mark.parametrize(
    "kind, text, takes",
    [
        ("RATE", "1", True),
        ("RATE", "0", False),
        ("FRACTION", "0", True),
        ("FRACTION", "1", True),
        ("LENGTH", "16", True),
        ("LENGTH", "15", False),
        ("POSITIVE", "0", False),
        ("SEED", "4294967295", True),
        ("COUNT", "1000000000000", True),
        ("LR", "1e37", True),
        ("MINUTES", "10000000", True),
    ],
)
def test_a_flag_kind_takes_its_closed_ends_and_refuses_its_open_ones(kind, text, takes):
    """runs' argparse types at their bounds: a closed end is a value the flag takes."""
    from argparse import ArgumentTypeError

    import runs

    convert = getattr(runs, kind)
    if takes:
        assert convert(text) == float(text)
    else:
        with pytest.raises(ArgumentTypeError, match=f"got {text}$"):
            convert(text)


def test_given_flags_leaves_the_parser_s_defaults_as_they_were(monkeypatch):
    """given_flags parses with every default suppressed, then puts them back: a parse after it
    still fills in the flags not given (train.py asks it twice, bench.py after its parse)."""
    from runs import Parser, given_flags

    parser = Parser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.5)
    monkeypatch.setattr(sys, "argv", ["train.py", "--lr", "0.1"])
    assert given_flags(parser) == {"lr"}
    args = parser.parse_args()
    assert (args.steps, args.lr) == (3, 0.1)


def test_an_out_dir_is_refused_only_where_it_cannot_be_made(tmp_path, monkeypatch):
    """refuse_to_overwrite: a name of the file system's longest is made; a folder it could go in
    that is not writable (as root cannot make one, here by os.access) is refused before any work."""
    import runs

    longest = "x" * os.pathconf(tmp_path, "PC_NAME_MAX")
    runs.refuse_to_overwrite(str(tmp_path / longest / "run"))
    runs.make_out_dir(str(tmp_path / longest / "run"))
    monkeypatch.setattr(runs.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit, match=f"{tmp_path} is not a writable one"):
        runs.refuse_to_overwrite(str(tmp_path / "run"))


def test_only_processes_past_rank_0_say_a_gone_peer_in_one_line(monkeypatch):
    """torchrun_ranks sets peer_stopped as the hook of ranks 1 and up; rank 0's errors (a NaN, a
    full disk) stay Python's."""
    import runs

    def hook(*args):
        pass

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(sys, "excepthook", hook)
    monkeypatch.setenv("RANK", "0")
    assert runs.torchrun_ranks() == (0, 2) and sys.excepthook is hook
    monkeypatch.setenv("RANK", "1")
    assert runs.torchrun_ranks() == (1, 2)
    assert sys.excepthook.func is runs.peer_stopped and sys.excepthook.args == (hook,)


def test_a_gone_peer_s_line_holds_gloo_s_first_sentence_only():
    import runs

    gone = RuntimeError("[/gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:3. GLHF. More")
    with contextlib.redirect_stderr(io.StringIO()) as err:
        runs.peer_stopped(None, RuntimeError, gone, None)
    said = "another process is gone (Connection closed by peer [127.0.0.1]:3); this one stops too"
    assert err.getvalue() == f"error: {said} (its own error, where it printed one, is above)\n"


@pytest.mark.parametrize(
    "message, cause",
    [
        (
            "[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 8 bytes. Error code 12 (Cannot allocate memory). More",
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes. Error code",
        ),
        (
            "MPS backend out of memory (MPS allocated: 1 GB). Tried to allocate 4 GB. Use PYTORCH",
            "MPS backend out of memory (MPS allocated: 1 GB). Tried to allocate 4 GB)",
        ),
    ],
)
def test_other_allocators_running_out_stop_in_one_line(message, cause):
    """stops_plainly on the CPU's allocator (its "[enforce fail" left out) and MPS's, whose
    errors are RuntimeErrors, not torch.cuda.OutOfMemoryError."""
    from runs import stops_plainly

    @stops_plainly("--batch-size 9 x --context 9")
    def step():
        raise RuntimeError(message)

    with pytest.raises(SystemExit) as stopped:
        step()
    said = "a training step does not fit in memory here"
    assert stopped.value.code.startswith(f"error: --batch-size 9 x --context 9: {said} ({cause}")


def test_a_device_this_machine_lacks_is_one_line(monkeypatch):
    """device_or_die: --device cuda where torch sees no GPU stops before any work; auto falls back
    to the CPU."""
    import runs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runs.device_or_die("auto") == "cpu" and runs.device_or_die("cpu") == "cpu"
    for name in ("cuda", "mps"):
        with pytest.raises(SystemExit, match=f"^error: --device {name} is not available here$"):
            runs.device_or_die(name)


def test_an_infinite_figure_stops_the_run_and_names_the_checkpoint_kept(tmp_path):
    """stop_if_diverged: inf stops a run as NaN does; the line names the last checkpoint where
    one was saved, and says there is none where none was."""
    from runs import stop_if_diverged

    path = tmp_path / "ckpt_last.pt"
    assert stop_if_diverged(dict(loss=2.5, grad_norm=1.0), 3, str(path)) == dict(
        loss=2.5, grad_norm=1.0
    )
    with pytest.raises(SystemExit, match=r"loss inf at step 3: stopped; no checkpoint yet$"):
        stop_if_diverged(dict(loss=math.inf, grad_norm=1.0), 3, str(path))
    path.write_bytes(b"a checkpoint")
    kept = re.escape(f"the last good checkpoint is {path}")
    with pytest.raises(SystemExit, match=f"val_loss -inf at step 4: stopped; {kept}$"):
        stop_if_diverged(dict(val_loss=-math.inf, val_acc=0.5), 4, str(path))


def test_a_checkpoint_is_on_disk_whole_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """save_checkpoint flushes Python's buffer and fsyncs the file before the rename: a crash of
    the machine after it leaves the whole new file or the old one, never a renamed empty one."""
    import runs

    path = tmp_path / "ckpt_last.pt"
    synced = []
    fsync = os.fsync

    def spy(fd):
        synced.append((os.fstat(fd).st_size, path.exists()))
        fsync(fd)

    monkeypatch.setattr(runs.os, "fsync", spy)
    runs.save_checkpoint(str(path), {"step": 1, "weights": torch.ones(100)})
    assert synced == [(path.stat().st_size, False)]
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_checkpoint_write_s_own_errors_go_on_up(tmp_path, monkeypatch):
    """Only a full disk's RuntimeError is one line: another of torch.save's errors (a bug, not the
    user's) is raised as it was, and leaves no file."""
    import runs

    def broken(*args, **kwargs):
        raise RuntimeError("Could not pickle object of type Generator")

    monkeypatch.setattr(runs.torch, "save", broken)
    with pytest.raises(RuntimeError, match="Could not pickle"):
        runs.save_checkpoint(str(tmp_path / "ckpt_last.pt"), {"step": 1})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content, said",
    [
        (dict(model={}), "not a checkpoint of train.py or finetune.py"),
        (dict(model={}, cfg=dict(hidden=30, heads=4)), "its config is not one this tinyencoder"),
    ],
)
def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path, content, said):
    """load_checkpoint: a dict without a config, and a config whose values this tinyencoder.py
    refuses (a ValueError, not only a TypeError)."""
    from runs import load_checkpoint

    path = tmp_path / "ckpt.pt"
    torch.save(content, path)
    with pytest.raises(SystemExit, match=f"^error: --init {re.escape(str(path))}: {said}"):
        load_checkpoint(str(path), "--init")


def test_a_run_resumed_at_its_last_step_has_nothing_left_to_do():
    """check_resumed: --max-steps at the step the run is at is no earlier than it; a fitted run
    that took every step it planned resumes (to its final line) unless given a new budget."""
    from runs import check_resumed

    state = dict(step=5, max_steps=5, global_batch=8)
    check_resumed(state, 8, "8 a step", 5)
    check_resumed(state, 8, "8 a step", None)
    with pytest.raises(SystemExit, match="the run took all 5 steps it planned"):
        check_resumed(state, 8, "8 a step", None, {"time_budget"})
    with pytest.raises(SystemExit, match="the run is at step 5, past --max-steps 4"):
        check_resumed(state, 8, "8 a step", 4)


def test_dropout_reaches_modernbert_s_mlp_but_not_bert_s():
    """runs.dropouts: ModernBERT's MLP has a dropout of its own; BERT's and RoBERTa's none (their
    mlp_dropout stays 0, for the export)."""
    from runs import dropouts

    modern = dropouts("modernbert", 0.1)
    assert modern["mlp_dropout"] == 0.1 and len(modern) == 5
    for arch in ("bert", "roberta"):
        assert set(dropouts(arch, 0.1)) == set(modern) - {"mlp_dropout"}


def test_a_fresh_run_starts_its_metrics_anew_and_a_resumed_one_keeps_its_steps(tmp_path):
    """Metrics: a fresh run in a folder whose run was killed before its first checkpoint empties
    metrics.jsonl; kept_bytes keeps whole records up to the resumed step, skipping lines that are
    no record of a step, and never a last line cut short."""
    from runs import Metrics, kept_bytes

    (tmp_path / "metrics.jsonl").write_text('{"step": 3}\n')
    Metrics(str(tmp_path), None).write({"step": 1})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    lines = [b'{"step": 1}\n', b'{"note": "x"}\n', b"[2]\n", b'{"step": 2}\n', b'{"step": 3}']
    assert kept_bytes(lines, 3) == sum(map(len, lines[:4]))
    assert kept_bytes(lines, 1) == len(lines[0])
    assert kept_bytes(lines, 0) == 0


def test_a_forked_child_unsets_only_this_run_s_wakeup_file(their_wakeup_file):
    """StopSignals.hold and forget, run around a fork in the child: SIGINT and SIGTERM held back
    until the parent's wakeup file is unset, so that the child's Ctrl-C does not count towards the
    parent's third; another's wakeup file set since kept."""
    import runs

    stop = runs.StopSignals()
    try:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        stop.hold()
        assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        stop.forget()
        assert signal.set_wakeup_fd(their_wakeup_file) == -1
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        stop.hold()
        stop.forget()
        assert signal.set_wakeup_fd(stop.wakeup) == their_wakeup_file
    finally:
        stop.close()


def test_the_demo_shows_its_held_out_span_from_a_line_start_and_never_masks_sep(capsys):
    """runs.demo: the middle span's text from after its first newline up to the span's end, three
    spans of it masked in the model's input, and its final SEP never one of them."""
    import tinyencoder as te
    from runs import demo

    data = np.frombuffer(b"01234" + b"ab\nshort line\nab" + b"cdefghijklmnopqrst" * 4, np.uint8)
    spans = [(0, 5), (5, 21), (21, len(data))]
    model = te.TinyEncoder(te.Config.from_preset("roberta", hidden=32, layers=1, heads=2))
    inputs = []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    demo(model, data, spans, contextlib.nullcontext())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "demo, held out : sh___ ___e⏎__"
    assert lines[2] == "     original   : short line⏎ab"
    assert inputs[0][0, -1] == te.SEP and (inputs[0] == te.MASK).sum() == 8


def test_a_results_file_in_a_folder_it_cannot_write_is_refused(tmp_path, monkeypatch):
    """runs.output_file (bench.py's and gpu_check.py's --json): checked before the work, a folder
    that takes no files (here by os.access, as root cannot make one) refused."""
    from argparse import ArgumentTypeError

    import runs

    assert runs.output_file(str(tmp_path / "out.json")) == str(tmp_path / "out.json")
    monkeypatch.setattr(runs.os, "access", lambda path, mode: False)
    with pytest.raises(ArgumentTypeError, match="cannot write a file at"):
        runs.output_file(str(tmp_path / "out.json"))


def test_the_last_tenth_held_out_is_cut_where_the_training_part_ends():
    """Too few documents to hold some out: each file's last tenth (rounded down from 9/10 of its
    bytes) is held out and its first nine tenths train, no byte in both; a held-out part of 100
    bytes is enough to measure on."""
    from data.corpus import split_documents

    a, b = bytes(range(256)) * 4, b"0123456789" * 100
    # neither a.txt nor b.txt is held out by its name's hash
    corpus = split_documents([("a.txt", a[:1005]), ("b.txt", b[:999])], "corp")
    (train, train_offsets), (val, val_offsets) = corpus["train"], corpus["val"]
    assert train.tobytes() == a[:904] + b[:899] and val.tobytes() == a[904:1005] + b[899:999]
    assert list(train_offsets) == [0, 904, 1803] and list(val_offsets) == [0, 101, 201]
    assert len(split_documents([("a.txt", a[:1000])], "corp")["val"][0]) == 100


def test_a_held_out_document_half_of_whose_text_trains_stays_held_out():
    """Near-copies are documents more than half of whose bytes lie in training lines: exactly half
    is not more, and the document stays held out."""
    from data.corpus import split_documents

    def lines(doc, count):
        return b"".join(b"line %d of document %d\n" % (i, doc) for i in range(count))

    # of doc0.txt ... doc59.txt, doc8 and doc42 are held out by their names' hash
    documents = [(f"doc{i}.txt", lines(i, 20)) for i in range(60)]
    documents[8] = ("doc8.txt", lines(3, 10) + lines(8, 10))  # 200 of 400 bytes doc3's
    val_bytes, _ = split_documents(documents, "corp")["val"]
    assert val_bytes.tobytes() == documents[8][1] + documents[42][1]


def test_the_default_corpus_reads_the_stdlib_s_python_files_and_data_reads_every_file(
    tmp_path, monkeypatch
):
    """read_documents with no --data: pydoc's topics, then the stdlib's .py files but those of
    its tests and installed packages; a --data folder of the same files gives every one of them
    (a user's folder named test/ is data)."""
    import sysconfig

    from data.corpus import read_documents

    for name in ("a.py", "b.txt", "sub/e.py", "test/c.py", "site-packages/d.py", "tests/f.py"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    names = [name for name, _ in read_documents(None)]
    topics = [name for name in names if name.startswith("pydoc_data/")]
    assert len(topics) > 50 and names[len(topics) :] == ["a.py", "sub/e.py"]
    every = ["a.py", "b.txt", "site-packages/d.py", "sub/e.py", "test/c.py", "tests/f.py"]
    assert [name for name, _ in read_documents(str(tmp_path))] == every


def test_data_is_read_in_sorted_order_whatever_order_the_folder_lists(tmp_path, monkeypatch):
    """files_under sorts each folder's files and subfolders: every machine reads the documents in
    one order (its held-out split, rows and digest), here with a listing in reverse order."""
    from data.corpus import read_documents

    for name in ("a.txt", "b.txt", "x/1.txt", "x/2.txt", "y/1.txt"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text(name)
    walk = os.walk

    def reversed_walk(*args, **kwargs):
        for folder, subfolders, files in walk(*args, **kwargs):
            subfolders.reverse()  # in place: the walk goes on into the list as given back
            files.reverse()
            yield folder, subfolders, files

    monkeypatch.setattr(os, "walk", reversed_walk)
    names = [name for name, _ in read_documents(str(tmp_path))]
    assert names == ["a.txt", "b.txt", "x/1.txt", "x/2.txt", "y/1.txt"]


def test_a_default_corpus_whose_preparation_was_cut_short_is_prepared_again(tmp_path, monkeypatch):
    """prepare_stdlib writes val.idx last, and only it says "done": a preparation killed after
    the training files is made again, not read with no held-out files."""
    from data import corpus

    monkeypatch.setattr(corpus, "STDLIB_STEM", str(tmp_path / "stdlib"))
    monkeypatch.setattr(corpus, "stdlib_documents", lambda: [("a.txt", b"a line of text\n" * 80)])
    for suffix in ("bin", "idx"):  # a kill after the training files
        (tmp_path / f"stdlib-train.{suffix}").write_bytes(b"")
    corpus.prepare_stdlib()
    parts = corpus.load_stdlib()
    assert [len(parts[part][0]) for part in ("train", "val")] == [1080, 120]


def test_the_corpus_digest_names_where_its_documents_start(monkeypatch):
    """load_corpus's sha256, which a resumed run checks, tells the same bytes cut into other
    documents apart (their rows differ)."""
    from data import corpus

    data = np.frombuffer(b"two documents, or three", np.uint8)
    digests = []
    for offsets in ([0, 4, 23], [0, 4, 15, 23]):
        parts = dict(train=(data, np.array(offsets)), val=(data, np.array([0, 23])))
        monkeypatch.setattr(corpus, "split_documents", lambda documents, spec: parts)
        digests.append(corpus.load_corpus("corp")["sha256"])
    assert digests[0] != digests[1]


def test_packed_rows_read_each_token_at_most_once_an_epoch_and_wrap_a_short_corpus():
    """ModernBERT's rows: an epoch holds as many whole rows as the stream of documents (each CLS
    bytes SEP) fills; a corpus shorter than a row fills it with its documents again."""
    from types import SimpleNamespace

    from data.rows import CLS, SEP, TrainingRows

    packed = SimpleNamespace(inputs="packed", masking="dynamic")
    docs = [b"document %d. " % k * (3 + k % 5) for k in range(30)]
    data, offsets = byte_corpus(docs)
    rows = TrainingRows(packed, data, offsets, 32, 0, 1)
    assert rows.count == sum(len(doc) + 2 for doc in docs) // 32
    data, offsets = byte_corpus([b"0123456789"])
    row = TrainingRows(packed, data, offsets, 32, 0, 1)[0]
    one = [CLS, *b"0123456789", SEP]
    assert list(row.ids) == (one * 3)[:32] and list(row.doc_ids) == [1] * 12 + [2] * 12 + [3] * 8


def test_held_out_rows_mask_as_they_did_at_earlier_commits():
    """held_out_rows' masks, each row's key its own (not an NSP pair's): the positions this
    commit's rows label, so that the accuracies the README quotes stay comparable."""
    import tinyencoder as te
    from data.rows import held_out_rows, masked_row

    data = np.frombuffer(b"def f(x):\n    return x + 1  # the held-out row's bytes\n", np.uint8)
    cfg = te.Config.from_preset("roberta", hidden=32, layers=1, heads=2, max_len=64)
    _, rows = held_out_rows(data, np.array([0, len(data)]), 32, 2, cfg)
    labelled = []
    for row in rows:
        labels = masked_row(row, cfg, 0.15)[1]
        labelled.append((labels != te.IGNORE_INDEX).nonzero().flatten().tolist())
    assert labelled == [[7, 11, 14, 18], [6, 11, 14, 25]]


def test_nsp_pairs_are_spread_over_the_held_out_documents():
    """held_out_pairs: the pairs' starts stride through the held-out bytes (by a prime), so that
    eight pairs read eight of forty documents, not the first few."""
    from data.rows import held_out_pairs

    docs = [b"d%02d\n" % d * 16 for d in range(40)]  # 64 bytes each
    data, offsets = byte_corpus(docs)
    pairs = held_out_pairs(data, offsets, 32, 8)
    first = [re.search(rb"d\d\d", bytes(pair.ids[1:].astype(np.uint8))).group() for pair in pairs]
    assert len(set(first)) == 8, first


def test_a_pair_cut_where_there_is_no_newline_has_a_first_segment():
    """cut_after_a_newline: a chunk without a newline is cut anywhere but at its start, so that A
    is never empty (an empty A is a row of CLS SEP B SEP)."""
    from data.rows import sentence_pair

    docs = [bytes([97 + d]) * 200 for d in range(6)]  # no newline anywhere
    data, offsets = byte_corpus(docs)
    for i in range(300):
        row = sentence_pair(data, offsets, 64, i * 37 % len(data), [5, i])
        first = row.ids[row.token_types == 0]
        assert len(first) > 2 and (row.token_types == 1).sum() > 1, (i, row.ids)


def test_held_out_copies_compare_lines_without_their_indentation():
    """Lines compare stripped and count their text alone: a held-out file that is a training
    file indented anew is a copy (it trains); one whose shared lines are mostly indentation, its
    own text the larger part, is none (it stays held out)."""
    from data.corpus import split_documents

    code = b"".join(b"value_%d = compute(%d)\n" % (i, i) for i in range(20))
    # of doc0.txt ... doc59.txt, doc8 and doc42 are held out by their names' hash
    documents = [(f"doc{i}.txt", b"document %d\n" % i * 30) for i in range(60)]
    documents[3] = ("doc3.txt", code + b"".join(b" " * 40 + b"%d\n" % i for i in range(20)))
    documents[8] = ("doc8.txt", code.replace(b"value", b"    value"))
    own = b"".join(b"a line of doc42's own, number %d\n" % i for i in range(20))
    documents[42] = ("doc42.txt", documents[3][1][len(code) :] + own)
    val_bytes, val_offsets = split_documents(documents, "corp")["val"]
    assert val_bytes.tobytes() == documents[42][1] and len(val_offsets) == 2


def test_a_row_masks_alike_however_long_its_padding():
    """masked_row draws its masks over the real tokens alone: the same row padded to 64 or to 128
    gets the same masked inputs and labels (a sentence pair's padding varies with its B)."""
    import tinyencoder as te
    from data.rows import Example, masked_row, pad

    cfg = te.Config.from_preset("roberta", hidden=32, layers=1, heads=2, max_len=128)
    text = np.frombuffer(b"forty bytes of a row, masked as it was..", np.uint8)
    ids = np.r_[[te.CLS], text, [te.SEP]]
    masked = []
    for width in (64, 128):
        doc_ids = pad(np.ones(len(ids)), width, 0)
        row = Example(pad(ids, width), pad([], width, 0), doc_ids, -1, [3, 9])
        inputs, labels = masked_row(row, cfg, 0.3)
        masked.append(torch.stack([inputs[: len(ids)], labels[: len(ids)]]))
    assert torch.equal(masked[0], masked[1]) and (masked[0][1] != te.IGNORE_INDEX).any()


# Tests from a mutation run over pipelines.py and data/tasks.py (each fails on its mutant)
def test_stdlib_sources_are_the_py_files_that_decode(monkeypatch):
    """python_sources reads the stdlib's .py files as text: pydoc's topics (prose, not Python)
    and a file that is not UTF-8 are left out."""
    from data import tasks

    def documents(spec):
        yield "a.py", b"x = 1\n"
        yield "pydoc_data/topics", b"assert: the assert statement\n"
        yield "b.py", b"y = '\xff'\n"

    monkeypatch.setattr(tasks, "read_documents", documents)
    assert list(tasks.python_sources()) == [("a.py", "x = 1\n")]


def test_tagging_task_holds_out_the_files_pretraining_holds_out(monkeypatch):
    """The tagging task's val files are those corpus.py holds out of pretraining (md5 of the
    name % 25 == 0), so that a model is never scored on code it pretrained on."""
    import hashlib

    from data import tasks

    names = [f"pkg/mod{i}.py" for i in range(100)]

    def sources():
        for i, name in enumerate(names):
            yield name, f"value_{i} = {i}\n"

    monkeypatch.setattr(tasks, "python_sources", sources)
    parts = tasks.tagging_examples(train_every=1)
    held = set()
    for i, name in enumerate(names):
        if hashlib.md5(os.fsencode(name)).digest()[0] % 25 == 0:
            held.add(f"value_{i} = {i}\n")
    assert held and {example["text"] for example in parts["val"]} == held
    assert len(parts["train"]) == len(names) - len(held)


def test_tagging_task_leaves_out_runs_of_blank_lines(monkeypatch):
    """A run of the tagging task with no token but "other" (blank lines alone) teaches nothing
    and is left out; the runs of code around it stay."""
    from data import tasks

    def sources():
        yield "a.py", "x = 1\n" + "\n" * 20 + "y = 2\n"

    monkeypatch.setattr(tasks, "python_sources", sources)
    parts = tasks.tagging_examples(max_bytes=8, train_every=1)
    examples = parts["train"] + parts["val"]
    assert all(set(example["tags"]) != {"other"} for example in examples)
    assert [example["text"].strip() for example in examples] == ["x = 1", "y = 2"]


def test_soft_keywords_are_tagged_as_names():
    """match, case and _ are soft keywords: names to tokenize and to the tagging task, as they
    are where they name a variable; hard keywords alone are tagged "keyword"."""
    from data.tasks import TAGS, byte_tags

    source = "match = case = _ = None\n"
    tags = [TAGS[t] for t in byte_tags(source)]
    data = source.encode()
    names = bytes(b for b, t in zip(data, tags) if t == "name").decode()
    keywords = bytes(b for b, t in zip(data, tags) if t == "keyword").decode()
    assert (names, keywords) == ("matchcase_", "None")


def test_a_long_first_line_is_cut_without_an_empty_run():
    """spans: a first line longer than max_bytes is cut in pieces straight away, no empty
    (0, 0) run before it."""
    from data.tasks import spans

    assert list(spans(b"abcdefgh\nij\n", 4)) == [(0, 4), (4, 8), (8, 12)]


def test_definitions_are_dedented_stripped_and_cut_between_characters():
    """definitions: each function's source, dedented, trailing blank lines stripped, cut to
    max_bytes UTF-8 bytes with a character the cut splits dropped."""
    from data.tasks import definitions

    text = "class A:\n    def f(self):\n        return 'é'\n\n\n"
    assert list(definitions(text, 1000)) == [
        "class A:\n    def f(self):\n        return 'é'",
        "def f(self):\n    return 'é'",
    ]
    assert list(definitions("def f():\n    return 'é'\n", 22)) == ["def f():\n    return '"]


def test_package_task_keeps_a_texts_first_package(monkeypatch):
    """A definition found in two packages' training files is one example, labelled with the
    package it was found in first, as package_examples says."""
    import hashlib

    from data import tasks

    names = ["email/a.py", "http/b.py"]
    for name in names:  # both training files of the packages task (md5 % 5 != 0)
        assert hashlib.md5(name.encode()).digest()[0] % 5

    def sources():
        for name in names:
            yield name, "def f():\n    pass\n"

    monkeypatch.setattr(tasks, "python_sources", sources)
    parts = tasks.package_examples()
    assert parts == {"train": [{"text": "def f():\n    pass", "label": "email"}], "val": []}


def answers_of(source: str) -> dict:
    """function_questions of a function's source as {question: [answer text, ...]}."""
    from data.tasks import function_questions

    data = source.encode()
    found = {}
    for _, question, first, end in function_questions(data):
        found.setdefault(question, []).append(data[first:end].decode())
    return found


def test_function_questions_answer_with_the_right_spans():
    """Each default goes with its own parameter (defaults belong to the last positional ones),
    a raised call's answer is the exception's name, and a name bound to a short one-line value
    of up to 30 bytes is asked about, unless several names are bound at once."""
    source = (
        "def f(a, b=1, /, c=2, *, d, e=None):\n"
        "    x = compute(1)\n"
        "    y = z = 2\n"
        f"    w = '{'v' * 28}'\n"
        f"    u = '{'v' * 29}'\n"
        "    t = (1,\n         2)\n"
        "    raise ValueError('bad')\n"
    )
    assert answers_of(source) == {
        "default of b": ["1"],
        "default of c": ["2"],
        "default of e": ["None"],
        "exception raised": ["ValueError"],
        "name bound to compute(1)": ["x"],
        f"name bound to '{'v' * 28}'": ["w"],
    }


def test_qa_task_keeps_answers_up_to_max_answer_and_at_a_contexts_start(monkeypatch):
    """qa_examples: an answer of MAX_ANSWER (40) bytes is asked about, one of 41 is not; an
    answer that starts its context (a long line cut just before it) keeps its question; and an
    answer's start counts characters, as SQuAD's does."""
    from data import tasks

    # "default of b" leaves 126 - 1 - 12 = 113 bytes of context: the first run ends before 7
    cut = "def g(" + "a" * 101 + "=0, b=7):\n    return b\n"

    def sources():
        yield "a.py", "def f(x='" + "v" * 38 + "', y='" + "v" * 39 + "'):\n    return x\n"
        yield "a.py", cut
        yield "a.py", "def h(s='é', z=1):\n    return z\n"

    monkeypatch.setattr(tasks, "python_sources", sources)
    parts = tasks.qa_examples()
    records = {r["question"]: r for r in parts["train"] + parts["val"]}
    assert "default of x" in records and "default of y" not in records
    assert records["default of x"]["answers"][0]["text"] == "'" + "v" * 38 + "'"
    assert records["default of b"]["answers"] == [{"text": "7", "start": 0}]
    # start counts characters, as SQuAD does: é is one, not its two bytes
    assert records["default of z"]["answers"] == [{"text": "1", "start": 15}]


def test_exact_match_and_token_f1_count_as_squad_does():
    """exact_match strips the answers' whitespace as the prediction's; token F1 counts a token
    as often as both share it (SQuAD's multiplicity), not once."""
    from data.tasks import exact_match, token_f1

    assert exact_match("None", [" None\n"]) == 1.0
    assert token_f1("a a", ["a a b"]) == pytest.approx(0.8)


def test_write_task_writes_val_last_and_remakes_a_half_written_task(tmp_path, monkeypatch):
    """write_task hands max_bytes to the task's maker; the val file, written last, marks the
    task done: a write that fails on the train file leaves no val file, and a train file alone
    (a run stopped between the two) is written again with its val file."""
    from data import tasks

    asked = []

    def examples(max_bytes):
        asked.append(max_bytes)
        return {part: [{"text": part, "label": part}] for part in ("train", "val")}

    def broken(max_bytes):
        return {"train": None, "val": [{"text": "v", "label": "v"}]}

    monkeypatch.setattr(tasks, "tagging_examples", broken)
    paths = tasks.task_paths("tags", str(tmp_path))
    with pytest.raises(TypeError):
        tasks.write_task("tags", str(tmp_path))
    assert not os.path.exists(paths["val"])
    monkeypatch.setattr(tasks, "tagging_examples", examples)
    Path(paths["train"]).write_text("a half-written task\n")
    assert tasks.write_task("tags", str(tmp_path), 60) == paths and asked == [60]
    for part in ("train", "val"):
        assert json.loads(Path(paths[part]).read_text()) == {"text": part, "label": part}
