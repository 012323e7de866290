"""A model at work on raw text, as transformers' pipelines are: embeddings, a classifier's labels,
a tagger's spans and extractive answers.

    vectors = pipelines.encode(model, ["def f(x): return x", "import os"])  # (2, hidden)
    pipelines.classify(classifier, ["import os"])  # [{"label": name, "score": probability}]
    pipelines.tag(tagger, ["x = 1"])  # [[[first char, end char, tag], ...]]: runs of one tag
    pipelines.answer(qa_model, "default of timeout", "def get(url, timeout=10): ...")  # "10"

Each text runs as [CLS] bytes [SEP], as the tokenizer that tinyencoder_hf.save writes frames it.
tinyencoder.py alone embeds too: te.pool(model(ids, mask).hidden, mask, "mean"), with ids
framed so and the model in eval mode (BERT's and RoBERTa's dropout), is encode's vector before
its normalisation. The question and context of a span model are read as transformers'
question-answering pipeline reads them through the saved tokenizer: [CLS] question [SEP] context
[SEP], the context the second segment where the model has two.
"""

import contextlib
import dataclasses
import numbers
from collections.abc import Iterable, Mapping, Set
from typing import NamedTuple

import torch
import torch.nn.functional as F

import tinyencoder as te


def check_model(model, caller: str):
    """A TinyEncoder on bytes. A wordpiece or BPE checkpoint loads (tinyencoder_hf.load) and gives
    transformers' logits for its own ids, but bytes fed to it as ids mean nothing."""
    # torch.compile's wrapper holds the model it compiled
    if not isinstance(getattr(model, "_orig_mod", model), te.TinyEncoder):
        raise ValueError(f"{caller} takes a TinyEncoder, got {type(model).__name__}")
    check_bytes(model.cfg)


def check_count(caller: str, name: str, value):
    """A ValueError unless value is a whole number above 0: an int or NumPy's (True is not one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{caller}'s {name} must be a whole number above 0, got {value!r}")


def is_list(value) -> bool:
    """A list or tuple: a str is not a list of texts, and None is not an empty one."""
    return isinstance(value, (list, tuple))


def text_ids(name: str, text) -> list[int]:
    """te.byte_ids, with a ValueError naming the argument where text is neither str nor bytes or
    holds a lone surrogate (as a JSON "\\ud800" escape reads), which has no UTF-8 bytes."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise ValueError(f"{name} must be str or bytes, got {type(text).__name__}")
    try:
        return te.byte_ids(text)
    except UnicodeEncodeError as e:
        bad = f"{e.object[e.start : e.end]!r} at character {e.start}"
        raise ValueError(f"{name}: {bad} is a lone surrogate, not text") from None


def check_bytes(cfg: te.Config):
    """The byte vocabulary, with [CLS] and [SEP] past the bytes (a [SEP] that were a byte would
    read the text's newlines as [SEP]); the pad id may be a byte, as BERT's is: masks come from
    the rows' lengths."""
    if not isinstance(cfg, te.Config):
        raise ValueError(f"a Config is needed (a model's is model.cfg), got {type(cfg).__name__}")
    if cfg.vocab_size != te.VOCAB_SIZE or min(cfg.cls_id, cfg.sep_id) < 256:
        got = f"vocab_size={cfg.vocab_size}, cls_id={cfg.cls_id}, sep_id={cfg.sep_id}"
        raise ValueError(
            f"not a byte-level model ({got}; bytes are 0-255): its tokens are not bytes"
        )


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode for the block, then each of its modules in the mode it was in (a
    layer frozen in eval mode stays so), an error raised or not."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


# a str is one text, not a list of them; a set (a dict's keys too) has no order, and a dict's
# texts would be its keys
NOT_TEXTS = (str, bytes, bytearray, Set, Mapping)


def text_list(texts, caller: str) -> list:
    """texts as a list, or a one-line error where they are not an ordered collection of texts."""
    refused = ValueError(f"{caller} takes a list of texts, got {type(texts).__name__}")
    if not isinstance(texts, Iterable) or isinstance(texts, NOT_TEXTS):
        raise refused
    try:
        return list(texts)
    except TypeError:
        # an Iterable that cannot iterate: NumPy's 0-d array of one str
        raise refused from None


