"""``vqvae report``: one self-contained HTML page per run (stage 1, its priors, or a prior alone).

The page holds everything inline (PNG as base64, SVG charts, CSS and a small script, no network):
the run's facts, its curves, the codebook atlas, usage maps, each kept checkpoint's pictures and
the priors' bits/code and samples. Whatever is missing is said on the page; the run folder is
only read (the page itself is written atomically, by default as ``RUN/report.html``).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, is_dataclass, replace
from html import escape
from pathlib import Path
from typing import Any

import torch

from ..data.sources import load_splits
from ..distributed import pick_device
from ..errors import CheckpointError, ConfigError, DataError
from ..fileio import check_writable, write_bytes
from ..generation.codes import load_stage1
from ..codec.surprise import surprise
from ..generation.grids import pick, tile
from ..generation.pipeline import Pipeline
from ..store import checkpoint as ckpt
from ..store import runs
from . import svg
from .assets import CSS, PAGE, SCRIPT
from .atlas import PER_PAGE, Atlas, build_atlas, columns, sprite_pages
from .facts import RunFacts, find, read_run, stage1_of
from .timeline import Frame, png_bytes, prior_frames, stage1_frames

REPORT = "report.html"
ATLAS_IMAGES = 2048  # held-out images encoded for the atlas and the usage maps
SECTIONS = (("run", "The run"), ("curves", "Curves"), ("atlas", "Codebook atlas"),
            ("usage", "Usage maps"), ("checkpoints", "Checkpoints"), ("prior", "Prior"))
LOSSES = ("loss", "mse_x", "l1_x", "mse_e", "mse_z", "gan_g", "perceptual", "freq")


def write_report(run: str | Path, out: str | Path | None = None, *,
                 device: str | torch.device = "auto", progress: bool = True) -> Path:
    """``vqvae report``: write the report of the run folder ``run`` (a stage-1 run with the prior
    runs inside it, or a prior run) to ``out`` (default ``RUN/report.html``), its models run on
    ``device``; returns its path. A run without checkpoints, logs or its stage-1 model still
    gets a page saying what is missing."""
    facts = find(run)
    path = Path(out) if out is not None else facts.path / REPORT
    check_writable(path, "HTML file to write (e.g. report.html)")
    html = build_page(facts, pick_device(device), progress)
    return write_bytes(path, html.encode())


# --- gathering ---------------------------------------------------------------------------------


def _stage1_run(facts: RunFacts) -> tuple[RunFacts | None, list[RunFacts]]:
    """The stage-1 run the page is about (None when its checkpoint is gone or outside any run
    folder) and the priors on the page: a stage-1 run's own, or the prior run asked for."""
    if facts.stage == ckpt.VQVAE_KIND:
        return facts, facts.priors
    checkpoint, _ = stage1_of(facts)  # why it is gone: said with the prior's samples
    home = runs.find_run(checkpoint) if checkpoint is not None else None
    return (replace(read_run(home, False), priors=[facts]) if home else None), [facts]


def _held_out(stage1: RunFacts | None, model: Any,
              notes: list[str]) -> tuple[torch.Tensor | None, str]:
    """Up to :data:`ATLAS_IMAGES` held-out uint8 images of the stage-1 run's data, and which
    images the held-out set is, in words."""
    if stage1 is None or stage1.config is None or model is None:
        return None, ""
    try:
        splits = load_splits(replace(stage1.config.data, workers=0))
        test = splits.test
        return pick(test, min(ATLAS_IMAGES, len(test)), seed=0), splits.held_out
    except (DataError, ConfigError, OSError) as e:
        notes.append(f"the held-out images of {stage1.config.data.source} cannot be read ({e}): "
                     f"no atlas, usage maps or reconstructions")
        return None, ""


