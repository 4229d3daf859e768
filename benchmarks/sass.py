"""The machine code of the Triton kernels' main loops, read without a GPU.

    python -m benchmarks.sass                 # sm_90: the float32 push and the 8-bit history's kernels
    python -m benchmarks.sass --arch 80 --kernels push:bfloat16:float32 swap_back:float32 --out /tmp/s.json

Each kernel variant (a key of ``lawa_optim.backends.triton.compile_ptx``) is compiled by
Triton for ``sm_<arch>`` as a launch compiles it, PTX then the cubin its own ``ptxas``
assembles; the cubin is disassembled with the ``nvdisasm`` Triton ships (``-c``). In the
listing a loop is a backward branch and the instructions between its target and it;
the main loop is the one holding the most 128-bit global accesses (the outermost on a
tie), the loops inside it are inner loops (a refresh's pass over the slots, the float64
fallback, the 8-bit swap-in's pass over the deltas). Per loop the table gives:

- ``path``: the instructions of one iteration along the fewest-instruction path from the
  loop's head to its backward branch among those that pass the most global stores
  (inner loops not counted: they have their own row), i.e. an iteration that writes
  everything a snapshot writes (not a first push's shorter path) and takes no rare
  branch (no refresh, no non-finite fallback, no slow division or 64-bit remainder);
  ``per element``: ``path`` divided by the elements one thread moves per iteration;
- ``all``: every instruction in the loop's body, all branches included (inner loops not);
- the global loads and stores along ``path``: 128-bit, and narrower;
- ``code``: the instructions of the whole kernel.

Instructions are counted per thread (each is issued once per warp). Writes the JSON record
(default ``benchmarks/results/sass-sm<arch>.json``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import RESULTS
from lawa_optim import _cli

#: What the default run reads: the float32 push and the 8-bit history's kernels, each in
#: both variants (every parameter aligned, and a branch per table row).
KERNELS = tuple(f"{name}{suffix}" for name in ("push:float32:float32", "push_int8:float32", "swap_in:int8:float32")
                for suffix in ("", ":per_row"))


def _parser() -> _cli.Parser:
    parser = _cli.Parser(prog="python -m benchmarks.sass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=(80, 90), default=90, help="compute capability (default 90)")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), metavar="NAME",
                        help=f"kernel variants, keys of compile_ptx (default {' '.join(KERNELS)})")
    parser.add_argument("--out", type=_cli.output_file, default=None,
                        help="JSON file to write (default benchmarks/results/sass-sm<arch>.json)")
    return parser


if __name__ == "__main__":  # answer a bad argument or --help before compiling, which takes seconds
    _parser().parse_args()


# -- reading an nvdisasm listing (no toolchain needed) -------------------------------

_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_PRED = re.compile(r"^@!?U?P[T\d]+\s+")
_TARGET = re.compile(r"`\(([^)]+)\)")


@dataclass
class Instr:
    """One instruction of the listing."""

    addr: int
    text: str  # without the address and the closing semicolon
    opcode: str = field(init=False)  # e.g. "LDG.E.128", "BRA"
    guarded: bool = field(init=False)  # under a predicate (@P0, @!P1)
    target: str | None = field(init=False)  # a branch's or a call's label

    def __post_init__(self) -> None:
        body = _PRED.sub("", self.text)
        self.guarded = body != self.text
        self.opcode = body.split(None, 1)[0] if body else ""
        match = _TARGET.search(body)
        self.target = match.group(1) if match else None

    @property
    def is_branch(self) -> bool:
        return self.opcode.split(".")[0] in ("BRA", "JMP")

    @property
    def ends_flow(self) -> bool:
        """No fall-through: an unconditional branch, exit or return."""
        base = self.opcode.split(".")[0]
        conditional = self.guarded or (base == "BRA" and re.search(r"\bBRA(?:\.\w+)*\s+!?U?P[T\d]+\s*,", self.text))
        return base in ("BRA", "JMP", "EXIT", "RET") and not conditional

    def access(self) -> tuple[str, int] | None:
        """("load" | "store", bits) of a global memory access."""
        base = self.opcode.split(".")
        if base[0] not in ("LDG", "STG"):
            return None
        bits = next((int(m) for m in base[1:] if m in ("128", "64")), None)
        if bits is None:
            bits = 16 if {"U16", "S16"} & set(base) else 8 if {"U8", "S8"} & set(base) else 32
        return ("load" if base[0] == "LDG" else "store", bits)


def parse_listing(text: str) -> tuple[list[Instr], dict[str, int]]:
    """The instructions of an ``nvdisasm -c`` listing, in address order, and each label's
    address (the address of the instruction that follows it)."""
    instrs: list[Instr] = []
    pending: list[str] = []
    labels: dict[str, int] = {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            instrs.append(Instr(int(m.group(1), 16), m.group(2)))
            labels.update((name, instrs[-1].addr) for name in pending)
            pending = []
        elif (m := _LABEL.match(line)) and not line.lstrip().startswith("//"):
            pending.append(m.group(1))
    return instrs, labels


@dataclass
class Loop:
    """The instructions from ``head`` to the backward branch at ``tail`` (addresses)."""

    head: int
    tail: int

    def holds(self, addr: int) -> bool:
        return self.head <= addr <= self.tail

    def inside(self, other: Loop) -> bool:
        return other.holds(self.head) and other.holds(self.tail) and (self.head, self.tail) != (other.head, other.tail)


def loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Every backward branch's loop, outermost first."""
    found = {(labels[i.target], i.addr) for i in instrs if i.is_branch and i.target in labels and labels[i.target] <= i.addr}
    return [Loop(h, t) for h, t in sorted(found, key=lambda ht: (ht[0] - ht[1], ht[0]))]


