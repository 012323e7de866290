"""The corpora train.py reads: two byte arrays each (train, val), with their documents' offsets.

A document goes to validation by a hash of its name, so the split stays put when documents come and
go, unless it is a near-copy of a training document (near_copies), which trains instead. The
default corpus, Python's standard library with pydoc's topics, is prepared once into this folder.
"""

import contextlib
import fnmatch
import glob
import hashlib
import io
import os
import re
import sys
import sysconfig

import numpy as np

# the standard library's tests and installed packages are not part of the default corpus
SKIPPED_FOLDERS = ("site-packages", "test", "tests", "idle_test")
HERE = os.path.dirname(os.path.abspath(__file__))
# one prepared corpus per Python build and stdlib folder: 3.11.2's stdlib is not 3.11.7's
# (and per split rule: SPLIT names the rule's version, so that a new one prepares the corpus again)
SPLIT = 3
STDLIB = f"{sys.version}|{sysconfig.get_paths()['stdlib']}|split {SPLIT}"
STDLIB_KEY = hashlib.sha256(STDLIB.encode()).hexdigest()
STDLIB_STEM = os.path.join(HERE, "stdlib-py%d.%d.%d-" % sys.version_info[:3] + STDLIB_KEY[:8])
# the lone surrogates that are not os.fsdecode's stand-ins for the bytes 0x80-0xff of a path
NOT_BYTES = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def die(message):
    # one line, no traceback; a path's bytes that are not UTF-8 as \x escapes
    sys.exit(printable(f"error: {message}"))


def printable(text: str) -> str:
    """text as a terminal can show it: bytes of a path that are not UTF-8 (os.fsdecode's lone
    surrogates) as \\x escapes, any other lone surrogate (JSON's "\\ud800") as a \\u escape, where
    a strict UTF-8 stdout would raise UnicodeEncodeError; and a character stdout's encoding lacks
    (Windows' cp1252 into a file: the demo's ⏎) as an escape too, where it raised the same."""
    # surrogateescape turns U+DC80-U+DCFF back into the bytes 0x80-0xff and refuses other surrogates
    text = NOT_BYTES.sub(lambda found: f"\\u{ord(found.group()):04x}", text)
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except (LookupError, TypeError):  # a stdout put in place whose encoding Python does not know
        return text


def read_documents(spec, out_dir=None):
    """(name, bytes) for each file that spec (a file, folder or glob) names, once, whatever the
    links and globs that reach it, but for those under out_dir (a run's own checkpoints); with no
    spec, for pydoc's topics and the stdlib's .py files. A name is the file's path from the folder
    spec starts at, however spec spells that folder."""
    if not spec:
        from pydoc_data.topics import topics

        for key, text in sorted(topics.items()):
            yield f"pydoc_data/{key}", text.encode()
    pattern = spec or sysconfig.get_paths()["stdlib"]
    roots = [pattern]
    if glob.has_magic(pattern) and not os.path.exists(pattern):  # a file named "notes[1].txt"
        roots = glob_paths(pattern)
    if not any(os.path.exists(root) for root in roots):
        die(f"--data {pattern}: no such file or folder")
    base = starting_folder(pattern, roots)
    seen = set()  # real paths read, and folders walked: a link may lead back
    outputs = None
    if out_dir and not os.path.isfile(pattern):
        outputs = os.path.join(os.path.realpath(out_dir), "")
    # a file named, or a folder inside --out-dir, is the user's data (the run writes in --out-dir)
    if outputs and os.path.realpath(base).startswith(outputs):
        outputs = None
    # --out-dir itself: its files would all be skipped as the run's own ("no files there")
    if outputs and os.path.join(os.path.realpath(base), "") == outputs:
        die(f"--data {pattern}: that is --out-dir, where the run writes: choose another --out-dir")
    for root in roots:
        for path in files_under(root, skip=() if spec else SKIPPED_FOLDERS, seen=seen):
            if not spec and not path.endswith(".py"):
                continue
            if outputs and os.path.realpath(path).startswith(outputs):
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:  # a broken link, a file without read permission
                die(f"--data: cannot read {path} ({e.strerror})")
            yield os.path.relpath(path, base), data


