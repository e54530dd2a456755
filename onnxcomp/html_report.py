"""Self-contained HTML pages for `optimize --report R.html` and `search --report R.html`.

One file, no network: the style sheet is inline and every chart is a PNG embedded as a data: URI
(matplotlib, the `eval` extra; without it the page has the tables only and says so). Reads reports
(plain dicts, as `--report R.json` writes them), never models.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin:0 0 16px} table{border-collapse:collapse;width:100%;margin:6px 0 14px;font-size:13px}
th,td{border-bottom:1px solid #eee;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f6f6;font-weight:600} td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.skipped td{color:#888} .ok{color:#1a7f37;font-weight:600} .bad{color:#c62828;font-weight:600}
code{font:12px ui-monospace,Menlo,Consolas,monospace;background:#f3f3f3;padding:1px 4px;border-radius:3px;overflow-wrap:anywhere}
img{max-width:100%;border:1px solid #eee} details{margin:4px 0 10px} summary{cursor:pointer;color:#444}
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return _e(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    return _e(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], row_class: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for k, r in enumerate(rows):
        cls = f' class="{row_class[k]}"' if row_class and row_class[k] else ""
        cells = "".join(f'<td class="n">{_num(c)}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
                        else f"<td>{c if isinstance(c, _Raw) else _e(c)}</td>" for c in r)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """Cell content that is already HTML."""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _page(title: str, subtitle: str, sections: list[str]) -> str:
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_e(title)}</title><style>{_STYLE}</style>"
            f"</head><body><h1>{_e(title)}</h1><p class=\"sub\">{subtitle}</p>{''.join(sections)}</body></html>\n")


def _bar_png(labels: Sequence[str], values: Sequence[float], xlabel: str, title: str) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(labels)
    fig, ax = plt.subplots(figsize=(8.5, max(2.2, 0.26 * n + 1.0)), dpi=100)
    ax.barh(range(n), values, color="#4c72b0")
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# optimize
# ---------------------------------------------------------------------------------------------
def optimize_page(report: dict, source: str = "") -> str:
    """The page for one `optimize` run (`Report.as_dict()`)."""
    b, a = report.get("before", {}), report.get("after", {})
    sections = []
    rows = []
    for key, label in (("params", "params"), ("param_bits", "weight bits"), ("macs", "MACs"), ("bytes", "file bytes"),
                       ("lzma_bytes", "lzma bytes"), ("nodes", "nodes")):
        if key in b or key in a:
            x, y = b.get(key), a.get(key)
            ratio = f"{x / y:.2f}x" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else "-"
            rows.append([label, x, y, ratio])
    if rows:
        sections.append("<h2>Before and after</h2>" + _table(["", "before", "after", "reduction"], rows))
    val = report.get("validation")
    if val:
        verdict = '<span class="ok">PASS</span>' if val.get("passed") else '<span class="bad">FAIL</span>'
        text = str(val.get("describe", ""))
        for word in ("PASS", "FAIL"):  # describe() starts with the verdict: shown once, coloured
            text = text.removeprefix(word).lstrip(": ")
        sections.append(f"<h2>Validation</h2><p>{verdict}: {_e(text)}</p>")
    sections.append("<h2>Passes</h2>" + _table(
        ["pass", "rewritten", "skipped", "seconds", "check", "put back by the guard"],
        [[p["name"], p.get("rewritten", 0), sum(1 for r in p.get("layers", []) if r.get("action") == "skipped"),
          p.get("seconds", 0.0), _check_text(p.get("validation")), ", ".join(p.get("rolled_back", [])) or "-"]
         for p in report.get("passes", [])]))
    chart = _sensitivity_chart(report)
    if chart:
        sections.append("<h2>Per-layer error</h2>" + chart)
    else:
        chart = _savings_chart(report)
        if chart:
            sections.append("<h2>Where the savings are</h2><p>No per-layer error was captured in this run (the "
                            "guard captures layer outputs when it has to repair a pass; `onnxcomp sensitivity` "
                            "measures every layer alone).</p>" + chart)
    for p in report.get("passes", []):
        layers = p.get("layers", [])
        if not layers:
            continue
        rows, cls = [], []
        for r in layers:
            rows.append([r.get("node"), r.get("op"), r.get("action"), r.get("params_before"), r.get("params_after"),
                         r.get("macs_before"), r.get("macs_after"), _figures_text(r.get("figures", {})),
                         r.get("reason", "")])
            cls.append("skipped" if r.get("action") == "skipped" else "")
        sections.append(f"<h2>{_e(p['name'])}: every layer</h2><details open><summary>{len(layers)} layers, "
                        f"config <code>{_e(_config_text(p.get('config', {})))}</code></summary>"
                        + _table(["node", "op", "action", "params before", "params after", "MACs before", "MACs after",
                                  "figures", "reason"], rows, cls) + "</details>")
    sub = f"pipeline <code>{_e(report.get('pipeline'))}</code>, seed {_e(report.get('seed'))}, " \
          f"{report.get('seconds', 0):.1f} s" + (f", input {_e(source)}" if source else "")
    return _page("onnxcomp optimize", sub, sections)


def _check_text(v: dict | None) -> str:
    if not v:
        return "-"
    return str(v.get("describe") or ("PASS" if v.get("passed") else "FAIL"))


def _config_text(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items() if v not in ("", None))


def _figures_text(f: dict) -> str:
    keep = []
    for k, v in f.items():
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            keep.append(f"{k}={_num(v) if not isinstance(v, str) else v}")
        if len(keep) >= 5:
            break
    return "; ".join(keep)


def _sensitivity_chart(report: dict) -> str:
    """Relative error at each rewritten layer's output in the guard's checks and the final one (the
    layers the model is most sensitive to on top), from the report's validation figures."""
    checks = [("final", report.get("validation") or {})] + [(p["name"], p.get("validation") or {})
                                                            for p in report.get("passes", [])]
    layers = [(name, lay) for name, val in checks for lay in val.get("layers", [])
              if isinstance(lay.get("rel_err"), (int, float))]
    if not layers:
        return ""
    layers = sorted(layers, key=lambda nl: -nl[1]["rel_err"])[:30]
    png = _bar_png([f"{name}: {lay['node']}" for name, lay in layers], [lay["rel_err"] for _, lay in layers],
                   "relative L2 error at the layer's output (vs the input model, on held-out data)",
                   "most affected layers, per check (the guard's after each pass, and the final one)")
    if png is None:
        return "<p>(matplotlib is not installed: no chart)</p>"
    return _img(png, "per-layer error")


