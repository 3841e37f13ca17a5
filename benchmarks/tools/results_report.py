"""pytest-benchmark JSON -> a markdown table and a PNG bar chart.

    python -m benchmarks.tools.results_report results.json --out DIR      # DIR/benchmarks.md, DIR/benchmarks.png

Table: one row per benchmark, in the order group, case, implementation; "vs reference" is the
reference's median over this one's (above 1: faster than the group's reference for the same
case). GB/s counts the bytes the call must move (see benchmarks/__init__.py), "% copy" is that
against a large device copy timed in the same session. Chart: one panel per group, the
speed-up over the reference per case, on a log axis.
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

GROUPS = ("batchrenorm-forward", "batchrenorm-forward-backward", "norm-block-forward",
          "norm-block-forward-backward", "noise", "ssim", "train-step", "inference")
REFERENCE = {"batchrenorm-forward": "reference", "batchrenorm-forward-backward": "reference",
             "norm-block-forward": "reference", "norm-block-forward-backward": "reference",
             "noise": "reference", "ssim": "skimage", "train-step": "br-unet-reference",
             "inference": "eager"}
IMPL_ORDER = ("reference", "skimage", "br-unet-reference", "reference-compiled", "ssim-fp64",
              "ssim-fp32", "ssim-fp32-compiled", "batchnorm2d", "d-unet-batchnorm2d", "triton",
              "br-unet-triton", "cuda", "br-unet-cuda", "cpu", "br-unet-cpu")
COLORS = {"reference": "#9e9e9e", "skimage": "#9e9e9e", "br-unet-reference": "#9e9e9e",
          "reference-compiled": "#6a3d9a", "ssim-fp32-compiled": "#6a3d9a",
          "ssim-fp64": "#b2abd2", "ssim-fp32": "#8073ac",
          "batchnorm2d": "#33a02c", "d-unet-batchnorm2d": "#33a02c",
          "triton": "#1f78b4", "br-unet-triton": "#1f78b4", "cuda": "#e31a1c", "br-unet-cuda": "#e31a1c",
          "cpu": "#ff7f00", "br-unet-cpu": "#ff7f00"}


def load_rows(data: dict) -> list[dict]:
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        group = info.get("group") or bench.get("group")
        rows.append({
            "group": group, "impl": info.get("impl", bench["name"]), "case": info.get("case", ""),
            "median": bench["stats"]["median"], "min": bench["stats"].get("min"),
            "rounds": bench["stats"].get("rounds"),
            "gbps": info.get("gbps"), "fraction_of_copy": info.get("fraction_of_copy"),
            "images_per_s": info.get("images_per_s"), "check": info.get("check", ""),
            "full_size": info.get("full_size"), "info": info,
        })
    for row in rows:  # speed-up over the group's reference on the same case
        ref = next((r for r in rows if r["group"] == row["group"] and r["case"] == row["case"]
                    and r["impl"] == REFERENCE.get(row["group"])), None)
        row["speedup"] = ref["median"] / row["median"] if ref else None
    order = {g: i for i, g in enumerate(GROUPS)}
    impl_order = {name: i for i, name in enumerate(IMPL_ORDER)}
    cases = list(OrderedDict.fromkeys(r["case"] for r in rows))  # as the run met them
    rows.sort(key=lambda r: (order.get(r["group"], len(order)), r["group"], cases.index(r["case"]),
                             impl_order.get(r["impl"], len(impl_order)), r["impl"]))
    return rows


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _ratio(v: float) -> str:
    return f"{v:.0f}×" if v >= 10 else f"{v:.2g}×"


def _session(data: dict, rows: list[dict]) -> dict:
    info = rows[0]["info"] if rows else {}
    machine = data.get("machine_info") or {}
    commit = data.get("commit_info") or {}
    loads = [r["info"].get("load_avg") for r in rows if r["info"].get("load_avg") is not None]
    return {
        "device": info.get("device", machine.get("cpu", {}).get("brand_raw", "?")),
        "copy_gbps": info.get("copy_gbps"), "size": info.get("size"), "torch": info.get("torch"),
        "date": (data.get("datetime") or "")[:10], "commit": (commit.get("id") or "")[:10],
        "dirty": commit.get("dirty"), "threads": info.get("threads"),
        "load": (min(loads), max(loads)) if loads else None,
    }


def markdown(data: dict, rows: list[dict]) -> str:
    s = _session(data, rows)
    lines = [f"Device: **{s['device']}**; copy bandwidth {s['copy_gbps']:.1f} GB/s (read + write, "
             f"measured in the same session); size `{s['size']}`; torch {s['torch']}; "
             f"{s['date']}; commit {s['commit']}{' (with uncommitted changes)' if s['dirty'] else ''}."
             if s["copy_gbps"] else "No benchmark rows."]
    if s["load"]:
        lines.append(f"Load average during the run: {s['load'][0]:.1f}-{s['load'][1]:.1f} "
                     f"on {s['threads']} threads (other work on the machine slows every row).")
    lines += ["", "Median (and fastest) of the timed rounds; on a busy machine the fastest round is "
              "the better guide. *vs ref*: the reference's median over this one's (above 1: faster). "
              "GB/s: the bytes the call must move over its median; % copy: of the copy bandwidth "
              "above. Cases not at their real size are marked (small).", "",
              "| group | implementation | case | median (min) | vs ref | GB/s | % copy | check |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        speed = f"{r['speedup']:.2f}×" if r["speedup"] else "–"
        gbps = f"{r['gbps']:.1f}" if r["gbps"] else (f"{r['images_per_s']:.0f} img/s" if r["images_per_s"] else "–")
        frac = f"{100 * r['fraction_of_copy']:.0f}%" if r["fraction_of_copy"] else "–"
        case = r["case"] + (" (small)" if r["full_size"] is False else "")
        check = r["check"]
        if check.startswith("FAILED"):
            check = "**differs from its check** (see JSON)"
        fastest = f" ({_time(r['min'])})" if r["min"] else ""
        lines.append(f"| {r['group']} | {r['impl']} | {case} | {_time(r['median'])}{fastest} | {speed} | "
                     f"{gbps} | {frac} | {check} |")
    return "\n".join(lines) + "\n"


def chart(data: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    groups = [g for g in list(OrderedDict.fromkeys(r["group"] for r in rows))
              if any(r["speedup"] and r["impl"] != REFERENCE.get(g) for r in rows if r["group"] == g)]
    if not groups:
        return
    heights = [1.2 + 0.42 * len({r["case"] for r in rows if r["group"] == g}) for g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(12.5, sum(heights) + 1.2),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    s = _session(data, rows)
    fig.suptitle(f"Speed-up over each group's reference (the line at 1×; log scale, right = faster)\n"
                 f"{s['device']}, {s['date']}, size {s['size']}", fontsize=11)
    for ax, group in zip(axes[:, 0], groups):
        # the reference is the line at 1, not a bar
        members = [r for r in rows if r["group"] == group and r["speedup"]
                   and r["impl"] != REFERENCE.get(group)]
        if not members:
            continue
        cases = list(OrderedDict.fromkeys(r["case"] for r in members))
        impls = sorted({r["impl"] for r in members},
                       key=lambda n: IMPL_ORDER.index(n) if n in IMPL_ORDER else len(IMPL_ORDER))
        bar = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            ys, xs, labels = [], [], []
            for i, case in enumerate(cases):
                r = next((m for m in members if m["case"] == case and m["impl"] == impl), None)
                if r:
                    ys.append(i - 0.4 + bar * (j + 0.5))
                    xs.append(r["speedup"])
                    wrong = r["check"].startswith("FAILED")
                    labels.append(_ratio(r["speedup"]) + (" (wrong grads)" if wrong else ""))
            # bars grow from the line at 1: right when faster, left when slower
            ax.barh(ys, [x - 1 for x in xs], left=1, height=bar * 0.9, label=impl, color=COLORS.get(impl))
            for y, x, text in zip(ys, xs, labels):
                ax.text(x * 1.04 if x >= 1 else x / 1.04, y, text, va="center", fontsize=7,
                        ha="left" if x >= 1 else "right")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _ratio(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels([c + ("" if any(m["full_size"] is not False for m in members if m["case"] == c)
                                 else " (small)") for c in cases], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{group} (reference: {REFERENCE.get(group)})", fontsize=10, loc="left")
        xs_all = [r["speedup"] for r in members]
        ax.set_xlim(min(xs_all + [1]) / 3, max(xs_all + [1]) * 3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.grid(axis="x", which="both", alpha=0.25)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="the file --benchmark-json wrote")
    p.add_argument("--out", type=Path, default=None, help="directory for benchmarks.md and .png "
                   "(default: beside the JSON)")
    args = p.parse_args(argv)
    data = json.loads(args.json.read_text())
    rows = load_rows(data)
    out = args.out or args.json.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.md").write_text(markdown(data, rows))
    chart(data, rows, out / "benchmarks.png")
    print(f"{len(rows)} rows -> {out / 'benchmarks.md'}, {out / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
