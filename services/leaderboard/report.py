"""The leaderboard as one self-contained HTML file: the table (sortable, best per column marked)
and plots drawn as inline SVG — accuracy by split per entry, cost vs accuracy with the
cost-quality frontiers (where answers were judged), held-out loss by split per entry (where texts
were scored: a text suite), and the routing confusion (gold task × chosen expert) per strategy.

SVG written here rather than a plotting library: the file needs no network, no JavaScript bundle
and no extra dependency, renders in any browser (and in the gateway's ``GET /leaderboard``), and
the few lines of script only sort the table and switch which frontier / heatmap is shown.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from pathlib import Path

from services.leaderboard.board import ORACLE, Board, graded_queries, nats_per_token

SPLIT_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7")
STRATEGY_COLOUR = "#d62728"
EXPERT_COLOUR = "#7f7f7f"


def e(value: object) -> str:
    return escape(str(value), quote=True)


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------ page


def render(board: Board) -> str:
    run = board.run
    title = f"moerge leaderboard — run {run['id']} ({run['suite']})"
    settings = run.get("settings") or {}
    meta = [
        f"suite <b>{e(run['suite'])}</b>",
        f"base <b>{e(run['base_model'])}</b>",
        f"splits {e(', '.join(board.splits))}",
        f"seed {e(run['seed'])}",
        f"{e(run['n_per_task'] if run['n_per_task'] is not None else 'default')} per task",
        f"{e(run['n_queries'])} queries",
        f"{e(run['mode'])} in {run['seconds']:.0f} s",
        f"{e(run['created_at'] or '')}",
    ]
    if settings.get("machine"):
        meta.append(e(settings["machine"]))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{CSS}</style>
</head>
<body data-run="{e(run["id"])}">
<header>
<h1>{e(title)}</h1>
<p class="meta">{" · ".join(meta)}</p>
</header>
<section id="table-section">
<h2>Leaderboard</h2>
<div class="scroll">{table(board)}</div>
<p class="note">★ best in its column (moe/oracle and bounds left out: they need the gold task). Click a header to sort.
Zero router (experts alone, mixed at random): AIQ {fmt(board.zero_router.get("aiq"), ".3f")}.
Cost range for AIQ: {board.cost_range[0]:.4f} – {board.cost_range[1]:.4f} per query.</p>
</section>
{answer_sections(board)}{loss_section(board)}<section id="confusion-section">
<h2>Routing confusion: gold task × chosen expert</h2>
{confusion_plots(board)}
</section>
<script>{SCRIPT}</script>
</body>
</html>
"""


def has_column(board: Board, key: str) -> bool:
    return any(c.key == key for c in board.columns)


def answer_sections(board: Board) -> str:
    """The accuracy plots, where the run judged answers."""
    if not has_column(board, "acc_all"):
        return ""
    return f"""<section id="accuracy-section">
<h2>Accuracy by split</h2>
{accuracy_plot(board)}
</section>
<section id="frontier-section">
<h2>Cost vs accuracy, with the cost-quality frontier</h2>
{frontier_plot(board)}
</section>
"""


def loss_section(board: Board) -> str:
    """The held-out loss plot, where the run scored texts."""
    if not has_column(board, "loss_all"):
        return ""
    return f"""<section id="loss-section">
<h2>Held-out loss by split (nats per token, lower is better)</h2>
{loss_plot(board)}
</section>
"""


def write_report(board: Board, path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(board), encoding="utf-8")
    tmp.replace(path)
    return path.resolve()


def table(board: Board) -> str:
    head = "".join(f'<th title="{e(c.help)}" data-key="{e(c.key)}">{e(c.header)}</th>' for c in board.columns)
    body = []
    for row in board.rows:
        cells = []
        for c in board.columns:
            v = c.get(row)
            best = row["entry"] in board.best.get(c.key, set())
            cls = ' class="best"' if best else ""
            text = fmt(v, c.fmt) + (" ★" if best else "")
            cells.append(f'<td{cls} data-value="{"" if v is None else repr(float(v))}">{e(text)}</td>')
        skipped = row["all"]["skipped"]
        note = f' <span class="skipped" title="queries it cannot answer">({skipped} skipped)</span>' if skipped else ""
        body.append(
            f'<tr data-entry="{e(row["entry"])}" data-kind="{e(row["kind"])}">'
            f'<td class="entry">{e(row["entry"])}{note}</td><td>{e(row["kind"])}</td>{"".join(cells)}</tr>'
        )
    return (
        f'<table id="leaderboard"><thead><tr><th data-key="entry">entry</th><th data-key="kind">kind</th>{head}</tr>'
        f"</thead><tbody>{''.join(body)}</tbody></table>"
    )


