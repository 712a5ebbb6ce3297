"""One rank of the end-of-run stress test: fit -> final validation -> sample, many times in a row.

Launched by torchrun (2 processes, gloo). Each round is a fresh tiny run in its own dir, with
the default loaders (no worker processes: the forked worker of the final validation's loader is
what once deadlocked after fit).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from orchestra.config import StrategyConfig, StrategyName
from orchestra.train.run import train
from tests.helpers import tiny_config


def main() -> None:
    corpus, cache, out, strategy, rounds = sys.argv[1:6]
    times = []
    for i in range(int(rounds)):
        cfg = tiny_config(
            Path(corpus),
            Path(cache),
            Path(out) / f"round{i:02d}",
            max_steps=2,
            micro_batch_size=2,
            global_batch_size=4,
            val_every_n_steps=100,  # the final validation is the one after fit
            val_batches=2,
            devices=2,
            accelerator="cpu",
            collective_timeout_s=60.0,
        )
        cfg = dataclasses.replace(
            cfg,
            strategy=StrategyConfig(name=StrategyName(strategy)),
        )
        started = time.time()
        result = train(cfg)
        times.append(time.time() - started)
        if result.summary:
            assert result.summary["steps"] == 2 and result.summary["val_loss"] is not None, result.summary
    print(json.dumps({"rounds": len(times), "max_s": max(times)}), flush=True)


if __name__ == "__main__":
    main()
