"""Loss curve files: a CSV of every step and a dependency-free SVG line chart of it."""
from __future__ import annotations

import csv
from pathlib import Path

CURVE_COLUMNS = ("step", "seconds", "lr", "train_bpb", "heldout_bpb")


def read_curve_csv(path: Path) -> list[dict]:
    """Rows written by ``write_curve_csv`` (numbers as floats, empty cells as None)."""
    with open(path, newline="") as fh:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(fh)]


def write_curve_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CURVE_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CURVE_COLUMNS})


def write_curve_svg(rows: list[dict], path: Path, title: str, baseline: float | None = None) -> None:
    """Train bits per byte per step (grey), small held-out sample (blue), unigram baseline (dashed)."""
    w, h, left, right, top, bottom = 640, 360, 56, 16, 32, 40
    train = [(r["step"], r["train_bpb"]) for r in rows if r.get("train_bpb") is not None]
    held = [(r["step"], r["heldout_bpb"]) for r in rows if r.get("heldout_bpb") is not None]
    pts = train + held
    if not pts:
        return
    xmax = max(1, max(p[0] for p in pts))
    ys = [p[1] for p in pts] + ([baseline] if baseline is not None else [])
    ymin, ymax = 0.0, max(ys) * 1.05

    def sx(x: float) -> float:
        return left + (w - left - right) * x / xmax

    def sy(y: float) -> float:
        return top + (h - top - bottom) * (1 - (y - ymin) / (ymax - ymin))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11"><rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>']
    for i in range(6):  # y grid and labels
        y = ymin + (ymax - ymin) * i / 5
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.1f}</text>')
    for i in range(6):
        x = xmax * i / 5
        out.append(f'<text x="{sx(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{int(x)}</text>')
    out.append(f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle">step</text>')
    out.append(f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">'
               f'bits per byte</text>')
    if baseline is not None:
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{sy(baseline):.1f}" y2="{sy(baseline):.1f}" '
                   f'stroke="#c33" stroke-dasharray="4 3"/><text x="{w - right - 4}" y="{sy(baseline) - 4:.1f}" '
                   f'text-anchor="end" fill="#c33">unigram {baseline:.2f}</text>')
    if train:
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in train)
        out.append(f'<polyline points="{line}" fill="none" stroke="#888" stroke-width="1"/>')
    if held:
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in held)
        out.append(f'<polyline points="{line}" fill="none" stroke="#36c" stroke-width="2"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="#36c"/>' for x, y in held]
        out.append(f'<text x="{w - right - 4}" y="{top + 14}" text-anchor="end" fill="#36c">held-out sample '
                   f'{held[-1][1]:.2f}</text>')
    out.append("</svg>")
    Path(path).write_text("\n".join(out) + "\n")
