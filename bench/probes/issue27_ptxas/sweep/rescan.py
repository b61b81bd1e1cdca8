"""Re-run sass_scan on the SASS kept for flagged compiles (OUTDIR/work/KEY/k.sass) and rewrite results.jsonl's flags.
usage: python rescan.py OUTDIR"""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_scan
out = sys.argv[1]
rs = [json.loads(l) for l in open(os.path.join(out, "results.jsonl"))]
for r in rs:
    p = os.path.join(out, "work", r["key"], "k.sass")
    if os.path.exists(p):
        r["flags"], r["stats"] = sass_scan.scan(open(p).read(), maybe=True)
with open(os.path.join(out, "results_rescanned.jsonl"), "w") as f:
    for r in rs:
        f.write(json.dumps(r) + "\n")
print(len(rs), "results;", sum(any(x["kind"] == "never" for x in r.get("flags", [])) for r in rs), "flagged")
