"""Static check of a Triton PTX kernel's shared-memory accesses: evaluates, for every thread of the CTA
(tid.x = 0..NTHREADS-1), every address operand of ld/st.shared (and wgmma descriptors' start addresses) through
its backward slice of integer ops, with global_smem at offset 0. Registers defined more than once (phi copies of
loops) take the union of their definitions' values. A value that depends on memory loads (ld.global/ld.param)
is reported as UNKNOWN.  usage: python ptx_smem_check.py file.ptx NTHREADS SHARED_BYTES"""
import re, sys, itertools
from collections import defaultdict

path, NT, SHARED = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lines = open(path).read().split("\n")
insts = []
for ln, raw in enumerate(lines, 1):
    s = raw.split("//")[0].strip()
    if not s or s.startswith(".") or s.endswith(":") or s in ("{", "}", ")", "("):
        continue
    s = s.rstrip(";")
    m = re.match(r"(@!?%p\d+\s+)?([a-z][\w.:]*)\s*(.*)", s)
    if not m:
        continue
    pred, op, rest = m.groups()
    ops = [o.strip() for o in re.split(r",(?![^{]*\})", rest)] if rest else []
    insts.append((ln, pred, op, ops))

defs = defaultdict(list)
for i, (ln, pred, op, ops) in enumerate(insts):
    if not ops or op.startswith(("st.", "bar", "wgmma", "fence", "bra", "ret", "setp")):
        if op.startswith("setp"):
            defs[ops[0]].append(i)
        continue
    dst = ops[0]
    if dst.startswith("{"):
        for d in dst.strip("{}").split(","):
            defs[d.strip()].append(i)
    else:
        defs[dst].append(i)

UNK = "UNK"
MASK = {"b16": 0xFFFF, "u16": 0xFFFF, "s16": 0xFFFF, "b32": 0xFFFFFFFF, "u32": 0xFFFFFFFF, "s32": 0xFFFFFFFF,
        "b64": (1 << 64) - 1, "u64": (1 << 64) - 1, "s64": (1 << 64) - 1, "pred": 1}

def bits(op):
    for t in reversed(op.split(".")):
        if t in MASK: return t
    return "b64"

def sx(v, nb):
    v &= (1 << nb) - 1
    return v - (1 << nb) if v >> (nb - 1) else v

memo = {}
stack = set()
unknown_src = set()

def val(tok, tid, cta_y):
    tok = tok.strip()
    if re.fullmatch(r"-?\d+", tok): return {int(tok)}
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", tok): return {int(tok, 16)}
    if tok == "%tid.x": return {tid}
    if tok in ("%tid.y", "%tid.z", "%ctaid.x", "%ctaid.z"): return {0}
    if tok == "%ctaid.y": return {cta_y}
    if tok == "global_smem": return {0}
    if not tok.startswith("%"): return {UNK}
    key = (tok, tid, cta_y)
    if key in memo: return memo[key]
    if key in stack: return set()  # a loop-carried cycle: the other definitions supply the values
    stack.add(key)
    out = set()
    for i in defs.get(tok, []):
        out |= ev(i, tok, tid, cta_y)
    stack.discard(key)
    if len(out) > 4096: out = {UNK}
    memo[key] = out
    return out

def combos(sets):
    if any(UNK in s for s in sets): return None
    return itertools.product(*sets)

