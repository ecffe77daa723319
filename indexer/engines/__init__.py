"""Where pass 1 of `mammals index` runs: ``local`` (this process, decode threads) or ``ray`` (Ray Data).

Both run the same :class:`indexer.shard.ShardRunner` and hand its outputs to the same driver loop
(indexer/pipeline.py), which alone writes the store. ``local`` never imports ray.
"""

from __future__ import annotations

from dataclasses import dataclass

ENGINES: tuple[str, ...] = ("local", "ray")


@dataclass(frozen=True)
class EngineOptions:
    """How to run pass 1. The Ray fields are ignored by the local engine."""

    name: str = "local"
    # None: join the Ray this process already runs, else start a local one for the run (and stop it after);
    # "auto" or "HOST:PORT": an existing cluster (`ray start --head`).
    ray_address: str | None = None
    concurrency: int = 1  # model actors (each holds the encoder and the trained models)
    num_gpus_per_worker: float = 0.0  # GPUs per model actor (0: CPU actors)
    threads_per_worker: int = 0  # torch threads in a model actor (0: all cores of its node, as the local engine)

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ValueError(f"unknown engine {self.name!r} (choose from {', '.join(ENGINES)})")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {self.concurrency}")
        if self.num_gpus_per_worker < 0 or self.threads_per_worker < 0:
            raise ValueError("num_gpus_per_worker and threads_per_worker cannot be negative")


__all__ = ["ENGINES", "EngineOptions"]
