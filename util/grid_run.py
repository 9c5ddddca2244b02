"""The processes of a grid run (`scripts/reproduce.py`): their meeting point, their logs, their progress line."""
from __future__ import annotations

import collections
import contextlib
import datetime
import io
import os
import re
import threading

from util.grid import Cell, Ranks, slurm_rendezvous


class Group:
    """The processes of a torchrun / srun launch: one barrier at the end, a sum of failures."""

    def __init__(self, ranks: Ranks, device, timeout_h: float):
        self.ranks, self.device, self.active = ranks, device, ranks.world > 1
        self.timeout = datetime.timedelta(hours=timeout_h)
        if not self.active:
            return
        import torch
        import torch.distributed as dist

        if ranks.launcher == "srun":
            for key, value in slurm_rendezvous().items():
                os.environ.setdefault(key, value)
        kwargs = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank,
                                world_size=ranks.world, timeout=self.timeout, **kwargs)
        # Waiting for the slowest process may take hours: a CPU (Gloo) barrier that names the
        # ranks that never arrive, instead of an NCCL kernel spinning on every GPU.
        self.cpu = dist.new_group(backend="gloo", timeout=self.timeout) if device.type == "cuda" else None

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.monitored_barrier(group=self.cpu, timeout=self.timeout, wait_all_ranks=True)

    def total(self, n: int) -> int:
        if not self.active:
            return n
        import torch
        import torch.distributed as dist
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.destroy_process_group()


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # cursor moves of nested progress bars


class LogStream(io.TextIOBase):
    """A cell's console output, kept for the rank's log: whole lines only (progress-bar redraws
    collapse to their last state), and the last lines in memory for the error message."""

    def __init__(self, file):
        self.file, self.buf, self.tail = file, "", collections.deque(maxlen=50)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        self.buf = self.buf[self.buf.rfind("\r") + 1:]
        for line in lines:
            line = ANSI.sub("", line[line.rfind("\r") + 1:]).rstrip()
            if line.strip():
                self.file.write(line + "\n")
                self.tail.append(line)
        return len(text)

    def flush(self) -> None:
        self.file.flush()

    def error(self) -> str | None:
        return next((line[len("error: "):] for line in reversed(self.tail) if line.startswith("error: ")), None)


class Progress:
    """One tqdm line for this process: the images of all its cells, and the current cell's count."""

    def __init__(self, ranks: Ranks, plan: list[tuple[Cell, list[int]]], file):
        from tqdm import tqdm

        self.ranks, self.plan = ranks, plan
        done = sum(len(cell.done(mine)) for cell, mine in plan)
        self.bar = tqdm(total=sum(len(m) for _, m in plan), initial=done, unit="img", file=file,
                        position=ranks.rank if ranks.world > 1 else None, dynamic_ncols=True, disable=False,
                        desc=f"rank {ranks.rank}", mininterval=1.0)

    @contextlib.contextmanager
    def watch(self, k: int, cell: Cell, mine: list[int]):
        """Follow cell k's records while it runs (a thread polls the records folder)."""
        stop = threading.Event()
        seen = len(cell.done(mine))
        live = self.bar.fp.isatty() if hasattr(self.bar.fp, "isatty") else False

        def show(now: int) -> None:
            self.bar.set_description_str(f"rank {self.ranks.rank} cell {k + 1}/{len(self.plan)} {cell.label} "
                                         f"{now}/{len(mine)}", refresh=False)

        def poll():
            nonlocal seen
            show(seen)
            self.bar.refresh()
            while True:
                now = len(cell.done(mine))
                if now != seen:
                    show(now)
                    self.bar.update(now - seen)
                    seen = now
                elif live:  # a terminal: keep the clock running; a log file gets a line per change only
                    self.bar.refresh()
                if stop.wait(1.0) and seen == len(cell.done(mine)):
                    return

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def write(self, text: str) -> None:
        self.bar.write(text, file=self.bar.fp)

    def close(self) -> None:
        self.bar.close()
