"""One page per run: RUN_DIR/report.html (self-contained: inline CSS, images as data URIs) and its
Markdown twin RUN_DIR/report.md (images as files: RUN_DIR/report_files/*.png and RUN_DIR/eval/*.png).

Sections: summary, training curves (from metrics.jsonl), evaluations (every RUN_DIR/eval/*.json
holding a "protocol" key: one row per numeric entry), plots (RUN_DIR/eval/*.png), the resolved
config (config.yaml verbatim) and the environment the report was made in.
"""
from __future__ import annotations

import base64
import html
import json
import os
import platform
import subprocess
from pathlib import Path

from .. import __version__
from ..atomic import replacing, write_text
from ..errors import ConfigError

SECTIONS = ("Summary", "Training curves", "Evaluations", "Plots", "Configuration", "Environment")
NONE_YET = "none yet"
MAX_TABLE_ROWS = 50   # of a list inside an eval file (a sweep, a per-epoch history)


def read_events(run_dir: Path) -> list[dict]:
    """The events of RUN_DIR/metrics.jsonl ([] when there is none); unreadable lines are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    events = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(e, dict):
                events.append(e)
    return events


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def eval_results(run_dir: Path) -> list[dict]:
    """Every RUN_DIR/eval/*.json object with a "protocol" key, sorted by file name, as
    {"file", "rows": [(metric, value, protocol)], "tables": {key: [row dicts]}}.

    A metric is any top-level number; its protocol is `protocol_<part>` when the metric's name has
    that part (knn_bank_top1 -> protocol_bank), else `protocol`. Top-level lists of flat objects
    (e.g. a kNN sweep) become tables."""
    out = []
    for path in sorted((Path(run_dir) / "eval").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or "protocol" not in data:
            continue
        rows, tables = [], {}
        for key, value in data.items():
            if _number(value):
                rows.append((key, value, str(data[_protocol_key(key, data)])))
            elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                tables[key] = value
        out.append({"file": path.name, "rows": rows, "tables": tables})
    return out


def _protocol_key(metric: str, data: dict) -> str:
    """The protocol of `metric` in an eval file: `protocol_<prefix>` when the metric's name starts with
    that prefix (baseline_pixels_top1 -> protocol_baseline_pixels), else `protocol_<part>` for a part of
    its name (knn_bank_top1 -> protocol_bank), else `protocol`."""
    prefixes = [k for k in data if k.startswith("protocol_") and metric.startswith(k[len("protocol_"):] + "_")]
    if prefixes:
        return max(prefixes, key=len)
    tags = [t for t in metric.split("_") if f"protocol_{t}" in data]
    return f"protocol_{tags[0]}" if tags else "protocol"


def read_knn_eval(run_dir: Path) -> dict:
    """RUN_DIR/eval/knn.json (`selfsup eval knn`), or {} when there is none or it is unreadable."""
    try:
        data = json.loads((Path(run_dir) / "eval" / "knn.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def plot_curves(events: list[dict], path: Path, baselines: dict | None = None) -> Path | None:
    """PNG of loss, learning rate, kNN top-1 and the collapse alarm's embed_std (left axis) and embed_rank
    (right axis) against step (top row) and wall time (bottom row); None when there is no train event.
    `baselines` ({name: top-1}): horizontal lines on the kNN panels."""
    train = [e for e in events if e.get("event") == "train" and _number(e.get("step"))]
    if not train:
        return None
    knn = [e for e in events if e.get("event") == "knn" and _number(e.get("knn_top1"))]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4, squeeze=False)
    panels = [("loss", train, ["loss"]), ("learning rate", train, ["lr"]),
              ("kNN top-1", knn, ["knn_top1", "knn_bank_top1"]),
              ("embeddings: std (left), effective rank (right)", train, ["embed_std", "embed_rank"])]
    for row, (xkey, xlabel) in enumerate([("step", "step"), ("wall_time", "wall time (s)")]):
        for col, (title, evs, keys) in enumerate(panels):
            ax = axes[row, col]
            drawn = False
            for i, key in enumerate(keys):
                pts = [(e[xkey], e[key]) for e in evs if _number(e.get(xkey)) and _number(e.get(key))]
                if pts:
                    x, y = zip(*pts)
                    on = ax.twinx() if key == "embed_rank" else ax   # its own scale: 1 .. D
                    on.plot(x, y, marker="o" if len(pts) < 30 else None, markersize=3, label=key, color=f"C{i}")
                    drawn = True
            if title == "kNN top-1":
                for i, (name, value) in enumerate((baselines or {}).items()):
                    ax.axhline(value, color=f"C{i + 2}", linestyle="--", linewidth=1, label=f"baseline: {name}")
                    drawn = True
            if not drawn:
                ax.text(0.5, 0.5, f"no {title} yet", ha="center", va="center", transform=ax.transAxes)
            elif (len(keys) > 1 and any(_number(e.get(keys[1])) for e in evs) and keys[1] != "embed_rank") or \
                    (title == "kNN top-1" and baselines):
                ax.legend(fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(xlabel, fontsize=9)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:   # never half a PNG
        fig.savefig(tmp, format="png")
    return Path(path)


def environment() -> dict:
    """Versions, device and git commit of the machine making the report (the run's own environment
    is not recorded in the run directory)."""
    import torch
    import torchvision

    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    else:
        device = f"cpu: {platform.processor() or platform.machine()}"
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        if commit:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            commit += " (uncommitted changes)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "selfsup": __version__, "device": device, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "git_commit": commit or "unavailable"}


def _summary(run_dir: Path, cfg_text: str, events: list[dict]) -> list[tuple[str, str]]:
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.create(cfg_text) if cfg_text.strip() else OmegaConf.create({})
    except Exception:   # a hand-edited config that no longer parses still gets a report
        cfg = OmegaConf.create({})

    def get(key):
        v = OmegaConf.select(cfg, key, default=None)
        return "-" if v is None else str(v)

    final = next((e for e in reversed(events) if e.get("event") == "final"), None)
    knn = final if final and "knn_top1" in final else next(
        (e for e in reversed(events) if e.get("event") == "knn"), None)
    last_train = next((e for e in reversed(events) if e.get("event") == "train"), {})
    rows = [("run directory", str(run_dir)), ("method", get("method")), ("preset", get("preset")),
            ("backbone", get("model.backbone")), ("dataset", get("data.name")),
            ("steps", str((final or last_train).get("step", NONE_YET))),
            ("epochs", str((final or last_train).get("epoch", NONE_YET))),
            ("final loss", _fmt((final or last_train).get("loss"))),
            ("training finished", "yes" if final else "no (no final event in metrics.jsonl)")]
    if knn:
        rows += [("final kNN top-1", _fmt(knn.get("knn_top1"))), ("final kNN top-5", _fmt(knn.get("knn_top5"))),
                 ("kNN protocol", str(knn.get("protocol", "-")))]
        if "knn_bank_top1" in knn:
            rows.append(("final kNN top-1 (memory bank)", _fmt(knn["knn_bank_top1"])))
        for t in KNN_MILESTONES:
            first = time_to_knn(events, t)
            rows.append((f"first kNN top-1 >= {t:.2f}", "not reached" if first is None else
                         f"{first['wall_time']:.0f} s wall time (epoch {first.get('epoch', '-')}, "
                         f"step {first.get('step', '-')})"))
    else:
        rows.append(("final kNN", NONE_YET))
    rows += _gain_rows(read_knn_eval(run_dir))
    return rows


def _gain_rows(knn: dict) -> list[tuple[str, str]]:
    """Summary rows of `selfsup eval knn --baselines` (eval/knn.json): the result beside each baseline."""
    from .baselines import BASELINES, gains

    found = gains(knn)
    if not found:
        return []
    rows = [("kNN top-1 (eval knn)", f"{knn['knn_top1']:.4f} ({knn.get('protocol', '-')})")]
    rows += [(f"gain over {BASELINES[name]}", f"{gain:+.4f} (baseline {base:.4f})") for name, (base, gain) in found.items()]
    return rows


KNN_MILESTONES = (0.85, 0.90)


def time_to_knn(events: list[dict], threshold: float) -> dict | None:
    """The first kNN event of a run whose top-1 reaches `threshold` (it has wall_time, epoch, step),
    or None. Wall time is training time, the kNN evaluations included."""
    return next((e for e in events if e.get("event") == "knn" and e.get("knn_top1", -1) >= threshold
                 and "wall_time" in e), None)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return str(v)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{border-bottom:2px solid #444}
h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:85%}img{max-width:100%;border:1px solid #ddd}
.none{color:#888;font-style:italic}figure{margin:1em 0}figcaption{font-size:90%;color:#555}"""


def _html_table(header, rows, numeric=()) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{e(str(c))}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _md_cell(c) -> str:
    return str(c).replace("|", "\\|").replace("\n", " ")


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> dict:
    """Write RUN_DIR/report.html and RUN_DIR/report.md (and RUN_DIR/report_files/curves.png when
    metrics.jsonl has train events). Returns {"html", "markdown", "curves", "evals", "plots"}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory '{run_dir}' does not exist")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory: {cfg_path} is missing")
    cfg_text = cfg_path.read_text()
    events = read_events(run_dir)
    from .baselines import BASELINES, gains

    lines = {BASELINES[n]: base for n, (base, _) in gains(read_knn_eval(run_dir)).items()}
    curves = plot_curves(events, run_dir / "report_files" / "curves.png", lines)
    evals = eval_results(run_dir)
    plots = sorted((run_dir / "eval").glob("*.png"))
    env = environment()
    summary = _summary(run_dir, cfg_text, events)
    title = f"selfsup report: {run_dir.name}"
    e = html.escape

    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style></head><body>",
         f"<h1>{e(title)}</h1>"]
    m = [f"# {title}", ""]

    def section(name):
        h.append(f"<h2>{e(name)}</h2>")
        m.extend([f"## {name}", ""])

    def none_yet(what=""):
        h.append(f"<p class=none>{e(what + NONE_YET)}</p>")
        m.extend([f"_{what}{NONE_YET}_", ""])

    section("Summary")
    h.append(_html_table(("", ""), summary))
    m.extend([_md_table(("item", "value"), summary), ""])

    section("Training curves")
    if curves:
        h.append(f"<figure><img alt='training curves' src='{_data_uri(curves)}'><figcaption>loss, learning rate "
                 "and kNN top-1 against step (top) and wall time (bottom), from metrics.jsonl</figcaption></figure>")
        m.extend([f"![training curves]({curves.relative_to(run_dir).as_posix()})", ""])
    else:
        none_yet("no train events in metrics.jsonl: ")

    section("Evaluations")
    if evals:
        rows = [(ev["file"], k, _fmt(v), p) for ev in evals for k, v, p in ev["rows"]]
        h.append(_html_table(("file", "metric", "value", "protocol"), rows, numeric=(2,)))
        m.extend([_md_table(("file", "metric", "value", "protocol"), rows), ""])
        for ev in evals:
            for key, table in ev["tables"].items():
                cols = list(dict.fromkeys(c for r in table for c in r))
                trows = [[_fmt(r.get(c)) for c in cols] for r in table[:MAX_TABLE_ROWS]]
                more = f" (first {MAX_TABLE_ROWS} of {len(table)} rows)" if len(table) > MAX_TABLE_ROWS else ""
                h.append(f"<p><b>{e(ev['file'])}: {e(key)}</b>{e(more)}</p>" + _html_table(cols, trows))
                m.extend([f"**{ev['file']}: {key}**{more}", "", _md_table(cols, trows), ""])
    else:
        none_yet("no eval/*.json with a protocol: ")

    section("Plots")
    if plots:
        for p in plots:
            h.append(f"<figure><img alt='{e(p.name)}' src='{_data_uri(p)}'>"
                     f"<figcaption>{e(p.name)}</figcaption></figure>")
            m.extend([f"![{p.stem}]({p.relative_to(run_dir).as_posix()})", ""])
    else:
        none_yet("no eval/*.png: ")

    section("Configuration")
    h.append(f"<p>config.yaml, verbatim:</p><pre>{e(cfg_text)}</pre>")
    m.extend(["config.yaml, verbatim:", "", "```yaml", cfg_text.rstrip("\n"), "```", ""])

    section("Environment")
    env_rows = list(env.items())
    h.append("<p>Of the machine that made this report.</p>" + _html_table(("", ""), env_rows))
    m.extend(["Of the machine that made this report.", "", _md_table(("item", "value"), env_rows), ""])
    h.append("</body></html>\n")

    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    write_text(html_path, "\n".join(h))
    write_text(md_path, "\n".join(m))
    return {"html": str(html_path), "markdown": str(md_path), "curves": str(curves) if curves else None,
            "evals": [ev["file"] for ev in evals], "plots": [str(p) for p in plots]}
