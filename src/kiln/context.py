"""RunContext: what every stage receives explicitly (no globals): seed, cache, progress, metering."""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator


def _read_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Linux lets a process reset its own peak-RSS mark (clear_refs = 5), giving per-stage peaks."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    hwm = _read_hwm_bytes()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Meter:
    name: str
    wall_s: float = 0.0
    peak_rss_bytes: int = 0

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 3), "peak_rss_bytes": self.peak_rss_bytes}


@dataclass
class RunContext:
    seed: int = 0
    show_progress: bool = True
    meters: list[Meter] = field(default_factory=list)

    @contextmanager
    def meter(self, name: str) -> Iterator[Meter]:
        m = Meter(name)
        per_stage = _reset_hwm()
        t0 = time.perf_counter()
        try:
            yield m
        finally:
            m.wall_s = time.perf_counter() - t0
            m.peak_rss_bytes = peak_rss_bytes() if per_stage else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.meters.append(m)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator["callable"]:
        """Yields advance(n=1). A rich progress bar on stderr, so `--json` stdout stays clean."""
        if not self.show_progress:
            yield lambda n=1: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        console = Console(stderr=True, force_terminal=None if os.isatty(2) else False)
        cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
        if not console.is_terminal:  # a log, not a terminal: one line per tenth of the work
            state = {"done": 0, "t0": time.perf_counter(), "next": 0}

            def advance(n=1):
                state["done"] += n
                if state["done"] >= state["next"] or state["done"] == total:
                    console.print(f"{description} {state['done']}/{total} "
                                  f"({time.perf_counter() - state['t0']:.0f} s)", highlight=False)
                    state["next"] = state["done"] + max(1, total // 10)
            console.print(f"{description} 0/{total}", highlight=False)
            yield advance
            return
        with Progress(*cols, console=console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)

    def log(self, message: str) -> None:
        if self.show_progress:
            from rich.console import Console

            Console(stderr=True).print(message, highlight=False)


@contextmanager
def torch_threads(n: int):
    """Set torch's intra-op threads inside the block and restore them after. The column loops of
    GPTQ and SparseGPT are thousands of tiny vector ops: on one thread they run ~30× faster than with
    a thread team whose barriers cost more than the work (worse still on an oversubscribed CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded(fn):
    """Run `fn` inside torch_threads(1)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch_threads(1):
            return fn(*args, **kwargs)
    return wrapper
