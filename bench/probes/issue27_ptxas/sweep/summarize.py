"""Table of a sweep: kernel x block -> compiles / flagged ("never"-written UR reads), plus each flagged compile.
usage: python summarize.py OUTDIR (after rescan.py)"""
import json, sys
from collections import Counter
rs = [json.loads(l) for l in open(sys.argv[1] + "/results_rescanned.jsonl")]
c, f, e, tb = Counter(), Counter(), Counter(), Counter()
cfgs = {}
for r in rs:
    kw = r["rec"]["kw"]
    k = (r["kernel"], kw.get("BH", kw.get("BO")), kw.get("BD", kw.get("BI")))
    c[k] += 1
    if "error" in r:
        e[k] += 1
    tb[k] += bool(r.get("stats", {}).get("tnspB"))
    cfgs.setdefault(k, set()).add((kw.get("BM"), kw.get("num_warps"), kw.get("num_stages")))
    if any(x["kind"] == "never" for x in r.get("flags", [])):
        f[k] += 1
print(f"{'kernel':15s} {'BH/BO':>5s} {'BD/BI':>5s} {'compiles':>8s} {'(BM,w,s)':>8s} {'w/tnspB':>7s} {'errors':>6s} {'FLAGGED':>7s}")
for k in sorted(c, key=lambda k: (k[0], k[1] or 0, k[2] or 0)):
    print(f"{k[0]:15s} {str(k[1]):>5s} {str(k[2]):>5s} {c[k]:8d} {len(cfgs[k]):8d} {tb[k]:7d} {e[k]:6d} {f[k]:7d}")
print("total", len(rs), "compiles;", sum(f.values()), "flagged;", sum(e.values()), "errors;",
      "maybe-only:", sum(1 for r in rs if r.get("flags") and not any(x["kind"] == "never" for x in r["flags"])))
for r in rs:
    nv = [x for x in r.get("flags", []) if x["kind"] == "never"]
    if nv:
        kw = r["rec"]["kw"]
        sk = {k: v for k, v in kw.items() if k in ("DTYPE", "BM", "BH", "BD", "BO", "BI", "num_warps", "num_stages",
                                                  "WIDE", "TMA", "LOAD_PRE", "DUAL", "TWO_LOOPS", "STORE_H")}
        print(r["key"], r["kernel"], sk, "case", r["rec"]["case"]["tag"], "M", r["rec"]["case"]["M"],
              "| " + "; ".join(f"{x['off']}: {x['ins']}" for x in nv))