def _vector_accesses(instrs: list[Instr], loop: Loop) -> int:
    return sum(1 for i in instrs if loop.holds(i.addr) and (i.access() or ("", 0))[1] == 128)


def main_loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """The outermost loops that hold a 128-bit global access, in address order: the one
    loop over whole steps, or, where the kernel branches per row, the aligned rows' and
    the misaligned rows'. (A masked tail's loops hold none.)"""
    found = loops(instrs, labels)
    outer = [lp for lp in found if not any(lp.inside(o) for o in found) and _vector_accesses(instrs, lp)]
    if not outer:
        raise ValueError("the listing has no loop with a 128-bit global access")
    return sorted(outer, key=lambda lp: lp.head)


def _tally(instrs: list[Instr]) -> dict[str, int]:
    out = {"instructions": len(instrs), "loads_128": 0, "loads_narrow": 0, "stores_128": 0, "stores_narrow": 0}
    for i in instrs:
        if (acc := i.access()) is not None:
            out[f"{acc[0]}s_{'128' if acc[1] == 128 else 'narrow'}"] += 1
    return out


def summarize(instrs: list[Instr], labels: dict[str, int], loop: Loop, elements: int) -> dict:
    """``all``, ``path`` and ``per_element`` (see the module docstring) of ``loop``, inner
    loops excluded, and the same of each inner loop; ``elements``: what one thread moves
    per iteration."""
    inner = [lp for lp in loops(instrs, labels) if lp.inside(loop)]
    body = [i for i in instrs if loop.holds(i.addr)]
    mine = {id(i) for i in body if not any(lp.holds(i.addr) for lp in inner)}
    # Basic blocks of the body: a block starts at the head, at a label and after a branch.
    starts = {loop.head} | {a for a in labels.values() if loop.holds(a)}
    starts |= {body[n + 1].addr for n, i in enumerate(body[:-1]) if i.is_branch or i.ends_flow}
    blocks: list[list[Instr]] = []
    for i in body:
        if i.addr in starts or not blocks:
            blocks.append([])
        blocks[-1].append(i)
    index = {b[0].addr: n for n, b in enumerate(blocks)}

    def weight(block: list[Instr]) -> tuple[int, int]:
        """(minus the global stores it passes, the instructions it adds): minimised in that order."""
        counted = [i for i in block if id(i) in mine]
        return -sum(1 for i in counted if (i.access() or ("",))[0] == "store"), len(counted)

    # Forward edges only (the back edges of this loop and the inner ones dropped, and the
    # edges that leave the body): a DAG in address order, walked once.
    best: list[tuple[tuple[int, int], int] | None] = [None] * len(blocks)
    best[0] = (weight(blocks[0]), -1)
    for n, block in enumerate(blocks):
        if best[n] is None:
            continue
        last = block[-1]
        succ = []
        if last.is_branch and last.target in labels and labels[last.target] in index:
            succ.append(index[labels[last.target]])
        if not last.ends_flow and n + 1 < len(blocks):
            succ.append(n + 1)
        for s in (s for s in succ if s > n):
            w, c = weight(blocks[s])
            cand = ((best[n][0][0] + w, best[n][0][1] + c), n)
            if best[s] is None or cand[0] < best[s][0]:
                best[s] = cand
    end = index[max(a for a in index if a <= loop.tail)]
    if best[end] is None:
        raise ValueError(f"no path from the loop's head at {loop.head:#x} to its back edge at {loop.tail:#x}")
    path: list[Instr] = []
    n = end
    while n != -1:
        path[:0] = [i for i in blocks[n] if id(i) in mine]
        n = best[n][1]
    direct = [lp for lp in inner if not any(lp.inside(o) for o in inner)]
    return {"head": f"{loop.head:#06x}", "back_edge": f"{loop.tail:#06x}", "all": len(mine),
            "path": _tally(path), "per_element": len(path) / elements,
            "inner": [summarize(instrs, labels, lp, elements) for lp in direct]}


