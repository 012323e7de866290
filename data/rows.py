"""The rows train.py reads, cut from a corpus (see corpus.py) as each recipe says, and batched;
the masked bytes that a batch's loss counts, and those its logits predict right.

Training example i is a pure function of i and the seed, so a resumed run, and any split of a global
batch over processes and micro-batches, sees the same rows and masks. The held-out rows are the same
plain rows for every recipe, masked with fixed seeds, so that the recipes' accuracies compare.
"""

import dataclasses
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from data.corpus import die
from tinyencoder import CLS, IGNORE_INDEX, PAD, SEP, make_layout, mask_tokens

# every recipe's held-out rows are masked alike, so that their figures compare
HELD_OUT_RATE = 0.15


class Example(NamedTuple):
    ids: np.ndarray  # (T,) bytes and special ids
    token_types: np.ndarray  # (T,) 0 for the first segment, 1 for the second
    doc_ids: np.ndarray  # (T,) 1, 2, ... for the documents in the row, 0 at padding
    nsp_label: int  # 1 when the second segment is a random one, 0 when it follows; -1 without NSP
    mask_key: list  # seeds the row's masks


def pad(x, length, value=PAD):
    padding = np.full(length - len(x), value)
    return np.concatenate([x, padding]).astype(np.int64)


def sentence_pair(data, offsets, length, start, key):
    """BERT's CLS A SEP B SEP from the length - 3 bytes from start on, cut after a newline (code's
    nearest thing to a sentence end); B follows A (label 0) or is cut the same way from another
    document (label 1), as BERT's random sentence, so that where B starts never tells the label."""
    rng = np.random.default_rng(key)
    span = length - 3  # bytes of A and B
    doc, chunk_start, end = pair_bytes(offsets, start, span)
    chunk = data[chunk_start:end]
    cut = cut_after_a_newline(chunk, rng)
    first, second = chunk[:cut], chunk[cut:]
    nsp_label = int(rng.random() < 0.5)
    size = len(second)
    # A is its whole document (one byte): B can only be another's
    if size == 0:
        nsp_label, size = 1, span - len(first)
    if nsp_label:
        second = random_second(data, offsets, doc, span, size, rng)
    ids = np.concatenate([[CLS], first, [SEP], second, [SEP]])
    types = np.r_[np.zeros(len(first) + 2), np.ones(len(second) + 1)]
    doc_ids = np.ones(len(ids))
    return Example(
        ids=pad(ids, length),
        token_types=pad(types, length, 0),
        doc_ids=pad(doc_ids, length, 0),
        nsp_label=nsp_label,
        mask_key=key,
    )


def pair_bytes(offsets, start, span):
    """The document that byte start is in, and where the span bytes of a pair from start begin
    and end in it: they begin earlier near the document's end, and stop at it."""
    doc = np.searchsorted(offsets, start, "right") - 1
    end = min(start + span, offsets[doc + 1])
    return doc, max(offsets[doc], end - span), end


def cut_after_a_newline(chunk, rng) -> int:
    """Where a chunk splits into A and B: after one of its newlines (not its last byte), else
    anywhere but its start."""
    cuts = np.flatnonzero(chunk[:-1] == 10) + 1
    if len(cuts):
        return cuts[rng.integers(len(cuts))]
    return rng.integers(1, max(2, len(chunk)))


def random_second(data, offsets, doc, span, size, rng):
    """A random B: up to size bytes of a document other than doc (doc itself in a corpus of one),
    drawn as a real B is: bytes from a random byte of the corpus, cut after a newline as A and B
    would be, so that neither where it starts (a line start, mostly) nor its length tells it from
    a real one."""
    doc_size = offsets[doc + 1] - offsets[doc]
    # a byte outside doc, unless doc is all
    start = rng.integers(max(1, len(data) - doc_size))
    if start >= offsets[doc] and doc_size < len(data):
        start += doc_size
    # the cut leaves B its size bytes before its document ends, as a real B has them, so that a
    # padded pair does not tell a random B: a chunk of span + size bytes, cut in its first span
    other, chunk_start, end = pair_bytes(offsets, start, span + size)
    first_bytes = data[chunk_start : max(chunk_start + 1, end - size + 1)]
    at = chunk_start  # with no newline there, a document's start is its first line's
    if 10 in first_bytes[:-1] or chunk_start > offsets[other]:
        at += cut_after_a_newline(first_bytes, rng)
    # a one-byte document: nothing follows its cut, so B is the byte itself
    if at >= end:
        at = chunk_start
    return data[at : min(at + size, offsets[other + 1])]