def glob_paths(pattern) -> list:
    """glob.glob(pattern, recursive=True), sorted, but that a link to a folder that holds it is not
    followed: glob's ** goes round it until the path is too long, and round two such links in
    time exponential in that length."""
    start = glob_start(pattern)  # the search starts there; rest: the parts it matches
    rest = pattern[len(start) :].lstrip(os.sep).split(os.sep)
    folders_only = rest[-1] == ""  # "corp/*/" names folders
    if folders_only:
        rest = rest[:-1]
    # "." or ".." after ** would walk up and down again without end
    after = rest[rest.index("**") :] if "**" in rest else []
    if "." in after or ".." in after:
        die(f"--data {pattern}: a '.' or '..' after '**' is not supported; spell out the folders")
    # ** does not search hidden folders (.git) unless a part asks for a hidden name
    hidden = any(part.startswith(".") and part not in (".", "..") for part in rest)
    found = []
    if start and glob_match(rest, []):  # "corp/**" names corp/ too, as glob's does
        found.append(os.path.join(start, ""))
    stack = [(start, [], frozenset([os.path.realpath(start or ".")]))]
    while stack:
        folder, names, above = stack.pop()
        part = rest[len(names)] if len(names) < len(rest) else None
        for name, is_folder in listed(folder, part):
            path, path_names = os.path.join(folder, name), names + [name]
            if glob_match(rest, path_names) and (is_folder or not folders_only):
                found.append(path)
            deeper = "**" in rest or len(path_names) < len(rest)
            if not (deeper and is_folder) or (name.startswith(".") and not hidden and name != part):
                continue
            real = os.path.realpath(path)
            if name == part:
                # "." or "..": the search goes on from there, as if it had started there
                stack.append((path, path_names, frozenset([real])))
            elif real not in above:  # a link to a folder above this one would lead round again
                stack.append((path, path_names, above | {real}))
    return sorted(found)


def listed(folder: str, part) -> list:
    """(name, whether a folder) of each entry of folder, none where it cannot be listed (glob
    passes it over too: its search lists some that no match needs); and where the glob's part
    here is "." or ".." (c/*/../x), that, a folder no listing holds, as glob's names it."""
    try:
        entries = [(entry.name, entry.is_dir()) for entry in os.scandir(folder or ".")]
    except OSError:
        entries = []
    if part in (".", ".."):
        entries.append((part, True))
    return entries


