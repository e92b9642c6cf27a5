"""Report folders: ``report.json`` plus PNG figures, rendered to Markdown/HTML.

A report folder holds ``report.json``::

    {"title": str, "created": str, "sections": [
        {"title": str, "text": str, "pre": str,
         "table": {"columns": [str, ...], "rows": [[...], ...]},
         "figures": [{"file": "name.png", "caption": str}, ...]}, ...]}

(every section key but ``title`` optional) and the PNG files it names.
:func:`render` turns it into ``report.md`` (figures linked) and a
self-contained ``report.html`` (figures embedded as data URIs), so the HTML
file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis._runfiles import atomic_path, write_json

REPORT_FILE = "report.json"


# -- rendering ----------------------------------------------------------------------


def read_report(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / REPORT_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"report folder {str(folder)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(
            f"report folder {str(folder)!r} must hold {REPORT_FILE} "
            "(written by opx train, opx report or opx demo); it does not"
        )
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("sections"), list):
        raise ValueError(f"{str(path)!r} must hold a report with a list of sections")
    return report


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def to_markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# {report.get('title', 'Report')}", ""]
    if report.get("created"):
        lines += [f"Created {report['created']}.", ""]
    for sec in report["sections"]:
        lines += [f"## {sec.get('title', '')}", ""]
        if sec.get("text"):
            lines += [sec["text"].strip(), ""]
        table = sec.get("table")
        if table:
            cols = [str(c) for c in table["columns"]]
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "|".join("---" for _ in cols) + "|")
            for row in table["rows"]:
                lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
            lines.append("")
        if sec.get("pre"):
            lines += ["```text", sec["pre"].rstrip(), "```", ""]
        for fig in sec.get("figures", []):
            lines += [f"![{fig.get('caption', '')}]({fig['file']})", ""]
            if fig.get("caption"):
                lines += [f"*{fig['caption']}*", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1.5em 0; } img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #555; }
"""


