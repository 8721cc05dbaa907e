"""Search engines: adapters of one contract (:class:`autoft.engines.base.Engine`).

``optuna`` runs trials in this process (an Optuna study, threads for ``n_jobs``; other processes join
with ``autoft worker``); ``ray`` runs them on a Ray cluster (Ray Tune with Optuna's sampler). Both
take the same :class:`~autoft.engines.base.SearchRequest`, translate the same pruner spec, emit the
same events and leave their trials in the same study record.
"""
from __future__ import annotations

ENGINES = ("optuna", "ray")


def get_engine(name: str):
    """The engine called ``name`` (imported on first use: Ray is heavy)."""
    if name == "optuna":
        from autoft.engines.optuna_engine import OptunaEngine

        return OptunaEngine()
    if name == "ray":
        from autoft.engines.ray_engine import RayEngine

        return RayEngine()
    from autoft.errors import ConfigError

    raise ConfigError(f"unknown engine '{name}'; expected one of {', '.join(ENGINES)}", field="backend")
