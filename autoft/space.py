"""Declarative search spaces (``search_spaces/*.yaml``) and their one, engine-neutral translator.

A space file maps parameter names (fields of :class:`~autoft.core.config.TrialConfig`) to:

* a list — categorical choices: ``optimizer: [adamw, sgd]``
* a scalar — a fixed value: ``schedule: cosine``
* ``{choices: [...]}`` — categorical, with optional ``when``
* ``{low: a, high: b, log: bool, step: s}`` — int or float (from the field's type), optional ``when``

``when: {head: mlp}`` samples a parameter only if an earlier one has that value (or one of a list).
``unfreeze`` may use ``high: num_stages`` (the chosen backbone's stage count, capped by
``max: N``): its range is conditional on the backbone.  ``backbone`` is required.

One key is not a parameter: ``first_trials``, a list of partial configurations (recipes) that a new
study tries first, on the best-ranked backbone (see :mod:`autoft.rank`); ``unfreeze: half`` means
half of that backbone's stages; parameters a recipe does not name are sampled.  A recipe's ``when_task``
(e.g. ``{min_classes: 20, max_train_per_class: 20}``) restricts it to tasks of that shape.

:meth:`SearchSpace.sample` is a define-by-run function over any Optuna-style trial (``suggest_*``),
so the Optuna engine and Ray Tune's ``OptunaSearch`` use the same code.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoft.core.config import TrialConfig
from autoft.errors import ConfigError, did_you_mean
from autoft.task import read_yaml

PARAMS = [n for n in TrialConfig.model_fields if n != "seed"]
_INT_FIELDS = {n for n, f in TrialConfig.model_fields.items() if f.annotation is int}


@functools.lru_cache(maxsize=None)
def num_stages(backbone: str) -> int:
    """Stage count of a backbone, from its zoo record: no network is built and no weights are read."""
    from autoft.zoo import get_record

    return get_record(backbone).stage_count()


@dataclass
class Param:
    name: str
    kind: str  # "categorical" | "int" | "float" | "fixed"
    choices: list | None = None
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    cap: int | None = None  # unfreeze: max
    value: Any = None
    when: dict[str, list] = field(default_factory=dict)

    def active(self, chosen: dict) -> bool:
        return all(chosen.get(k) in v for k, v in self.when.items())

    def bounds(self, chosen: dict) -> tuple:
        high = self.high
        if high == "num_stages":
            high = num_stages(chosen["backbone"])
            if self.cap is not None:
                high = min(high, self.cap)
        return self.low, high

    def suggest(self, trial, chosen: dict):
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        low, high = self.bounds(chosen)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(low), int(high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(low), float(high), step=self.step, log=self.log)


FIRST_TRIALS = "first_trials"


@dataclass
class SearchSpace:
    params: list[Param]
    file: str | None = None
    first_trials: list[dict] | None = None  # recipes tried first; None: the built-in one (autoft.rank)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def get(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def unfreeze_values(self, backbone: str) -> list[int]:
        """Every ``unfreeze`` a trial on ``backbone`` can get from this space (sorted; empty when the space
        has no ``unfreeze``, or a float range)."""
        p = self.get("unfreeze")
        if p is None:
            return []
        if p.kind == "fixed":
            vals = [p.value]
        elif p.kind == "categorical":
            vals = list(p.choices)
        elif p.kind == "int":
            low, high = p.bounds({"backbone": backbone})
            vals = list(range(int(low), int(high) + 1, int(p.step or 1)))
        else:
            return []
        return sorted({int(v) for v in vals if isinstance(v, int) and not isinstance(v, bool)})

    @property
    def backbones(self) -> list[str]:
        p = self.get("backbone")
        return list(p.choices) if p.kind == "categorical" else [p.value]

    def sample(self, trial, fixed: dict | None = None) -> TrialConfig:
        """Define-by-run: ask ``trial`` for every active parameter; return the full config."""
        chosen: dict[str, Any] = {}
        for p in self.params:
            if p.active(chosen):
                chosen[p.name] = p.suggest(trial, chosen)
        return TrialConfig(**{**chosen, **(fixed or {})})

    def with_overrides(self, overrides: dict[str, Any]) -> "SearchSpace":
        """A copy where each overridden parameter is fixed (a list for ``backbone`` stays a choice)."""
        params = []
        for name, v in overrides.items():
            _check_name(name, "--set", name)
            if isinstance(v, list) and not v:
                raise ConfigError(f"the list for '{name}' is empty", file="--set", field=name)
            if name != "backbone":
                for one in (v if isinstance(v, list) else [v]):
                    _check_value(name, one, "--set", name)
        for p in self.params:
            if p.name in overrides:
                v = overrides[p.name]
                if isinstance(v, list) and len(v) > 1:
                    params.append(Param(p.name, "categorical", choices=list(v), when=p.when))
                else:
                    params.append(Param(p.name, "fixed", value=v[0] if isinstance(v, list) else v, when=p.when))
            else:
                params.append(p)
        for name, v in overrides.items():
            if name not in self.names:
                params.append(Param(name, "fixed", value=v))
        space = SearchSpace(params, self.file, self.first_trials)
        space.validate()
        return space

    def validate(self) -> "SearchSpace":
        from autoft.zoo import get_spec

        for b in self.backbones:
            try:
                get_spec(b)
            except Exception as exc:
                raise ConfigError(str(exc), file=self.file, field="backbone") from None
        if not self.backbones:
            raise ConfigError("the backbone list is empty; name at least one backbone", file=self.file,
                              field="backbone")
        un = self.get("unfreeze")
        if un is not None and un.kind != "categorical":
            top = un.value if un.kind == "fixed" else un.high
            if isinstance(top, int):
                for b in self.backbones:
                    if top > num_stages(b):
                        raise ConfigError(
                            f"unfreeze {top} is above the {num_stages(b)} stages of backbone '{b}'; use at most "
                            f"{num_stages(b)}, or 'high: num_stages' to follow each backbone", file=self.file,
                            field="unfreeze")
        elif un is not None:
            for b in self.backbones:
                if max(un.choices) > num_stages(b):
                    raise ConfigError(f"unfreeze choice {max(un.choices)} is above the {num_stages(b)} stages of "
                                      f"backbone '{b}'", file=self.file, field="unfreeze")
        # a complete config must be buildable from the defaults + fixed values
        try:
            TrialConfig(backbone=self.backbones[0], **{p.name: p.value for p in self.params
                                                        if p.kind == "fixed" and p.name != "backbone"})
        except Exception as exc:
            raise ConfigError(f"fixed values are invalid: {exc}", file=self.file) from None
        return self


def _check_name(name: str, file, fld: str | None = None) -> None:
    if name not in PARAMS:
        raise ConfigError(f"unknown parameter '{name}'{did_you_mean(name, PARAMS)}; parameters are: "
                          f"{', '.join(PARAMS)}", file=file, field=fld or name)


def parse_space(doc: dict, file: str | Path | None = None) -> SearchSpace:
    file = str(file) if file else None
    if "backbone" not in doc:
        raise ConfigError("a search space needs 'backbone' (a list of backbone names)", file=file, field="backbone")
    doc = dict(doc)
    first_trials = _parse_first_trials(doc.pop(FIRST_TRIALS), file) if FIRST_TRIALS in doc else None
    order = ["backbone"] + [k for k in doc if k != "backbone"]
    params = []
    for name in order:
        hint = did_you_mean(name, [FIRST_TRIALS]) if name not in PARAMS else ""
        if hint:
            raise ConfigError(f"unknown key '{name}'{hint}", file=file, field=name)
        _check_name(name, file)
        params.append(_parse_param(name, doc[name], file))
    names = [p.name for p in params]
    for p in params:
        for dep in p.when:
            if dep not in names[: names.index(p.name)]:
                raise ConfigError(f"'when' refers to '{dep}', which is not declared before '{p.name}'",
                                  file=file, field=f"{p.name}.when")
    return SearchSpace(params, file, first_trials).validate()


def _parse_first_trials(spec: Any, file) -> list[dict]:
    if not isinstance(spec, list) or not all(isinstance(r, dict) for r in spec):
        raise ConfigError("first_trials must be a list of mappings (parameter: value), e.g. "
                          "[{unfreeze: half, lr: 1.0e-3}]", file=file, field=FIRST_TRIALS)
    for i, recipe in enumerate(spec):
        for name, value in recipe.items():
            fld = f"{FIRST_TRIALS}[{i}].{name}"
            if name == WHEN_TASK:
                _check_when_task(value, file, fld)
                continue
            if name == "backbone":
                raise ConfigError("a first trial takes its backbone from the ranking (the best-ranked first); "
                                  "leave 'backbone' out", file=file, field=fld)
            _check_name(name, file, fld)
            if name == "unfreeze":
                if value != "half" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                    raise ConfigError(f"unfreeze must be an integer >= 0 or 'half', got {value!r}", file=file,
                                      field=fld)
                continue
            _check_value(name, value, file, fld)
    return [dict(r) for r in spec]


# A recipe's ``when_task`` condition: the recipe runs only on a task whose training split has that many classes
# and (on average) that many examples per class, e.g. ``when_task: {min_classes: 20, max_train_per_class: 20}``
# (autoft.rank.recipe_applies).
WHEN_TASK = "when_task"
WHEN_TASK_KEYS = ("min_classes", "max_classes", "min_train_per_class", "max_train_per_class")


def _check_when_task(value: Any, file, fld: str) -> None:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"when_task must be a mapping of some of {list(WHEN_TASK_KEYS)} to numbers, e.g. "
                          "{min_classes: 20, max_train_per_class: 20}", file=file, field=fld)
    for k, v in value.items():
        if k not in WHEN_TASK_KEYS:
            raise ConfigError(f"unknown condition '{k}'{did_you_mean(k, WHEN_TASK_KEYS)}; conditions are: "
                              f"{', '.join(WHEN_TASK_KEYS)}", file=file, field=f"{fld}.{k}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{k} must be a number >= 0, got {v!r}", file=file, field=f"{fld}.{k}")


def _parse_param(name: str, spec: Any, file) -> Param:
    fld = name
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        return Param(name, "fixed", value=spec)
    allowed = {"choices", "low", "high", "log", "step", "max", "when", "value"}
    for k in spec:
        if k not in allowed:
            raise ConfigError(f"unknown key '{k}'{did_you_mean(k, allowed)}; allowed: {sorted(allowed)}",
                              file=file, field=f"{fld}.{k}")
    when = {}
    for k, v in (spec.get("when") or {}).items():
        when[k] = v if isinstance(v, list) else [v]
    if "value" in spec:
        return Param(name, "fixed", value=spec["value"], when=when)
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError("choices must be a non-empty list", file=file, field=f"{fld}.choices")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"choices repeat a value: {choices}", file=file, field=f"{fld}.choices")
        if name != "backbone":
            for c in choices:
                _check_value(name, c, file, f"{fld}.choices")
        return Param(name, "categorical", choices=choices, when=when)
    if "low" not in spec or "high" not in spec:
        raise ConfigError("a range needs both 'low' and 'high' (or give 'choices' or a fixed value)",
                          file=file, field=fld)
    kind = "int" if name in _INT_FIELDS else "float"
    low, high = spec["low"], spec["high"]
    if high == "num_stages":
        if name != "unfreeze":
            raise ConfigError("'num_stages' is only allowed as the high end of unfreeze", file=file, field=f"{fld}.high")
    for key, v in (("low", low), ("high", high)):
        if v == "num_stages":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"must be a number, got {v!r}", file=file, field=f"{fld}.{key}")
        _check_value(name, v, file, f"{fld}.{key}")
    if high != "num_stages" and low > high:
        raise ConfigError(f"low ({low}) is above high ({high})", file=file, field=fld)
    log = bool(spec.get("log", False))
    if log and (low <= 0):
        raise ConfigError(f"a log range needs low > 0, got {low}", file=file, field=f"{fld}.low")
    if log and spec.get("step") is not None:
        raise ConfigError("'step' and 'log: true' cannot be combined", file=file, field=f"{fld}.step")
    return Param(name, kind, low=low, high=high, log=log, step=spec.get("step"), cap=spec.get("max"), when=when)


def _check_value(name: str, value: Any, file, fld: str) -> None:
    """Validate one candidate value against TrialConfig's field rules."""
    if name == "unfreeze":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"unfreeze must be an integer >= 0, got {value!r}", file=file, field=fld)
        return
    try:
        TrialConfig(backbone="resnet20", **{name: value})
    except Exception as exc:
        msg = str(exc).split("\n")
        detail = msg[2].strip() if len(msg) > 2 else str(exc)
        detail = detail.split(" [type=")[0]
        raise ConfigError(f"invalid value {value!r}: {detail}", file=file, field=fld) from None


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    return parse_space(read_yaml(path, "search space"), path)