def build_page(facts: RunFacts, device: torch.device = torch.device("cpu"),
               progress: bool = True) -> str:
    """The page's HTML for the run ``facts`` describe (see :func:`write_report`)."""
    stage1, priors = _stage1_run(facts)
    notes: list[str] = []
    model = None
    if stage1 is not None and stage1.latest is not None:
        try:
            model = ckpt.load_autoencoder(stage1.latest, device)
        except (CheckpointError, ConfigError, DataError, OSError) as e:
            notes.append(f"{stage1.latest} cannot be loaded ({e}): no atlas")
    images, held_out = _held_out(stage1, model, notes)
    multiscale = model is not None and model.cfg.quantizer == "multiscale"
    if multiscale:
        notes.append("the atlas and usage maps draw one grid of codes; a multiscale tokenizer's "
                     "token maps of several scales are not drawn yet")
    atlas = (build_atlas(model, images, progress=progress)
             if images is not None and not multiscale else None)
    frames = (stage1_frames(stage1.checkpoints, images, device, progress)
              if stage1 is not None and images is not None else [])
    drawn = [_prior_part(p, images, device, progress) for p in priors]
    prior_parts = [(frames, why) for frames, why, _ in drawn]
    surprised = [surprise_map for _, _, surprise_map in drawn]
    missing = [*notes, *(f"stage 1: {m}" for m in (stage1.missing if stage1 else []))]
    if stage1 is None:
        missing.append("stage 1: no stage-1 run folder: no atlas, usage maps or reconstructions")
    for p, (_, why) in zip(priors, prior_parts):
        missing += [f"{p.name}: {m}" for m in p.missing] + ([f"{p.name}: {why}"] if why else [])
    body = [_missing(missing),
            _section("run", [_run_facts(r, images, held_out)
                             for r in [stage1, *priors] if r is not None]),
            _section("curves", _curves(stage1)),
            _section("atlas", _atlas_html(atlas)),
            _section("usage", _usage(stage1, atlas)),
            _section("checkpoints", _checkpoints(frames)),
            _section("prior", _priors(priors, prior_parts, surprised))]
    title = f"vqvae report: {facts.path}"
    return PAGE.format(title=escape(title), css=CSS, script=SCRIPT,
                       when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       nav=" ".join(f'<a href="#{key}">{name}</a>' for key, name in SECTIONS),
                       body="\n".join(body), data=_json_script(_atlas_data(atlas)))


def _prior_part(prior: RunFacts, images: torch.Tensor | None, device: torch.device,
                progress: bool) -> tuple[list[Frame], str | None, str]:
    """A prior run's sample frames (or why there are none) and its surprise map (or why not),
    with its stage-1 model loaded once for both."""
    checkpoint, why = stage1_of(prior)
    if checkpoint is None or not prior.checkpoints:
        return [], why, "no stage-1 model or no checkpoint: no surprise map"
    try:
        stage1 = load_stage1(prior.config, device)
    except (CheckpointError, ConfigError, DataError, OSError) as e:
        return ([], f"its stage-1 model cannot decode its codes ({e}): no samples",
                "its stage-1 model cannot be loaded: no surprise map")
    return (prior_frames(prior.checkpoints, stage1, device, progress), None,
            _surprise(prior, stage1, images, device))


SURPRISE_IMAGES = 256  # held-out images a prior codes for its surprise map
SURPRISE_SHOWN = 8  # the most and the least surprising of them, each