# ------------------------------------------------------------------------------------ plots


def accuracy_plot(board: Board) -> str:
    def bar(row: dict, split: str) -> tuple[float, str] | None:
        m = row["splits"].get(split)
        if not graded_queries(m):
            return None
        assert m is not None
        return m["accuracy"], f"{m['accuracy']:.3f} ({m['correct']}/{m['n']})"

    return split_bars(board, "plot-accuracy", "accuracy by split per entry", 1.0, "{:g}", bar)


def loss_plot(board: Board) -> str:
    """One bar per entry and split: nats per token, on an axis from 0 to the largest loss."""
    losses = {(row["entry"], sp): nats_per_token(row["splits"].get(sp)) for row in board.rows for sp in board.splits}
    top_value = max((v for v in losses.values() if v is not None), default=1.0) or 1.0

    def bar(row: dict, split: str) -> tuple[float, str] | None:
        value = losses[(row["entry"], split)]
        return None if value is None else (value, f"{value:.3f} nats per token")

    return split_bars(board, "plot-loss", "held-out loss by split per entry", top_value, "{:.2f}", bar)


def split_bars(
    board: Board,
    plot_id: str,
    label: str,
    axis_max: float,
    tick_fmt: str,
    bar: Callable[[dict, str], tuple[float, str] | None],
) -> str:
    """Horizontal bars, one group per entry and one bar per split, on an axis from 0 to
    ``axis_max``; ``bar(row, split)`` gives a bar's value and tooltip, or None for no bar."""
    splits = board.splits
    bar_h, gap, left, width, top = 9, 8, 230, 560, 28
    group_h = bar_h * len(splits) + gap
    height = top + group_h * len(board.rows) + 30
    out = [
        (
            f'<svg class="plot" id="{plot_id}" xmlns="http://www.w3.org/2000/svg" width="{left + width + 40}" '
            f'height="{height}" role="img" aria-label="{label}">'
        )
    ]
    for i, s in enumerate(splits):  # legend
        x: float = left + i * 130
        out.append(
            f'<rect x="{x}" y="6" width="12" height="12" fill="{SPLIT_COLOURS[i % len(SPLIT_COLOURS)]}"/>'
            f'<text x="{x + 16}" y="16" class="legend">{e(s)}</text>'
        )
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        x = left + t * width
        out.append(
            f'<line x1="{x}" y1="{top - 4}" x2="{x}" y2="{height - 26}" class="grid"/>'
            f'<text x="{x}" y="{height - 12}" class="tick" text-anchor="middle">{tick_fmt.format(t * axis_max)}</text>'
        )
    for j, row in enumerate(board.rows):
        y0 = top + j * group_h
        out.append(
            f'<text x="{left - 8}" y="{y0 + group_h / 2}" class="label" text-anchor="end" '
            f'dominant-baseline="middle">{e(row["entry"])}</text>'
        )
        for i, s in enumerate(splits):
            got = bar(row, s)
            if got is None:
                continue
            value, title = got
            w = max(1.0, value / axis_max * width)  # a zero still shows as a hairline
            out.append(
                f'<rect class="bar" data-entry="{e(row["entry"])}" data-split="{e(s)}" x="{left}" '
                f'y="{y0 + i * bar_h}" width="{w:.2f}" height="{bar_h - 1}" '
                f'fill="{SPLIT_COLOURS[i % len(SPLIT_COLOURS)]}"><title>{e(row["entry"])} · {e(s)}: '
                f"{e(title)}</title></rect>"
            )
    out.append("</svg>")
    return "".join(out)


