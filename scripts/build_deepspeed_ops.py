"""Build DeepSpeed's JIT-compiled CPU ops now (set-up), not inside a test's time limit.

On a CPU machine DeepSpeed's communication backend loads its shared-memory all-reduce op
(ShareMemCommBuilder) when the first process group starts, compiling it with g++ on first use: ~1.5 min
on 2 loaded cores, longer than a two-process test should ever wait. Built once into
$TORCH_EXTENSIONS_DIR; a no-op (a second or two) when the build is there. Skipped where DeepSpeed is not
installed or the op does not apply.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time


def main() -> int:
    if importlib.util.find_spec("deepspeed") is None:
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print("== deepspeed: no CPU communication op to build here")
        return 0
    started = time.perf_counter()
    builder.load(verbose=False)
    print(
        f"== deepspeed: {builder.absolute_name()} ready in {time.perf_counter() - started:.0f} s "
        f"({os.environ.get('TORCH_EXTENSIONS_DIR', 'torch default cache')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