def framed_rows(cfg: te.Config, texts: list, caller: str) -> list:
    """[CLS] bytes [SEP], the ids of each text, as transformers' saved tokenizer frames one; a
    text that is not text, or over max_len tokens framed, is an error, never cut silently."""
    rows = []
    for i, text in enumerate(texts):
        rows.append([cfg.cls_id, *text_ids(f"{caller}'s texts[{i}]", text), cfg.sep_id])
        if len(rows[i]) > cfg.max_len:
            too_long = f"{len(rows[i])} tokens, over max_len={cfg.max_len}"
            raise ValueError(f"{caller}'s texts[{i}] is {too_long}")
    return rows


class Batch(NamedTuple):
    # which of the rows the batch holds, in its order
    rows: list
    # (B, T) ids and attention_mask (1 at each row's tokens), on the model's device
    ids: torch.Tensor
    doc_ids: torch.Tensor
    # the batch's layout, unpadded where that is faster (te.make_layout)
    layout: object


def by_length(model, rows: list, batch_size: int):
    """The rows in batches of batch_size, shortest first, so that little is padded. On a CPU a
    batch with padding runs unpadded whatever cfg.unpad says, one of rows of one length as rows:
    the same numbers, faster."""
    # unpad is an execution field: speed, not numbers
    unpadded = dataclasses.replace(model.cfg, unpad=True)
    device = model.tok_embed.weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for first in range(0, len(rows), batch_size):
        batch = order[first : first + batch_size]
        inputs = padded([rows[i] for i in batch], model.cfg.pad_id)
        ids, doc_ids = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
        layout = te.make_layout(unpadded, doc_ids, model.tok_embed.weight.dtype)
        yield Batch(batch, ids, doc_ids, layout)


@torch.no_grad()
def encode(model, texts, pooling="mean", normalize=True, batch_size=32) -> torch.Tensor:
    """Embeddings (N, hidden) of a list of str or bytes: each text runs as [CLS] bytes [SEP],
    pooled as te.pool() says; normalize makes each unit length. Texts of like length share a
    batch (by_length). A text over max_len tokens is an error, never cut silently."""
    check_model(model, "encode")
    cfg = model.cfg
    if cfg.classifier == "choice":
        raise ValueError("encode takes a model of rows of text, not a multiple-choice one")
    rows = framed_rows(cfg, text_list(texts, "encode"), "encode")
    check_count("encode", "batch_size", batch_size)
    if pooling not in ("mean", "cls") or not isinstance(normalize, bool):
        got = f"{pooling!r} and {normalize!r}"
        raise ValueError(f"encode's pooling is 'mean' or 'cls', normalize True or False; got {got}")
    out = torch.zeros(len(rows), cfg.hidden)
    with evaluating(model):
        for batch in by_length(model, rows, batch_size):
            # the trunk alone: the model's head (MLM or a classifier's) would be work thrown away
            hidden = model.trunk(batch.ids, batch.doc_ids, None, batch.layout)
            hidden = batch.layout.scatter(hidden)  # (B, T, hidden)
            out[batch.rows] = te.pool(hidden, batch.doc_ids, pooling).float().cpu()
    if normalize:
        out = F.normalize(out, dim=-1)
    return out


def check_task(model, caller: str, kind: str):
    """A TinyEncoder on bytes (check_model) with a kind of classifier."""
    check_model(model, caller)
    if model.cfg.classifier != kind:
        got = model.cfg.classifier
        raise ValueError(f"{caller} needs a {kind} model (Config.classifier={kind!r}), not {got!r}")


def labels_of(model, caller: str, kind: str) -> list:
    """The class names of a model with a kind of classifier: model.label_names (tinyencoder_hf.load
    reads them from id2label), else LABEL_0, LABEL_1, ... as transformers names them."""
    check_task(model, caller, kind)
    count = model.cfg.num_labels
    names = getattr(model, "label_names", None)
    if names is None:
        names = [f"LABEL_{i}" for i in range(count)]
    if hasattr(names, "tolist"):  # a NumPy array (np.unique's), as tinyencoder_hf.save takes
        names = names.tolist()
    if not is_list(names) or len(names) != count:
        raise ValueError(
            f"model.label_names must be a list of num_labels={count} names, got {names!r}"
        )
    # names, as transformers' id2label holds them (a class named 3 is "3")
    return [str(name) for name in names]


@torch.no_grad()
def classify(model, texts, batch_size=32) -> list[dict]:
    """A sequence classifier's verdict on each of a list of texts, as transformers'
    text-classification pipeline gives it: {"label": the likeliest class, "score": its softmax
    probability}; with one label (num_labels=1, regression), its name and the number."""
    names = labels_of(model, "classify", "sequence")
    rows = framed_rows(model.cfg, text_list(texts, "classify"), "classify")
    check_count("classify", "batch_size", batch_size)
    verdicts = [None] * len(rows)
    with evaluating(model):
        for batch in by_length(model, rows, batch_size):
            logits = model(batch.ids, batch.doc_ids, layout=batch.layout).logits.float().cpu()
            scores, best = logits.softmax(-1).max(-1)
            if model.cfg.num_labels == 1:
                scores = logits[:, 0]
            for i, score, label in zip(batch.rows, scores.tolist(), best.tolist()):
                verdicts[i] = dict(label=names[label], score=score)
    return verdicts


