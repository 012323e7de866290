"""Three fine-tuning tasks cut from Python's standard library, no download, written as JSONL.

tags: every UTF-8 byte of a .py source labelled with the class of the token that Python's own
tokenize puts it in. packages: which top-level stdlib package a function or class comes from.
qa: extractive questions on a function's source (a parameter's default, the exception raised, the
name a value is bound to), answered by a span of it; scored by exact match and token F1 (below).
All are split by file with corpus.py's hash of the file's name, so that the tagging and QA tasks'
held-out files are the ones pretraining holds out too, but for near-copies of training files, which
pretraining trains on (corpus.near_copies; see PACKAGE_HOLDOUT for the packages task).
"""

import ast
import hashlib
import io
import json
import keyword
import os
import re
import sys
import textwrap
import tokenize
from collections import Counter

from data.corpus import STDLIB, read_documents, renamed_into_place

TAGS = ("other", "name", "keyword", "operator", "number", "string", "comment")
# Python 3.12+ tokenizes an f-string into parts instead of one STRING; other tokens are "other"
TYPE_NAMES = dict(NAME="name", OP="operator", NUMBER="number", STRING="string", COMMENT="comment")
TYPE_NAMES.update(FSTRING_START="string", FSTRING_MIDDLE="string", FSTRING_END="string")
TOKEN_TAGS = {
    getattr(tokenize, k): TAGS.index(v) for k, v in TYPE_NAMES.items() if hasattr(tokenize, k)
}
FSTRING_MIDDLE = getattr(tokenize, "FSTRING_MIDDLE", None)

# All the packages of CPython 3.10 to 3.12 (none of the optional or split-out tkinter, idlelib,
# turtledemo, lib2to3, distutils, ensurepip, venv) with some 100 training definitions or more and a
# held-out file of 10 or more (importlib's has 4 on 3.10); python -m data.tasks prints their counts
PACKAGES = ("asyncio", "ctypes", "email", "encodings", "http", "importlib", "multiprocessing")
PACKAGES += ("unittest", "urllib", "wsgiref", "xml", "xmlrpc")
# corpus.py's % 25 == 0 holds out a file of 10 or more definitions in ctypes and encodings only;
# % 5 == 0 holds out those files and 4 times as many others: the val files of the packages task,
# unlike those of the tagging task, were not all held out of pretraining
PACKAGE_HOLDOUT = 5


def held_out(name, modulus=25):
    """Whether the file name (relative to the stdlib) is validation; 25 is corpus.py's rule."""
    return hashlib.md5(name.encode()).digest()[0] % modulus == 0


def python_sources():
    """(name, text) of the stdlib's .py files that decode: corpus.py pretrains on them but
    pydoc_data/topics.py, whose topics it reads as text."""
    for name, data in read_documents(None):
        if not name.endswith(".py"):  # pydoc's topics
            continue
        try:
            yield name, data.decode()
        except UnicodeDecodeError:
            continue


def byte_tags(text):
    """The TAGS index of each UTF-8 byte of text, by tokenize's tokens."""
    # split as tokenize splits, at "\n" only; ENDMARKER sits on the empty line after the last
    lines = io.StringIO(text).readlines() + [""]
    starts = [0]  # of each line in bytes: tokenize counts columns in characters
    for line in lines:
        starts.append(starts[-1] + len(line.encode()))
    tags = bytearray(starts[-1])  # the slices assigned below keep their lengths
    gap_start = None
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        ends = (token.start, token.end)
        start, end = [starts[row - 1] + len(lines[row - 1][:col].encode()) for row, col in ends]
        # 3.12 reports an escaped {{ or }} in an f-string as one brace, its twin left in a gap
        if gap_start is not None:
            tags[gap_start:start] = bytes([TAGS.index("string")]) * len(tags[gap_start:start])
        gap_start = end if token.type == FSTRING_MIDDLE else None
        tag = TOKEN_TAGS.get(token.type, 0)
        if token.type == tokenize.NAME and keyword.iskeyword(token.string):
            tag = TAGS.index("keyword")  # hard keywords only: match, case and _ stay names
        # later tokens overwrite earlier ones, should 3.12's f-string positions overlap
        tags[start:end] = bytes([tag]) * (end - start)
    return tags


def spans(data, max_bytes):
    """(start, end) of greedy runs of whole lines of up to max_bytes, longer lines cut in pieces."""
    # fewer could not hold a 4-byte character, and the cut before it would never move on
    if max_bytes < 4:
        raise ValueError("max_bytes must hold a 4-byte character")
    begin = end = 0  # the run so far
    for line in data.splitlines(keepends=True):
        line_end = end + len(line)
        if line_end - begin > max_bytes and end > begin:  # the line starts the next run
            yield begin, end
            begin = end
        while line_end - begin > max_bytes:
            cut = begin + max_bytes
            while data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: cut before its character
                cut -= 1
            yield begin, cut
            begin = cut
        end = line_end
    yield begin, end