def _surprise(prior: RunFacts, stage1: Any, images: torch.Tensor | None,
              device: torch.device) -> str:
    """The prior's surprise map (docs/codec.md) of held-out images of its stage 1's data: the
    most and least surprising of the first :data:`SURPRISE_IMAGES`, with their bits; or why
    there is none."""
    if images is None or prior.latest is None:
        return "no held-out images or no checkpoint: no surprise map"
    try:
        pipe = Pipeline(ckpt.load_prior(prior.latest, device), stage1, prior.config, prior.name)
        found = surprise(pipe, images[:SURPRISE_IMAGES], device=device)
    except (CheckpointError, ConfigError, DataError, OSError) as e:
        return f"its models cannot code held-out images ({e}): no surprise map"
    bits = found.per_image
    order = bits.argsort(descending=True)
    k = min(SURPRISE_SHOWN, len(order) // 2) or 1
    shown = torch.cat([order[:k], order[-k:]])
    strip = png_bytes(tile(found.maps()[shown], k))
    listed = ", ".join(f"{bits[i]:.0f}" for i in shown.tolist())
    return (f"<p>Where the prior is surprised: each code's -log2 p painted red over held-out "
            f"images (full red: log2 K bits, a uniform guess). Top row: the {k} most "
            f"surprising of {len(bits)} (outliers, or what the prior has not learnt); bottom "
            f"row: the {k} least. Bits per image, in that order: {listed} (mean "
            f"{bits.mean():.1f}; <code>vqvae surprise</code> ranks a whole set).</p>"
            + _png(strip, "surprise map", "px"))


# --- sections ----------------------------------------------------------------------------------


def _section(key: str, parts: list[str] | str) -> str:
    title = dict(SECTIONS)[key]
    inner = parts if isinstance(parts, str) else "\n".join(parts)
    return f'<section id="{key}"><h2>{title}</h2>\n{inner}\n</section>'


def _missing(missing: list[str]) -> str:
    if not missing:
        return '<section id="missing" class="ok"><p>Nothing is missing.</p></section>'
    items = "".join(f"<li>{escape(m)}</li>" for m in missing)
    return (f'<section id="missing" class="warn"><h2>What is missing</h2><ul>{items}</ul>'
            f'</section>')


def _png(data: bytes, alt: str, cls: str = "") -> str:
    return (f'<img alt="{escape(alt)}" class="{cls}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>"
                               for k, v in rows) + "</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return escape(str(value))


def _run_facts(r: RunFacts, images: torch.Tensor | None, held_out: str) -> str:
    cfg = r.config
    rows = [("folder", escape(str(r.path))),
            ("command lines", "<br>".join(f"<code>{escape(c)}</code>" for c in r.commands)
             or "not recorded")]
    if cfg is not None:
        train = cfg.train
        if r.stage == ckpt.VQVAE_KIND:
            d = cfg.data
            held = f"; held out: {held_out}" if held_out else ""
            used = "" if images is None else f"; {images.shape[0]} of them in the atlas"
            rows.append(("data", escape(f"{d.source}, {d.size}px, {d.channels} channel(s)"
                                        f"{held}{used}")))
            m = cfg.model
            rows.append(("model", escape(f"{cfg.preset} preset, {m.architecture}, "
                                         f"{m.quantizer} quantizer, {m.codebook_size} codes of "
                                         f"{m.code_dim} dims")))
        else:
            m = cfg.model
            rows.append(("data", escape(f"codes {cfg.codes} of stage 1 {cfg.stage1}")))
            rows.append(("model", escape(f"{cfg.preset} preset, {m.variant}, {m.layers} layers, "
                                         f"d_model {m.d_model}, {m.height}x{m.width} grids of "
                                         f"{m.codebook_size} codes, {m.num_classes} classes")))
        budget = f"--steps {train.steps}" + (f", --minutes {train.minutes:g}"
                                             if train.minutes else "")
        rows.append(("budget", escape(budget)))
        ran = "; ".join(f"from step {h.get('step')}: {h.get('device')} ({h.get('name')}), "
                        f"{h.get('processes')} process(es), {h.get('cpus')} CPU cores, torch "
                        f"{h.get('torch')}" for h in r.hardware)
        rows.append(("hardware", escape(f"--device {train.device}, --precision "
                                        f"{train.precision}; " + (ran or "which device ran it is "
                                        "not recorded (a run from before hardware.jsonl)"))))
    st = r.state
    if st:
        speeds = [x["steps_per_s"] for x in r.train if isinstance(x.get("steps_per_s"),
                                                                    (int, float))]
        speed = f", {sum(speeds) / len(speeds):.1f} steps/s on average" if speeds else ""
        rows.append(("trained", escape(f"{st.get('step', '?')} steps in "
                                       f"{float(st.get('seconds', 0)):.1f} s{speed}, "
                                       f"{st.get('world_size', 1)} process(es), global batch "
                                       f"{st.get('global_batch', '?')}")))
    rows.append(("kept checkpoints", escape(", ".join(p.name for p in r.checkpoints) or "none")))
    if r.final:
        metrics = " ".join(f"<span class=m>{escape(k)} <b>{_fmt(v)}</b></span>"
                           for k, v in r.final.items() if k != "split")
        rows.append(("final held-out metrics", metrics))
    config = json.dumps(_plain(cfg), indent=1) if cfg is not None else "unreadable"
    return (f"<h3>{escape(r.name)}</h3>{_table(rows)}<details><summary>config</summary>"
            f"<pre>{escape(config)}</pre></details>")


def _plain(cfg: Any) -> Any:
    return asdict(cfg) if is_dataclass(cfg) else cfg


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))]


