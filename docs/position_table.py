"""How the learned position table of a train.py checkpoint stands: the size of its rows, and how
alike neighbouring rows are (a table that encodes order has alike neighbours). The byte rows'
size is printed beside it, for scale.

    python docs/position_table.py out-roberta/ckpt_last.pt out-roberta-normal/ckpt_last.pt
"""

import argparse
import os
import sys

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tinyencoder as te  # noqa: E402
from runs import load_checkpoint  # noqa: E402


def describe(path):
    state, cfg = load_checkpoint(path, "position_table.py")
    model = te.TinyEncoder(cfg)
    model.load_state_dict(state["model"])
    if model.pos_embed is None:
        return f"{path}: {cfg.arch} has no position table (RoPE)"
    # RoBERTa's rows start past the pad id
    first = cfg.pos_offset
    # the rows train.py's run trained (its --context); a finetune.py checkpoint's: the whole table
    context = state["args"].get("context", cfg.max_len)
    rows = model.pos_embed.weight.detach()[first : first + context]
    neighbours = F.cosine_similarity(rows[1:], rows[:-1], dim=-1).mean()
    byte_rows = model.tok_embed.weight.detach()[:256]
    return (
        f"{path}: step {state['step']}: position rows norm {rows.norm(dim=-1).mean():.3f},"
        f" neighbour cosine {neighbours:.3f}; byte rows norm {byte_rows.norm(dim=-1).mean():.3f}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoints", nargs="+", help="train.py checkpoints (ckpt_last.pt)")
    for path in parser.parse_args().checkpoints:
        print(describe(path))


if __name__ == "__main__":
    main()
