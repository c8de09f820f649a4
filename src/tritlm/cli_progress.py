"""Training progress on the command line: a live bar on a terminal, plain log lines elsewhere.

A live bar written to a file or a pipe (``tritlm train ... > log``) shows nothing until the run
ends, so when stdout is not a terminal each of about :data:`LINES` evenly spaced steps, every
evaluation and the end print one line instead.
"""

from __future__ import annotations

import time

from tritlm.cli_info import _console

LINES = 20  # progress lines of a whole run when stdout is not a terminal


class Progress:
    """Fed by the trainer's callback events (``start``, ``step``, ``eval``, ``end``). Rollbacks
    are not printed here: the trainer's own warning already says what happened and the new LR."""

    def __init__(self, label: str, quiet: bool = False, live: bool | None = None):
        self.console = _console()
        self.quiet = quiet
        self.label = label
        self.live = self.console.is_terminal if live is None else live
        self.bar = None
        self.task = None
        self.val: tuple[int, float] | None = None  # (step, loss) of the latest evaluation
        self.every, self.total = 1, 0
        self.t0 = time.perf_counter()

    def _val(self) -> str:
        # before the first evaluation there is no val loss to show (not a stale or NaN one)
        return "val -" if self.val is None else f"val {self.val[1]:.4f} (step {self.val[0]})"

    def _line(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"{self.label}: {text}", markup=False, highlight=False)

    def __call__(self, ev: dict) -> None:
        e = ev["event"]
        if e == "start":
            self.t0 = time.perf_counter()
            self.every = max(1, (ev["max_steps"] - ev["step"]) // LINES)
            self.total = ev["max_steps"]
            if self.live and not self.quiet:
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
                from rich.progress import Progress as Bar

                self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
                self.bar.start()
                self.task = self.bar.add_task(self.label, total=ev["max_steps"], completed=ev["step"], info="")
            else:
                self._line(f"starting at step {ev['step']} of {ev['max_steps']}")
        elif e == "step":
            info = f"loss {ev['loss']:.4f}  {self._val()}  lr {ev['lr']:.2e}"
            if self.bar is not None:
                self.bar.update(self.task, completed=ev["step"], info=info)
            elif ev["step"] % self.every == 0 or ev["step"] == self.total:
                self._line(f"step {ev['step']}/{self.total}  {info}  {time.perf_counter() - self.t0:.1f} s")
        elif e == "eval":
            self.val = (ev["step"], ev["val_loss"])
            if self.bar is None:
                self._line(f"step {ev['step']}/{self.total}  {self._val()}")
        elif e == "end":
            if self.bar is not None:
                self.bar.stop()