def _charts(charts: list[tuple[str, dict[str, list[tuple[float, float]]], bool]],
            none: str) -> str:
    """The line charts that have data (title, series, log y), or the sentence ``none``."""
    drawn = [svg.line_chart(title, series, log) for title, series, log in charts
             if any(series.values())]
    return '<div class="charts">' + "".join(drawn) + "</div>" if drawn else f"<p>{none}</p>"


def _curves(stage1: RunFacts | None) -> str:
    if stage1 is None:
        return "<p>No stage-1 run: no curves.</p>"
    t, e = stage1.train, stage1.evals
    return _charts([
        ("training losses", {k: _series(t, k) for k in LOSSES}, True),
        ("held-out PSNR (dB)", {"with codes": _series(e, "psnr"),
                                "continuous": _series(e, "psnr_noq")}, False),
        ("held-out SSIM", {"with codes": _series(e, "ssim"),
                           "continuous": _series(e, "ssim_noq")}, False),
        ("codebook usage (%)", {"held-out": _series(e, "usage"),
                                "training window": _series(t, "window_usage")}, False),
        ("perplexity", {"held-out": _series(e, "perplexity"),
                        "training window": _series(t, "window_perplexity")}, False),
        ("learning rate", {"lr": _series(t, "lr")}, False)],
        "No training or held-out log: no curves.")


def _atlas_html(atlas: Atlas | None) -> str:
    if atlas is None:
        return "<p>No atlas: it needs a stage-1 checkpoint and its held-out images.</p>"
    dead = int((atlas.counts == 0).sum())
    k = atlas.counts.numel()
    return f"""<p>Every code as a tile, most used first: <b>left</b>, the mean of the held-out
image patches encoded to it ({atlas.patch}x{atlas.patch} pixels, the part of the image one grid
cell sees); <b>right</b>, what the decoder draws for a grid made of that one code. {dead} of {k}
codes are dead (crossed in red: no held-out patch uses them). Click a tile to see its usage,
where in the grid it is used and its {atlas.neighbours.shape[1]} nearest codes by codebook
distance (outlined in blue on the page). Hover for its id and count.</p>
<div class="controls"><button id="atlas-prev">&larr;</button> <span id="atlas-page-label"></span>
<button id="atlas-next">&rarr;</button> <label>code id <input id="atlas-find" type="number"
min="0" max="{k - 1}"></label></div>
<div class="atlas-wrap"><canvas id="atlas-canvas"></canvas>
<div id="atlas-selected"><p>Click a tile.</p></div></div>"""


def _usage(stage1: RunFacts | None, atlas: Atlas | None) -> str:
    parts = []
    if atlas is not None:
        h, w = atlas.entropy.shape
        parts.append(svg.usage_histogram(atlas.counts.tolist()))
        parts.append(svg.heatmap(atlas.entropy.tolist(), f"code entropy per grid position "
                                 f"({h}x{w})", "bits"))
        parts.append('<div><p>Where the most used codes are used (held-out assignments per '
                     'grid position, darker = more; click a tile in the atlas for any code):</p>'
                     '<div id="usage-maps"></div></div>')
    else:
        parts.append("<p>No usage maps: they need a stage-1 checkpoint and held-out images.</p>")
    if stage1 is not None:
        t, e = stage1.train, stage1.evals
        parts.append(_charts([("dead codes over the run", {
            "held-out": _series(e, "dead_codes"),
            "training window": _series(t, "window_dead_codes"),
            "restarts": _series(t, "restarts")}, False)], "No log: no timeline of dead codes."))
        cfg = stage1.config
        if not _series(t, "restarts"):
            why = ""
            if cfg is not None and cfg.model.quantizer == "fsq":
                why = " (fsq has no dead-code restarts)"
            elif cfg is not None and cfg.model.restart_after:
                why = (f" (codes unused for {cfg.model.restart_after} steps were re-seeded; "
                       f"the window's dead codes are counted after those restarts)")
            parts.append(f"<p>Restarts are not recorded in this run's log{escape(why)}.</p>")
    return '<div class="charts">' + "".join(parts) + "</div>"


