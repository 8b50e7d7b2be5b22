"""Reading optimized HLO text: the collectives a compiled step runs, their sizes, and whether each sits in a
loop body (a ``while`` body, or anything it calls), where it runs once per iteration instead of once per step.

Also the precision of every ``dot``/``convolution`` with the source op it came from, so a test can check
that the float32 cloak's matmuls run at HIGHEST precision on a TPU and the base's at the default.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                  "ragged-all-to-all")
_OPCODE = re.compile(r"=\s*(?P<type>.*?)\s(?P<op>[a-z][\w\-]*)\((?P<args>[^)]*)\)")
_CALLED = re.compile(r"(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


def type_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO type (a tuple's elements summed); layouts and tiling ignored."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        total += _DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
    return total


def parse_computations(text: str) -> tuple[dict[str, list[str]], str | None, dict[str, str]]:
    """({computation: [instruction lines]}, entry name, {value name: its HLO type}) of an HLO module."""
    comps: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    entry = current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
            for name, type_text in re.findall(r"([\w.\-]+):\s*((?:\([^)]*\))|[^,()]+(?:\{[^}]*\})?)", header.group(3)):
                types[name] = type_text
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            stripped = line.strip()
            comps[current].append(stripped)
            m = re.match(r"(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s[a-z][\w\-]*\(", stripped)
            if m:
                types[m.group(1)] = m.group(2)
    return comps, entry, types


def _called(lines: list[str]) -> list[str]:
    names: list[str] = []
    for line in lines:
        names += _CALLED.findall(line)
        for group in _BRANCHES.findall(line):
            names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
    return names


def _closure(comps: dict[str, list[str]], roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo += _called(comps[name])
    return seen


def loop_computations(comps: dict[str, list[str]]) -> set[str]:
    """Every computation that runs inside a while loop (bodies, conditions and what they call)."""
    roots = [m for lines in comps.values() for line in lines if " while(" in line
             for m in re.findall(r"(?:body|condition)=%?([\w.\-]+)", line)]
    return _closure(comps, roots)


def collectives(text: str) -> list[dict[str, Any]]:
    """One entry per collective of the compiled module: op, operand and result bytes (per device), the mesh
    axes / replica groups it spans, and whether it runs inside a loop body. Async pairs and the copies of one
    collective that XLA's async-collective fusion leaves in several computations count once (by channel)."""
    comps, _, types = parse_computations(text)
    in_loop = loop_computations(comps)
    out, seen = [], set()
    for comp, lines in comps.items():
        for line in lines:
            m = _OPCODE.search(line)
            if not m or m.group("op").removesuffix("-start") not in COLLECTIVE_OPS:
                continue
            channel = re.search(r"channel_id=(\d+)", line)
            # Channel ids are not unique across ops after XLA's passes: the op and its type complete the key.
            key = (m.group("op").removesuffix("-start"), channel.group(1), m.group("type")) if channel \
                else ("name", line.split("=")[0].strip())
            operands = [a.strip().lstrip("%") for a in m.group("args").split(",") if a.strip()]
            operand_bytes = sum(type_bytes(types.get(name.split()[-1].lstrip("%"), name)) for name in operands)
            result_bytes = type_bytes(m.group("type"))
            if m.group("op").endswith("-start") and m.group("type").startswith("("):
                result_bytes -= operand_bytes  # (operands, results) tuple of an async start
            groups = re.search(r"replica_groups=(\S+?\}(?:\s*\{[^}]*\})?|\S+)", line)
            entry = {"op": m.group("op").removesuffix("-start"), "operand_bytes": int(operand_bytes),
                     "result_bytes": int(result_bytes), "in_loop": comp in in_loop,
                     "groups": groups.group(1)[:80] if groups else "", "source": _op_name(line)}
            if key in seen:
                continue
            seen.add(key)
            out.append(entry)
    return out


def _op_name(line: str) -> str:
    m = re.search(r'op_name="([^"]*)"', line)
    return m.group(1) if m else ""


def dot_precisions(text: str) -> list[dict[str, Any]]:
    """Every dot / convolution (also inside fusions): its operand precision config, operand dtypes and source."""
    _, _, types = parse_computations(text)
    out = []
    for line in text.splitlines():
        m = _OPCODE.search(line)
        if not m or m.group("op") not in ("dot", "convolution"):
            continue
        precision = re.search(r"operand_precision=\{([^}]*)\}", line)
        operands = [a.strip().split()[-1].lstrip("%") for a in m.group("args").split(",") if a.strip()]
        dtypes = [d for name in operands for d, _ in _ARRAY.findall(types.get(name, ""))[:1]]
        out.append({"op": m.group("op"), "precision": precision.group(1) if precision else "default",
                    "operand_dtypes": dtypes, "source": _op_name(line)})
    return out


__all__ = ["COLLECTIVE_OPS", "collectives", "dot_precisions", "loop_computations", "parse_computations",
           "type_bytes"]
