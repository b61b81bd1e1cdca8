"""Uniform registers read where no path from the kernel entry has written them (nvdisasm SASS).

A generalisation of ../issue27/sass_undef_ur.py from the entry block to the whole CFG: a forward "may be
defined" data-flow (union over predecessors; a predicated write counts as a write). A read of URn at a point
where no path from the entry wrote URn reads an unwritten register on every execution that reaches it: that
is what ptxas 12.8 emitted for issue 27 (UIADD3 UR30, UP0, UR40, 0x40 before any write of UR40).
Also reported, as "maybe": reads where SOME path from the entry reaches them without a write (must-defined
analysis, intersection over predecessors); these can be infeasible paths, so they are a hint only.
Operand widths: an address [URn+imm] 1 (2 if URn.64); gdesc[URn] 4 registers when A comes from shared memory (gdesc is the 2nd operand), 2 when A is
in registers; desc[URn] 2; a .64 uniform op reads/writes pairs; UIMAD.WIDE writes a pair; everything else 1.
usage: python sass_scan.py file.sass [--maybe]   (exit 1 when anything is flagged)"""
import re, sys

# uniform ops that have no uniform-register destination (memory / control operands only)
NO_UR_DST = ("UTMA", "UBLK", "USETMAXREG", "UCGABAR", "UISETP", "UPLOP", "UPSETP", "UBRA", "UCLEA", "UTC",
             "ULDGSTS", "USTG", "UVOTE")


def parse(text):
    insts, labels = [], {}
    for line in text.split("\n"):
        lm = re.match(r"^(\.L_x_\d+):", line)
        if lm:
            labels[lm.group(1)] = len(insts)
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if not m:
            continue
        off, ins = m.groups()
        pm = re.match(r"^(@!?U?P[T0-9]+)\s+", ins)
        pred = pm.group(1) if pm else None
        if pm:
            ins = ins[pm.end():]
        op = ins.split()[0]
        rest = ins[len(op):]
        ops = [o.strip() for o in re.split(r",(?![^\[]*\])", rest)] if rest.strip() else []
        insts.append(dict(off=off, pred=pred, op=op, ops=ops, text=(pred + " " if pred else "") + ins))
    return insts, labels


def ur_uses(ins):
    """(reads, writes): sets of uniform register numbers."""
    op, ops = ins["op"], ins["ops"]
    base = op.split(".")[0]
    uniform_dst = ((op.startswith("U") or base in ("S2UR", "R2UR", "LDCU", "VOTEU", "REDUX"))
                   and not op.startswith(NO_UR_DST))
    wide = ".64" in op
    reads, writes = set(), set()
    for k, o in enumerate(ops):
        for mm in re.finditer(r"(gdesc\[|desc\[|\[)?(-|!|~)?\bUR(\d+)(\.64)?", o):
            ctx, n, w64 = mm.group(1), int(mm.group(3)), mm.group(4)
            if k == 0 and ctx is None and uniform_dst and re.fullmatch(r"UR\d+(\.\w+)*", o):
                w = 2 if (wide or "WIDE" in op) else 1
                writes.update(range(n, n + w))
                continue
            if ctx == "gdesc[":
                w = 4 if k == 1 else 2
            elif ctx == "desc[":
                w = 2
            elif ctx == "[" or "[" in o[:mm.start()]:  # an address: 32-bit unless written URn.64
                w = 2 if w64 else 1
            else:
                w = 2 if (wide or w64) else 1
            reads.update(range(n, n + w))
    return reads, writes


def cfg(insts, labels):
    starts = {0}
    for i, ins in enumerate(insts):
        if ins["op"].startswith(("BRA", "EXIT", "BRX", "RET", "JMP", "CALL", "BREAK", "BSYNC", "WARPSYNC")):
            starts.add(i + 1)
    starts.update(labels.values())
    starts = sorted(s for s in starts if s < len(insts))
    blocks = []
    for a, b in zip(starts, starts[1:] + [len(insts)]):
        blocks.append((a, b))
    at = {a: bi for bi, (a, b) in enumerate(blocks)}
    succ = [set() for _ in blocks]
    unknown = False
    for bi, (a, b) in enumerate(blocks):
        last = insts[b - 1]
        op = last["op"]
        tgt = re.search(r"`\((\.L_x_\d+)\)", " ".join(last["ops"]))
        falls = True
        if op.startswith(("BRA", "JMP")):
            if tgt and tgt.group(1) in labels:
                succ[bi].add(at[labels[tgt.group(1)]])
            else:
                unknown = True
            falls = last["pred"] is not None
        elif op.startswith(("EXIT", "RET")):
            falls = last["pred"] is not None
        elif op.startswith("BRX"):
            unknown = True
            succ[bi].update(range(len(blocks)))
            falls = False
        if falls and b < len(insts):
            succ[bi].add(at[b])
    return blocks, succ, unknown


def scan(text, maybe=False):
    insts, labels = parse(text)
    if not insts:
        return [], dict(n=0)
    blocks, succ, unknown = cfg(insts, labels)
    uses = [ur_uses(i) for i in insts]
    nb = len(blocks)
    pred = [set() for _ in range(nb)]
    for b, ss in enumerate(succ):
        for s in ss:
            pred[s].add(b)
    ALL = set(range(256))
    gen = []
    for a, b in blocks:
        g = set()
        for i in range(a, b):
            g |= uses[i][1]
        gen.append(g)
    # may-defined (union) and must-defined (intersection; predicated writes count, as in may)
    may_in = [set() for _ in range(nb)]
    must_in = [set(ALL) for _ in range(nb)]
    must_in[0] = set()
    changed = True
    while changed:
        changed = False
        for b in range(nb):
            if b:
                mi = set().union(*[may_in[p] | gen[p] for p in pred[b]]) if pred[b] else set()
                ui = set.intersection(*[must_in[p] | gen[p] for p in pred[b]]) if pred[b] else set()
            else:
                mi, ui = set(), set()
            if mi != may_in[b] or ui != must_in[b]:
                may_in[b], must_in[b], changed = mi, ui, True
    flags = []
    for b, (a, e) in enumerate(blocks):
        may, must = set(may_in[b]), set(must_in[b])
        for i in range(a, e):
            r, w = uses[i]
            never = sorted(x for x in r if x not in may)
            if never:
                flags.append(dict(kind="never", off=insts[i]["off"], regs=never, ins=insts[i]["text"]))
            elif maybe:
                some = sorted(x for x in r if x not in must)
                if some:
                    flags.append(dict(kind="maybe", off=insts[i]["off"], regs=some, ins=insts[i]["text"]))
            may |= w
            must |= w
    stats = dict(n=len(insts), blocks=nb, unknown_branch=unknown,
                 hgmma=sum(i["op"].startswith("HGMMA") for i in insts),
                hmma=sum(i["op"].startswith("HMMA") for i in insts),
                 tnspB=sum(i["op"].startswith("HGMMA") and ".tnspB" in " ".join(i["ops"]) for i in insts),
                 tnspA=sum(i["op"].startswith("HGMMA") and ".tnspA" in " ".join(i["ops"]) for i in insts))
    return flags, stats


if __name__ == "__main__":
    flags, stats = scan(open(sys.argv[1]).read(), "--maybe" in sys.argv)
    print(stats)
    for f in flags:
        print(f"{f['kind']:5s} {f['off']}: UR{f['regs']} {f['ins']}")
    sys.exit(1 if any(f["kind"] == "never" for f in flags) else 0)