def _checkpoints(frames: list[Frame]) -> str:
    if not frames:
        return "<p>No checkpoint pictures: they need stage-1 checkpoints and held-out images.</p>"
    rows = []
    for f in frames:
        cells = (_png(f.pictures["reconstructions"], f"reconstructions at step {f.step}", "px")
                 + _png(f.pictures["interpolations"], f"interpolations at step {f.step}", "px")
                 if f.pictures else escape(f.note))
        rows.append(f'<tr><th>step {f.step}</th><td>{cells}</td></tr>')
    return ("<p>Each kept checkpoint (up to 12, spread over the run) on the same held-out images: "
            "top row real, below it the reconstruction through the codes; then latent "
            "interpolations between pairs, one row per pair.</p><table class=frames>"
            + "".join(rows) + "</table>")


def _priors(priors: list[RunFacts], drawn: list[tuple[list[Frame], str | None]],
            surprised: list[str]) -> str:
    if not priors:
        return ("<p>No prior run in this folder (<code>vqvae train-prior --out RUN/prior</code>)."
                "</p>")
    parts = []
    for p, (fs, why), surprise_map in zip(priors, drawn, surprised):
        parts.append(f"<h3>{escape(p.name)}</h3>")
        parts.append(_charts([
            ("held-out bits/code", {"true class": _series(p.evals, "bits_per_code"),
                                    "null class": _series(p.evals, "bits_per_code_uncond")},
             False),
            ("training bits/code", {"bits": _series(p.train, "bits")}, False)],
            "No training or held-out log: no curves."))
        rows = "".join(f"<tr><th>step {f.step}</th><td>"
                       + (_png(f.pictures["samples"], f"samples at step {f.step}", "px")
                          if f.pictures else escape(f.note)) + "</td></tr>" for f in fs)
        parts.append("<p>Samples at each kept checkpoint (seed 0; a conditional prior draws its "
                     "classes in turn):</p><table class=frames>" + rows + "</table>"
                     if rows else f"<p>No samples{escape(': ' + why if why else '')}.</p>")
        parts.append(surprise_map if surprise_map.startswith("<")
                     else f"<p>No surprise map: {escape(surprise_map)}.</p>")
    return "\n".join(parts)


# --- the atlas's data for the script ------------------------------------------------------------


def _atlas_data(atlas: Atlas | None) -> dict[str, Any] | None:
    if atlas is None:
        return None
    k = atlas.counts.numel()
    n, h, w = atlas.grids.shape
    dtype = "<u2" if k <= 1 << 16 else "<u4"
    grids = atlas.grids.numpy().astype(dtype).tobytes()
    return {"k": k, "side": int(atlas.patches.shape[-1]), "columns": columns(k),
            "perPage": PER_PAGE, "order": atlas.order.tolist(), "counts": atlas.counts.tolist(),
            "neighbours": atlas.neighbours.tolist(),
            "distances": [[round(float(d), 3) for d in row] for row in atlas.distances],
            "pages": ["data:image/png;base64," + base64.b64encode(p).decode()
                      for p in sprite_pages(atlas)],
            "grid": [h, w], "images": n, "gridBytes": 2 if dtype == "<u2" else 4,
            "grids": base64.b64encode(grids).decode()}


def _json_script(data: Any) -> str:
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f'<script type="application/json" id="atlas-data">{text}</script>'
