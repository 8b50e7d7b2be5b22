"""Reading optimized HLO text: the collectives a compiled step runs, their sizes, and whether each sits in a
loop body (a ``while`` body, or anything it calls), where it runs once per iteration instead of once per step.

Also the pieces of one instruction's text that the compiled module's own API does not expose (array shapes with
their memory space, called computations, replica groups), which :mod:`sgt_jax.training.roofline` reads.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional

import numpy as np

COLLECTIVE_OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
                  "ragged-all-to-all")
_OPCODE = re.compile(r"=\s*(?P<type>.*?)\s(?P<op>[a-z][\w\-]*)\((?P<args>[^)]*)\)")
_CALLED = re.compile(r"(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
# dtype[dims]{layout}: the layout may carry a memory space, S(n) (0, the default, is HBM; on a TPU 1 is VMEM).
_ARRAY = re.compile(r"\b(pred|token|[a-z][a-z0-9]*)\[([\d,]*)\](?:\{([^}]*)\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
                "f8e5m2fnuz": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
                "s64": 8, "u64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "token": 0}


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...], int]]:
    """(dtype, dims, memory space) of every array in an HLO type, a tuple's elements in order."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(type_text):
        space = _MEMORY_SPACE.search(layout or "")
        out.append((dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
    return out


def array_bytes(dtype: str, dims) -> int:
    return int(_DTYPE_BYTES.get(dtype, 4) * int(np.prod(dims, dtype=np.int64)))


def type_bytes(type_text: str, *, memory_space: int | None = None) -> int:
    """Bytes of every array in an HLO type (a tuple's elements summed), or of those in one memory space only;
    layouts and tiling ignored."""
    return sum(array_bytes(dtype, dims) for dtype, dims, space in arrays(type_text)
               if memory_space is None or space == memory_space)


def split_instruction(text: str) -> tuple[str, str, str]:
    """(result type, opcode, everything after the opcode) of one instruction's text ``%name = TYPE op(...), ...``;
    the type may be a tuple, so it ends at the first space outside brackets."""
    body = text.split("=", 1)[1].lstrip() if "=" in text.split("(", 1)[0] else text
    depth = 0
    for i, ch in enumerate(body):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == " " and depth == 0:
            opcode, rest = body[i + 1:].split("(", 1)
            return body[:i], opcode, rest
    return body, "", ""


def called_computations(line: str) -> list[str]:
    """The computations one instruction calls: loop body and condition, fusion, applied or branch computations."""
    names = _CALLED.findall(line)
    for group in _BRANCHES.findall(line):
        names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
    return names


def replica_groups(line: str, num_devices: int) -> list[list[int]] | None:
    """The device groups a collective runs over, as ids into the program's device assignment, from any of the
    three spellings: ``{{0,1},{2,3}}`` (``{}``: one group of every device), iota ``[2,4]<=[4,2]T(1,0)`` and
    mesh axes ``mesh['x'=2,'y'=4] {'y'}`` (a sub-axis ``'y':(1)2`` is 2 devices of y, after 1; the mesh may give
    its device order, ``mesh[...], device_ids=([2,4]T(1,0)) {...}``). None without replica groups
    (collective-permute names source-target pairs instead) or in a spelling not known here."""
    m = re.search(r"replica_groups=", line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("{"):
        groups = [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", _balanced(rest)[1:-1])]
        return [g for g in groups if g] or [list(range(num_devices))]
    if re.match(r"\[[\d,]+\]<=", rest):
        shape = _ints(rest[:rest.index("]")])
        return _iota(rest).reshape(shape).tolist()
    mesh = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\((.*?)\))?\s*\{([^}]*)\}", rest)
    return _mesh_axes_groups(mesh.group(1), mesh.group(2), mesh.group(3)) if mesh else None


def _iota(text: str) -> np.ndarray:
    """The flat device ids of an iota tile assignment, ``[4,4]<=[8,2]T(1,0)`` or ``[8,2]T(1,0)``: arange over the
    dimensions after ``<=`` (or the only ones), transposed by T."""
    m = re.match(r"\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?", text)
    dims = _ints(m.group(2) or m.group(1))
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    return (ids.transpose(_ints(m.group(3))) if m.group(3) else ids).reshape(-1)


def _ints(text: str) -> list[int]:
    return [int(i) for i in re.findall(r"\d+", text)]


def _balanced(text: str) -> str:
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return text[:i + 1]
    return text


def _mesh_axes_groups(axes_text: str, device_ids: str | None, grouped_text: str) -> list[list[int]]:
    """Groups of a mesh-axes replica list: the device array reshaped to the mesh, every axis split where a grouped
    sub-axis cuts it (``(pre)size`` takes ``size`` devices after a stride of ``pre``), the grouped dimensions
    moved last, in the order listed, and one group per row."""
    names = re.findall(r"'([^']+)'=\d+", axes_text)
    sizes = [int(s) for s in re.findall(r"'[^']+'=(\d+)", axes_text)]
    ids = np.arange(int(np.prod(sizes))) if not device_ids else _iota(device_ids) if device_ids.startswith("[") \
        else np.array(_ints(device_ids))
    refs = [(name, int(pre) if pre else None, int(size) if size else None)
            for name, pre, size in re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", grouped_text)]
    dims, grouped = [], {}
    for axis, full in zip(names, sizes):
        cuts = sorted((pre, size) for name, pre, size in refs if name == axis and pre is not None)
        if any(name == axis and pre is None for name, pre, _ in refs):
            grouped[(axis, None)] = len(dims)
            dims.append(full)
            continue
        covered = 1  # the product of the minor-to-major pieces so far, from the most major down
        for pre, size in cuts:
            if pre != covered:
                dims.append(pre // covered)
            grouped[(axis, pre)] = len(dims)
            dims.append(size)
            covered = pre * size
        if covered != full:
            dims.append(full // covered)
    order = [grouped[(name, pre)] for name, pre, _ in refs]
    keep = [i for i in range(len(dims)) if i not in order]
    group_size = int(np.prod([dims[i] for i in order]))
    return ids.reshape(dims).transpose(keep + order).reshape(-1, group_size).tolist()


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
    return [name for line in lines for name in called_computations(line)]


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


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction of a compiled module, as :class:`CompiledModule` reads it."""

    name: str
    opcode: str
    type: str  # result type text
    text: str  # everything after the opcode: operands and attributes
    operands: tuple[str, ...]
    users: tuple[str, ...]

    def attribute(self, key: str) -> Optional[str]:
        m = re.search(rf"\b{key}=%?\"?([\w.\-$]+)", self.text)
        return m.group(1) if m else None

    def backend_config(self) -> dict:
        m = re.search(r"backend_config=(\{.*\})", self.text, re.S)
        if not m:
            return {}
        try:
            return json.JSONDecoder().raw_decode(m.group(1))[0]
        except ValueError:
            return {}


class CompiledModule:
    """The instructions of a compiled module (``compiled.runtime_executable().hlo_modules()[0]``), by computation,
    read once through the module's API: names, operands and users from it; type and attributes from each
    instruction's text."""

    def __init__(self, module):
        self.computations: dict[str, list[Instruction]] = {}
        self.instructions: dict[str, Instruction] = {}
        self.computation_of: dict[str, str] = {}  # instruction -> its computation
        for computation in module.computations():
            instructions = []
            for instruction in computation.instructions():
                kind, opcode, rest = split_instruction(instruction.to_string())
                record = Instruction(instruction.name, opcode, kind, rest,
                                     tuple(o.name for o in instruction.operands()),
                                     tuple(u.name for u in instruction.users()))
                instructions.append(record)
                self.instructions[record.name] = record
                self.computation_of[record.name] = computation.name
            self.computations[computation.name] = instructions
        self.fused = {i.attribute("calls") for i in self.instructions.values() if i.opcode == "fusion"}
        self.entry = re.search(r"^ENTRY %?([\w.\-]+)", module.to_string(), re.M).group(1)

    def root(self, computation: str) -> Instruction:
        instructions = self.computations[computation]
        return next((i for i in reversed(instructions) if not i.users), instructions[-1])

    def operand_types(self, instruction: Instruction) -> list[str]:
        return [self.instructions[name].type for name in instruction.operands]

    def parameters(self, computation: str) -> dict[int, Instruction]:
        """A computation's parameters by number (a fusion's operand i is its computation's parameter i)."""
        return {int(re.match(r"(\d+)\)", i.text).group(1)): i for i in self.computations[computation]
                if i.opcode == "parameter"}


__all__ = ["COLLECTIVE_OPS", "CompiledModule", "Instruction", "array_bytes", "arrays", "called_computations",
           "collectives", "loop_computations", "parse_computations", "replica_groups",
           "split_instruction", "type_bytes"]
