"""The pretrained model and the text for ``blast sparsify``: loading, tokenizing, windows, checks.

A model is a transformers directory or a GGUF file (dequantized to fp32 by transformers; needs the ``gguf``
package). Text is raw (tokenized with the model's own tokenizer) or pre-tokenized: a safetensors file whose
``train`` tensor is training text and whose every other 1-D tensor is a held-out set
(``examples/prepare_data.py --model`` writes one for the Bible books).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Tuple

import torch
from torch import nn

from .. import layouts
from .options import Options, SparsifyError

log = logging.getLogger("blast_compile.sparsify")


def _from_pretrained(cls, path: str, **kw):
    if os.path.isdir(path):
        return cls.from_pretrained(path, **kw)
    return cls.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), **kw)


def load_model(path: str) -> nn.Module:
    """fp32 causal LM from a transformers directory or a .gguf file."""
    from transformers import AutoModelForCausalLM

    try:
        model = _from_pretrained(AutoModelForCausalLM, path, dtype=torch.float32)
    except ImportError as e:  # (GGUF without the gguf package, ...)
        raise SparsifyError("MODEL", f"{path}: {e}") from e
    except (OSError, ValueError, KeyError) as e:
        raise SparsifyError("MODEL", f"{path} could not be loaded as a causal LM ({type(e).__name__}: {e})") from e
    return _unquantized(model)


def _unquantized(model: nn.Module) -> nn.Module:
    """A GGUF file loads dequantized, but the model stays marked as quantized: transformers then refuses to
    save it, and its saved config would ask for GGUF again on reload. The same weights in a model built from
    the config alone."""
    if getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None:
        return model
    cfg = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items()
                                            if k != "quantization_config"})
    plain = type(model)(cfg).to(torch.float32)
    try:  # (a state dict holds tied weights under each of their names: strict loading keeps them tied)
        plain.load_state_dict(model.state_dict())
    except RuntimeError as e:
        raise SparsifyError("MODEL", f"dequantized weights do not fit {type(model).__name__}: {e}") from e
    return plain.eval() if not model.training else plain


def load_tokenizer(path: str):
    """The model's tokenizer, or None when it has none (token files need none)."""
    try:
        from transformers import AutoTokenizer

        return _from_pretrained(AutoTokenizer, path)
    except Exception as e:  # noqa: BLE001  (no tokenizer files: fine until raw text needs one)
        log.info("no tokenizer for %s (%s)", path, str(e).splitlines()[0][:200])
        return None


def mlp_layers(model: nn.Module, skip_layers=()) -> List[str]:
    """Qualified names of the MLP projections the sparsifier prunes (MLPs :mod:`layouts` knows), minus those
    in decoder layers ``skip_layers``."""
    skip = tuple(f"layers.{i}." for i in skip_layers)
    return [q for mlp in layouts.mlp_modules(model) for q in mlp.quals.values()
            if not any(s in q + "." for s in skip)]


def check_model(model: nn.Module, o: Options) -> None:
    """Errors that need the loaded model: no known MLP, layers to skip that do not exist, a too long --seq."""
    mlps = layouts.mlp_modules(model)
    if not mlps:
        known = ", ".join(sorted({lay.family for lay in layouts.LAYOUTS}))
        raise SparsifyError("MODEL", f"{o.model}: no MLP the sparsifier knows ({type(model).__name__}; known "
                                     f"layouts: {known})")
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    bad = [i for i in o.skip_layers if n_layers is not None and i >= n_layers]
    if bad:
        raise SparsifyError("--skip-layers", f"{bad}: the model has {n_layers} decoder layers")
    if not o.dense_baseline and not mlp_layers(model, o.skip_layers):
        raise SparsifyError("--skip-layers", "every MLP is skipped: nothing left to sparsify")
    if not o.dense_baseline:
        for mlp in mlps:
            for role, mod in mlp.modules.items():
                w = getattr(mod, "weight", None)
                if isinstance(w, torch.Tensor) and w.dim() == 2 and min(w.shape) < o.block:
                    raise SparsifyError("--block", f"{o.block} is larger than {mlp.quals[role]}'s weight "
                                                   f"({w.shape[0]} x {w.shape[1]}): a block must fit the MLP's "
                                                   "weights for there to be blocks to prune")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos and o.seq > max_pos:
        raise SparsifyError("--seq", f"{o.seq} is longer than the model's {max_pos} positions")


