"""Temperature scaling and the "unknown" threshold, fitted on the validation split and kept in RUN/calibration.json.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T fitted by LBFGS on the validation
NLL: accuracy is unchanged (the argmax does not move) and the probabilities stop being over-confident.
The rejection threshold is a quantile of a confidence score on the same validation images, chosen so that
a stated share (``keep``) of in-distribution images is kept; anything scoring lower is flagged unknown.
torchmetrics and torch have no temperature fit or quantile threshold of this shape, hence this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchmetrics.functional.classification as tmf

from imgcls.errors import ImgclsError
from imgcls.io import write_json

FILE = "calibration.json"
MIN_VAL = 20  # below this many validation images a fitted temperature is noise: keep T = 1
T_RANGE = (0.05, 20.0)
# Which score decides "unknown": measured on a leave-two-classes-out intel-scenes run (README, "unknown"):
# the calibrated max-probability and the energy score separated left-out from kept-class test images
# about equally; max-probability was kept because it reads as a probability and needs no extra output.
DEFAULT_SCORE = "max_prob"


def scores(logits: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Per-image confidence scores of the calibrated logits; higher = more like the training classes.

    ``max_prob``: the largest calibrated probability. ``energy``: the negative free energy
    ``T * logsumexp(logits / T)`` (Liu et al. 2020), which keeps the logits' scale that softmax discards.
    """
    z = logits.float() / temperature
    return {"max_prob": z.softmax(1).max(1).values, "energy": temperature * torch.logsumexp(z, 1)}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising the NLL of ``softmax(logits / T)`` (LBFGS over log T, so T stays positive)."""
    logits = logits.detach().double()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, T_RANGE[0]), T_RANGE[1])


def ece_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> tuple[float, float]:
    """Expected calibration error (15 bins, as in eval) and mean NLL of ``softmax(logits / T)``."""
    z = logits.float() / temperature
    ece = tmf.multiclass_calibration_error(z.softmax(1), labels, num_classes=z.shape[1], n_bins=15, norm="l1")
    return float(ece), float(F.cross_entropy(z, labels))


@dataclass(frozen=True)
class Calibration:
    """What RUN/calibration.json holds. ``thresholds`` has one entry per score; ``score`` names the one used."""

    temperature: float = 1.0
    keep: float = 0.95
    score: str = DEFAULT_SCORE
    thresholds: dict[str, float] = field(default_factory=dict)
    fitted_on: str = "val"
    n: int = 0
    val: dict[str, float] = field(default_factory=dict)  # ece/nll before and after on the fitting images
    note: str = ""

    @property
    def threshold(self) -> float | None:
        return self.thresholds.get(self.score)

    def flag(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score, unknown) per image; nothing is flagged when there is no threshold."""
        s = scores(logits, self.temperature)[self.score]
        if self.threshold is None:
            return s, torch.zeros(len(s), dtype=torch.bool)
        return s, s < self.threshold


UNCALIBRATED = Calibration(note="no calibration.json in the run (trained before calibration): temperature 1, no unknown threshold")


def fit(logits: torch.Tensor, labels: torch.Tensor, *, keep: float) -> Calibration:
    """Temperature and thresholds from validation ``logits``/``labels`` so that ``keep`` of them score at or above."""
    if not 0.0 < keep <= 1.0:
        raise ImgclsError(f"keep must be in (0, 1], got {keep}")
    n = len(labels)
    if n < MIN_VAL:
        return Calibration(keep=keep, n=n, note=f"only {n} validation image(s) (< {MIN_VAL}): temperature 1, no unknown threshold")
    t = fit_temperature(logits, labels)
    ece0, nll0 = ece_nll(logits, labels)
    ece1, nll1 = ece_nll(logits, labels, t)
    # the (1 - keep) quantile: ``keep`` of the validation images have a score >= the threshold
    thresholds = {k: float(torch.quantile(v.double(), 1.0 - keep, interpolation="lower")) for k, v in scores(logits, t).items()}
    return Calibration(
        temperature=t, keep=keep, thresholds=thresholds, n=n,
        val={"ece_before": ece0, "ece_after": ece1, "nll_before": nll0, "nll_after": nll1},
    )


def save(run_dir: Path, cal: Calibration) -> Path:
    return write_json(Path(run_dir) / FILE, asdict(cal))


def read(run_dir: Path) -> Calibration:
    """The run's calibration; :data:`UNCALIBRATED` for runs trained before calibration existed."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return UNCALIBRATED
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        cal = Calibration(**d)
        t = float(cal.temperature)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise ImgclsError(f"{path} is damaged ({e}); delete it to use temperature 1") from None
    if not (math.isfinite(t) and t > 0) or cal.score not in ("max_prob", "energy"):
        raise ImgclsError(f"{path} is damaged (temperature {cal.temperature}, score {cal.score!r}); delete it to use temperature 1")
    return cal


def from_json(d: dict) -> Calibration:
    """The inverse of ``asdict`` for calibration stored inside an exported file's metadata."""
    return Calibration(**d)


def open_set(known: torch.Tensor, left_out: torch.Tensor) -> dict[str, float]:
    """AUROC (known scored higher than left-out) and FPR@95 % TPR: the share of left-out images kept when
    the threshold keeps 95 % of the known ones."""
    from imgcls.engine.evaluate import auroc

    if not len(known) or not len(left_out):
        return {"auroc": float("nan"), "fpr_at_95": float("nan")}
    t95 = float(torch.quantile(known.double(), 0.05, interpolation="lower"))
    return {"auroc": auroc(known, left_out), "fpr_at_95": float((left_out.double() >= t95).float().mean())}


def unknown_report(cal: Calibration, logits: torch.Tensor, excluded_logits: torch.Tensor | None = None) -> dict:
    """For eval's metrics.json: the share of test images flagged and, for leave-classes-out runs, the share
    of left-out images flagged with AUROC/FPR@95 % of every score (the chosen one under ``score``)."""
    out: dict = {"score": cal.score, "threshold": cal.threshold, "keep": cal.keep}
    if cal.threshold is None:
        out["note"] = cal.note or "no threshold"
        return out
    s_known, flagged = cal.flag(logits)
    out["flagged_test"] = float(flagged.float().mean()) if len(flagged) else float("nan")
    if excluded_logits is not None and len(excluded_logits):
        _s, ex_flagged = cal.flag(excluded_logits)
        out["flagged_left_out"] = float(ex_flagged.float().mean())
        known_all, left_all = scores(logits, cal.temperature), scores(excluded_logits, cal.temperature)
        out["by_score"] = {k: open_set(known_all[k], left_all[k]) for k in known_all}
        out["auroc"] = out["by_score"][cal.score]["auroc"]
        out["fpr_at_95"] = out["by_score"][cal.score]["fpr_at_95"]
    return out


def calibration_report(cal: Calibration, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """For eval's metrics.json: ECE and NLL of the raw (before) and temperature-scaled (after) probabilities."""
    ece0, nll0 = ece_nll(logits, labels)
    ece1, nll1 = ece_nll(logits, labels, cal.temperature)
    out = {"temperature": cal.temperature, "ece_before": ece0, "ece_after": ece1, "nll_before": nll0, "nll_after": nll1,
           "fitted_on": cal.fitted_on, "n_fit": cal.n}
    if cal.note:
        out["note"] = cal.note
    return out