def to_html(report: Mapping[str, Any], folder: Path) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(report.get('title', 'Report'))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(report.get('title', 'Report'))}</h1>",
    ]
    if report.get("created"):
        parts.append(f"<p>Created {esc(report['created'])}.</p>")
    for sec in report["sections"]:
        parts.append(f"<h2>{esc(sec.get('title', ''))}</h2>")
        for para in (sec.get("text") or "").strip().split("\n\n"):
            if para.strip():
                parts.append(f"<p>{esc(para.strip())}</p>")
        table = sec.get("table")
        if table:
            parts.append("<table><tr>")
            parts += [f"<th>{esc(str(c))}</th>" for c in table["columns"]]
            parts.append("</tr>")
            for row in table["rows"]:
                cells = "".join(f"<td>{esc(_fmt(v))}</td>" for v in row)
                parts.append(f"<tr>{cells}</tr>")
            parts.append("</table>")
        if sec.get("pre"):
            parts.append(f"<pre>{esc(sec['pre'].rstrip())}</pre>")
        for fig in sec.get("figures", []):
            png = folder / fig["file"]
            if not png.is_file():
                raise FileNotFoundError(
                    f"figure {fig['file']!r} named in {REPORT_FILE} is missing "
                    f"from {str(folder)!r}"
                )
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            caption = esc(fig.get("caption", ""))
            parts.append(
                f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def render(folder: str | os.PathLike, *, fmt: str = "both") -> list[Path]:
    """Write ``report.md`` and/or ``report.html`` from a report folder."""
    if fmt not in ("html", "md", "both"):
        raise ValueError(f"fmt must be one of html, md, both; got {fmt!r}")
    folder = Path(folder)
    report = read_report(folder)
    written = []
    if fmt in ("md", "both"):
        path = folder / "report.md"
        with atomic_path(path) as tmp:
            tmp.write_text(to_markdown(report), encoding="utf-8")
        written.append(path)
    if fmt in ("html", "both"):
        path = folder / "report.html"
        with atomic_path(path) as tmp:
            tmp.write_text(to_html(report, folder), encoding="utf-8")
        written.append(path)
    return written


def write_report(folder: str | os.PathLike, title: str, sections: list[dict]) -> Path:
    """Write ``report.json`` (atomically) and render it to Markdown and HTML."""
    folder = Path(folder)
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_json(
        folder / REPORT_FILE, {"title": title, "created": created, "sections": sections}
    )
    render(folder)
    return folder


# -- figures --------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    _plt().close(fig)
    return path


def _display(img: np.ndarray) -> tuple[np.ndarray, dict]:
    """(C, H, W) -> something imshow shows, min-max scaled per image."""
    img = np.asarray(img, dtype=np.float64)
    lo, hi = float(img.min()), float(img.max())
    scaled = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if img.shape[0] == 3:
        return np.transpose(scaled, (1, 2, 0)), {}
    return scaled[0], {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}


def plot_inputs_outputs(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray]], *, max_cols=6
):
    """Grid of input images with the network's outputs beneath them.

    ``rows``: (label, inputs (n, C, H, W), outputs (n, C, H, W)). Each row of
    the figure pair shows inputs on top and outputs below; every image is
    min-max scaled on its own, so a sign-flipped output shows as a negative.
    """
    plt = _plt()
    n_cols = max(min(max_cols, len(x)) for _, x, _ in rows)
    fig, axes = plt.subplots(
        2 * len(rows), n_cols, figsize=(1.4 * n_cols + 1.2, 2.8 * len(rows)),
        squeeze=False,
    )  # fmt: skip
    for r, (label, xs, ys) in enumerate(rows):
        for c in range(n_cols):
            for j, (imgs, what) in enumerate(((xs, "input"), (ys, "output"))):
                ax = axes[2 * r + j, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(imgs):
                    img, kw = _display(imgs[c])
                    ax.imshow(img, interpolation="nearest", **kw)
                else:
                    ax.axis("off")
                if c == 0:
                    ax.set_ylabel(f"{label}\n{what}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_moduli(w: np.ndarray, title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    mod = np.sort(np.abs(np.asarray(w)))[::-1]
    ax.plot(np.arange(1, len(mod) + 1), mod, "o-", ms=3)
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xlabel("index (by decreasing modulus)")
    ax.set_ylabel("|eigenvalue|")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_eigenvectors(vectors: np.ndarray, input_shape, title: str, k: int = 8):
    """Real and imaginary parts of the top-k eigenvectors as images."""
    plt = _plt()
    v = np.asarray(vectors)[:, :k]
    k = v.shape[1]
    fig, axes = plt.subplots(2, k, figsize=(1.3 * k + 1, 3), squeeze=False)
    for i in range(k):
        for j, part in enumerate((v[:, i].real, v[:, i].imag)):
            ax = axes[j, i]
            ax.set_xticks([])
            ax.set_yticks([])
            if np.allclose(part, 0):
                ax.axis("off")
                continue
            img, kw = _display(part.reshape(input_shape))
            ax.imshow(img, interpolation="nearest", **kw)
            if i == 0:
                ax.set_ylabel(("real", "imag")[j], fontsize=8)
        axes[0, i].set_title(f"v{i + 1}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# -- the analysis of one model -----------------------------------------------------


def forward(model, images: np.ndarray) -> np.ndarray:
    """Run the model in float64 on the CPU, without gradients."""
    import torch

    model = model.cpu().double().eval()
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(images), dtype=torch.float64)
        return model(x).numpy()


def analyse_and_write(
    out: str | os.PathLike,
    model,
    images: np.ndarray,
    cfg: Mapping[str, Any],
    *,
    history=None,
    title: str = "Report",
):
    """Export, analyse, plot and write a report folder for one trained model.

    Returns the memorization report.
    """
    from analysis import _pipeline as pipe
    from analysis import io as aio

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().double().eval()
    shape = tuple(model.input_shape)
    report = aio.export_results(
        out / "result.h5",
        model,
        images,
        history=history,
        config=dict(cfg),
        **pipe.analysis_options(cfg),
    )
    sections = [{"title": "Memorization report", "pre": str(report)}]

    if cfg["output"].get("figures", True):
        sections += figure_sections(out, model, images, shape, cfg, report)
    write_report(out, title, sections)
    return report


def figure_sections(out: Path, model, images, shape, cfg, report, prefix: str = ""):
    """Spectrum, eigenvector and input/output figures for one model."""
    from analysis import data

    w = np.asarray(report.eigenvalues)
    v = report.eigenvectors
    if v is None:
        import opextract
        from analysis import eigs

        A = opextract.to_sparse(model, shape, layout=report.layout)
        w, v = eigs(A, len(w))
    if report.layout == "padded":
        from analysis import eigenvector_images

        imgs = eigenvector_images(v, shape, layout="padded")  # (k, 2, C, H, W)
        v = (imgs[:, 0] + 1j * imgs[:, 1]).reshape(len(imgs), -1).T
    sections = []
    f1 = save_figure(
        plot_moduli(w, f"top {len(w)} eigenvalue moduli"), out / f"{prefix}moduli.png"
    )
    f2 = save_figure(
        plot_eigenvectors(v, shape, "top eigenvectors (each min-max scaled)"),
        out / f"{prefix}eigenvectors.png",
    )
    sections.append(
        {
            "title": "Spectrum",
            "figures": [
                {"file": f1.name, "caption": "Eigenvalue moduli, decreasing."},
                {
                    "file": f2.name,
                    "caption": "Real (top) and imaginary (bottom) parts of the "
                    "top eigenvectors as images.",
                },
            ],
        }
    )
    rng = np.random.default_rng(cfg["data"].get("seed", 0))
    rows = [("training", images[:6], forward(model, images[:6]))]
    n_probe = int(cfg["analysis"].get("probes") or 0)
    if n_probe:
        noise = data.gaussian_noise(n_probe, shape, rng=rng)
        squares = data.white_squares(n_probe, shape, rng=rng)
        rows += [
            ("noise", noise, forward(model, noise)),
            ("squares", squares, forward(model, squares)),
        ]
    f3 = save_figure(plot_inputs_outputs(rows), out / f"{prefix}inputs_outputs.png")
    sections.append(
        {
            "title": "Inputs and outputs",
            "figures": [
                {
                    "file": f3.name,
                    "caption": "Inputs above the network's outputs; every image "
                    "min-max scaled on its own.",
                }
            ],
        }
    )
    return sections
