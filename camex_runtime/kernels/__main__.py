"""`python -m camex_runtime.kernels`: build (or find) the native kernels now and say which
kernels serve linear layers on this machine. Image builds run it, with `CAMEX_KERNELS_DIR` set,
so that a container loads a prebuilt library and never compiles at start-up.

Exit status 0 when the native kernels load, 1 when serving would fall back to torch's.
"""
from __future__ import annotations

import logging
import sys

from camex_runtime import kernels
from camex_runtime.kernels import build


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernels.status()  # logs "linear kernels: ..." (and a build's progress)
    print(f"build directory: {build.build_dir()}")
    return 0 if kernels.native() is not None else 1


if __name__ == "__main__":
    sys.exit(main())