def frontier_plot(board: Board) -> str:
    left, right, top, bottom, width, height = 60, 30, 20, 45, 760, 440
    lo, hi = board.cost_range
    if hi <= lo:
        pad = abs(lo) * 0.5 or 1.0
        lo, hi = lo - pad, hi + pad
    span = hi - lo
    x_lo, x_hi = lo - 0.04 * span, hi + 0.04 * span

    def sx(c: float) -> float:
        return left + (c - x_lo) / (x_hi - x_lo) * (width - left - right)

    def sy(a: float) -> float:
        return top + (1 - a) * (height - top - bottom)

    def path(points: list[list[float]], end: float) -> str:
        if not points:
            return ""
        pts = [*points, [end, points[-1][1]]] if end > points[-1][0] else points
        return " ".join(f"{sx(c):.2f},{sy(a):.2f}" for c, a in pts)

    strategies = [r for r in board.rows if r["kind"] == "strategy" and r["frontier"]]
    shown = max((r for r in strategies if r["entry"] != ORACLE), key=lambda r: r["aiq"], default=None)
    options = "".join(
        f'<option value="{e(r["entry"])}"{" selected" if r is shown else ""}>{e(r["entry"])} '
        f"(AIQ {r['aiq']:.3f})</option>"
        for r in sorted(strategies, key=lambda r: -r["aiq"])
    )
    out = [
        f'<label class="picker">frontier of <select id="frontier-select">{options}</select></label>'
        if strategies
        else "",
        (
            f'<svg class="plot" id="plot-frontier" xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" role="img" aria-label="cost per query against accuracy">'
        ),
    ]
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(
            f'<line x1="{left}" y1="{sy(t)}" x2="{width - right}" y2="{sy(t)}" class="grid"/>'
            f'<text x="{left - 6}" y="{sy(t)}" class="tick" text-anchor="end" '
            f'dominant-baseline="middle">{t:g}</text>'
        )
    for k in range(5):
        c = lo + k * (hi - lo) / 4
        out.append(f'<text x="{sx(c)}" y="{height - bottom + 16}" class="tick" text-anchor="middle">{c:.4g}</text>')
    out.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" class="axis" text-anchor="middle">'
        'cost per query</text><text x="14" y="{0}" class="axis" text-anchor="middle" '
        'transform="rotate(-90 14 {0})">accuracy (all splits)</text>'.format((top + height - bottom) / 2)
    )
    zero = board.zero_router.get("frontier") or []
    if zero:
        out.append(
            f'<polyline class="frontier zero" points="{path(zero, board.cost_range[1])}">'
            f"<title>experts alone (zero router), AIQ {fmt(board.zero_router.get('aiq'), '.3f')}</title>"
            "</polyline>"
        )
    for r in strategies:
        style = "" if r is shown else ' style="display:none"'
        out.append(
            f'<polyline class="frontier strategy" data-entry="{e(r["entry"])}"{style} '
            f'points="{path(r["frontier"], board.cost_range[1])}"><title>{e(r["entry"])} + experts: '
            f"AIQ {r['aiq']:.3f}</title></polyline>"
        )
    for r in board.rows:
        m = r["all"]
        if not graded_queries(m):  # it judged no answer (a text suite's rows)
            continue
        c, a = m["cost"] / m["n"], m["accuracy"]
        colour = EXPERT_COLOUR if r["kind"] == "expert" else STRATEGY_COLOUR
        out.append(
            f'<circle class="point {e(r["kind"])}" data-entry="{e(r["entry"])}" cx="{sx(c):.2f}" '
            f'cy="{sy(a):.2f}" r="4.5" fill="{colour}"><title>{e(r["entry"])}: cost {c:.4f}, '
            f"accuracy {a:.3f}</title></circle>"
        )
        if r["kind"] == "strategy":
            out.append(
                f'<text class="point-label" x="{sx(c) + 6:.2f}" y="{sy(a) - 5:.2f}">'
                f"{e(r['entry'].removeprefix('moe/'))}</text>"
            )
    out.append("</svg>")
    out.append(
        '<p class="note">Grey: experts alone; red: strategies. Dashed: the experts-only frontier (zero '
        "router). Solid: the chosen strategy mixed with the experts; its AIQ is the area under it over "
        "the cost range, divided by the range.</p>"
    )
    return "".join(out)


def confusion_plots(board: Board) -> str:
    rows = [r for r in board.rows if r["kind"] == "strategy" and r["all"]["confusion"]]
    if not rows:
        return '<p class="note">No query-level strategy in this run: nothing routed per query.</p>'
    shown = max(rows, key=lambda r: (r["entry"] != ORACLE, r["all"]["routing_accuracy"] or 0.0))
    options = "".join(
        f'<option value="{e(r["entry"])}"{" selected" if r is shown else ""}>{e(r["entry"])}</option>' for r in rows
    )
    out = [f'<label class="picker">strategy <select id="confusion-select">{options}</select></label>']
    for r in rows:
        out.append(heatmap(r["entry"], r["all"]["confusion"], hidden=r is not shown))
    return "".join(out)


