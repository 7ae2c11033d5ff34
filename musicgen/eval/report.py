"""What an evaluation leaves behind: a console table in the model card's form, a JSON report (values,
settings, package versions, weight hashes, skipped clips), per-clip values as CSV, and an SVG plot of the
per-clip scores (written by hand: no plotting package needed)."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ..files import write_atomically
from .metrics import Report

LABELS = {"fad": "FAD (VGGish)", "fad-clap": "FAD (CLAP)", "kl": "KL (PaSST)", "clap": "CLAP score",
          "chroma": "chroma cosine"}


def table(report: Report) -> str:
    rows = [("metric", "value", "clips")]
    for name, v in report.values.items():
        rows.append((LABELS.get(name, name), f"{v['value']:.4f}", str(v["clips"])))
        if "fad_inf" in v:
            rows.append((f"{LABELS.get(name, name)} ∞", f"{v['fad_inf']['value']:.4f}", str(v["clips"])))
        if name == "kl":
            rows.append(("KL (gen ‖ ref)", f"{v['kl_gen_ref']:.4f}", str(v["clips"])))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if report.skipped:
        lines.append(f"{len(report.skipped)} clip(s) skipped for some metric: see the JSON report")
    return "\n".join(lines)


def atomic_write(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def to_json(report: Report, settings: dict) -> str:
    return json.dumps({"metrics": report.values, "settings": settings, "skipped": report.skipped,
                       "notes": report.notes}, indent=2, ensure_ascii=False)


def to_csv(report: Report) -> str:
    columns = sorted({c for row in report.per_clip.values() for c in row})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", *columns])
    for key in sorted(report.per_clip):
        row = report.per_clip[key]
        w.writerow([key, *("" if row.get(c) is None else f"{row[c]:.6g}" for c in columns)])
    return buf.getvalue()


def to_svg(report: Report) -> str:
    """One histogram of the per-clip values per metric, side by side."""
    columns = sorted({c for row in report.per_clip.values() for c in row})
    W, H, pad, bins = 260, 180, 30, 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(1, len(columns)) * W}" height="{H}" '
             f'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for i, col in enumerate(columns):
        vals = [row[col] for row in report.per_clip.values() if row.get(col) is not None and math.isfinite(row[col])]
        x0 = i * W
        parts.append(f'<text x="{x0 + W / 2}" y="14" text-anchor="middle">{LABELS.get(col, col)} per clip '
                     f'(n={len(vals)})</text>')
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        span = (hi - lo) or 1.0
        counts = [0] * bins
        for v in vals:
            counts[min(bins - 1, int((v - lo) / span * bins))] += 1
        top, bw = max(counts), (W - 2 * pad) / bins
        for b, n in enumerate(counts):
            h = (H - 2 * pad) * n / top
            parts.append(f'<rect x="{x0 + pad + b * bw:.1f}" y="{H - pad - h:.1f}" width="{bw - 1:.1f}" '
                         f'height="{h:.1f}" fill="#4a7ab5"/>')
        parts.append(f'<line x1="{x0 + pad}" y1="{H - pad}" x2="{x0 + W - pad}" y2="{H - pad}" stroke="black"/>')
        parts.append(f'<text x="{x0 + pad}" y="{H - pad + 14}">{lo:.3g}</text>')
        parts.append(f'<text x="{x0 + W - pad}" y="{H - pad + 14}" text-anchor="end">{hi:.3g}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write(report: Report, settings: dict, json_path: Path) -> list[Path]:
    """The JSON report at json_path, the CSV and the SVG beside it (same name, other suffix)."""
    json_path = Path(json_path)
    out = [json_path, json_path.with_suffix(".csv"), json_path.with_suffix(".svg")]
    for path, text in zip(out, (to_json(report, settings), to_csv(report), to_svg(report))):
        atomic_write(path, text)
    return out
