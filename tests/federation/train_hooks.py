"""``train_hook`` programs for the real-process tests: what a hospital runs before it packs a round.

    python train_hooks.py wait FLAG       contribute the fine-tune as is, once FLAG exists
    python train_hooks.py poison ROUND    in ROUND, a scaled-up update: every norm weight times 1e30
                                          (finite, so every signature and check passes); else as is

The hook reads ``FEDMERGE_ROUND``, ``FEDMERGE_FINETUNED`` and writes ``FEDMERGE_OUTPUT``, as
fedmerge documents for ``train_hook``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    what, arg = argv
    source, out = Path(os.environ["FEDMERGE_FINETUNED"]), Path(os.environ["FEDMERGE_OUTPUT"])
    if what == "wait":
        deadline = time.monotonic() + 600
        while not Path(arg).exists():
            if time.monotonic() > deadline:
                print(f"{arg} never appeared", file=sys.stderr)
                return 1
            time.sleep(0.2)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if what == "poison" and os.environ["FEDMERGE_ROUND"] == arg:
        from safetensors.torch import load_file, save_file

        for f in tmp.glob("*.safetensors"):
            tensors = load_file(f)
            save_file({k: v * 1e30 if "norm" in k else v for k, v in tensors.items()}, f, metadata={"format": "pt"})
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