def heatmap(entry: str, confusion: dict[str, dict[str, int]], hidden: bool = False) -> str:
    tasks = sorted(confusion)
    experts = sorted({x for row in confusion.values() for x in row})
    cell, left, top = 30, 170, 130
    width, height = left + cell * len(experts) + 20, top + cell * len(tasks) + 10
    style = ' style="display:none"' if hidden else ""
    out = [
        (
            f'<svg class="plot heatmap" data-entry="{e(entry)}"{style} xmlns="http://www.w3.org/2000/svg" '
            f'width="{width}" height="{height}" role="img" aria-label="routing confusion of {e(entry)}">'
        )
    ]
    for j, x in enumerate(experts):
        cx = left + j * cell + cell / 2
        out.append(f'<text class="label" x="{cx}" y="{top - 6}" transform="rotate(-55 {cx} {top - 6})">{e(x)}</text>')
    for i, t in enumerate(tasks):
        total = sum(confusion[t].values()) or 1
        y = top + i * cell
        out.append(
            f'<text class="label" x="{left - 6}" y="{y + cell / 2}" text-anchor="end" '
            f'dominant-baseline="middle">{e(t)}</text>'
        )
        for j, x in enumerate(experts):
            n = confusion[t].get(x, 0)
            share = n / total
            out.append(
                f'<rect class="cell" x="{left + j * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                f'fill="rgba(31,119,180,{0.06 + 0.94 * share:.3f})"><title>gold {e(t)} → {e(x)}: {n} '
                f"({share:.0%})</title></rect>"
            )
            if n:
                colour = "#fff" if share > 0.5 else "#222"
                out.append(
                    f'<text class="count" x="{left + j * cell + cell / 2}" y="{y + cell / 2}" '
                    f'text-anchor="middle" dominant-baseline="middle" fill="{colour}">{n}</text>'
                )
    out.append("</svg>")
    return "".join(out)


CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta, .note { color: #555; } .note { font-size: 12px; max-width: 900px; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 13px; }
th, td { padding: 4px 7px; border-bottom: 1px solid #e3e3e3; text-align: right; white-space: nowrap; }
th { cursor: pointer; background: #f5f5f5; position: sticky; top: 0; }
td.entry, td:nth-child(2), th:nth-child(-n+2) { text-align: left; }
tr[data-kind="expert"] td.entry { color: #555; }
td.best { font-weight: 700; color: #1a7f37; }
.skipped { color: #a00; font-size: 11px; }
svg.plot { display: block; margin: 6px 0 10px; background: #fff; }
.grid { stroke: #e6e6e6; } .tick, .legend, .label, .point-label, .axis { font-size: 11px; fill: #333; }
.count { font-size: 10px; }
.frontier { fill: none; stroke-width: 2; } .frontier.zero { stroke: #999; stroke-dasharray: 5 4; }
.frontier.strategy { stroke: #d62728; }
.picker { font-size: 13px; }
"""

SCRIPT = """
(function () {
  var table = document.getElementById('leaderboard');
  var body = table.tBodies[0];
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
    th.addEventListener('click', function () {
      var asc = th.dataset.sort !== 'asc';
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { delete h.dataset.sort; });
      th.dataset.sort = asc ? 'asc' : 'desc';
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col];
        var vx = x.dataset.value, vy = y.dataset.value;
        if (vx === undefined) { return (asc ? 1 : -1) * x.textContent.localeCompare(y.textContent); }
        if (vx === '') { return 1; } if (vy === '') { return -1; }
        return (asc ? 1 : -1) * (parseFloat(vx) - parseFloat(vy));
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  function picker(selectId, selector) {
    var select = document.getElementById(selectId);
    if (!select) { return; }
    function show() {
      document.querySelectorAll(selector).forEach(function (el) {
        el.style.display = el.dataset.entry === select.value ? '' : 'none';
      });
    }
    select.addEventListener('change', show);
    show();
  }
  picker('frontier-select', '#plot-frontier .frontier.strategy');
  picker('confusion-select', 'svg.heatmap');
  // what the browser actually laid out (the page test reads these back from the DOM)
  function drawn(selector) {
    return Array.prototype.filter.call(document.querySelectorAll(selector), function (el) {
      var r = el.getBoundingClientRect();
      return r.width > 0 && r.height > 0;
    }).length;
  }
  document.body.dataset.plotsDrawn = drawn('svg.plot');
  document.body.dataset.barsDrawn = drawn('svg.plot rect.bar');  // accuracy's, or a text suite's loss
  document.body.dataset.pointsDrawn = drawn('#plot-frontier circle.point');
  document.body.dataset.ready = '1';
})();
"""
