"""Rank backbones before training: transferability scores on frozen features, in seconds.

For every backbone the pooled features of the frozen network (the ``unfreeze=0`` prefix, taken from
the :class:`~autoft.core.cache.FeatureCache`, so head-only trials reuse them) are scored on the
training split with

* **LogME** (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
  ICML 2021): the log marginal evidence of a Bayesian linear model from features to each one-hot
  label column, per example, averaged over classes; the prior/noise precisions are fitted by the
  paper's fixed-point iteration on the SVD of the features.  Higher is better;
* optionally a **kNN probe**: leave-one-out accuracy of a k-nearest-neighbour classifier (cosine).

The ranking is advisory: the search uses it to try the most promising backbones first
(:func:`prior_params`) and, when asked, to drop backbones scoring far below the best; fine-tuned
validation scores decide.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from autoft.core.cache import FeatureCache
from autoft.core.config import TrialConfig
from autoft.core.train import TaskData, memory_budget, use_task_inputs
from autoft.data.encode import streamed
from autoft.core.device import resolve_device
from autoft.study.record import ATTR_FIRST_TRIAL, ATTR_RANKING
from autoft.errors import AutoftError, ConfigError
from autoft.zoo.base import Backbone

log = logging.getLogger(__name__)
METHODS = ("logme", "knn")


# -- scores ---------------------------------------------------------------------------------------
def logme(features: np.ndarray, labels: np.ndarray, *, max_iter: int = 100, tol: float = 1e-4) -> float:
    """LogME of ``features`` (n, d) for integer class ``labels`` (n,): mean per-example log evidence.

    For each class column y (one-hot), with F = U diag(s) V^T and sigma_i = s_i^2, iterate
    gamma = sum beta sigma_i / (alpha + beta sigma_i), m = beta A^-1 F^T y with A = alpha I + beta F^T F,
    alpha = gamma / |m|^2, beta = (n - gamma) / |y - F m|^2 until alpha/beta settle; then
    log p(y|F) = n/2 log beta + d/2 log alpha - n/2 log 2pi - beta/2 |y - F m|^2 - alpha/2 |m|^2 - 1/2 log|A|.
    """
    f = np.asarray(features, dtype=np.float64)
    y_int = np.asarray(labels).astype(np.int64)
    if f.ndim != 2 or len(f) != len(y_int):
        raise ValueError(f"features must be (n, d) with one label per row; got {f.shape} and {y_int.shape}")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)  # u: (n, k), s: (k,)
    sigma = s ** 2
    k = len(s)
    evidences = []
    for c in np.unique(y_int):
        y = (y_int == c).astype(np.float64)
        z = u.T @ y  # coordinates of y in the span of the features
        resid_out = max(float(y @ y - z @ z), 0.0)  # part of y outside the span: never fitted
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            denom = alpha + beta * sigma
            gamma = float(np.sum(beta * sigma / denom))
            m2 = float(np.sum((beta * s * z / denom) ** 2))  # |m|^2 (V is orthonormal)
            res2 = resid_out + float(np.sum((alpha * z / denom) ** 2))  # |y - F m|^2
            new_alpha = gamma / max(m2, 1e-12)
            new_beta = (n - gamma) / max(res2, 1e-12)
            done = abs(new_alpha - alpha) / alpha < tol and abs(new_beta - beta) / beta < tol
            alpha, beta = new_alpha, new_beta
            if done:
                break
        denom = alpha + beta * sigma
        m2 = float(np.sum((beta * s * z / denom) ** 2))
        res2 = resid_out + float(np.sum((alpha * z / denom) ** 2))
        logdet = float(np.sum(np.log(denom))) + (d - k) * math.log(alpha)
        ev = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
              - beta / 2 * res2 - alpha / 2 * m2 - logdet / 2)
        evidences.append(ev / n)
    return float(np.mean(evidences))


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5, chunk: int = 2048) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour vote (cosine similarity)."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    y = torch.as_tensor(np.asarray(labels)).long()
    n, k = len(f), max(1, min(k, len(f) - 1))
    num_classes = int(y.max()) + 1
    correct = 0
    for i in range(0, n, chunk):
        sim = f[i:i + chunk] @ f.T
        rows = torch.arange(i, min(i + chunk, n))
        sim[rows - i, rows] = -math.inf  # leave the example itself out
        nb = sim.topk(k, dim=1).indices
        votes = torch.zeros(len(rows), num_classes).scatter_add_(1, y[nb], torch.ones(len(rows), k))
        correct += int((votes.argmax(1) == y[rows]).sum())
    return correct / n


# -- ranking --------------------------------------------------------------------------------------
@dataclass
class BackboneScore:
    backbone: str
    logme: float | None = None
    knn: float | None = None
    seconds: float = 0.0  # features (cached or computed) + scores
    feature_seconds: float = 0.0
    examples: int = 0
    feature_dim: int = 0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def frozen_features(backbone: str | Backbone, task: TaskData, cache: FeatureCache,
                    on: tuple[str, ...] = ("train",), keep_unfreeze=()) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of the frozen backbone (a zoo name or a built backbone) for the examples of
    ``on``, and their labels.

    ``keep_unfreeze``: unfreeze counts the search will try on this backbone, most wanted first; the same
    pass keeps their prefix outputs in the cache (``FeatureCache.prefix(..., keep=)``, in that order while
    they fit), so those trials start from them. Ignored on the streamed path (features on disk).

    Computed for train + validation (the rows head-only trials use, so they share the cache entry):
    in memory from the encoded images, or, when the encoded images would exceed the task's memory
    budget, streamed into a feature file on disk (:meth:`FeatureCache.stream_prefix`; same numbers).
    """
    bb = cache.backbone(backbone) if isinstance(backbone, str) else backbone
    bb.set_unfreeze(0)
    use_task_inputs(bb, task)  # a text task's max_length, as in the trials: the same features, the same cache entries
    rows = torch.from_numpy(np.union1d(task.splits.train, task.splits.val)).long()
    want = np.sort(np.concatenate([getattr(task.splits, s) for s in on]))
    pos = torch.from_numpy(np.searchsorted(rows.numpy(), want))
    device = resolve_device(task.device)
    if streamed(len(task.data), bb.preprocessing, memory_budget(task)):
        # too many images to encode in memory: the pooled features are computed by streaming the images
        # through the evaluation transform into a feature file on disk (the entry head-only trials read)
        feats = cache.stream_prefix(bb, task.data, bb.num_stages, rows, device, task.num_workers)
        return feats.read(pos).numpy(), task.data.labels[want]
    encoded, digest = cache.encoded(task.data, bb.preprocessing)
    keep = [bb.num_stages - int(u) for u in keep_unfreeze if 0 < int(u) < bb.num_stages]
    feats = cache.prefix(bb, encoded, digest, bb.num_stages, device, rows=rows, keep=keep)
    return feats[pos].numpy(), task.data.labels[want]


