"""The text a run trains on, torch-free: what a spec's `data` names, its tokens cached once, its splits.

`data` is one of:
- `synthetic`: uniformly random tokens from (seed, step) (runner/job/data.py); no files at all.
- `stdlib`: this Python's standard library sources (every *.py under sysconfig's stdlib folder, in path
  order), byte-level. Real text on every machine, so tests and the self-test need no shipped corpus.
- a folder or file of text: its files (a folder's recursively, in path order, hidden ones skipped),
  tokenized with `tokenizer.json` beside the `weights` file when there is one, else byte-level (ids 0-255).
- a nanoGPT token folder: `train.bin` and `val.bin` (uint16 little-endian token ids), or the path of such
  a train.bin. Read as they are; no cache.

Text is tokenized once into LAB_HOME/corpora/<key>/tokens.bin (key: a hash of the files' paths, sizes and
times and of the tokenizer's bytes), under a file lock so ranks starting together build it once. The last
10% of its tokens is the held-out split, as nanoGPT splits. Every rank opens the files with numpy.memmap:
the page cache holds one copy for all ranks of a machine, never one whole copy per rank.

Sizes (`split_sizes`) come from the files' sizes where bytes are tokens, so validation never reads a
byte-level corpus; a tokenizer corpus is tokenized (and cached) when validation first asks.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SYNTHETIC = "synthetic"
STDLIB = "stdlib"
BYTE_VOCAB = 256
VAL_FRACTION = 0.1  # the held-out share of a text corpus (nanoGPT's split)
NANOGPT_DTYPE = np.dtype("<u2")
CACHE_VERSION = 1  # part of every cache key: a change of the format builds new caches
_SKIPPED_PARTS = {"site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """A `data` value that names nothing usable; the message says what to give instead."""


@dataclass(frozen=True)
class Source:
    """What a `data` value resolves to: its kind, its files and the tokenizer that turns them into ids."""

    kind: str  # synthetic | stdlib | text | tokens
    root: Path | None = None  # the folder or file named (the stdlib folder for stdlib)
    files: tuple[Path, ...] = ()  # text files in order; for tokens (train.bin, val.bin or nothing)
    tokenizer: Path | None = None  # tokenizer.json for text, None: byte-level

    @property
    def byte_level(self) -> bool:
        return self.kind in (STDLIB, "text") and self.tokenizer is None

    @property
    def decodable(self) -> bool:
        """Whether ids read back as text: bytes, or ids of a tokenizer.json we hold."""
        return self.byte_level or self.tokenizer is not None

    def describe(self) -> str:
        if self.kind == SYNTHETIC:
            return "synthetic tokens"
        if self.kind == "tokens":
            return f"the nanoGPT token folder {self.root}"
        what = "the standard library's sources" if self.kind == STDLIB else str(self.root)
        how = f"tokenized with {self.tokenizer}" if self.tokenizer else "byte-level"
        n = len(self.files)
        return f"{what} ({n} file{'s' if n != 1 else ''}, {how})"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def cache_root() -> Path:
    """LAB_HOME/corpora: the data folder storage.db.lab_home names (read here from the environment, as rank
    processes inherit it, because the job never imports storage)."""
    return Path(os.environ.get("LAB_HOME") or "lab-data").expanduser().resolve() / "corpora"


def is_token_folder(data: str) -> bool:
    """A nanoGPT layout: a folder holding train.bin, or a path to a .bin file."""
    path = Path(data).expanduser()
    return (path.is_dir() and (path / "train.bin").is_file()) or (path.suffix == ".bin" and path.is_file())


def is_byte_text(data: str, weights: str | None) -> bool:
    """Whether `data` is text read byte by byte (256 ids): stdlib, or text with no tokenizer.json beside
    the weights. Cheap (two stats): RunSpec.model_config asks it to size the vocabulary."""
    if data == SYNTHETIC:
        return False
    if data == STDLIB:
        return True
    return not is_token_folder(data) and tokenizer_beside(weights) is None


def tokenizer_beside(weights: str | None) -> Path | None:
    """The --weights folder's tokenizer.json, if there is one."""
    if not weights:
        return None
    path = Path(weights).expanduser()
    candidate = (path if path.is_dir() else path.parent) / "tokenizer.json"
    return candidate if candidate.is_file() else None


