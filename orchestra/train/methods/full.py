"""finetune=full: every pretrained weight trains (optionally with L2-SP and layer-wise lr)."""

from __future__ import annotations

from orchestra.train.methods.spec import MethodSpec

SPEC = MethodSpec(name="full")