class TrainingRows:
    """Example i of a recipe's inputs: in epoch e, slot order(e)[i mod count] of the corpus.

    "pairs" (BERT): a sentence pair from each length - 3 bytes of each document. "full-sentences"
    (RoBERTa) and "packed" (ModernBERT) read one stream of documents, each followed by SEP:
    RoBERTa's rows run across documents behind one CLS each; ModernBERT's documents start with CLS
    and pack length tokens a row. "static" masking (BERT) draws dupe_factor masks per slot, once;
    "dynamic" masks are new each time.
    """

    def __init__(self, recipe, data, offsets, length, seed, dupe_factor):
        self.recipe = recipe
        self.data, self.offsets = data, offsets
        self.length = length
        self.seed, self.dupe_factor = seed, dupe_factor
        if recipe.inputs == "pairs":
            # each document cut into pairs of length - 3 bytes on its own, so that a document
            # shorter than that is a pair too (on one grid over all bytes, some were never read)
            span = length - 3
            # a document's pairs, rounded up
            pieces = np.maximum(1, -(-np.diff(offsets) // span))
            starts = [offsets[d] + span * np.arange(n) for d, n in enumerate(pieces)]
            self.pair_starts = np.concatenate(starts)
            self.count = len(self.pair_starts)
            return
        opening, self.row_len = [], length - 1
        if recipe.inputs == "packed":
            opening, self.row_len = [CLS], length
        docs = []
        for start, end in zip(offsets, offsets[1:]):
            doc = np.r_[opening, data[start:end], [SEP]]
            docs.append(doc.astype(np.uint16))
        self.stream = np.concatenate(docs)
        self.count = max(1, len(self.stream) // self.row_len)

    @lru_cache(maxsize=1)
    def order(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.count)

    def __getitem__(self, i):
        epoch, j = divmod(i, self.count)
        slot = int(self.order(epoch)[j])
        key = [self.seed, i]
        if self.recipe.masking == "static":
            key = [self.seed, slot, epoch % self.dupe_factor]
        if self.recipe.inputs == "pairs":
            start = self.pair_starts[slot]
            return sentence_pair(self.data, self.offsets, self.length, start, key)
        first = slot * self.row_len
        where = (first + np.arange(self.row_len)) % len(self.stream)
        ids = self.stream[where].astype(np.int64)
        no_types = np.zeros(self.length, np.int64)
        if self.recipe.inputs == "full-sentences":  # attends across documents
            one_doc = np.ones(self.length, np.int64)
            return Example(np.r_[[CLS], ids], no_types, one_doc, -1, key)
        doc_ids = np.cumsum(ids == CLS)
        # the row starts inside a document: that is document 1 too
        if ids[0] != CLS:
            doc_ids += 1
        return Example(ids, no_types, doc_ids, -1, key)


def held_out_rows(data, offsets, length, count, cfg):
    """count plain rows, spread over the held-out documents (CLS, up to 254 bytes of one, SEP), and
    the (start, end) of their bytes. Rows are at most 256 wide whatever the context: padding them
    to a context of 1024 made an evaluation ~5x slower, for the same figures. Their masks (at
    HELD_OUT_RATE, seeded by each row's key) must pick a byte, or an evaluation scores nothing."""
    width = min(256, length)
    span = max(1, width - 2)
    spans = []
    for doc_start, doc_end in zip(offsets, offsets[1:]):
        for start in range(doc_start, doc_end, span):
            spans.append((start, min(start + span, doc_end)))
    # more rows asked than there are spans: each span once (np.linspace would list them all)
    spread = np.linspace(0, len(spans) - 1, min(count, len(spans))).round().astype(int)
    spans = [spans[i] for i in np.unique(spread)]
    rows = []
    for j, (start, end) in enumerate(spans):
        ids = np.r_[[CLS], data[start:end], [SEP]]
        no_types = pad([], width, 0)
        doc_ids = pad(np.ones(len(ids)), width, 0)
        rows.append(Example(pad(ids, width), no_types, doc_ids, -1, [0, 0, 0, j]))
    if not any((masked_row(row, cfg, HELD_OUT_RATE)[1] != IGNORE_INDEX).any() for row in rows):
        held = f"{sum(end - start for start, end in spans)} bytes of {len(rows)} held-out rows"
        die(f"--eval-seqs {count}: none of the {held} is masked at {HELD_OUT_RATE:.0%}: ask more")
    return spans, rows


def held_out_pairs(data, offsets, length, count):
    """count sentence pairs, spread over the held-out bytes, for next-sentence prediction."""
    pairs = []
    for j in range(count):
        # 7919, a prime, spreads the pairs
        start = j * 7919 * (length - 3) % len(data)
        pairs.append(sentence_pair(data, offsets, length, start, [0, 0, 1, j]))
    return pairs


def to_device(t, device):
    """A GPU gets t, a tensor or a layout's tensors, through pinned memory without waiting, so that
    the copy overlaps its work."""
    if not torch.is_tensor(t):  # a layout (make_layout's): each of its tensors
        for field in dataclasses.fields(t):
            value = getattr(t, field.name)
            if torch.is_tensor(value):
                setattr(t, field.name, to_device(value, device))
        return t
    if device.type == "cuda" and t.is_cpu:
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def masked_row(row, cfg, rate):
    """A row's inputs and labels: rate of its ordinary bytes masked, by a generator seeded from its
    key, drawn for its real tokens only (so that a held-out row masks alike at any --context)."""
    seed = np.random.SeedSequence(row.mask_key).generate_state(1, np.uint64)[0]
    # int first: NumPy 1 shifts a uint64 by a Python int as a float, and refuses
    generator = torch.Generator().manual_seed(int(seed) >> 1)
    real = np.count_nonzero(row.doc_ids)  # padding follows the real tokens
    masked, label = mask_tokens(torch.from_numpy(row.ids[:real]), cfg, generator, rate)
    padding = torch.from_numpy(row.ids[real:])
    ids = torch.cat([masked, padding])
    return ids, torch.cat([label, torch.full_like(padding, IGNORE_INDEX)])


def collate(rows, cfg, device, rate, dtype=torch.float32):
    """The model's keyword arguments for rows, on the device: each row masked at rate (masked_row);
    next_sentence_label where the rows have one; and the layout, made here on the CPU for a forward
    in dtype, so that the device never waits."""
    ids, labels = zip(*(masked_row(row, cfg, rate) for row in rows))
    doc_ids = torch.from_numpy(np.stack([row.doc_ids for row in rows]))
    labels = torch.stack(labels)
    batch = dict(
        input_ids=to_device(torch.stack(ids), device),
        attention_mask=to_device(doc_ids, device),
        labels=to_device(labels, device),
        layout=to_device(make_layout(cfg, doc_ids, dtype, device, labels), device),
    )
    # ModernBERT has no segment embeddings
    if cfg.type_vocab:
        types = np.stack([row.token_types for row in rows])
        batch["token_type_ids"] = to_device(torch.from_numpy(types), device)
    if rows[0].nsp_label >= 0:
        nsp_labels = torch.tensor([row.nsp_label for row in rows])
        batch["next_sentence_label"] = to_device(nsp_labels, device)
    return batch


def masked_bytes(batch):
    """The bytes that the MLM loss counts: those with a label."""
    return (batch["labels"] != IGNORE_INDEX).sum()


def correct_bytes(out, batch):
    """Masked bytes predicted right. Given labels, the model's logits are the labelled bytes' only:
    the layout's labelled tokens, whose labels a gather finds without reading the device."""
    layout = batch["layout"]
    targets = layout.gather(batch["labels"]).flatten()[layout.labelled]
    return (out.logits.argmax(-1) == targets).sum()
