"""Run a small search from Python instead of the CLI: the same use case, the same results folder.

    AUTOFT_HOME=../shared/assets python examples/search_from_python.py

Uses the built-in `digits` task with a reduced budget (4 trials, 2 epochs, resnet20 only), prints
each trial as it ends (an event callback), then the winner's validation and test scores and the
per-backbone leaderboard.
"""
from __future__ import annotations

import tempfile

import autoft


class PrintTrials(autoft.Callback):
    def on_trial_end(self, e):
        score = "-" if e.value is None else f"{e.value:.4f}"
        print(f"trial {e.number}: {e.state} {score} ({e.config.get('backbone')}, unfreeze {e.config.get('unfreeze')})")


def main() -> None:
    out = tempfile.mkdtemp(prefix="autoft-example-")
    r = autoft.search("digits", n_trials=4, overrides={"backbone": ["resnet20"], "epochs": 2}, results_dir=out,
                      callbacks=[PrintTrials()])
    print(f"best trial #{r.best_trial.number}: validation accuracy {r.best_value:.4f}, "
          f"test accuracy {r.test_metrics['accuracy']:.4f}")
    print("config:", r.best_config)
    print(r.leaderboard().to_string(index=False))
    print("files:", ", ".join(str(p) for p in r.files))


if __name__ == "__main__":
    main()
