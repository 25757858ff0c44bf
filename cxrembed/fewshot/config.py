"""The few-shot sweep's configuration: one dataclass, saved next to every result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cxrembed.errors import ConfigError

#: Heads that need no training sample: scored once, reported as the 0-shot rows.
TRAINING_FREE = ("zeroshot", "adapted")
TEXT_HEADS = ("zeroshot", "tip")
CI_METHODS = ("pooled", "full", "none")


@dataclass
class FewShotConfig:
    """Everything that defines a sweep; saved next to its outputs."""

    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: int = 10  # draws per shot count: seeds 0 .. seeds-1
    heads: tuple[str, ...] = ("mlp", "linear", "knn", "tip", "zeroshot")
    no_finding: bool = True  # add K "No Finding" images as negatives
    init: str = "random"  # mlp start: "random" or "adapted" (the paper's protocol)
    bootstrap: int = 1000  # patient resamples for intervals (0: none)
    # Interval of the seed-mean AUC (test patients resampled; the same resamples for every
    # head and shot count):
    # "pooled": resample b scores seed b mod seeds only; its value is the seed mean plus
    #   that seed's deviation from its own point estimate. Conservative (the variance of a
    #   mean over seeds is at most the mean of the seeds' variances) at the cost of 1x.
    # "full": every resample scores every seed and averages them: exact, seeds x the cost.
    ci: str = "pooled"
    level: float = 0.95
    seed: int = 0  # base seed of draws, head initialisations and resamples
    test_split: str = "test"
    head_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # torch device of the mlp head and the AUC scorer: "cpu", "cuda[:N]" (both on the GPU;
    # the other heads are numpy on the CPU either way) or "auto" (a GPU when there is one);
    # the device the sweep ran on is in its result (source["device"])
    device: str = "cpu"

    def __post_init__(self) -> None:
        from cxrembed.heads import available_heads

        self.shots = tuple(sorted({int(k) for k in self.shots}))
        self.heads = tuple(dict.fromkeys(self.heads))
        if not self.shots or self.shots[0] < 1:
            raise ConfigError(f"shots must be positive integers, got {self.shots}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}")
        valid = set(available_heads()) | {"adapted"}
        unknown = [h for h in self.heads if h not in valid]
        if unknown or not self.heads:
            raise ConfigError(f"unknown head {', '.join(unknown) or '(none)'}; expected some "
                              f"of: {', '.join(sorted(valid))}")
        if self.init not in ("random", "adapted"):
            raise ConfigError(f"init must be 'random' or 'adapted', got {self.init!r}")
        if self.ci not in CI_METHODS:
            raise ConfigError(f"ci must be one of {', '.join(CI_METHODS)}, got {self.ci!r}")
        if self.bootstrap < 0:
            raise ConfigError(f"bootstrap must be >= 0, got {self.bootstrap}")
        if self.test_split in ("train", "val"):
            raise ConfigError(f"test_split {self.test_split!r} is where shots or the selection "
                              "sample are drawn from; score on another split (test)")
        if not 0 < self.level < 1:
            raise ConfigError(f"level must be in (0, 1), got {self.level}")
        bad = sorted(set(self.head_options) - valid)
        if bad:
            raise ConfigError(f"head_options for unknown head(s) {', '.join(bad)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FewShotConfig":
        from cxrembed.config import from_mapping

        return from_mapping(cls, values, "few-shot")
