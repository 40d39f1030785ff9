"""The stdout tables: one block per (subject, method or model, mode or task), providers as columns.

A cell is the median time in ms and, for providers other than fastpeft, `time / fastpeft's time` measured in the
same run (above 1: fastpeft is faster). fastpeft's cell adds its fraction of the measured copy bandwidth (micro).
"""

from __future__ import annotations

from collections import defaultdict


def _cell(record: dict) -> str:
    if record.get("status") != "ok":
        return record.get("status", "?")
    text = f"{record['ms']['p50']:.3f}"
    if record["provider"] == "fastpeft":
        if "frac_copy_bw" in record:
            text += f" ({record['frac_copy_bw']:.0%} bw)"
    elif record.get("ratio_to_fastpeft") is not None:
        text += f" {record['ratio_to_fastpeft']:.2f}x"
    return text


def _block(title: str, rows: dict, providers: list[str]) -> list[str]:
    widths = [max(len("case"), *(len(r) for r in rows))]
    cells = {row: {p: _cell(rec) for p, rec in recs.items()} for row, recs in rows.items()}
    for p in providers:
        widths.append(max(len(p), *(len(cells[row].get(p, "-")) for row in rows)))
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(["case", *providers], widths))]
    for row in rows:
        values = [row] + [cells[row].get(p, "-") for p in providers]
        lines.append("  ".join(v.ljust(w) for v, w in zip(values, widths)))
    return lines


def table(records: list[dict]) -> str:
    """The tables of one subject's records."""
    blocks: dict = defaultdict(lambda: defaultdict(dict))
    order: dict = defaultdict(list)
    for r in records:
        if r["subject"] == "e2e":
            title, row = f"e2e | {r['model']} | {r['task']}  (ms per call)", r["method"]
        elif r["subject"] == "ceiling":
            title, row = "ceilings", r["case"]
        else:
            title, row = f"{r['subject']} | {r['method']} | {r['mode']}  (ms, median)", r["case"]
        blocks[title][row][r["provider"]] = r
        if r["provider"] not in order[title]:
            order[title].append(r["provider"])
    lines = ["cells: median ms; 'Nx': that provider's time / fastpeft's in this run (above 1: fastpeft is faster); "
             "'(bw)': fastpeft's fraction of the measured copy bandwidth", ""]
    for title, rows in blocks.items():
        lines.extend(_block(title, rows, order[title]))
        lines.append("")
    notes = _problems(records)
    if notes:
        lines.append("not measured:")
        lines.extend(f"  {n}" for n in notes)
    return "\n".join(lines)


def _problems(records: list[dict]) -> list[str]:
    """One line per (status, reason): what was not measured (or fell back) and why."""
    groups: dict = defaultdict(list)
    for r in records:
        if r.get("status") in ("skipped", "error"):
            key = (r["status"], r.get("reason"))
        elif r.get("fallback"):
            key = ("fell back to the reference path", r["fallback"])
        else:
            continue
        item = f"{r['provider']}/{r['method']}/{r.get('model') or r['case']}"
        if item not in groups[key]:
            groups[key].append(item)
    lines = []
    for (status, reason), items in groups.items():
        shown = ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")
        lines.append(f"{status}: {reason}\n    {shown}")
    return lines


def ceilings_line(ceil: dict) -> str:
    return f"ceilings: copy {ceil['copy_gbps']:.1f} GB/s, matmul {ceil['matmul_tflops']:.2f} TFLOP/s"