def tagging_examples(max_bytes=126, train_every=6):
    """{"train": [...], "val": [...]} of {"text", "tags"}: runs of whole lines of at most max_bytes
    UTF-8 bytes, with a TAGS name per byte; blank runs are left out, and so is a held-out run
    whose text a training file holds too (copied code). Training keeps every train_every-th run
    (some 20,000 on 3.11): more than fine-tuning reads, and quick to load."""
    parts = {"train": [], "val": []}
    for name, text in python_sources():
        try:
            tags = byte_tags(text)
        except (tokenize.TokenError, SyntaxError):
            continue
        data = text.encode()
        part = parts["val" if held_out(name) else "train"]
        for begin, end in spans(data, max_bytes):
            if any(tags[begin:end]):  # not all "other"
                text_tags = [TAGS[tag] for tag in tags[begin:end]]
                part.append({"text": data[begin:end].decode(), "tags": text_tags})
    # the code pages of encodings/ share their tables line for line, as other copied code does
    seen = {example["text"] for example in parts["train"]}
    parts["val"] = [example for example in parts["val"] if example["text"] not in seen]
    parts["train"] = parts["train"][::train_every]
    return parts


def definitions(text, max_bytes):
    """The source of each function and class in text, dedented, cut to max_bytes UTF-8 bytes."""
    lines = io.StringIO(text).readlines()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            source = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).rstrip()
            yield source.encode()[:max_bytes].decode(errors="ignore")  # drops a cut character


def balanced(labels, cap):
    """[{"text", "label"}] for at most cap texts of each label, picked by a hash of the text."""
    counts = Counter()
    examples = []
    for _, text in sorted((hashlib.md5(text.encode()).digest(), text) for text in labels):
        if counts[labels[text]] < cap:
            counts[labels[text]] += 1
            examples.append({"text": text, "label": labels[text]})
    return examples


def package_examples(max_bytes=126, cap=400, val_cap=200):
    """{"train": [...], "val": [...]} of {"text", "label"}: the functions and classes of PACKAGES,
    each text once (the first), none in both splits, at most cap (val_cap) of each package."""
    labels = {"train": {}, "val": {}}
    for name, text in python_sources():
        package = name.split(os.sep)[0]
        if package not in PACKAGES:
            continue
        try:
            texts = list(definitions(text, max_bytes))
        except (SyntaxError, ValueError):
            continue
        part = labels["val" if held_out(name, PACKAGE_HOLDOUT) else "train"]
        for text in texts:
            part.setdefault(text, package)
    val = {text: label for text, label in labels["val"].items() if text not in labels["train"]}
    return {"train": balanced(labels["train"], cap), "val": balanced(val, val_cap)}


# -------------------------------------------------------------------------------------------------
# Extractive QA. A context is a run of whole lines of a function's dedented source; the question
# and context together fit max_bytes, as [CLS] question [SEP] context [SEP] fits 128 tokens.
QA_KINDS = ("default", "raises", "bound")
MAX_ANSWER = 40  # bytes