def _savings_chart(report: dict) -> str:
    """Per rewritten layer, the parameters (or MACs) it saved, largest first."""
    rows = []
    for p in report.get("passes", []):
        for r in p.get("layers", []):
            if r.get("action") != "rewritten":
                continue
            for key in ("params", "macs"):
                b, a = r.get(f"{key}_before"), r.get(f"{key}_after")
                if isinstance(b, (int, float)) and isinstance(a, (int, float)):
                    rows.append((f"{p['name']}: {r['node']} ({key})", float(b - a)))
                    break
    if not rows:
        return ""
    rows = sorted(rows, key=lambda t: -abs(t[1]))[:30]
    png = _bar_png([t[0] for t in rows], [t[1] for t in rows], "saved (before - after; negative: grew)",
                   "parameters / MACs saved per rewritten layer")
    return _img(png, "savings per layer") if png is not None else "<p>(matplotlib is not installed: no chart)</p>"


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------
def search_page(result: dict, front_png: bytes | None, source: str = "") -> str:
    """The page for one `search` (`SearchResult.as_dict()`), with the front's PNG when given."""
    objs = result.get("objectives", [])
    sections = []
    best = result.get("best")
    if best:
        sections.append(f"<h2>Best feasible</h2><p>trial {best['number']}: <code>{_e(best['pipeline'])}</code> "
                        + ", ".join(f"{o} {best['values'][o]:.4f}x" for o in objs if o in best.get("values", {}))
                        + "</p>")
    else:
        sections.append('<h2>Best feasible</h2><p class="bad">no trial met the tolerance</p>')
    if front_png:
        sections.append("<h2>Trials and front</h2>" + _img(front_png, "search front"))
    def rows_for(trials: list[dict]) -> tuple[list, list]:
        rows, cls = [], []
        for t in trials:
            f = t.get("figures", {})
            acc = f.get("cand_top1_acc", f.get("top1_agreement", f.get("sequence_agreement")))
            m = f.get("metric")
            shown = (f"{m['candidate']:.4g}" if isinstance(m, dict) and isinstance(m.get("candidate"), (int, float))
                     else f"{acc:.2f}%" if isinstance(acc, (int, float)) else "-")
            rows.append([t["number"], t["status"], *[t.get("values", {}).get(o) for o in objs], shown, t.get("samples"),
                         round(t.get("seconds", 0.0), 1), _Raw(f"<code>{_e(t['pipeline'])}</code>"), t.get("reason", "")])
            cls.append("" if t["status"] == "feasible" else "skipped")
        return rows, cls
    by_metric = any(isinstance(t.get("figures", {}).get("metric"), dict) for t in result.get("trials", []))
    headers = ["trial", "status", *[f"{o} ratio" for o in objs], "metric" if by_metric else "accuracy", "samples",
               "seconds", "pipeline", "why"]
    rows, cls = rows_for(result.get("front", []) + result.get("references", []))
    sections.append("<h2>Front (re-judged on every held-out sample) and references</h2>" + _table(headers, rows, cls))
    rows, cls = rows_for(result.get("trials", []))
    sections.append(f"<h2>Every trial</h2><details><summary>{len(rows)} trials</summary>"
                    + _table(headers, rows, cls) + "</details>")
    if result.get("notes"):
        sections.append("<h2>Warm start and budget</h2><ul>"
                        + "".join(f"<li>{_e(n)}</li>" for n in result["notes"]) + "</ul>")
    sub = (f"{len(result.get('trials', []))} trials on {_e(result.get('executor'))}, {result.get('seconds', 0):.0f} s, "
           f"objectives {', '.join(objs)}; judged on {result.get('coarse_samples')} held-out samples, the front on "
           f"{result.get('full_samples')}" + (f"; input {_e(source)}" if source else ""))
    return _page("onnxcomp search", sub, sections)
