"""``imgcls audit DATA``: near-duplicates, likely label errors, shortcuts and class balance, on one page.

Label errors: every image gets class probabilities from a model that never saw it (k-fold logistic
regression on frozen, pretrained EfficientNet-Lite0 features), and cleanlab's ``find_label_issues``
ranks the images whose given label those probabilities contradict most. The pooled features are computed
once per data set and kept in the output folder (``features.npy``, keyed by the files' content).

Writes ``audit.json``, ``index.html`` (self-contained: thumbnails are data URIs) and, with
``--write-csv``, ``audit.csv``; it never writes to the data set.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np

from imgcls import io as io_mod
from imgcls import progress
from imgcls.data import audit as checks
from imgcls.data.cache import decode_pool
from imgcls.data.prepare import auto_img_size
from imgcls.data.sources import discover
from imgcls.errors import ImgclsError

FEATURE_MODEL = "efficientnet_lite0"  # ImageNet weights ship in a package: no network
FOLDS = 5
TOP = 60  # label issues and near-duplicate pairs shown on the page (all of them are in audit.json)


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImgclsError(f"imgcls audit needs {module}: pip install 'imgcls[audit]'")


def run_audit(data: str, out_dir: Path, *, img_size: int = 0, folds: int = FOLDS, write_csv: bool = False,
              labels: bool = True, device: str = "auto") -> dict:
    """Audit ``data`` into ``out_dir``; returns the audit.json content."""
    for m in ("imagehash", *(("cleanlab", "sklearn") if labels else ())):
        _need(m)
    t0 = time.perf_counter()
    disc = discover(data)
    if write_csv and disc.kind == "fashion-mnist":
        raise ImgclsError("--write-csv lists files; the built-in fashion-mnist has none")
    size = img_size or auto_img_size(disc, cap=160)
    items: list[checks.Item] = []
    images = []
    skipped = []
    for name, pool in disc.pools.items():
        dec = decode_pool(pool, size=size)
        skipped.extend(dec.skipped)
        items.extend(checks.Item(name, p, lab, h, i) for i, (p, lab, h) in enumerate(zip(dec.paths, dec.labels, dec.hashes)))
        images.append(dec.images)
    pixels = np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)  # N x S x S x 3 uint8
    if len(items) < 2:
        raise ImgclsError(f"{data}: fewer than two usable images to audit")
    timings = {}

    t = time.perf_counter()
    exact = checks.exact_duplicates(items)
    with progress.task("perceptual hashes", len(items)) as bar:
        ph = checks.perceptual_hashes(pixels)
        bar.advance(len(items))
    near = checks.near_duplicates(items, ph, checks.colour_thumbs(pixels))
    timings["duplicates_s"] = time.perf_counter() - t

    t = time.perf_counter()
    files = disc.kind != "fashion-mnist"
    shortcut = checks.shortcuts(checks.facts([it.path for it in items], disc.root), [it.label for it in items]) if files else {"attributes": {}, "flags": []}
    timings["shortcuts_s"] = time.perf_counter() - t

    issues: list[dict] = []
    label_note = ""
    if labels:
        t = time.perf_counter()
        feats = features(pixels, [it.hash for it in items], out_dir, size=size, device=device)
        timings["features_s"] = time.perf_counter() - t
        t = time.perf_counter()
        issues, label_note = label_issues(feats, [it.label for it in items], folds=folds)
        for li in issues:
            li.update(split=items[li["index"]].split, path=items[li["index"]].path)
        timings["label_issues_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    doc = {
        "data": disc.root, "kind": disc.kind, "img_size": size, "images": len(items), "skipped": skipped,
        "classes": dict(sorted(_counts(items).items())),
        "balance": checks.balance(items),
        "exact_duplicates": exact,
        "near_duplicates": near,
        "near_duplicate_summary": {
            "pairs": len(near), "across_splits": sum(p["across_splits"] for p in near),
            "labels_differ": sum(p["labels_differ"] for p in near),
            "max_distance": checks.NEAR_DISTANCE, "max_colour_difference": checks.NEAR_COLOUR,
        },
        "label_issues": issues,
        "label_issue_note": label_note,
        "shortcuts": shortcut,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    io_mod.write_json(out_dir / "audit.json", doc)
    io_mod.write_text(out_dir / "index.html", render_page(doc, items, pixels))
    if write_csv:
        write_issue_csv(out_dir / "audit.csv", doc, items)
    return doc


def _counts(items: list[checks.Item]) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        out[it.label] = out.get(it.label, 0) + 1
    return out


def features(pixels: np.ndarray, hashes: list[str], out_dir: Path, *, size: int, device: str = "auto") -> np.ndarray:
    """Pooled Lite0 features (N x 1280 float32) of ``pixels``, cached in ``out_dir`` by content."""
    key = hashlib.blake2b(f"{FEATURE_MODEL}|{size}|{'|'.join(hashes)}".encode(), digest_size=16).hexdigest()
    npy, meta = out_dir / "features.npy", out_dir / "features.json"
    try:
        if json.loads(meta.read_text())["key"] == key:
            cached = np.load(npy)
            if cached.shape[0] == len(hashes):
                return cached
    except (OSError, ValueError, KeyError):
        pass  # none yet, or another data set's: compute
    import torch

    from imgcls.engine import runtime as rt_mod
    from imgcls.engine.evaluate import predict_logits
    from imgcls.models import build_model, data_stats

    rt = rt_mod.setup(device, distributed=False)
    model = build_model(FEATURE_MODEL, num_classes=2, pretrained=True)
    model.reset_classifier(0)  # the forward pass now ends at the pooled features
    mean, std = data_stats(model)
    model = model.to(rt.device).eval()
    precision = rt_mod.inference_precision("auto", "fp32", rt.device)
    with progress.task("features (Lite0)", len(pixels)) as bar:
        feats = predict_logits(model, torch.from_numpy(pixels), mean=mean, std=std, device=rt.device,
                               precision=precision, on_batch=bar.advance).numpy().astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, feats)
    io_mod.atomic_write_bytes(npy, buf.getvalue())
    io_mod.write_json(meta, {"key": key, "model": FEATURE_MODEL, "img_size": size})  # after the array: the key vouches for it
    return feats


def label_issues(feats: np.ndarray, labels: list[str], *, folds: int = FOLDS) -> tuple[list[dict], str]:
    """Likely label errors, most likely first: [{"index", "label", "suggested", "p_label", "p_suggested"}]."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = _counts_of(labels)
    usable = [c for c, n in sorted(counts.items()) if n >= 2]  # k-fold needs two images of a class at least
    note = ""
    if len(usable) < len(counts):
        note = f"left out of the label check (fewer than 2 images): {', '.join(c for c in sorted(counts) if c not in usable)}"
    if len(usable) < 2:
        return [], (note or "fewer than two classes with 2+ images: no label check")
    idx = np.asarray([i for i, y in enumerate(labels) if y in usable])
    cls = {c: k for k, c in enumerate(usable)}
    y = np.asarray([cls[labels[i]] for i in idx])
    k = max(2, min(folds, min(counts[c] for c in usable)))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
    with progress.task(f"{k}-fold logistic regression", 1) as bar:
        probs = cross_val_predict(clf, feats[idx], y, cv=StratifiedKFold(k, shuffle=True, random_state=0), method="predict_proba")
        bar.advance(1)
    ranked = find_label_issues(labels=y, pred_probs=probs, return_indices_ranked_by="self_confidence")
    out = []
    for r in ranked:
        s = int(probs[r].argmax())
        out.append({
            "index": int(idx[r]), "label": usable[y[r]], "suggested": usable[s],
            "p_label": round(float(probs[r, y[r]]), 4), "p_suggested": round(float(probs[r, s]), 4),
        })
    return out, note