def function_questions(source: bytes):
    """(kind, question, answer start, answer end), in bytes of a dedented function's source: each
    parameter's default, each raised exception's name, each name bound to a short expression."""
    lines = source.splitlines(keepends=True)
    starts = [0]  # each line's first byte: ast counts columns in UTF-8 bytes
    for line in lines:
        starts.append(starts[-1] + len(line))

    def where(node):
        first = starts[node.lineno - 1] + node.col_offset
        return first, starts[node.end_lineno - 1] + node.end_col_offset

    function = ast.parse(source).body[0]
    arguments = function.args
    positional = arguments.posonlyargs + arguments.args
    pairs = list(zip(positional[len(positional) - len(arguments.defaults) :], arguments.defaults))
    pairs += [(a, d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None]
    for argument, default in pairs:
        yield ("default", f"default of {argument.arg}", *where(default))
    for node in ast.walk(function):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            yield ("raises", "exception raised", *where(node.exc.func))
        elif isinstance(node, ast.Raise) and node.exc is not None:
            yield ("raises", "exception raised", *where(node.exc))
        one_name = isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        if one_name and len(node.targets) == 1 and node.value.lineno == node.value.end_lineno:
            first, end = where(node.value)
            if end - first <= 30:
                value = source[first:end].decode()
                yield ("bound", f"name bound to {value}", *where(node.targets[0]))


def qa_examples(max_bytes=126, cap=2000, val_cap=200):
    """{"train": [...], "val": [...]} of {"question", "context", "answers": [{"text", "start"}]}:
    for each question on a function, the run of its lines (spans()) that holds the answer, with
    every answer to the question in that run; start counts characters. Question and context
    take max_bytes - 1 (a third special token). At most cap (val_cap) questions of each kind,
    picked by a hash of question and context, none in both splits."""
    found = {"train": {}, "val": {}}
    for name, text in python_sources():
        part = found["val" if held_out(name) else "train"]
        try:
            sources = [source.encode() for source in definitions(text, 1 << 20)]
        except (SyntaxError, ValueError):
            continue
        for source in sources:
            if not source.startswith((b"def ", b"async def ")):
                continue
            for kind, question, first, end in function_questions(source):
                room = max_bytes - 1 - len(question.encode())
                if not 0 < end - first <= MAX_ANSWER:
                    continue
                for begin, stop in spans(source, room):
                    if begin <= first and end <= stop:
                        context = source[begin:stop].decode()
                        answer = (first - begin, end - begin)
                        part.setdefault((kind, question, context), set()).add(answer)
    # a question on text that is in a training file too (copied code) is not held out
    found["val"] = {key: spans for key, spans in found["val"].items() if key not in found["train"]}
    return {part: qa_part(found[part], {"train": cap, "val": val_cap}[part]) for part in found}


def qa_part(found: dict, cap: int) -> list:
    """The records of at most cap questions of each kind, picked by a hash, kind by kind."""
    records = []
    for kind in QA_KINDS:
        keyed = [(hashlib.md5((q + c).encode()).digest(), q, c) for k, q, c in found if k == kind]
        for _, question, context in sorted(keyed)[:cap]:
            data = context.encode()
            answers = []
            for first, end in sorted(found[(kind, question, context)]):
                start = len(data[:first].decode())  # in characters, as SQuAD counts
                answers.append({"text": data[first:end].decode(), "start": start})
            records.append({"question": question, "context": context, "answers": answers})
    return records


def answer_tokens(text: str) -> list:
    """The tokens that token F1 counts, for answers that are code: each run of word bytes
    (letters, digits, _ and every non-ASCII byte) is one, and each other byte but whitespace."""
    return re.findall(rb"[\w\x80-\xff]+|[^\w\s\x80-\xff]", text.encode(), flags=re.ASCII)


def exact_match(prediction: str, answers: list) -> float:
    """1.0 where the prediction is one of the answers, surrounding whitespace aside; else 0.0."""
    return float(any(prediction.strip() == answer.strip() for answer in answers))


def token_f1(prediction: str, answers: list) -> float:
    """SQuAD's F1 over answer_tokens: the best over the answers of the harmonic mean of the
    precision and recall of the tokens both share (counted with multiplicity)."""
    best = 0.0
    for answer in answers:
        ours, theirs = Counter(answer_tokens(prediction)), Counter(answer_tokens(answer))
        shared = sum((ours & theirs).values())
        if shared:
            precision, recall = shared / sum(ours.values()), shared / sum(theirs.values())
            best = max(best, 2 * precision * recall / (precision + recall))
        elif not ours and not theirs:
            best = 1.0
    return best


# The task files are made again for another Python (another stdlib: 3.11.2's is not 3.11.7's)
# and for other rules (any change to this file), as corpus.py's are for another Python.
with open(__file__, "rb") as source:
    TASKS_KEY = hashlib.sha256(STDLIB.encode() + source.read()).hexdigest()[:8]


def task_paths(name, folder) -> dict:
    """{"train": path, "val": path}: {folder}/{name}-pyX.Y.Z-{key}-{train,val}.jsonl."""
    stem = os.path.join(folder, "%s-py%d.%d.%d-%s" % (name, *sys.version_info[:3], TASKS_KEY))
    return {part: f"{stem}-{part}.jsonl" for part in ("train", "val")}


def write_task(name, folder, max_bytes=126):
    """Write the task's two files (task_paths), name "tags", "packages" or "qa", unless there;
    the val file, written last and renamed into place whole, marks "done". Returns the paths."""
    makers = {"tags": tagging_examples, "packages": package_examples, "qa": qa_examples}
    paths = task_paths(name, folder)
    if os.path.exists(paths["val"]):
        return paths
    parts = makers[name](max_bytes)
    os.makedirs(folder, exist_ok=True)
    for part in ("train", "val"):
        with renamed_into_place(paths[part]) as temporary, open(temporary, "w") as f:
            for example in parts[part]:
                f.write(json.dumps(example, separators=(",", ":")) + "\n")
    return paths


if __name__ == "__main__":  # the counts PACKAGES rests on, on this Python
    parts = package_examples()
    for package in PACKAGES:
        print(package, *[sum(ex["label"] == package for ex in parts[p]) for p in ("train", "val")])