def resolve(data: str, weights: str | None = None) -> Source:
    """The Source `data` names; DataError saying what is wrong and what to give instead."""
    if data == SYNTHETIC:
        return Source(SYNTHETIC)
    if data == STDLIB:
        root = stdlib_root()
        files = _stdlib_files(str(root))
        if not files:
            raise DataError(f"this Python's standard library at {root} has no .py sources; give a text folder")
        return Source(STDLIB, root, files)
    if not data.strip():
        raise DataError("is empty; give synthetic, stdlib, a folder or file of text, or a nanoGPT token folder")
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"no file or folder at {str(path)!r}; give a folder or file of text, a nanoGPT folder "
                        "with train.bin, stdlib (this Python's sources) or synthetic")  # fmt: skip
    if is_token_folder(data):
        train = path / "train.bin" if path.is_dir() else path
        val = train.parent / "val.bin"
        return Source("tokens", train.parent, (train, val) if val.is_file() else (train,))
    files = (path,) if path.is_file() else tuple(_files_under(path, "*"))
    if not files:
        raise DataError(f"the folder {str(path)!r} holds no readable files; give a folder of text files")
    for f in files[:1]:
        if not os.access(f, os.R_OK):
            raise DataError(f"{str(f)!r} cannot be read (permission denied); give a corpus this user can read")
    return Source("text", path, files, tokenizer_beside(weights))


@functools.lru_cache(maxsize=1)
def _stdlib_files(root: str) -> tuple[Path, ...]:
    """The standard library's sources, listed once per process (the Launch page validates on every change)."""
    return tuple(_files_under(Path(root), "*.py"))


def _files_under(root: Path, pattern: str) -> list[Path]:
    out = []
    for p in root.rglob(pattern):
        rel = p.relative_to(root).parts
        if _SKIPPED_PARTS & set(rel) or any(part.startswith(".") for part in rel) or not p.is_file():
            continue
        out.append(p)
    return sorted(out)


# ---- sizes, cache and the memory-mapped splits ----------------------------------------------------
def vocab_of(source: Source) -> int | None:
    """The ids a corpus can hold: 256 bytes, the tokenizer's vocabulary, or (token folders) None: their
    largest id is read by `largest_id`."""
    if source.byte_level:
        return BYTE_VOCAB
    if source.tokenizer is not None:
        return _tokenizer(str(source.tokenizer)).get_vocab_size()
    return None


def split_sizes(source: Source) -> tuple[int, int]:
    """(train tokens, held-out tokens); byte-level corpora from their files' sizes, without reading them."""
    if source.kind == "tokens":
        sizes = [_nanogpt_len(f) for f in source.files]
        return sizes[0], sizes[1] if len(sizes) > 1 else 0
    if source.byte_level:
        return _split(sum(f.stat().st_size for f in source.files))
    meta = prepare(source)
    return int(meta["train"]), int(meta["count"]) - int(meta["train"])


def largest_id(source: Source) -> int:
    """The largest token id in a token folder's files (read once per file version)."""
    return max(_largest_id(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in source.files)


@functools.lru_cache(maxsize=32)
def _largest_id(path: str, size: int, mtime_ns: int) -> int:
    data = np.memmap(path, dtype=NANOGPT_DTYPE, mode="r")
    return int(data.max()) if len(data) else -1


def _nanogpt_len(path: Path) -> int:
    size = path.stat().st_size
    if size % 2:
        raise DataError(f"{path} has an odd number of bytes: nanoGPT token files hold uint16 ids (2 bytes each)")
    return size // 2


def _split(count: int) -> tuple[int, int]:
    train = count - int(count * VAL_FRACTION)
    return train, count - train


def cache_key(source: Source) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} {source.kind}".encode())
    for f in source.files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if source.tokenizer is not None:
        h.update(source.tokenizer.read_bytes())
    return h.hexdigest()[:24]


