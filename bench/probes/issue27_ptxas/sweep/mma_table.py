"""HGMMA / HMMA per (kernel role, block, BM) before vs after: counts of compiles whose SASS has HGMMA (wgmma) and
HMMA (mma.sync), and their instruction totals. role: bsmm dX (cfg kind dx/dx_dual), bsmm fwd, hidden_bwd dh-only
(LOAD_PRE != 0: the dh loop is its only dot), hidden_bwd all.
usage: python mma_table.py BEFORE/results.jsonl AFTER/results.jsonl"""
import json, sys
from collections import defaultdict


def load(p):
    out = defaultdict(lambda: [0, 0, 0, 0, 0, 0])  # n, n_hgmma, n_hmma, sum hgmma, sum hmma, errors
    for l in open(p):
        r = json.loads(l)
        kw = r["rec"]["kw"]
        kinds = {u["cfg"][0] for u in r["uses"] if u.get("cfg")}
        if r["kernel"] == "bsmm":
            role = "bsmm dX" + (" dual" if kw.get("DUAL") else "") if kinds & {"dx", "dx_dual"} else "bsmm fwd"
            blk = (kw["BO"], kw["BI"])
        else:
            role = "hbwd dh-only" if kw.get("LOAD_PRE") else "hbwd recompute"
            blk = (kw["BH"], kw["BD"])
        v = out[(role, blk, kw["BM"])]
        v[0] += 1
        if "error" in r:
            v[5] += 1
            continue
        s = r["stats"]
        v[1] += s["hgmma"] > 0
        v[2] += s.get("hmma", 0) > 0
        v[3] += s["hgmma"]
        v[4] += s.get("hmma", 0)
    return out


a, b = load(sys.argv[1]), load(sys.argv[2])
print(f"{'role':16s} {'block':>9s} {'BM':>4s} | {'n':>3s} {'w/HGMMA':>7s} {'w/HMMA':>6s} {'sumHG':>6s} {'sumHM':>6s} | "
      f"{'n':>3s} {'w/HGMMA':>7s} {'w/HMMA':>6s} {'sumHG':>6s} {'sumHM':>6s}")
for k in sorted(set(a) | set(b), key=lambda k: (k[0], k[1], k[2])):
    x, y = a.get(k, [0] * 6), b.get(k, [0] * 6)
    print(f"{k[0]:16s} {str(k[1]):>9s} {k[2]:4d} | {x[0]:3d} {x[1]:7d} {x[2]:6d} {x[3]:6d} {x[4]:6d} | "
          f"{y[0]:3d} {y[1]:7d} {y[2]:6d} {y[3]:6d} {y[4]:6d}" + (f"  ERR {x[5]}/{y[5]}" if x[5] or y[5] else ""))
