"""Run by test_ddp.py under `torchrun --nproc_per_node 2`: train a tiny LM data-parallel (gloo on
CPU) and write this rank's sha256 of the final weights to OUT/hash-RANK.json.

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port P \\
        ddp_worker.py CORPUS OUT [DENSE]

With DENSE (a dense Hugging Face model directory) the model is upcycled from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from tests.training.conftest import tiny_config
from camex_runtime.training import train


def state_sha256(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    corpus, out = sys.argv[1], Path(sys.argv[2])
    dense = {"from_dense": sys.argv[3]} if len(sys.argv) > 3 else {}
    result = train(tiny_config(out / "run", [corpus], steps=4, batch_size=4, eval_every=2, **dense))
    rank = int(os.environ["RANK"])
    record = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]),
              "sha256": state_sha256(result.model), "metrics": result.metrics}
    (out / f"hash-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
