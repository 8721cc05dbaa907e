"""One pruner spec, translated by each engine: Optuna's pruners, Ray Tune's schedulers.

The task file's ``pruner`` (or ``--pruner``) becomes a :class:`PrunerSpec` once, with the epochs as
the fidelity and the first rung from the training size (:func:`first_rung`); the Optuna engine asks
it for an Optuna pruner, the Ray engine for a Tune scheduler:

=====================  ======================================  ==========================================
name                   Optuna                                  Ray Tune
=====================  ======================================  ==========================================
``hyperband``          ``HyperbandPruner`` (factor 3)          asynchronous Hyperband (ASHA, 3 brackets)
``successive_halving`` ``SuccessiveHalvingPruner`` (factor 3)  ASHA (1 bracket)
``median``             ``MedianPruner`` (4 startup trials)     ``MedianStoppingRule`` (4 samples)
``none``               ``NopPruner``                           ``FIFOScheduler``
=====================  ======================================  ==========================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from autoft.errors import ConfigError

PRUNERS = ("hyperband", "median", "successive_halving", "none")
MIN_EXAMPLES_BEFORE_PRUNING = 1000


def first_rung(n_train: int, max_epochs: int) -> int:
    """The first epoch after which a trial may be pruned: once it has trained on about
    ``MIN_EXAMPLES_BEFORE_PRUNING`` examples, and at most half-way through its epochs.

    One epoch for most tasks. On a few-shot task an epoch is a handful of optimizer steps (200
    examples: 2-7 steps, still inside the warm-up), and the score after it ranks configurations at
    random; pruning on it throws away good ones (digits-fewshot: 5 epochs of 10)."""
    need = math.ceil(MIN_EXAMPLES_BEFORE_PRUNING / max(1, n_train))
    return max(1, min(need, max_epochs // 2))


@dataclass(frozen=True)
class PrunerSpec:
    name: str
    max_epochs: int
    first: int = 1  # the first epoch after which a trial may be stopped
    reduction_factor: int = 3
    startup_trials: int = 4  # median: trials that always run to the end first

    def __post_init__(self):
        if self.name not in PRUNERS:
            raise ConfigError(f"unknown pruner '{self.name}'; expected one of {', '.join(PRUNERS)}", field="pruner")

    @classmethod
    def for_search(cls, name: str, max_epochs: int, n_train: int | None) -> "PrunerSpec":
        return cls(name, max_epochs, 1 if n_train is None else first_rung(n_train, max_epochs))

    def optuna(self):
        import optuna

        if self.name == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=self.first, max_resource=self.max_epochs,
                                                  reduction_factor=self.reduction_factor)
        if self.name == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.first)
        if self.name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=self.first,
                                                          reduction_factor=self.reduction_factor)
        return optuna.pruners.NopPruner()

    def ray(self, metric: str, mode: str):
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

        common = {"metric": metric, "mode": mode}
        if self.name in ("hyperband", "successive_halving"):
            # asynchronous: no trial is ever paused, so no checkpoints are needed
            return ASHAScheduler(time_attr="training_iteration", max_t=self.max_epochs, grace_period=self.first,
                                 reduction_factor=self.reduction_factor,
                                 brackets=3 if self.name == "hyperband" else 1, **common)
        if self.name == "median":
            return MedianStoppingRule(time_attr="training_iteration", grace_period=self.first,
                                      min_samples_required=self.startup_trials, **common)
        return FIFOScheduler()

    def describe(self) -> str:
        return self.name if self.name == "none" else f"{self.name} (first decision after epoch {self.first})"
