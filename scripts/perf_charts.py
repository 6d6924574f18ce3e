#!/usr/bin/env python3
"""Draw `benches/compare.py --json` results as an SVG bar chart (standard library only).

    python scripts/perf_charts.py docs/src/performance/inference-zen3.json docs/src/performance/inference-zen3.svg

One group of bars per case: this crate and each peer that ran it, the bar's length the
median milliseconds relative to the slowest engine of that case (cases differ a hundredfold
in size, so each group has its own scale), labelled with the milliseconds and, for a peer,
peer / ours (above 1: this crate is faster). The CPU, the thread count and the date are
in the title, the command in the footer. `--table` also prints the same numbers as a
Markdown table (the one beside the chart in the book).
"""

import argparse
import html
import json

ENGINES = [("ours", "this crate", "#2b6cb0"), ("pytorch", "PyTorch eager", "#dd6b20"),
           ("ort", "ONNX Runtime", "#718096"), ("candle-tf", "candle-transformers", "#38a169")]
NAMES = {"resnet50": "ResNet-50", "resnet20": "CIFAR ResNet-20", "resnext50_32x4d": "ResNeXt-50 32x4d",
         "resnet50d": "ResNet-50-D", "seresnext50_32x4d": "SE-ResNeXt-50", "resnetv2_50": "ResNet-V2-50"}

WIDTH, LABEL_WIDTH, BAR_HEIGHT, GAP, TOP = 860, 190, 15, 12, 90
BAR_SPACE = WIDTH - LABEL_WIDTH - 190


def chart(report):
    cases = report["cases"]
    engines = [e for e in ENGINES if any(e[0] in c["median_ms"] for c in cases)]
    what = "training step" if report["mode"] == "train" else "inference batch"
    isa = report.get("ours_isa", "auto")
    title = (f"{what}, median ms, f32, {report['threads']} threads: {report['cpu']}"
             f" ({', '.join(report.get('cpu_flags', [])) or 'no SIMD flags'})")
    if isa != "auto":
        title += f", ours forced to {isa}"
    rows = []
    y = TOP
    for case in cases:
        times = case["median_ms"]
        present = [e for e in engines if times.get(e[0])]
        slowest = max(times[name] for name, _, _ in present)
        label = f"{NAMES.get(case['arch'], case['arch'])}, batch {case['batch']}"
        group_height = len(present) * BAR_HEIGHT
        rows.append(text(LABEL_WIDTH - 10, y + group_height / 2 + 4, label, anchor="end", weight="bold"))
        for name, _, colour in present:
            ms = times[name]
            length = max(1.0, BAR_SPACE * ms / slowest)
            rows.append(f'<rect x="{LABEL_WIDTH}" y="{y + 1}" width="{length:.1f}" '
                        f'height="{BAR_HEIGHT - 2}" fill="{colour}"/>')
            note = f"{ms:.1f} ms"
            if name != "ours" and times.get("ours"):
                ratio = ms / times["ours"]
                note += f"  {ratio:.2f}x"
            rows.append(text(LABEL_WIDTH + length + 6, y + BAR_HEIGHT - 4, note, size=11))
            y += BAR_HEIGHT
        y += GAP
    legend = []
    x = LABEL_WIDTH
    for _, label, colour in engines:
        legend.append(f'<rect x="{x}" y="40" width="12" height="12" fill="{colour}"/>')
        legend.append(text(x + 16, 50, label, size=12))
        x += 30 + 7 * len(label)
    height = y + 30
    footer = text(10, height - 10, f"{report['date']}: {report['command']}", size=10, fill="#555")
    key = text(10, 72, "Nx beside a peer: its time / ours (above 1: this crate is faster). "
               "Each case has its own scale.", size=11, fill="#555")
    body = "\n".join([text(10, 22, title, size=13, weight="bold"), *legend, key, *rows, footer])
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


def table(report):
    """The results as a Markdown table: milliseconds, and peer / ours for each peer."""
    cases = report["cases"]
    engines = [e for e in ENGINES if any(e[0] in c["median_ms"] for c in cases)]
    peers = [e for e in engines if e[0] != "ours"]
    with_peak = any(c.get("fraction_of_peak") for c in cases)
    short = {"ours": "ours", "pytorch": "PyTorch", "ort": "ORT", "candle-tf": "candle-tf"}
    header = ["case"] + [f"{short[name]} ms" for name, _, _ in engines] \
        + [f"{short[name]} / ours" for name, _, _ in peers]
    if with_peak:
        header += [f"{short[name]} % peak" for name, _, _ in engines]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for case in cases:
        times = case["median_ms"]
        cells = [f"{NAMES.get(case['arch'], case['arch'])}, batch {case['batch']}"]
        cells += [f"{times[name]:.1f}" if times.get(name) else "-" for name, _, _ in engines]
        cells += [f"{times[name] / times['ours']:.2f}x" if times.get(name) and times.get("ours") else "-"
                  for name, _, _ in peers]
        if with_peak:
            fractions = case.get("fraction_of_peak") or {}
            cells += [f"{fractions[name]:.0%}" if fractions.get(name) else "-" for name, _, _ in engines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text(x, y, content, size=12, anchor="start", weight="normal", fill="#111"):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}">{html.escape(content)}</text>')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a JSON file written by benches/compare.py --json")
    parser.add_argument("svg", help="where to write the chart")
    parser.add_argument("--table", action="store_true", help="also print a Markdown table")
    args = parser.parse_args()
    with open(args.results) as source:
        report = json.load(source)
    if not report.get("cases"):
        raise SystemExit(f"{args.results}: no cases in it (expected compare.py --json output)")
    with open(args.svg, "w") as out:
        out.write(chart(report))
    if args.table:
        print(table(report))


if __name__ == "__main__":
    main()
