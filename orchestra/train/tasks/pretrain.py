"""task=pretrain: next-token prediction over a packed corpus (the data group), every row full."""

from __future__ import annotations

from typing import Any

from orchestra.train.module import CausalLMModule
from orchestra.train.plan import RunPlan, TaskSpec


def _datamodule(plan: RunPlan) -> Any:
    from orchestra.data.datamodule import TokenDataModule

    assert plan.dataset_dir is not None  # plan_run prepares the corpus for pretraining
    return TokenDataModule(dataset_dir=plan.dataset_dir, **plan.batch_args())


SPEC = TaskSpec(
    name="pretrain",
    module=CausalLMModule,
    build_datamodule=_datamodule,
    needs_base=False,
    full_rows=True,
    model_parallel=True,
)