def glob_match(parts, names) -> bool:
    """Whether a path's names match a glob's parts: ** any number of names, each other part one
    (fnmatch); a hidden name (.git) only by a part that starts with a dot, as glob matches."""
    if not parts:
        return not names
    hidden = bool(names) and names[0].startswith(".")
    if parts[0] == "**":
        further = bool(names) and not hidden and glob_match(parts, names[1:])
        return further or glob_match(parts[1:], names)
    if not names or (hidden and not parts[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(names[0], parts[0]) and glob_match(parts[1:], names[1:])


def glob_start(pattern) -> str:
    """A glob's leading part without wildcards: corp/**/*.py: corp; *.py: ""."""
    while glob.has_magic(pattern):
        pattern = os.path.dirname(pattern)
    return pattern


def starting_folder(pattern, roots) -> str:
    """The folder the names start at: pattern itself, a file's folder, or a glob's leading part
    without wildcards (glob_start)."""
    base = pattern
    if roots != [pattern]:
        base = glob_start(pattern)
    if not os.path.isdir(base):
        base = os.path.dirname(base)
    return base or "."


def files_under(root, skip, seen):
    """The files at or under root, links followed, each once (seen: real paths), in sorted order,
    so that every machine reads the documents in the same order; not pipes or devices, which
    would block or never end; not hidden ones (.git), which a glob's ** skips too."""
    walk = [("", [], [root])]
    if os.path.isdir(root):
        if was_seen(root, seen):
            return
        walk = os.walk(root, followlinks=True, onerror=unreadable_folder)
    for folder, subfolders, files in walk:
        if folder:  # a folder walked (root named alone is read, hidden or not)
            subfolders[:] = [sub for sub in subfolders if not sub.startswith(".")]
            files = [file for file in files if not file.startswith(".")]
        subfolders[:] = [sub for sub in sorted(subfolders) if sub not in skip]
        # a folder reached twice (a link back up, or a glob's match inside another) is walked once
        subfolders[:] = [sub for sub in subfolders if not was_seen(os.path.join(folder, sub), seen)]
        for file in sorted(files):
            path = os.path.join(folder, file)
            if os.path.exists(path) and not os.path.isfile(path):
                continue
            if not was_seen(path, seen):
                yield path


def unreadable_folder(error: OSError):
    """os.walk's onerror: a folder it cannot list (lost+found, to all but root) is left out, and
    said so (by one process), where os.walk passed it over in silence."""
    if os.environ.get("RANK", "0") == "0":
        left_out = f"cannot read the folder {error.filename} ({error.strerror}): its files left out"
        print(printable(f"--data: {left_out}"))


def was_seen(path, seen) -> bool:
    """Whether path's real path is in seen; adds it."""
    real = os.path.realpath(path)
    if real in seen:
        return True
    seen.add(real)
    return False


def split_documents(documents, spec):
    """{"train": (bytes, offsets), "val": (bytes, offsets)}, about 4% of the documents held out."""
    documents = list(documents)
    if not documents:
        die(f"--data {spec}: no files there")
    documents = [(name, data) for name, data in documents if data]
    if not documents:
        die(f"--data {spec}: no data, every file is empty")
    # os.fsencode: a file name need not be valid UTF-8
    held = [hashlib.md5(os.fsencode(name)).digest()[0] % 25 == 0 for name, _ in documents]
    if any(held) and not all(held):
        held = [is_held and not copy for is_held, copy in zip(held, near_copies(documents, held))]
        # a corpus of drafts, say: the fallback below holds copies out too (said by one process)
        if not any(held) and os.environ.get("RANK", "0") == "0":
            instead = "the last tenth of each file is held out instead"
            print(printable(f"--data {spec}: each file held out by name copies another: {instead}"))
    if all(held) or not any(held):
        # too few documents to hold some out: hold out the last tenth of each
        cuts = [len(data) * 9 // 10 for _, data in documents]
        # a file of one byte is held out whole: an empty document has no rows to train on
        train = [data[:cut] for (_, data), cut in zip(documents, cuts) if cut]
        val = [data[cut:] for (_, data), cut in zip(documents, cuts)]
    else:
        train = [data for (_, data), is_held in zip(documents, held) if not is_held]
        val = [data for (_, data), is_held in zip(documents, held) if is_held]
    # 15% of fewer than 100 bytes is too few masked bytes to mean anything
    held_bytes = sum(map(len, val))
    if held_bytes < 100:
        total = sum(len(data) for _, data in documents)
        too_little = f"holds out {held_bytes} of its {total} bytes, too few to measure on"
        advice = "give it 1 KB or more, or more files (near-copies of others train)"
        die(f"--data {spec}: {too_little}; {advice}")
    if not train:  # files of one byte each, every one held out whole
        die(f"--data {spec}: nothing left to train on, its {held_bytes} bytes all held out")
    parts = {}
    for part, docs in (("train", train), ("val", val)):
        parts[part] = (np.frombuffer(b"".join(docs), np.uint8), np.cumsum([0, *map(len, docs)]))
    return parts


def near_copies(documents, held) -> list:
    """Which held-out documents are near-copies of training ones: most of their bytes, whitespace
    aside, lie in lines that a training document holds too (the code pages in the stdlib's
    encodings/ share most of theirs), or one found so, pass after pass until none is (a copy of a
    copy trains too). A held-out text read in training measures memory, not prediction."""
    copies = [False] * len(held)
    while True:
        still_held = [is_held and not copy for is_held, copy in zip(held, copies)]
        found = copies_of_training(documents, still_held)
        if not any(found):
            return copies
        copies = [copy or new for copy, new in zip(copies, found)]


def copies_of_training(documents, held) -> list:
    """One pass of near_copies: the held-out documents that are near-copies of training ones."""
    held_lines = set()
    for (_, data), is_held in zip(documents, held):
        if is_held:
            held_lines.update(stripped_lines(data))
    trained_too = set()
    for (_, data), is_held in zip(documents, held):
        if not is_held:
            trained_too.update(held_lines.intersection(stripped_lines(data)))
    return [is_held and mostly_in(data, trained_too) for (_, data), is_held in zip(documents, held)]


def stripped_lines(data: bytes):
    """data's lines (to each \\n), stripped, one at a time: a list of them all would take up to 20
    times data's memory where lines are short."""
    return (line.strip() for line in io.BytesIO(data))


def mostly_in(data: bytes, lines: set) -> bool:
    """Whether more than half of data's bytes, whitespace aside, lie in lines of the set."""
    text = shared = 0
    for line in stripped_lines(data):
        text += len(line)
        if line in lines:
            shared += len(line)
    return shared > text / 2


def stdlib_documents():
    """The default corpus's documents: read_documents(None)'s but pydoc_data/topics.py, which holds
    the topics again as Python strings (the fine-tuning tasks read it, as Python)."""
    topics_source = os.path.join("pydoc_data", "topics.py")
    return ((name, data) for name, data in read_documents(None) if name != topics_source)


def prepare_stdlib():
    """Split the stdlib into data/ unless done. Each file is renamed into place whole; val.idx,
    written last, marks "done"."""
    if os.path.exists(f"{STDLIB_STEM}-val.idx"):
        return
    for part, (data, offsets) in split_documents(stdlib_documents(), None).items():
        for suffix, array in (("bin", data), ("idx", offsets.astype(np.int64))):
            path = f"{STDLIB_STEM}-{part}.{suffix}"
            with renamed_into_place(path) as temporary:
                array.tofile(temporary)


# the name a file is written under before renamed_into_place renames it: its writer's own
TEMPORARY = "{path}.{pid}.tmp"


@contextlib.contextmanager
def renamed_into_place(path):
    """A name to write path's content under, renamed to path once written, so that no reader sees
    half a file; the name is this process's own, so that two runs started at once write apart."""
    temporary = TEMPORARY.format(path=path, pid=os.getpid())
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        # a failed write or rename (a full disk, a Ctrl-C) leaves no half file behind
        if os.path.exists(temporary):
            os.remove(temporary)


def load_stdlib():
    """The prepared stdlib corpus, as split_documents() returns it."""
    parts = {}
    again = f"delete {STDLIB_STEM}-* to have the corpus made again"
    for part in ("train", "val"):
        try:
            data = np.fromfile(f"{STDLIB_STEM}-{part}.bin", np.uint8)
            offsets = np.fromfile(f"{STDLIB_STEM}-{part}.idx", np.int64)
        except FileNotFoundError as e:  # deleted by hand: its val.idx says it was made
            die(f"{e.filename} is missing: {again}")
        # cut short or changed by hand: the offsets run from 0 up to the end of the bytes
        whole = len(offsets) >= 2 and offsets[0] == 0 and offsets[-1] == len(data)
        if not whole or (np.diff(offsets) < 0).any():
            die(f"{STDLIB_STEM}-{part}.bin and .idx do not match ({len(data)} bytes): {again}")
        parts[part] = (data, offsets)
    return parts


def load_corpus(spec, out_dir=None, wait=None):
    """What train.py trains on: the files spec names but those in out_dir, split by name, or else
    the stdlib, which the first process of each machine (torchrun's LOCAL_RANK 0) writes into data/
    once, while wait (a barrier) holds the others. Its "sha256" names its bytes, for a resumed run
    to check."""
    if spec == "":  # an unset variable in --data "$DATA": no silent switch to the stdlib
        die("--data '' names no file, folder or glob (leave --data out for the Python stdlib)")
    if spec:
        corpus = split_documents(read_documents(spec, out_dir), spec)
    else:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # not RANK: every machine needs its copy
            try:
                prepare_stdlib()
            except OSError as e:  # a read-only checkout, a full disk
                die(f"cannot write the default corpus into {HERE} ({e.strerror}): make it writable")
        if wait is not None:
            wait()
        corpus = load_stdlib()
    digest = hashlib.sha256()
    for data, offsets in (corpus["train"], corpus["val"]):
        digest.update(np.int64(len(offsets)).tobytes() + offsets.astype(np.int64).tobytes())
        digest.update(data)
    return dict(corpus, sha256=digest.hexdigest())


def describe(corpus, spec) -> str:
    """A corpus in a line: documents and megabytes to train on and held out, and from where."""
    (train, train_offsets), (val, val_offsets) = corpus["train"], corpus["val"]
    trained_on = f"{len(train_offsets) - 1} documents ({len(train) / 1e6:.2f} MB) to train on"
    held_out = f"{len(val_offsets) - 1} held out ({len(val) / 1e6:.2f} MB)"
    return f"{trained_on}, {held_out}, from {spec or 'the Python stdlib'}"


def check_data(checkpoint: dict, corpus, spec):
    """A resumed run reads the bytes it started on (checkpoints before this check hold none), and
    under torchrun every process reads the same bytes: each node reads its own files."""
    where = f"--data {spec}" if spec else "the Python stdlib (another build?)"
    if checkpoint.get("data_sha256", corpus["sha256"]) != corpus["sha256"]:
        change = "files added, removed or changed, or a relative path read from another folder"
        die(f"--resume: {where} is not the data the run trained on ({change}); put it back")
    import torch.distributed as dist  # here: the data tools never need torch

    if dist.is_available() and dist.is_initialized():
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, corpus["sha256"])
        if len(set(digests)) > 1:
            die(f"{where} holds other bytes on some processes' nodes: every one must read the same")