def rank_backbones(task: TaskData, backbones: list[str], cache: FeatureCache | None = None, *,
                   methods: tuple[str, ...] = ("logme",), knn_k: int = 5,
                   on: tuple[str, ...] = ("train",), keep_unfreeze: dict | None = None) -> list[BackboneScore]:
    """Score every backbone; best (highest LogME, else kNN) first.  A backbone that cannot be
    loaded gets ``error`` set and goes last. ``keep_unfreeze`` (backbone -> unfreeze counts): see
    :func:`frozen_features`."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown ranking method(s) {unknown}; expected some of {list(METHODS)}")
    cache = cache or FeatureCache()
    out = []
    for name in dict.fromkeys(backbones):
        t0 = time.perf_counter()
        score = BackboneScore(name)
        try:
            f, y = frozen_features(name, task, cache, on, keep_unfreeze=(keep_unfreeze or {}).get(name, ()))
            score.feature_seconds = time.perf_counter() - t0
            score.examples, score.feature_dim = f.shape
            if "logme" in methods:
                score.logme = logme(f, y)
            if "knn" in methods:
                score.knn = knn_accuracy(f, y, knn_k)
        except Exception as exc:  # advisory: a backbone that cannot be scored is ranked last, not fatal
            score.error = str(exc) if isinstance(exc, AutoftError) else f"{type(exc).__name__}: {exc}"
            log.warning("ranking: backbone %s skipped: %s", name, score.error)
        score.seconds = time.perf_counter() - t0
        out.append(score)
    key = "logme" if "logme" in methods else "knn"
    return sorted(out, key=lambda s: (s.error is None, getattr(s, key) if getattr(s, key) is not None
                                      else -math.inf), reverse=True)


# -- use in the search ----------------------------------------------------------------------------
# The first trial on the best-ranked backbone when the search space declares no ``first_trials``: a
# common fine-tuning recipe, TrialConfig's defaults (AdamW, lr 1e-3, head learning rate 10x, linear
# head, batch 64) with the last half of the stages unfrozen; parameters the recipe does not name are
# sampled.
RECIPE = {"unfreeze": "half", **{k: TrialConfig.model_fields[k].default
                                 for k in ("lr", "head_lr_mult", "head", "optimizer", "batch_size")}}


@dataclass
class RankPolicy:
    """How the search uses the ranking (computed once, when a study starts).

    ``enqueue``: the first trials of a new study run each recipe of ``first_trials`` on the ``enqueue``
    best-ranked backbones, best first (values outside the search space are left to the sampler;
    ``unfreeze: half`` means half of that backbone's stages); 0 enqueues nothing.
    ``first_trials``: the recipes; None takes the search space's ``first_trials``, or :data:`RECIPE`.
    ``drop_below``: drop backbones whose LogME is more than this below the best (None keeps all).
    """

    enqueue: int = 1
    drop_below: float | None = None
    first_trials: list[dict] | None = None
    methods: tuple[str, ...] = ("logme",)

    @property
    def enabled(self) -> bool:
        return self.enqueue > 0 or self.drop_below is not None


def kept_backbones(scores: list[BackboneScore], drop_below: float | None) -> list[str]:
    ok = [s for s in scores if s.error is None]
    if drop_below is None or not ok or ok[0].logme is None:
        return [s.backbone for s in ok]
    best = ok[0].logme
    return [s.backbone for s in ok if s.logme is not None and s.logme >= best - drop_below]


def _fits(param, value, chosen: dict) -> bool:
    if param is None or not param.active(chosen):
        return False
    if param.kind == "fixed":
        return param.value == value
    if param.kind == "categorical":
        return value in param.choices
    low, high = param.bounds(chosen)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def task_shape(task_data: TaskData | None) -> dict | None:
    """What a recipe's ``when_task`` reads: the number of classes and the training examples per class
    (training split size / classes); None without task data."""
    if task_data is None:
        return None
    classes = task_data.data.num_classes
    return {"classes": classes, "train_per_class": len(task_data.splits.train) / max(1, classes)}


def recipe_applies(recipe: dict, shape: dict | None) -> bool:
    """Whether a recipe's ``when_task`` condition holds for a task of this shape (:func:`task_shape`); a
    recipe without one always applies, one with a condition never does when the shape is unknown."""
    cond = recipe.get("when_task")
    if not cond:
        return True
    if shape is None:
        return False
    checks = {"min_classes": lambda v: shape["classes"] >= v, "max_classes": lambda v: shape["classes"] <= v,
              "min_train_per_class": lambda v: shape["train_per_class"] >= v,
              "max_train_per_class": lambda v: shape["train_per_class"] <= v}
    return all(checks[k](v) for k, v in cond.items())


def prior_params(scores: list[BackboneScore], policy: RankPolicy, space, shape: dict | None = None) -> list[dict]:
    """The parameter sets to enqueue first: each recipe that applies to the task (``shape``: :func:`task_shape`;
    see :func:`recipe_applies`) on each top-ranked backbone (recipe by recipe), restricted to the space;
    duplicates are dropped."""
    from autoft.space import num_stages

    recipes = policy.first_trials
    if recipes is None:
        recipes = space.first_trials if space.first_trials is not None else [RECIPE]
    out = []
    for recipe in recipes:
        if not recipe_applies(recipe, shape):
            continue
        for b in kept_backbones(scores, policy.drop_below)[: policy.enqueue]:
            params = {"backbone": b}
            for name, value in recipe.items():
                if name == "when_task":
                    continue
                if name == "unfreeze" and value == "half":
                    value = max(1, round(num_stages(b) / 2))
                    p = space.get("unfreeze")
                    if p is not None and p.kind in ("int", "float"):
                        value = min(value, int(p.bounds(params)[1]))
                if _fits(space.get(name), value, params):
                    params[name] = value
            if params not in out:
                out.append(params)
    return out


def plan_first_trials(req, task_data: TaskData, cache: FeatureCache,
                      policy: RankPolicy) -> tuple[list[BackboneScore], list[dict]]:
    """For a new search: the ranking of the space's backbones (empty for a one-backbone space: nothing
    to rank) and the parameter sets to run first (:func:`prior_params`)."""
    backbones = req.space.backbones
    if len(backbones) < 2:
        return [], prior_params([BackboneScore(b) for b in backbones], policy, req.space, task_shape(task_data))
    t0 = time.perf_counter()
    # the ranking's pass over each whole backbone also keeps the prefixes of the depths the space can try:
    # the first trials' depths first (whichever backbone ranks first), then the fewest stages unfrozen first
    shape = task_shape(task_data)
    every = replace(policy, enqueue=len(backbones), drop_below=None)
    firsts = prior_params([BackboneScore(b) for b in backbones], every, req.space, shape)
    keep = {b: list(dict.fromkeys([p["unfreeze"] for p in firsts if p["backbone"] == b and "unfreeze" in p]
                                  + req.space.unfreeze_values(b))) for b in backbones}
    scores = rank_backbones(task_data, backbones, cache, methods=policy.methods, keep_unfreeze=keep)
    log.info("ranked %d backbones in %.1fs: %s", len(scores), time.perf_counter() - t0,
             ", ".join(f"{s.backbone} {s.logme:.3f}" if s.logme is not None else s.backbone for s in scores))
    return scores, prior_params(scores, policy, req.space, shape)


def apply_ranking(study, req, task_data: TaskData, cache: FeatureCache, policy: RankPolicy) -> list[BackboneScore]:
    """Start a new study: rank the space's backbones (recorded in the study's user attribute
    ``ranking``), enqueue the first trials (:func:`plan_first_trials`), and drop far-behind backbones
    from ``req.space`` if asked.  A study that already has trials reuses its recorded ranking (same
    space on resume)."""
    recorded = study.user_attrs.get(ATTR_RANKING)
    if recorded is not None:
        scores = [BackboneScore(**d) for d in recorded]
    elif not policy.enabled or study.get_trials(deepcopy=False):
        return []  # ranking off, or a study that started without it
    else:
        scores, first = plan_first_trials(req, task_data, cache, policy)
        if scores:
            study.set_user_attr(ATTR_RANKING, [s.to_dict() for s in scores])
        for params in first:
            study.enqueue_trial(params, user_attrs={ATTR_FIRST_TRIAL: True}, skip_if_exists=True)
    if policy.drop_below is None:
        return scores
    backbones = req.space.backbones
    kept = kept_backbones(scores, policy.drop_below)
    if kept and set(kept) != set(backbones):
        log.info("ranking: searching %s (dropped %s: LogME more than %g below the best)", ", ".join(kept),
                 ", ".join(sorted(set(backbones) - set(kept))), policy.drop_below)
        req.space = req.space.with_overrides({"backbone": [b for b in backbones if b in kept]})
    return scores
