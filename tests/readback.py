"""Reading back what the package compiled or exported, in ways only the tests need: the precision of every dot
of a compiled step, and an exported PyTorch SGT loaded through its own copy of ``sgt_torch.py``."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

_DEFINED = re.compile(r"%([\w.\-]+) = ([a-z]\w*)\[")  # an instruction of array type: name, dtype
_DOT = re.compile(r"=\s*\S+\s(dot|convolution)\(([^)]*)\)")


def dot_precisions(hlo_text: str) -> list[dict]:
    """Every dot / convolution of an optimized HLO module (also inside fusions): its operand precision config
    and its operands' dtypes."""
    dtypes = dict(_DEFINED.findall(hlo_text))
    out = []
    for line in hlo_text.splitlines():
        m = _DOT.search(line)
        if m:
            operands = [a.strip().lstrip("%") for a in m.group(2).split(",")]
            precision = re.search(r"operand_precision=\{([^}]*)\}", line)
            out.append({"op": m.group(1), "precision": precision.group(1) if precision else "default",
                        "operand_dtypes": [dtypes[name] for name in operands if name in dtypes]})
    return out


def load_torch_sgt(out_dir, *, device="cpu"):
    """An exported directory loaded with its own ``sgt_torch.py``, as a user without sgt_jax loads it."""
    path = Path(out_dir) / "sgt_torch.py"
    spec = importlib.util.spec_from_file_location(f"sgt_torch_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module.load_torch_sgt(out_dir, device=device)
