"""The rich console every command prints through."""
from __future__ import annotations

import os
import re

PIPE_WIDTH = 160  # columns when output goes to a file or a pipe
_RETRY = re.compile(r"retry of #(\d+)")  # a trial's origin when it runs an interrupted or stale trial again


def make_console():
    """A console on stdout. On a terminal it takes the terminal's width; in a log file or a pipe, where
    rich would assume 80 columns (wrapping lines and squeezing tables into "res…" cells), it uses
    ``PIPE_WIDTH`` unless ``COLUMNS`` says otherwise."""
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=PIPE_WIDTH)
    return console


class SearchProgress:
    """The ``autoft search`` view of a search's events (:mod:`autoft.events`), under either engine.

    On a terminal a live bar (trials done / pruned / failed, best so far, elapsed); in a log file or a
    pipe one plain line per finished trial (its state, score, epochs, backbone and origin).

    "done" counts the budget as the study does (:func:`autoft.study.budget.counted_trials`): a failed
    trial that another trial runs again counts once, through its retry. ``timeout_mode``: how the
    search reads its timeout (``command`` or ``trials``), for the first lines."""

    def __init__(self, console=None, timeout_mode: str = "command"):
        self.console = console or make_console()
        self.progress = None
        self.counts = {"complete": 0, "pruned": 0, "fail": 0}
        self.best: tuple[float, str, str] | None = None  # value, key, backbone
        self.resumed = 0
        self.timeout_mode = timeout_mode
        self.counted: set[str] = set()  # trials of this run that count toward the budget
        self.failed: set[str] = set()  # numbers of trials of this run that failed

    # events ------------------------------------------------------------------------------------
    def on_search_start(self, e) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        s = e.sizes or {}
        self.metric, self.direction, self.total = e.metric, e.direction, e.budget + (e.resumed if e.extend else 0)
        self.console.print(f"[bold]autoft search[/] task [cyan]{e.task}[/] · {e.examples} examples (train "
                           f"{s.get('train')}, val {s.get('val')}, test {s.get('test')}) · {e.classes} classes · "
                           f"metric {e.metric} · backbones {', '.join(e.backbones)}")
        timeout = ""
        if e.timeout:
            timeout = (f", no new trial after {e.timeout:g} s" if self.timeout_mode == "trials" else
                       f", {e.timeout:g} s for the whole command")
        self.console.print(f"study '{e.study}' in {e.storage} · engine {e.engine} · device {e.device} · budget "
                           f"{e.budget} trials{timeout} · pruner {e.pruner}", soft_wrap=True)
        if e.resumed:
            self.console.print(f"resuming: {e.resumed} finished trial(s) already in the study")
        self.resumed = min(e.resumed, self.total)
        self.progress = Progress(TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=self.console, transient=False,
                                 disable=not self.console.is_terminal and os.environ.get("AUTOFT_PROGRESS") != "1")
        self.task_id = self.progress.add_task("", total=self.total, completed=self.resumed)
        self.progress.start()

    def on_trial_end(self, e) -> None:
        if self.progress is None:
            return
        self.counts[e.state] = self.counts.get(e.state, 0) + 1
        if e.state == "complete" and e.value is not None:
            better = self.best is None or (e.value > self.best[0] if self.direction == "maximize"
                                           else e.value < self.best[0])
            if better:
                self.best = (e.value, e.number if e.number is not None else e.key, e.config.get("backbone", ""))
        c = self.counts
        key = str(e.number if e.number is not None else e.key)
        self.counted.add(key)
        if e.state == "fail":
            self.failed.add(key)
        retry = _RETRY.fullmatch(e.origin or "")
        if retry and retry.group(1) in self.failed:  # the failed trial counts once, through this retry
            self.counted.discard(retry.group(1))
        done = self.resumed + len(self.counted)
        best = (f"best {self.metric} {self.best[0]:.4f} (#{self.best[1]}, {self.best[2]})" if self.best
                else "no result yet")
        self.progress.update(self.task_id, completed=done, description=f"{c['complete']} complete · "
                             f"{c['pruned']} pruned · {c['fail']} failed · {best}")
        if self.progress.disable:  # not a terminal (CI log, file, pipe): one plain line per trial
            val = f"{e.value:.4f}" if e.value is not None else "-"
            origin = e.origin
            note = {"sampler": "", "first trial": " (first trial: a first_trials recipe of the search space)"}.get(
                origin, f" ({origin})")
            why = f" ({e.fail_reason.splitlines()[0][:200]})" if e.state == "fail" and e.fail_reason else ""
            why += f" (stopped by the {e.stopped_by})" if e.stopped_by else ""
            self.console.print(f"trial {e.number if e.number is not None else e.key} {e.state}{note}{why}: "
                               f"{self.metric} {val} after {e.epochs} epoch{'s' if e.epochs != 1 else ''} "
                               f"({e.config.get('backbone', '?')}, unfreeze {e.config.get('unfreeze', '?')} stages) · "
                               f"{done}/{self.total} done: {c['complete']} complete, {c['pruned']} pruned, "
                               f"{c['fail']} failed · {best}", soft_wrap=True)

    def on_search_end(self, e) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def time_summary(result) -> str:
    """How the search's time was spent, from a :class:`autoft.api.SearchResult`: ``time: preparing
    2.0 s · ranking 3.1 s · trials 101.2 s · final check 9.8 s · report 1.2 s · total 117.3 s of the
    120 s budget · 1 trial stopped by the deadline (#7)``."""
    t = dict(result.timings or {})
    total = t.pop("total", result.seconds)
    parts = [f"{name} {sec:.1f} s" for name, sec in t.items()]
    if result.timeout and result.timeout_mode == "command":
        parts.append(f"total {total:.1f} s of the {result.timeout:g} s budget")
    else:
        parts.append(f"total {total:.1f} s" + (f" (no new trial after {result.timeout:g} s)" if result.timeout else ""))
    stopped = list(result.stopped_by_deadline or ())
    if stopped:
        parts.append(f"{len(stopped)} trial{'s' if len(stopped) != 1 else ''} stopped by the deadline ("
                     + ", ".join(f"#{n}" for n in stopped) + ")")
    elif result.timeout and result.timeout_mode == "command":
        parts.append("no trial stopped by the deadline")
    if result.final_check_skipped:
        parts.append("final check skipped (no time left)")
    return "time: " + " · ".join(parts)
