"""The Run viewer tab: a run's curves (metric picker) and validation grids (a slider over steps), re-read every
few seconds while "Follow" is on, so a run can be watched while it trains (no W&B needed)."""

from __future__ import annotations

from typing import Any

from unilip.demo.runs import METRICS_FILE, default_metric, read_curves, read_grids
from unilip.demo.sources import Sources


def curve_frame(points: list[tuple[int, float]], metric: str):
    """[(step, value)] -> the DataFrame the line plot draws (columns `step` and `value`)."""
    import pandas as pd

    return pd.DataFrame({"step": [s for s, _ in points], "value": [v for _, v in points], "metric": metric})


def build_run_viewer(gr, app, sources: Sources, refresh_seconds: float) -> None:
    labels = list(sources.run)
    if not labels:
        gr.Markdown(
            "No run given. Start the demo with a run folder (`runs/<name>/tokenizer/stage1`) to see its curves."
        )
    with gr.Row():
        run = gr.Dropdown(labels, value=labels[0] if labels else None, label="Run", elem_id="run-run", scale=3)
        follow = gr.Checkbox(True, label=f"Follow (re-read every {refresh_seconds:g} s)", elem_id="run-follow")
        refresh = gr.Button("Refresh", elem_id="run-refresh", scale=0)
    message = gr.Markdown(elem_id="run-message")
    metric = gr.Dropdown([], label="Metric", elem_id="run-metric")
    plot = gr.LinePlot(x="step", y="value", x_title="step", y_title="value", height=320, elem_id="run-plot")
    with gr.Row():
        kind = gr.Radio([], label="Validation grids", elem_id="run-kind")
        step = gr.Slider(0, 1, value=0, step=1, label="Grid (oldest to newest)", elem_id="run-slider")
    grid = gr.Image(label="Grid", format="png", interactive=False, elem_id="run-grid")
    caption = gr.Markdown(elem_id="run-caption")
    timer = gr.Timer(refresh_seconds, active=True)

    def update(label: str | None, chosen: str | None, chosen_kind: str | None, index: float, following: bool) -> dict:
        if label not in sources.run:
            return {message: "Choose a run."}
        folder = sources.run[label]
        curves = read_curves(folder)
        names = sorted(curves)
        chosen = chosen if chosen in curves else default_metric(names)
        result: dict[Any, Any] = {
            message: "" if names else f"No metrics in {folder / METRICS_FILE} yet.",
            metric: gr.Dropdown(choices=names, value=chosen),
            plot: gr.LinePlot(value=curve_frame(curves[chosen], chosen), y_title=chosen) if chosen else None,
        }
        grids = read_grids(folder)
        kinds = sorted(grids)
        chosen_kind = chosen_kind if chosen_kind in grids else (kinds[0] if kinds else None)
        result[kind] = gr.Radio(choices=kinds, value=chosen_kind)
        series = grids.get(chosen_kind, [])
        if not series:
            result.update({step: gr.Slider(0, 1, value=0), grid: None, caption: "No validation grids yet."})
            return result
        last = len(series) - 1
        position = last if following else min(int(index or 0), last)
        shown = series[position]
        result.update(
            {
                step: gr.Slider(0, max(last, 1), value=position, step=1, label=f"Grid {position + 1} of {len(series)}"),
                grid: str(shown.path),
                caption: f"step {shown.step}" + (f": {shown.caption}" if shown.caption else ""),
            }
        )
        return result

    def show_step(label, chosen_kind, index) -> dict:
        series = read_grids(sources.run[label]).get(chosen_kind, []) if label in sources.run else []
        if not series:
            return {grid: None, caption: ""}
        shown = series[min(int(index or 0), len(series) - 1)]
        return {grid: str(shown.path), caption: f"step {shown.step}" + (f": {shown.caption}" if shown.caption else "")}

    inputs = [run, metric, kind, step, follow]
    outputs = [message, metric, plot, kind, step, grid, caption]
    for event in (app.load, timer.tick, refresh.click, run.change, metric.input, kind.input):
        event(update, inputs, outputs, show_progress="hidden")
    follow.change(lambda following: gr.Timer(active=following), follow, timer)
    # moving the slider by hand stops following, so the next refresh does not jump back to the newest grid
    step.release(lambda: False, None, follow).then(show_step, [run, kind, step], [grid, caption])
