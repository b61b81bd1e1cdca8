"""Pick one compile per coverage key from sweep_compile.py --dry's groups.json.
Coverage key: kernel, dtype, every block/tile constexpr and variant switch, num_warps, num_stages, maxnreg; not the
epilogue/ordering switches listed in DROP (one representative of those is kept, the first recorded) nor the
integer-argument specialisations (M, dims, strides)."""
import json, sys
DROP = {"GROUP", "STORE_H", "STORE_PRE", "HAS_B1", "HAS_B3", "HAS_B", "NANROW", "SPLIT", "FILL", "PF", "PF_LINE",
        "launch_pdl", "SCAN", "BX", "ALIGNED", "NNZ"}
g = json.load(open(sys.argv[1]))
extra_drop = set(sys.argv[3].split(",")) if len(sys.argv) > 3 and sys.argv[3] else set()
sel = {}
for k, r in g.items():
    ck = json.dumps([r["kernel"], sorted((a, b) for a, b in r["kw"].items() if a not in DROP | extra_drop)])
    sel.setdefault(ck, k)
open(sys.argv[2], "w").write("\n".join(sel.values()) + "\n")
from collections import Counter
print(len(sel), Counter(g[k]["kernel"] for k in sel.values()))
