"""Experiment tracking: tensorboardX (and optional wandb) scalars, histograms and text tables; progress bar.

Only process 0 writes; on every other process the :class:`Tracker` and :class:`ProgressBar` are no-ops,
so the train loop calls them unconditionally.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["Tracker", "ProgressBar", "summary_table", "markdown_table", "read_events", "read_event_file"]

logger = logging.getLogger(__name__)


def _is_main_process() -> bool:
    try:
        import jax

        return jax.process_index() == 0
    except Exception:  # jax not initialisable here: a single process
        return True


def _flatten(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _cell(value: Any) -> str:
    # Markdown table cells: pipes would split the cell, newlines would end the row.
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of ``rows`` (columns: the union of the rows' keys, in first-seen order)."""
    columns: List[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    if not columns:
        return ""
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


class Tracker:
    """Writes metrics of one run to ``<run_dir>/tensorboard`` (and to wandb when enabled and installed)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "sgt_jax",
        config: Optional[Mapping[str, Any]] = None,
    ):
        self.run_dir = Path(run_dir)
        self.log_dir = self.run_dir / "tensorboard"
        self.active = _is_main_process()
        self._writer = None
        self._wandb = None
        if not self.active:
            return
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported here: only a run that logs to TensorBoard needs it

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(logdir=str(self.log_dir), flush_secs=30)
        if wandb:
            self._wandb = self._start_wandb(wandb_project, config)
        if config is not None:
            self.config(config)

    @classmethod
    def from_config(cls, tracking_cfg: Any, config_dict: Optional[Mapping[str, Any]] = None) -> "Tracker":
        """From a :class:`sgt_jax.config.TrackingConfig` and the whole run config (logged once)."""
        return cls(
            tracking_cfg.run_dir,
            tensorboard=tracking_cfg.tensorboard,
            wandb=tracking_cfg.wandb,
            wandb_project=tracking_cfg.wandb_project,
            config=config_dict,
        )

    def _start_wandb(self, project: str, config: Optional[Mapping[str, Any]]) -> Any:
        try:
            import wandb  # optional extra (sgt_jax[wandb])
        except ImportError:
            warnings.warn("tracking.wandb=true but wandb is not installed (pip install wandb); logging to tensorboard only.",
                          stacklevel=3)
            return None
        try:
            wandb.init(project=project, dir=str(self.run_dir), config=dict(config) if config else None,
                       name=self.run_dir.name, resume="allow")
            return wandb
        except Exception as exc:  # no login, no network, ...: tracking must never stop training
            warnings.warn(f"wandb could not start ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                          "logging to tensorboard only.", stacklevel=3)
            return None

    # -- logging -----------------------------------------------------------------------------------

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.active:
            return
        clean = {}
        for tag, value in values.items():
            try:
                clean[tag] = float(value)
            except (TypeError, ValueError):
                logger.debug("skipping non-scalar metric %s", tag)
        if self._writer is not None:
            for tag, value in clean.items():
                self._writer.add_scalar(tag, value, global_step=int(step))
        if self._wandb is not None:
            self._wandb_call(lambda: self._wandb.log(clean, step=int(step)))

    def histograms(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.active:
            return
        arrays = {}
        for tag, value in values.items():
            array = np.asarray(value, dtype=np.float64).reshape(-1)
            array = array[np.isfinite(array)]  # one inf would make every bin edge nan
            if array.size:
                arrays[tag] = array
        if self._writer is not None:
            for tag, array in arrays.items():
                self._writer.add_histogram(tag, array, global_step=int(step))
        if self._wandb is not None:
            wandb = self._wandb
            self._wandb_call(lambda: wandb.log({t: wandb.Histogram(a) for t, a in arrays.items()}, step=int(step)))

    def text_table(self, step: int, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """A table (e.g. prompt | reconstruction | base generation | SGT generation) at ``step``."""
        if not self.active or not rows:
            return
        if self._writer is not None:
            self._writer.add_text(name, markdown_table(rows), global_step=int(step))
        if self._wandb is not None:
            wandb = self._wandb
            columns: List[str] = []
            for row in rows:
                columns.extend(k for k in row if k not in columns)
            data = [[str(row.get(c, "")) for c in columns] for row in rows]
            self._wandb_call(lambda: wandb.log({name: wandb.Table(columns=columns, data=data)}, step=int(step)))

    def config(self, config: Mapping[str, Any]) -> None:
        """Log the run configuration once, as a ``setting | value`` text table."""
        if not self.active:
            return
        rows = [{"setting": k, "value": v if isinstance(v, str) else json.dumps(v, default=str)}
                for k, v in sorted(_flatten(config).items())]
        if self._writer is not None:
            self._writer.add_text("config", markdown_table(rows), global_step=0)

    def _wandb_call(self, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:
            warnings.warn(f"wandb logging failed ({type(exc).__name__}: {exc}); disabling wandb for this run.")
            self._wandb = None

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb_call(lambda: self._wandb.finish())
            self._wandb = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ProgressBar:
    """A tqdm bar over optimizer steps with ETA, tokens/s and loss; silent off process 0 or when disabled."""

    def __init__(self, total: Optional[int], *, initial: int = 0, enabled: bool = True, desc: str = "train", **tqdm_kwargs: Any):
        self.enabled = bool(enabled) and _is_main_process()
        self._bar = None
        if self.enabled:
            from tqdm.auto import tqdm  # imported here: only an enabled progress bar needs it

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, **tqdm_kwargs)

    @classmethod
    def from_config(cls, tracking_cfg: Any, total: Optional[int], *, initial: int = 0, **kwargs: Any) -> "ProgressBar":
        return cls(total, initial=initial, enabled=tracking_cfg.progress_bar, **kwargs)

    def update(self, step: int, tokens_per_s: Optional[float] = None, loss: Optional[float] = None) -> None:
        """Move to ``step`` (absolute) and show the latest throughput and loss."""
        if self._bar is None:
            return
        postfix = {}
        if tokens_per_s is not None:
            postfix["tok/s"] = f"{float(tokens_per_s):,.0f}"
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4g}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(max(0, int(step) - self._bar.n))

    @property
    def n(self) -> int:
        return 0 if self._bar is None else int(self._bar.n)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (plain print when disabled on process 0)."""
        if self._bar is not None:
            self._bar.write(message)
        elif _is_main_process():
            print(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4e}"
        return f"{value:.4f}"
    return str(value)


def summary_table(rows: Mapping[str, Any], title: str = "Run summary", max_value_width: int = 60) -> str:
    """A one-screen, boxed ``name  value`` summary of the run, e.g. for the end of training. Numbers are
    right-aligned; a sentence longer than ``max_value_width`` wraps onto continuation lines."""
    import textwrap

    items = [(str(k), _format_value(v)) for k, v in rows.items()]
    key_width = max([len(k) for k, _ in items] + [1])
    unbreakable = max([len(v) for _, v in items if " " not in v] + [1])  # numbers, paths: never wrapped
    value_width = max(min(max([len(v) for _, v in items] + [1]), max_value_width), unbreakable)
    inner = max(key_width + 3 + value_width, len(title))
    value_width = inner - key_width - 3
    rule = "+" + "-" * (inner + 2) + "+"
    lines = [rule, f"| {title.center(inner)} |", rule]
    for key, value in items:
        if len(value) <= value_width:
            lines.append(f"| {key.ljust(key_width)}   {value.rjust(value_width)} |")
            continue
        for i, part in enumerate(textwrap.wrap(value, value_width, break_long_words=False)):
            lines.append(f"| {(key if i == 0 else '').ljust(key_width)}   {part.ljust(value_width)} |")
    lines.append(rule)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Reading event files back (the privacy frontier, tests): TFRecord framing + tensorboardX's Event proto.
# ----------------------------------------------------------------------------------------------------


def read_event_file(path: str | os.PathLike) -> Iterator[Any]:
    """Yield the ``Event`` protos of one tensorboard event file (stops at a truncated tail record)."""
    from tensorboardX.proto import event_pb2  # imported here, as for the writer

    with open(path, "rb") as f:
        while True:
            header = f.read(12)  # uint64 length + uint32 masked crc of the length
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            if len(payload) < length or len(f.read(4)) < 4:  # + uint32 masked crc of the payload
                return
            event = event_pb2.Event()
            event.ParseFromString(payload)
            yield event


def read_events(log_dir: str | os.PathLike) -> Dict[str, List[tuple]]:
    """``{tag: [(step, value), ...]}`` of every event file under ``log_dir``.

    Values: float for scalars, the ``HistogramProto`` for histograms, the decoded string for text.
    """
    out: Dict[str, List[tuple]] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        for event in read_event_file(path):
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    item: Any = value.simple_value
                elif kind == "histo":
                    item = value.histo
                elif kind == "tensor" and value.tensor.string_val:
                    item = value.tensor.string_val[0].decode("utf-8")
                elif kind == "tensor" and value.tensor.float_val:
                    item = value.tensor.float_val[0]
                else:
                    continue
                out.setdefault(value.tag, []).append((event.step, item))
    return out
