"""Live progress for a TorchTrainer run: rank 0 pushes step metrics to a tiny Ray actor, the driver
polls it into a tqdm bar and TensorBoard event files (the driver's terminal and run directory, even
when workers run on other nodes; Ray Train V2 itself has no TensorBoard logger)."""

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
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            if kind == "train":
                self.bar.n = min(step, self.total)
                self.last.update(metrics)
                self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", refresh=False)
                self.bar.refresh()
            else:
                self.last.update({f"{kind}_{k}": v for k, v in metrics.items()})
        if records:
            self.writer.flush()

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self._drain()
        self.bar.close()
        self.writer.close()
        return False