def _read_text(arg: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise SparsifyError(arg, f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); pre-tokenized text "
                                 "goes in a .safetensors file") from None
    except OSError as e:
        raise SparsifyError(arg, f"cannot read {path} ({e.strerror or e})") from None


def _read_tokens(arg: str, path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        t = load_file(path)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own types)
        raise SparsifyError(arg, f"{path} is not a readable safetensors token file ({e})") from None
    bad = [k for k, v in t.items() if v.dim() != 1 or v.dtype.is_floating_point or v.dtype == torch.bool]
    if bad:
        raise SparsifyError(arg, f"{path}: {bad[:3]} are not 1-D integer token ids")
    return {k: v.long() for k, v in t.items()}


def encode_text(tok, text: str) -> torch.Tensor:
    ids: List[int] = []
    for i in range(0, len(text), 200_000):  # (chunks: tokenizers are fast, not streaming)
        ids.extend(tok(text[i:i + 200_000], add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def load_data(o: Options, tokenizer, vocab_size: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(training token ids, {held-out name: ids}). Raw text needs ``tokenizer``; token ids must fit the model's
    vocabulary (a file tokenized for another model is an error, not garbage training)."""
    def need_tok(arg, path):
        if tokenizer is None:
            raise SparsifyError(arg, f"{path} is raw text but the model has no tokenizer: pass a token file "
                                     "(.safetensors) or a model directory with tokenizer files")
        return tokenizer

    train, evals = [], {}
    for p in o.data:
        if p.endswith(".safetensors"):
            t = _read_tokens("TEXT", p)
            if "train" not in t:
                raise SparsifyError("TEXT", f"{p} has no 'train' tensor (it has {sorted(t)})")
            train.append(t.pop("train"))
            if not o.eval:
                evals.update(t)
        else:
            train.append(encode_text(need_tok("TEXT", p), _read_text("TEXT", p)))
    for p in o.eval:
        if p.endswith(".safetensors"):
            t = _read_tokens("--eval", p)
            t.pop("train", None)
            evals.update(t or {})
        else:
            evals[os.path.splitext(os.path.basename(p))[0]] = encode_text(need_tok("--eval", p), _read_text("--eval", p))
    ids = torch.cat(train) if train else torch.zeros(0, dtype=torch.long)
    if not evals:  # hold out the tail of the training text
        n = int(ids.numel() * o.eval_fraction)
        ids, evals = ids[: ids.numel() - n], {"heldout": ids[ids.numel() - n:]}
    if o.eval_tokens:
        evals = {k: v[: o.eval_tokens] for k, v in evals.items()}
    sets = [("training text", "TEXT", ids)] + [(f"held-out set {k!r}", "--eval", v) for k, v in evals.items()]
    for name, arg, t in sets:
        if t.numel() < o.seq + 1:
            raise SparsifyError(arg, f"the {name} has {t.numel()} tokens, fewer than one window of --seq {o.seq} + 1")
        if int(t.max()) >= vocab_size or int(t.min()) < 0:
            raise SparsifyError(arg, f"the {name} has token ids up to {int(t.max())}, the model's vocabulary "
                                     f"{vocab_size}: tokenized for another model?")
    return ids, evals


def windows(ids: torch.Tensor, seq: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Consecutive non-overlapping (input, target) windows covering ``ids`` (deterministic)."""
    n = (ids.numel() - 1) // seq
    w = ids[: n * seq + 1]
    return w[:-1].reshape(n, seq), w[1:].reshape(n, seq)


def batch_starts(n_tokens: int, seq: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """``[steps, batch]`` window offsets drawn up front from ``seed``: step k sees the same text whatever
    happened before it (a resumed run continues on the same batches)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq, (steps, batch), generator=g)  # (a window is seq + 1 tokens)


__all__ = ["load_model", "load_tokenizer", "mlp_layers", "check_model", "load_data", "encode_text", "windows",
           "batch_starts"]
