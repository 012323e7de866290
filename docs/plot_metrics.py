"""Held-out masked-byte accuracy against training time, one line per run, from train.py's
metrics.jsonl files. Needs matplotlib (pip install -e ".[plot]").

    python docs/plot_metrics.py out-bert out-roberta "out-noise=bert, noise start" --png curves.png

Each run is a train.py --out-dir folder, optionally followed by =LABEL (default: its arch).
"""

import argparse
import json
import os
import sys


def read_metrics(run_dir):
    """The evaluations of one run, in order: dicts with step, arch, elapsed_s, val_acc, ...; a
    one-line error where the folder has none."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        sys.exit(f"error: {run_dir}: no metrics.jsonl (give train.py --out-dir folders)")
    evals = []
    with open(path) as f:
        for line in f:
            # a line cut short as the run was killed, or a blank one, is skipped
            try:
                evals.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not evals:
        sys.exit(f"error: {path} has no evaluations yet")
    if "arch" not in evals[0] or "val_acc" not in evals[0]:
        sys.exit(f"error: {path} is not train.py's (no arch and masked-byte accuracy)")
    return evals


def pyplot():
    """matplotlib's pyplot, drawing to files (no screen needed); it is the plot extra."""
    try:
        import matplotlib
    except ImportError:
        sys.exit('error: plot_metrics.py needs matplotlib: pip install -e ".[plot]"')
    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="train.py --out-dir folders, each DIR or DIR=LABEL")
    # the README's picture, beside this file, from whatever folder it runs in
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--png", default=os.path.join(here, "curves.png"))
    args = parser.parse_args()
    if os.path.isdir(args.png):
        sys.exit(f"error: --png {args.png} is a folder; give a file name")
    runs = [run.partition("=") for run in args.runs]  # (folder, "=", label)
    metrics = {folder: read_metrics(folder) for folder, _, _ in runs}
    fig, ax = pyplot().subplots(figsize=(7, 4.2), dpi=120)
    for folder, _, label in runs:
        evals = metrics[folder]
        minutes = [e["elapsed_s"] / 60 for e in evals]
        accuracy = [100 * e["val_acc"] for e in evals]
        # labelled runs are the variants, drawn dashed
        style = "--" if label else "-"
        ax.plot(minutes, accuracy, style, marker="o", label=label or evals[-1]["arch"])
    ax.set_xlabel("wall-clock minutes (2-core CPU)")
    ax.set_ylabel("held-out masked-byte accuracy (%)")
    ax.set_title("python train.py --arch ARCH, default recipes")
    ax.set_xlim(0, 10)
    # room for the legend above the curves
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