@torch.no_grad()
def tag(model, texts, batch_size=32) -> list[list]:
    """A token classifier's tags on each of a list of texts, as finetune.py reads them: for each
    run of characters of one tag (of bytes, for a text given as bytes), [first, end, tag], with
    "O", no tag, left out as transformers' token-classification pipeline leaves it (tag_runs). A
    character takes its first byte's tag, where that pipeline gives each of a character's bytes
    its own, at the character's offsets."""
    names = labels_of(model, "tag", "token")
    texts = text_list(texts, "tag")
    rows = framed_rows(model.cfg, texts, "tag")
    check_count("tag", "batch_size", batch_size)
    spans = [None] * len(rows)
    with evaluating(model):
        for batch in by_length(model, rows, batch_size):
            logits = model(batch.ids, batch.doc_ids, layout=batch.layout).logits
            for i, best in zip(batch.rows, logits.argmax(-1).tolist()):
                # each character's tag is its first byte's, the byte after [CLS] the text's first
                spans[i] = tag_runs([names[best[1 + start]] for start in char_starts(texts[i])])
    return spans


def char_starts(text) -> list:
    """Where each character of a str starts among its UTF-8 bytes; each byte of bytes."""
    if not isinstance(text, str):
        return list(range(len(text)))
    starts = []
    position = 0
    for character in text:
        starts.append(position)
        position += len(character.encode())
    return starts


def tag_runs(tags: list) -> list:
    """[first, end, tag] for each run of one tag in a list of tags, "O" left out. In the B-/I-
    scheme, as transformers' "simple" grouping reads it, B-X starts a run of X and I-X goes on
    with one (B-O and I-O are "O" too)."""
    runs = []
    for i, name in enumerate(tags):
        kind = name
        if name.startswith(("B-", "I-")):
            kind = name[2:]
        goes_on = bool(runs) and runs[-1][1] == i and runs[-1][2] == kind
        if goes_on and not name.startswith("B-"):
            runs[-1][1] = i + 1
        elif kind != "O":
            runs.append([i, i + 1, kind])
    return runs


def padded(rows: list, pad_id: int, token_types: list | None = None) -> dict:
    """Rows of ids as one right-padded batch: input_ids, an attention_mask from each row's length
    (not from pad_id: a checkpoint's pad id may be a byte, BERT's is 0) and, where token_types
    are given (a list per row), token_type_ids padded with 0."""
    T = max(len(row) for row in rows)
    batch = dict(input_ids=torch.full((len(rows), T), pad_id))
    batch["attention_mask"] = torch.zeros(len(rows), T, dtype=torch.long)
    if token_types is not None:
        batch["token_type_ids"] = torch.zeros(len(rows), T, dtype=torch.long)
    for r, row in enumerate(rows):
        batch["input_ids"][r, : len(row)] = torch.tensor(row)
        batch["attention_mask"][r, : len(row)] = 1
        if token_types is not None:
            batch["token_type_ids"][r, : len(row)] = torch.tensor(token_types[r])
    return batch


class QuestionRow(NamedTuple):
    # [CLS] question [SEP] context [SEP]
    ids: list
    # 0 up to the first [SEP], then 1 where the model has two segments
    token_types: list
    # the context's tokens, where an answer may lie
    context: range


def question_row(cfg: te.Config, question, context, names=("question", "context")) -> QuestionRow:
    """The ids of a question and its context (str or bytes), with a one-line error naming them
    (names) where they are not text or do not fit in max_len tokens."""
    check_bytes(cfg)
    question, context = text_ids(names[0], question), text_ids(names[1], context)
    # what [CLS] and two [SEP] leave
    room = cfg.max_len - 3
    if len(question) > room:
        full = f"max_len={cfg.max_len} leaves no room"
        raise ValueError(f"{names[0]} is {len(question)} bytes; {full}")
    if len(question) + len(context) > room:
        left = f"after the question, room for {room - len(question)}"
        raise ValueError(f"{names[1]} is {len(context)} bytes; {left}")
    ids = [cfg.cls_id, *question, cfg.sep_id, *context, cfg.sep_id]
    second = 0
    if cfg.type_vocab > 1:
        second = 1
    token_types = [0] * (len(question) + 2) + [second] * (len(context) + 1)
    first = len(question) + 2
    return QuestionRow(ids, token_types, range(first, first + len(context)))