def prepare(source: Source) -> dict:
    """Tokenize a text corpus into its cache once (the first caller builds it under a lock, the others wait
    and read it); returns its meta: dtype, count (tokens), train (tokens before the held-out split)."""
    folder = cache_root() / cache_key(source)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if meta_path.is_file():
            return json.loads(meta_path.read_text())
        folder.mkdir(exist_ok=True)
        vocab = vocab_of(source) or 0
        dtype = np.dtype("u1" if vocab <= 256 else "<u2" if vocab <= 65536 else "<u4")
        count = 0
        with open(folder / "tokens.bin", "wb") as out:
            for ids in _token_chunks(source):
                out.write(np.asarray(ids, dtype=dtype).tobytes())
                count += len(ids)
        train, _ = _split(count)
        meta = {"dtype": dtype.str, "count": count, "train": train, "vocab": vocab, "source": source.describe()}
        tmp = folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(meta_path)  # the meta appears last: a cache without it is rebuilt
        return meta


def _token_chunks(source: Source):
    """Each file's ids in order: its bytes, or its text through the tokenizer (files in batches, which the
    tokenizers library encodes on several threads)."""
    if source.tokenizer is None:
        for f in source.files:
            yield np.frombuffer(f.read_bytes(), dtype=np.uint8)
        return
    tok = _tokenizer(str(source.tokenizer))
    files = list(source.files)
    for i in range(0, len(files), 64):
        texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files[i : i + 64]]
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            yield enc.ids


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise DataError(f"{path} needs the tokenizers package (pip install tokenizers), or move it away to read "
                        "the text byte-level") from exc  # fmt: skip
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # the library raises its own exception type for a malformed file
        raise DataError(f"{path} is not a readable tokenizer.json ({str(exc)[:160]})") from exc


def open_splits(source: Source) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids) as read-only memory maps; the held-out split may be empty."""
    if source.kind == "tokens":
        maps = [np.memmap(f, dtype=NANOGPT_DTYPE, mode="r") for f in source.files]
        return maps[0], maps[1] if len(maps) > 1 else np.zeros(0, dtype=NANOGPT_DTYPE)
    meta = prepare(source)
    tokens = np.memmap(cache_root() / cache_key(source) / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    return tokens[: meta["train"]], tokens[meta["train"] :]


# ---- text in and out ----------------------------------------------------------------------------
def encode(source: Source, text: str) -> list[int]:
    """A prompt's ids: its UTF-8 bytes, or the tokenizer's ids."""
    if source.tokenizer is not None:
        return list(_tokenizer(str(source.tokenizer)).encode(text, add_special_tokens=False).ids)
    return list(text.encode("utf-8"))


def prompt_length(data: str, weights: str | None, prompt: str) -> int | None:
    """How many tokens `prompt` is in `data`'s tokenization (the seq a prompted generate run takes); None
    where `data` reads no text (validation then says why)."""
    try:
        source = resolve(data, weights)
        return len(encode(source, prompt)) if source.decodable else None
    except DataError:
        return None


def decode(source: Source, ids: list[int]) -> str:
    """Ids back to text; a byte-level id above 255 (the model's padded vocabulary) reads as U+FFFD."""
    if source.tokenizer is not None:
        return _tokenizer(str(source.tokenizer)).decode(list(ids), skip_special_tokens=False)
    raw = b"".join(bytes([i]) if 0 <= i < BYTE_VOCAB else "\ufffd".encode() for i in ids)
    return raw.decode("utf-8", errors="replace")
