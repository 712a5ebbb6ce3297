"""orchestra-train whose background checkpoint writer stalls inside one save (for a kill test).

The save of the step named in ORCHESTRA_TEST_STALL_STEP blocks in DCP's file writer, after
writing a marker file (ORCHESTRA_TEST_MARKER), so the test can kill the job while that
checkpoint is half written. Everything else is the real command.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint.filesystem as filesystem

_write_data = filesystem.FileSystemWriter.write_data


def _stalling_write_data(self: Any, plan: Any, planner: Any) -> Any:
    if f"step{int(os.environ['ORCHESTRA_TEST_STALL_STEP']):07d}" in str(self.path):
        Path(os.environ["ORCHESTRA_TEST_MARKER"]).write_text(str(self.path))
        time.sleep(3600)
    return _write_data(self, plan, planner)


filesystem.FileSystemWriter.write_data = _stalling_write_data  # type: ignore[method-assign]

if __name__ == "__main__":
    from orchestra.cli.train import main

    sys.argv = ["orchestra-train", *sys.argv[1:]]
    main()
