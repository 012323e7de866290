"""Shared pieces of the test suite: tiny configs, batches, model variants, and a spy on the
attention kernels that actually run. Tiny models, fixed seeds, CPU."""

import collections
import dataclasses
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tinyencoder
from runs import settle_vector_math
from tinyencoder import CLS, MASK, PAD, SEP, Config, TinyEncoder

# this process's first sin, tanh... on several threads could be off (runs.settle_vector_math)
settle_vector_math()

PRESETS = ("bert", "roberta", "modernbert")
CPU_BACKENDS = ("eager", "sdpa")
SPECIALS = torch.tensor([PAD, CLS, SEP, MASK])
TRUNC2 = 0.8796  # std of N(0, 1) truncated to [-2, 2]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(preset, **kw):
    """A small config of a preset. ModernBERT gets a window shorter than the test sequences
    and a global layer every 2nd."""
    small = dict(hidden=32, layers=2, heads=4, max_len=64)
    if preset == "modernbert":
        small.update(layers=3, window=8, global_every=2)
    return Config.from_preset(preset, **{**small, **kw})


@torch.no_grad()
def perturb(model, scale=0.2, seed=0):
    """Move every parameter (norms, biases, pad rows included) well away from its init."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def batch(lens=(24, 19, 11), T=24, lo=0, hi=256, pad=PAD, seed=0):
    """Right-padded rows of random ids in [lo, hi) starting with CLS; ids and the 0/1 mask."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T) < torch.tensor(lens)[:, None]).long()
    ids = torch.randint(lo, hi, (len(lens), T), generator=g).masked_fill(mask == 0, pad)
    ids[:, 0] = CLS
    return ids, mask


def packed_batch():
    """Row 0 packs three documents and padding; row 1 is one document; row 2 one plus padding."""
    doc = torch.tensor([[1] * 11 + [2] * 6 + [3] * 5 + [0] * 2, [1] * 24, [7] * 14 + [0] * 10])
    ids = torch.randint(0, 256, doc.shape).masked_fill(doc == 0, PAD)
    return ids, doc


def variant(model, **changes):
    """A new model with the same weights whose Config differs by changes (backend, unpadding)."""
    weight = next(model.parameters())  # the twin lives where the model does, in its dtype
    twin = TinyEncoder(dataclasses.replace(model.cfg, **changes)).to(weight.device, weight.dtype)
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


@pytest.fixture
def kernels(monkeypatch):
    """Counts the attention calls that actually run (eager, SDPA) and the unpadded layout's use."""
    calls = collections.Counter()

    def spy(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return counted

    monkeypatch.setattr(tinyencoder, "eager_attention", spy("eager", tinyencoder.eager_attention))
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", spy("sdpa", F.scaled_dot_product_attention)
    )
    unpadded = tinyencoder.Unpadded
    monkeypatch.setattr(unpadded, "gather", spy("unpadded", unpadded.gather))
    return calls


def assert_ran(calls, backend, unpad):
    """The backend asked for ran, the other did not, and unpadding ran exactly when asked for."""
    other = {"eager": "sdpa", "sdpa": "eager"}[backend]
    assert calls[backend] > 0 and calls[other] == 0, (backend, dict(calls))
    assert (calls["unpadded"] > 0) == unpad, (unpad, dict(calls))
    calls.clear()


def assert_close(a, b, tol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol, f"max abs diff {err:.3g} > {tol:g}"


def run_without(package: str, script: str, *args) -> subprocess.CompletedProcess:
    """Run script (a path beside the tests) with args as if package were not installed."""
    code = f"import runpy, sys; sys.modules[{package!r}] = None; sys.argv = sys.argv[1:]; "
    code += "runpy.run_path(sys.argv[0], run_name='__main__')"
    command = [sys.executable, "-c", code, script, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)


def tiny_checkpoint(path, arch="roberta", **overrides):
    """A train.py-style checkpoint of a tiny untrained model (a finetune.py one, with a head)."""
    cfg = Config.from_preset(arch, hidden=32, layers=2, heads=2, max_len=64, **overrides)
    torch.save(dict(model=TinyEncoder(cfg).state_dict(), cfg=dataclasses.asdict(cfg)), path)
    return path


# -------------------------------------------------------------------------------------------------
# Scripts run as `python script.py args` runs them, each in a child forked from one Python that has
# imported torch and numpy already (multiprocessing's fork server, started once): 0.3 s a run where
# a fresh interpreter takes 2-3 s to import torch, over a hundred times a suite. The child holds
# nothing of the test process; what needs an interpreter of its own (another environment, Ctrl-C,
# torchrun, `python -c`) still runs under subprocess.
HERE = Path(__file__).parent
SCRIPT_IN_CHILD = """
import os, runpy, sys
os.chdir(cwd)
os.environ.clear()
os.environ.update(environ)
for fd, path in ((1, out_path), (2, err_path)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
sys.argv = argv
sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
runpy.run_path(argv[0], run_name="__main__")
"""


def run_python(command, cwd=HERE, timeout=300, text=True) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, cwd=cwd, timeout=timeout, text=text) for a
    command [sys.executable, script, *args]: the exit code, stdout and stderr a process gives."""
    assert str(command[0]) == sys.executable and str(command[1]).endswith(".py"), command
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: no fork
        command = [str(part) for part in command]
        return subprocess.run(command, capture_output=True, text=text, cwd=cwd, timeout=timeout)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "numpy"])
    with tempfile.TemporaryDirectory() as outputs:
        paths = dict(out_path=os.path.join(outputs, "out"), err_path=os.path.join(outputs, "err"))
        names = dict(argv=[str(a) for a in command[1:]], cwd=str(cwd), environ=dict(os.environ))
        child = context.Process(target=exec, args=(SCRIPT_IN_CHILD, {**names, **paths}))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(command, timeout)
        read = Path.read_text if text else Path.read_bytes
        out, err = (read(Path(paths[key])) for key in ("out_path", "err_path"))
        return subprocess.CompletedProcess(command, child.exitcode, out, err)