def _counts_of(labels: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for y in labels:
        out[y] = out.get(y, 0) + 1
    return out


# --- outputs ----------------------------------------------------------------------------------------


def thumb_uri(pixels: np.ndarray, size: int = 96) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels)).resize((size, size), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_issue_csv(path: Path, doc: dict, items: list[checks.Item]) -> None:
    """``path,label[,split],issue,suggested_label`` for every usable image, paths relative to the data root:
    edit it (fix or drop rows), place it in the data folder and train on it as a CSV data source."""
    root = Path(doc["data"])
    issue: dict[int, list[str]] = {}
    suggested: dict[int, str] = {}
    for li in doc["label_issues"]:
        issue.setdefault(li["index"], []).append(f"label? ({li['p_label']:.2f})")
        suggested[li["index"]] = li["suggested"]
    for p in doc["near_duplicates"]:
        issue.setdefault(p["a"]["index"], []).append(f"near-duplicate of {_rel(p['b']['path'], root)}")
        issue.setdefault(p["b"]["index"], []).append(f"near-duplicate of {_rel(p['a']['path'], root)}")
    where = {it.path: i for i, it in enumerate(items)}
    for group in doc["exact_duplicates"]["within_split"] + doc["exact_duplicates"]["across_splits"]:
        paths = [f["path"] for f in group["files"]]
        for p in paths:
            others = [_rel(q, root) for q in paths if q != p]
            issue.setdefault(where[p], []).append("identical to " + ", ".join(others[:3]))
    splits = {it.split for it in items} != {"all"}
    io_mod.write_csv(
        path, ["path", "label", *(["split"] if splits else []), "issue", "suggested_label"],
        ([_rel(it.path, root), it.label, *([it.split] if splits else []), "; ".join(issue.get(i, [])), suggested.get(i, "")]
         for i, it in enumerate(items)),
    )


def _rel(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imgcls audit: {{ doc.data }}</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:20px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:210px;font-size:12px}.card img{width:96px;height:96px;margin-right:2px}
.warn{color:#a33}.muted{color:#777}code{font-size:12px;word-break:break-all}
</style></head><body>
<h1>Data audit: <code>{{ doc.data }}</code></h1>
<p>{{ doc.images }} images, {{ doc.classes|length }} classes, checked at {{ doc.img_size }} px in {{ doc.seconds.total_s }} s.
{% if doc.skipped %}{{ doc.skipped|length }} unusable file(s) skipped.{% endif %}</p>
<ul>
<li>near-duplicates: {{ doc.near_duplicate_summary.pairs }} pair(s), {{ doc.near_duplicate_summary.across_splits }} across splits, {{ doc.near_duplicate_summary.labels_differ }} with different labels</li>
<li>exact duplicates: {{ doc.exact_duplicates.within_split|length }} group(s) within a split, {{ doc.exact_duplicates.across_splits|length }} across splits, {{ doc.exact_duplicates.conflicting_labels|length }} with different labels</li>
<li>likely label errors: {{ doc.label_issues|length }}{% if doc.label_issue_note %} <span class="muted">({{ doc.label_issue_note }})</span>{% endif %}</li>
<li>possible shortcuts: {{ doc.shortcuts.flags|length }}</li>
<li{% if doc.balance.warning %} class="warn"{% endif %}>class balance: largest/smallest {{ "%.1f"|format(doc.balance.ratio) }}:1;
smallest: {% for s in doc.balance.smallest %}{{ s.class }} {{ s.count }}{% if not loop.last %}, {% endif %}{% endfor %}</li>
</ul>

<h2>Likely label errors</h2>
<p class="muted">Out-of-sample probabilities from {{ folds }}-fold logistic regression on pretrained Lite0 features, ranked by cleanlab (lowest probability of the given label first).</p>
<div class="grid">{% for li in issues %}<div class="card"><img src="{{ li.thumb }}" alt=""><br>
given <b>{{ li.label }}</b> ({{ "%.2f"|format(li.p_label) }}), suggested <b>{{ li.suggested }}</b> ({{ "%.2f"|format(li.p_suggested) }})<br><code>{{ li.path }}</code></div>{% endfor %}</div>

<h2>Near-duplicates</h2>
<p class="muted">Perceptual hash (pHash) within {{ doc.near_duplicate_summary.max_distance }} of 64 bits and 16x16 colour thumbnails within {{ doc.near_duplicate_summary.max_colour_difference }} levels; byte-identical files are listed apart.</p>
<div class="grid">{% for p in near %}<div class="card"><img src="{{ p.ta }}" alt=""><img src="{{ p.tb }}" alt=""><br>
{{ p.a.split }}/{{ p.a.label }} &middot; {{ p.b.split }}/{{ p.b.label }}, distance {{ p.distance }}{% if p.across_splits %} <span class="warn">across splits</span>{% endif %}{% if p.labels_differ %} <span class="warn">labels differ</span>{% endif %}<br>
<code>{{ p.ra }}</code><br><code>{{ p.rb }}</code></div>{% endfor %}</div>

<h2>Shortcuts</h2>
<p class="muted">How well each file attribute alone predicts the label (leave-one-out); a class is flagged when the attribute identifies at least half of it with 90 % precision.</p>
{% if doc.shortcuts.flags %}<table><tr><th>attribute</th><th>class</th><th>value</th><th>share of the class</th><th>precision</th><th>recall</th></tr>
{% for f in doc.shortcuts.flags %}<tr class="warn"><td>{{ f.attribute }}</td><td>{{ f.class }}</td><td>{{ f.value }}</td><td>{{ "%.0f"|format(100 * f.value_share) }} %</td><td>{{ "%.0f"|format(100 * f.precision) }} %</td><td>{{ "%.0f"|format(100 * f.recall) }} %</td></tr>{% endfor %}</table>
{% else %}<p>No attribute singles out a class.</p>{% endif %}
<table><tr><th>attribute</th><th>distinct values</th><th>balanced accuracy alone</th><th>chance</th></tr>
{% for a, s in doc.shortcuts.attributes.items() %}<tr><td>{{ a }}</td><td>{{ s.distinct_values }}</td><td>{{ "%.2f"|format(s.balanced_accuracy) }}</td><td>{{ "%.2f"|format(s.chance_balanced_accuracy) }}</td></tr>{% endfor %}</table>

<h2>Classes</h2>
<table><tr><th>class</th><th>images</th></tr>{% for c, n in doc.classes.items() %}<tr><td>{{ c }}</td><td>{{ n }}</td></tr>{% endfor %}</table>
</body></html>
"""


def render_page(doc: dict, items: list[checks.Item], pixels: np.ndarray) -> str:
    import jinja2

    root = Path(doc["data"])
    issues = [li | {"thumb": thumb_uri(pixels[li["index"]]), "path": _rel(items[li["index"]].path, root)} for li in doc["label_issues"][:TOP]]
    near = [p | {"ta": thumb_uri(pixels[p["a"]["index"]]), "tb": thumb_uri(pixels[p["b"]["index"]]),
                 "ra": _rel(p["a"]["path"], root), "rb": _rel(p["b"]["path"], root)} for p in doc["near_duplicates"][:TOP]]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(PAGE).render(doc=doc, issues=issues, near=near, folds=FOLDS)


__all__ = ["run_audit", "features", "label_issues", "render_page", "write_issue_csv", "thumb_uri"]
