"""Where a recipe's train-step memory goes, per device, from deviceless compiles of the real step (the builder's)
that change one thing at a time — XLA's memory analysis of each, differenced:

- base activations: the temporaries of the recipe against the same step with one kept base layer (the rest of
  the activation cost per row is the cloak's);
- per row: temporaries at 1, 2 and 4 rows per device (a line; its slope is a row's activations);
- fixed (no rows): the line at zero rows — the gathered cloak, its transient full gradient, the accumulator;
- the accumulator: temporaries at grad_accum_steps 4 against 1;
- arguments: the sharded base, the cloak's parameter and optimizer-state shards (exact, from the input shapes).

    python benchmarks/memory_breakdown.py llama2_7b h100:8 [key=value ...] > breakdown.json

GPU targets compile in seconds; a TPU target takes 5-12 minutes per compile (eight compiles).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from benchmarks.recipe_models import write
from sgt_jax import platforms
from sgt_jax.config import load_config
from sgt_jax.training import compile as compile_lib

GiB = 1 << 30


def _temporaries(cfg, devices, **changes) -> int:
    sections = {}
    for key, value in changes.items():
        section, field = key.split("__")
        sections.setdefault(section, {})[field] = value
    for section, fields in sections.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})
    return compile_lib.memory(compile_lib.compile_steps(cfg, devices, with_eval=False)["train"])["temporaries"]


def breakdown(recipe: str, topology: str, overrides=()) -> dict:
    platforms.use_cpu_backend()  # a deviceless compile for the topology: no local accelerator needed
    models = Path(tempfile.mkdtemp(prefix="sgt_models_"))
    write(models)
    cfg = load_config(Path("configs") / f"{recipe}.yaml", [f"model.path={models / recipe}", *overrides],
                      platform=compile_lib.topology_platform(topology))
    devices = compile_lib.topology_devices(topology)
    result = compile_lib.compile_steps(cfg, devices, with_eval=False)
    shards = compile_lib.parallel.batch_shards(result["mesh"])
    rows = {r: _temporaries(cfg, devices, data__batch_size=r * shards) for r in (1, 2, 4)}
    per_row = (rows[4] - rows[1]) / 3
    one_layer = _temporaries(cfg, devices, data__batch_size=2 * shards, model__truncate_at_layer=0)
    accum_one = _temporaries(cfg, devices, data__batch_size=shards, optimizer__grad_accum_steps=1)
    kept = result["truncate_at_layer"] + 1
    cloak = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(result["state"].params))
    base_per_row = (rows[2] - one_layer) / 2 * kept / max(kept - 1, 1)
    return {
        "recipe": recipe, "topology": topology, "mesh": dict(result["mesh"].shape), "seq_len": result["seq_len"],
        "kept_base_layers": kept, "cloak_fp32_bytes": cloak, "fsdp_shard_of_cloak_bytes": cloak / cfg.mesh.fsdp,
        "temporaries_by_rows_per_device": rows, "per_row_bytes": per_row,
        "base_activation_bytes_per_row": base_per_row, "cloak_activation_bytes_per_row": per_row - base_per_row,
        "fixed_bytes": rows[1] - per_row, "accumulation_bytes": rows[1] - accum_one,
        "base_argument_bytes": compile_lib.tree_bytes(result["base_state"]),
        "cloak_parameter_shard_bytes": compile_lib.tree_bytes(result["state"].params),
        "optimizer_state_shard_bytes": compile_lib.tree_bytes(result["state"].opt_state),
    }


if __name__ == "__main__":
    out = breakdown(sys.argv[1], sys.argv[2], sys.argv[3:])
    print(json.dumps(out, indent=1))
    print("\n".join(f"{k:<36}{v / GiB:8.2f} GiB" for k, v in out.items() if isinstance(v, float | int)
                    and "bytes" in k), file=sys.stderr)