def best_span(logits, allowed, max_length: int = 30) -> tuple[int, int]:
    """One row's answer: the first and last token, first <= last < first + max_length, both where
    allowed (the context's tokens), of highest start plus end logit. logits (T, 2), allowed (T,)."""
    check_count("best_span", "max_length", max_length)
    T = logits.shape[0]
    if not (torch.is_tensor(allowed) and allowed.dtype == torch.bool and allowed.shape == (T,)):
        raise ValueError(f"best_span's allowed must be a ({T},) bool tensor, one per token")
    # (T, T): the score of the span from token i to token j
    scores = logits[:, 0, None].float() + logits[None, :, 1].float()
    # no span is longer than the row: a larger max_length (10**30, say) allows them all, as T does
    ordered = torch.ones(T, T, dtype=torch.bool, device=logits.device).triu()
    ordered = ordered.tril(min(max_length, T) - 1)
    possible = ordered & allowed[:, None] & allowed[None, :]
    if not possible.any():
        raise ValueError("best_span: no token is allowed to answer")
    first, last = divmod(int(scores.masked_fill(~possible, -torch.inf).argmax()), T)
    return first, last


CONTINUATION = range(0x80, 0xC0)  # UTF-8's bytes after a character's first


def span_text(ids, first: int, last: int) -> str:
    """Tokens first to last (bytes) as text, a character cut at either end taken whole: the text
    is the context's own (what is not UTF-8 shows as U+FFFD)."""
    # back to the character's first byte (not past a special id), on to its last
    while first > 0 and ids[first] in CONTINUATION and ids[first - 1] < 256:
        first -= 1
    while last + 1 < len(ids) and ids[last + 1] in CONTINUATION:
        last += 1
    return bytes(ids[first : last + 1]).decode("utf-8", errors="replace")


@torch.no_grad()
def answer(model, question, context, max_length: int = 30) -> str:
    """Extractive question answering with a span model: the context's span of at most max_length
    bytes that the model rates best, as text."""
    check_task(model, "answer", "span")
    check_count("answer", "max_length", max_length)
    row = question_row(model.cfg, question, context)
    if not row.context:
        raise ValueError("answer's context is empty: no span of it can answer")
    device = model.tok_embed.weight.device
    ids = torch.tensor([row.ids], device=device)
    token_types = None
    if model.cfg.type_vocab:
        token_types = torch.tensor([row.token_types], device=device)
    with evaluating(model):
        logits = model(ids, token_type_ids=token_types).logits[0].cpu()  # (T, 2)
    allowed = torch.zeros(len(row.ids), dtype=torch.bool)
    allowed[row.context.start : row.context.stop] = True
    first, last = best_span(logits, allowed, max_length)
    return span_text(row.ids, first, last)


def choice_batch(cfg: te.Config, questions: list, choices: list) -> dict:
    """Multiple choice inputs: each question paired with each of its choices as [CLS] question
    [SEP] choice [SEP], padded to (B, choices, T) input_ids and attention_mask (and token_type_ids
    where the model has segments). Every question needs as many choices as the first has."""
    check_bytes(cfg)
    if not (is_list(questions) and is_list(choices)):
        got = f"{type(questions).__name__} and {type(choices).__name__}"
        raise ValueError(f"choice_batch takes a list of questions and one of choices, got {got}")
    if len(questions) != len(choices) or not questions:
        raise ValueError(f"{len(questions)} questions and {len(choices)} lists of choices")
    count = len(choices[0]) if is_list(choices[0]) else 0
    rows = []
    for i, (question, options) in enumerate(zip(questions, choices)):
        if not is_list(options) or not count:
            raise ValueError(f"choices[{i}] must be a list of one choice or more, got {options!r}")
        if len(options) != count:
            raise ValueError(f"choices[{i}] has {len(options)} choices and choices[0] {count}")
        for j, option in enumerate(options):
            names = (f"questions[{i}]", f"choices[{i}][{j}]")
            rows.append(question_row(cfg, question, option, names))
    token_types = None
    if cfg.type_vocab:
        token_types = [row.token_types for row in rows]
    batch = padded([row.ids for row in rows], cfg.pad_id, token_types)
    # (questions * choices, T) rows -> (questions, choices, T)
    return {name: t.unflatten(0, (len(questions), count)) for name, t in batch.items()}
