"""The core: fine-tune one configuration and score it (engine-neutral)."""
from autoft.core.cache import FeatureCache
from autoft.core.config import TrialConfig
from autoft.core.reporter import NullReporter, Reporter, StopAfter
from autoft.core.train import FineTuneResult, TaskData, fine_tune_and_score

__all__ = ["FeatureCache", "FineTuneResult", "NullReporter", "Reporter", "StopAfter", "TaskData",
           "TrialConfig", "fine_tune_and_score"]
