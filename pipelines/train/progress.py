"""Live progress for a TorchTrainer run: rank 0 pushes step metrics to a tiny Ray actor, the driver
polls it into a tqdm bar, one line per epoch's validation, and TensorBoard event files (the driver's
terminal and run directory, even when workers run on other nodes; Ray Train V2 itself has no
TensorBoard logger). Workers also push their Python warnings and restarts: the terminal shows those,
while the rest of their output stays in Ray's log files."""

from __future__ import annotations

import threading
from pathlib import Path

import ray


@ray.remote(num_cpus=0)
class ProgressLog:
    """Buffers (kind, step, metrics) records from rank 0 until the driver drains them."""

    def __init__(self):
        self.records = []

    def push(self, kind: str, step: int, metrics: dict) -> None:
        self.records.append((kind, step, metrics))

    def drain(self) -> list:
        out, self.records = self.records, []
        return out


class ProgressUI:
    """Context manager on the driver: a progress bar over optimizer steps and TensorBoard scalars."""

    def __init__(self, log, stage: str, total_steps: int, tb_dir: Path, show: bool = True, poll_s: float = 0.5):
        self.log, self.stage, self.total, self.tb_dir = log, stage, total_steps, Path(tb_dir)
        self.show, self.poll_s = show, poll_s
        self._stop = threading.Event()
        self.last: dict = {}
        self._said: set = set()  # warnings already shown (every rank reports the same one)

    def __enter__(self):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.writer = SummaryWriter(str(self.tb_dir))
        self.bar = tqdm(total=self.total, desc=f"{self.stage:>8}", unit="step", disable=not self.show,
                        dynamic_ncols=True, leave=True)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self):
        try:
            records = ray.get(self.log.drain.remote(), timeout=30)
        except Exception:  # the run is ending or Ray is shutting down: nothing more to show
            return
        for kind, step, metrics in records:
            if kind in ("warning", "resumed"):  # the workers' news: a line each (their logs stay in Ray's files)
                self._line(kind, metrics)
                continue
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            if kind == "train":
                self.bar.n = min(step, self.total)
                self.last.update(metrics)
                self.bar.set_postfix_str(f"loss={metrics.get('loss', float('nan')):.4f}, "
                                         f"{metrics.get('examples_per_s', 0):.0f} ex/s", refresh=False)
                self.bar.refresh()
            else:
                self.last.update({f"{kind}_{k}": v for k, v in metrics.items()})
                if kind == "val":
                    self._line(kind, metrics)
        if records:
            self.writer.flush()

    @property
    def step(self) -> int:
        """The last optimizer step a worker reported."""
        return int(self.bar.n)

    def _line(self, kind: str, metrics: dict) -> None:
        """One line above the bar (also without a bar: job logs keep it)."""
        if kind == "val":
            scores = "  ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items()
                               if k.startswith("val_") and k not in ("val_examples", "val_tokens"))
            text = f"{self.stage:>8} epoch {metrics.get('epoch', '?')}: validation {scores}"
        elif kind == "resumed":
            text = f"{self.stage:>8}: resumed at step {metrics['step']} from the latest checkpoint"
        else:
            text = f"warning ({self.stage} worker): {metrics['text']}"
            if text in self._said:
                return
            self._said.add(text)
        self.bar.write(text)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self._drain()
        self.bar.close()
        self.writer.close()
        return False
