"""Flag uniform registers (URn) read before any write in a kernel's entry block (straight-line code from offset 0
to the first branch), from nvdisasm/cuobjdump SASS text. usage: python sass_undef_ur.py file.sass"""
import re, sys
text = open(sys.argv[1]).read().split("\n")
written = set()
for line in text:
    m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
    if not m: continue
    off, ins = m.groups()
    ins = re.sub(r"^@!?U?P[T0-9]+\s+", "", ins)
    op = ins.split()[0]
    if op.startswith(("BRA", "EXIT", "BRX", "CALL", "RET")):
        print(f"entry block ends at {off}: {ins}"); break
    ops = [o.strip() for o in ins[len(op):].split(",")]
    wide = lambda o: 2 if (".64" in op or "WIDE" in op) else 1
    dst_is_ur = op.startswith("U") or op in ("R2UR", "S2UR") or op.startswith(("R2UR", "S2UR"))
    reads = []
    for k, o in enumerate(ops):
        for mm in re.finditer(r"(g?desc)?\[?U?R(\d+)|UR(\d+)", o):
            pass
    # collect UR tokens with context
    toks = []
    for k, o in enumerate(ops):
        for mm in re.finditer(r"(gdesc\[|desc\[)?UR(\d+)", o):
            toks.append((k, mm.group(1), int(mm.group(2))))
    for k, ctx, n in toks:
        is_dst = dst_is_ur and k == 0 and ctx is None and not op.startswith(("UISETP", "UPLOP", "USETMAXREG"))
        if is_dst:
            continue
        width = 4 if ctx == "gdesc[" else 2 if ctx == "desc[" else (2 if ".64" in op else 1)
        for r in range(n, n + width):
            if r not in written:
                print(f"{off}: reads UR{r} before any write in the entry block: {ins}")
    for k, ctx, n in toks:
        if dst_is_ur and k == 0 and ctx is None and not op.startswith(("UISETP", "UPLOP")):
            width = 2 if (".64" in op or "WIDE" in op) else 1
            written.update(range(n, n + width))