def ev(i, dst, tid, cta_y):
    ln, pred, op, ops = insts[i]
    base = op.split(".")[0]
    if base in ("ld", "atom", "wgmma"):
        unknown_src.add((ln, op)); return {UNK}
    srcs = [val(o, tid, cta_y) for o in ops[1:]] if base not in ("setp",) else None
    t = bits(op); m = MASK.get(t, (1 << 64) - 1); nb = m.bit_length()
    res = set()
    if base == "setp":
        return {0, 1}  # predicates: both ways
    if base == "selp":
        return (srcs[0] | srcs[1])
    cs = combos(srcs)
    if cs is None: return {UNK}
    for c in cs:
        try:
            if base == "mov": r = c[0]
            elif base == "add": r = c[0] + c[1]
            elif base == "sub": r = c[0] - c[1]
            elif base == "mul":
                if ".wide" in op: r = (sx(c[0], 32) * sx(c[1], 32)) if ".s32" in op else (c[0] & 0xFFFFFFFF) * (c[1] & 0xFFFFFFFF); m = (1 << 64) - 1
                else: r = c[0] * c[1]
            elif base == "mad":
                if ".wide" in op: r = ((sx(c[0], 32) * sx(c[1], 32)) if ".s32" in op else (c[0] & 0xFFFFFFFF) * (c[1] & 0xFFFFFFFF)) + c[2]; m = (1 << 64) - 1
                else: r = c[0] * c[1] + c[2]
            elif base == "shl": r = c[0] << c[1]
            elif base == "shr": r = (sx(c[0], nb) >> c[1]) if ".s" in op else ((c[0] & m) >> c[1])
            elif base == "and": r = c[0] & c[1]
            elif base == "or": r = c[0] | c[1]
            elif base == "xor": r = c[0] ^ c[1]
            elif base == "bfe": r = ((c[0] & 0xFFFFFFFF) >> c[1]) & ((1 << c[2]) - 1)
            elif base == "cvt":
                parts = op.split(".")
                dt, stp = parts[-2], parts[-1]
                if stp.startswith("f") or dt.startswith("f"): return {UNK}
                sv = sx(c[0], int(stp[1:])) if stp.startswith("s") else c[0] & MASK[stp]
                r = sv; m = MASK[dt]
            else:
                return {UNK}
        except Exception:
            return {UNK}
        res.add(r & m)
    return res

def addr_of(tok):
    m = re.fullmatch(r"\[\s*(%?[\w.]+)\s*(?:\+\s*(-?\d+))?\s*\]", tok.strip())
    return m.group(1), int(m.group(2) or 0)

SZ = {"b16": 2, "b32": 4, "b64": 8, "b8": 1, "u16": 2, "u32": 4, "f32": 4, "f16": 2, "b128": 16}
report = []
lo_all, hi_all = 1 << 60, -1
for i, (ln, pred, op, ops) in enumerate(insts):
    if ".shared" in op and op.split(".")[0] in ("ld", "st", "ldmatrix", "stmatrix", "atom", "red", "cp"):
        a = ops[1] if op.startswith("ld") else ops[0]
        reg, imm = addr_of(a)
        vec = 1
        mv = re.search(r"\.v(\d)", op)
        if mv: vec = int(mv.group(1))
        esz = SZ.get(op.split(".")[-1], 4) * vec
        vals = set()
        for tid in range(NT):
            for cy in (0, 1):
                vals |= val(reg, tid, cy)
        if UNK in vals:
            report.append((ln, op, a, "UNKNOWN (depends on loaded data)")); continue
        lo, hi = min(vals) + imm, max(vals) + imm + esz
        lo_all, hi_all = min(lo_all, lo), max(hi_all, hi)
        flag = "  <-- OUT OF RANGE" if lo < 0 or hi > SHARED else ""
        report.append((ln, op, a, f"[{lo}, {hi}){flag}"))
for r in report:
    print(*r, sep="\t")
print(f"\nld/st.shared: {len(report)} accesses; union of byte ranges [{lo_all}, {hi_all}); allocation {SHARED}")

# wgmma descriptors
print("\nwgmma descriptors (start addr = (desc & 0x3fff) << 4, LBO = ((desc>>16)&0x3fff)<<4, SBO = ((desc>>32)&0x3fff)<<4, "
      "base_off = (desc>>49)&7, swizzle = desc>>62: 1=128B 2=64B 3=32B)")
descs = []
for i, (ln, pred, op, ops) in enumerate(insts):
    if op.startswith("wgmma.mma_async"):
        for which, tok in (("A", ops[1]), ("B", ops[2])):
            vals = set()
            for tid in range(NT):
                vals |= val(tok, tid, 0)
            descs.append((ln, which, tok, vals, ops[-2:]))
for ln, which, tok, vals, trans in descs:
    if UNK in vals:
        print(ln, which, tok, "UNKNOWN"); continue
    dec = sorted({((v & 0x3fff) << 4, ((v >> 16) & 0x3fff) << 4, ((v >> 32) & 0x3fff) << 4, (v >> 49) & 7, v >> 62) for v in vals})
    print(ln, which, tok, "trans(a,b)=", trans, "(start, LBO, SBO, base_off, swz):", dec)