def read_listing(text: str, elements: int) -> dict:
    """The main loops of an ``nvdisasm -c`` listing (:func:`main_loops`), each with its
    inner loops; ``elements``: what one thread moves per iteration."""
    instrs, labels = parse_listing(text)
    return {"instructions": len(instrs), "elements_per_thread": elements,
            "loops": [summarize(instrs, labels, lp, elements) for lp in main_loops(instrs, labels)]}


# -- compiling and disassembling (Triton's toolchain) --------------------------------


def _elements_per_thread(name: str, ptx: str) -> int:
    """Elements one thread moves per iteration of the main loop: a step of ``BLOCK``, or a
    tile of ``TILE`` quantisation blocks for the 8-bit history, over the program's threads."""
    from lawa_optim.backends import triton as tb
    from lawa_optim.ops import QBLOCK

    threads = int(re.search(r"\.reqntid\s+(\d+)", ptx).group(1))
    step = tb.TILE * QBLOCK if "int8" in name else tb.BLOCK
    return step // threads


def read_asm(arch: int, asm: dict[str, dict]) -> dict:
    """Disassemble each variant's cubin in ``asm`` (from :func:`lawa_optim.backends.triton.compile_asm`
    for ``sm_<arch>``) and read its loops."""
    import triton
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = knobs.nvidia.nvdisasm.path
    kernels = {}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        for name, stages in asm.items():
            cubin.write_bytes(stages["cubin"])
            listing = subprocess.run([nvdisasm, "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
            kernels[name] = read_listing(listing, _elements_per_thread(name, stages["ptx"]))
    return {"arch": f"sm_{arch}", "triton": triton.__version__, "ptxas": _version(get_ptxas(arch).path),
            "nvdisasm": _version(nvdisasm), "kernels": kernels}


def _version(tool: str) -> str | None:
    """``release 13.4, V13.4.59`` from a CUDA tool's ``--version``."""
    out = subprocess.run([tool, "--version"], check=False, capture_output=True, text=True).stdout
    return next((line.split("tools, ", 1)[-1] for line in out.splitlines() if "release" in line), None)


def table(record: dict) -> str:
    """The record as a text table, one row per loop (inner loops numbered within theirs)."""
    rows = [("kernel", "code", "loop", "elements", "path", "per element", "all", "LDG.128", "LDG narrow",
             "STG.128", "STG narrow")]

    def add(name: str, code: str, what: str, loop: dict, elements: str) -> None:
        p = loop["path"]
        rows.append((name, code, what, elements, str(p["instructions"]), f"{loop['per_element']:.1f}",
                     str(loop["all"]), str(p["loads_128"]), str(p["loads_narrow"]), str(p["stores_128"]),
                     str(p["stores_narrow"])))
        for n, sub in enumerate(loop["inner"]):
            add("", "", f"{what}.{n + 1}", sub, "")

    for name, k in record["kernels"].items():
        for n, loop in enumerate(k["loops"]):
            add(*((name, str(k["instructions"])) if n == 0 else ("", "")), str(n + 1), loop, str(k["elements_per_thread"]))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from lawa_optim.backends import triton as tb

    try:
        asm = tb.compile_asm(args.arch, args.kernels)
    except ValueError as exc:  # a name that is no kernel variant
        parser.error(f"argument --kernels: {exc}")
    except RuntimeError as exc:  # no Triton, or its interpreter
        parser.error(str(exc))
    out = args.out or RESULTS / f"sass-sm{args.arch}.json"
    record = read_asm(args.arch, asm)
    record["command"] = " ".join(["python -m benchmarks.sass", *(sys.argv[1:] if argv is None else argv)])
    print(table(record))
    Path(out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    sys.exit(main())
