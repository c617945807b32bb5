"""What a run looks like in Jupyter, without ipywidgets: its summary as an HTML table
(`Run._repr_html_`), and live progress as one HTML output updated in place (an
IPython display handle, which every front end shows). With ipywidgets installed,
progress is rich's, as in a terminal."""

from __future__ import annotations

import html
import importlib.util
import time
from typing import Any

from podpipe.runtime.rundir.status import Status

UPDATE_SECONDS = 0.25  # the output is redrawn at most this often while the run goes


def in_notebook() -> bool:
    """Is this a Jupyter kernel (not a terminal IPython or a plain interpreter)?"""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def has_widgets() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


def summary_html(status: Status, where: str) -> str:
    """The run as a table: a row per node, batches, rows, busy time, restarts."""
    state = html.escape(status.state)
    colour = {"succeeded": "#2e7d32", "failed": "#c62828"}.get(status.state, "#555")
    rows = []
    for node, s in status.stages.items():
        total = max(s.batches_total, 1)
        rows.append(
            f"<tr><td style='text-align:left'>{html.escape(node)}</td>"
            f"<td><progress value='{s.batches_done}' max='{total}'></progress></td>"
            f"<td>{s.batches_done}/{s.batches_total}</td><td>{s.rows_in:,}</td>"
            f"<td>{s.rows_out:,}</td><td>{s.busy_seconds:.2f} s</td><td>{s.restarts}</td>"
            f"<td style='text-align:left'>{html.escape(s.version or '')}</td></tr>")
    error = (f"<div style='color:#c62828'>{html.escape(status.error)}</div>"
             if status.error else "")
    return (f"<div><b>podpipe run {html.escape(status.pipeline)}</b>: "
            f"<span style='color:{colour}'>{state}</span> in "
            f"{status.elapsed_seconds:.2f} s <code>{html.escape(where)}</code>{error}"
            "<table><thead><tr><th style='text-align:left'>stage</th><th></th>"
            "<th>batches</th><th>rows in</th><th>rows out</th><th>busy</th><th>restarts</th>"
            "<th style='text-align:left'>version</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div>")


def summary_text(status: Status) -> str:
    """The same, as plain text (a front end that shows no HTML)."""
    lines = [f"podpipe run {status.pipeline}: {status.state} in {status.elapsed_seconds:.2f} s"]
    lines += [f"  {node:<12} {s.batches_done:>6}/{s.batches_total:<6} {s.rows_out:>12,} rows"
              for node, s in status.stages.items()]
    return "\n".join(lines + ([status.error] if status.error else []))


class NotebookProgress:
    """The run's table, redrawn in one output as statuses come (the run's observer)."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.last = 0.0
        self.status: Status | None = None

    def __enter__(self) -> "NotebookProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self._show(self.status)  # the last status, whatever the throttle held back

    def __call__(self, status: Status) -> None:
        self.status = status
        now = time.monotonic()
        if self.handle is None or now - self.last >= UPDATE_SECONDS:
            self._show(status)
            self.last = now

    def _show(self, status: Status) -> None:
        from IPython.display import display

        shown = {"text/html": summary_html(status, str(status.run_dir or "")),
                 "text/plain": summary_text(status)}
        if self.handle is None:
            self.handle = display(  # type: ignore[no-untyped-call]
                shown, raw=True, display_id=True)
        else:
            self.handle.update(shown, raw=True)
