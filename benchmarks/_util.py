"""Shared by the benchmark scripts: environment record, output files, config sampling."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"


def setup(threads: int | None) -> None:
    """Offline assets (unless already set) and the number of intra-op threads."""
    assets = ROOT.parent / "shared" / "assets"
    if "AUTOFT_HOME" in os.environ:
        os.environ["AUTOFT_HOME"] = str(Path(os.environ["AUTOFT_HOME"]).expanduser().resolve())
    elif assets.is_dir():
        os.environ["AUTOFT_HOME"] = str(assets)
    os.environ.setdefault("AUTOFT_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if threads:
        torch.set_num_threads(threads)


def environment() -> dict:
    import optuna
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "optuna": optuna.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def write(name: str, doc: dict, markdown: str, out: Path = OUT) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    doc.setdefault("environment", {}).setdefault("load_average_at_end", [round(x, 2) for x in os.getloadavg()])
    j, m = out / f"{name}.json", out / f"{name}.md"
    j.write_text(json.dumps(doc, indent=1, default=str))
    m.write_text(markdown)
    return j, m


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}".rstrip("0").rstrip(".")
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def sample_configs(space, n: int, seed: int, fixed: dict) -> list:
    """``n`` configurations drawn by Optuna's RandomSampler through the space's define-by-run
    translator (the same code the search uses)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.sample(trial, fixed))
        study.tell(trial, 0.0)
    return out
