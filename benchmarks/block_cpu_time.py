"""Single-thread CPU time of one ViL-S block (384 wide, 2 x 1024 tokens = 512x512 at patch 16): a training
step (forward + backward) or an inference forward, median of 5 after a warm-up.

    python benchmarks/block_cpu_time.py SRC train|infer [chunkwise|parallel|recurrent]

SRC is a src/ directory holding the seglstm package to measure; run it for two trees alternately, each
in a fresh process, to compare them. CPU time (time.process_time) of one thread is far less sensitive to
other processes on a shared machine than wall time. Prints one JSON line.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def main() -> None:
    if len(sys.argv) not in (3, 4) or sys.argv[2] not in ("train", "infer"):
        sys.exit(__doc__)
    src, mode = sys.argv[1], sys.argv[2]
    backend = sys.argv[3] if len(sys.argv) == 4 else "chunkwise"
    sys.path.insert(0, src)
    import torch

    from seglstm.models.vision_lstm import ViLBlock  # the import path every measured tree has

    torch.set_num_threads(1)
    torch.manual_seed(0)
    block = ViLBlock(384, reverse=True, mlstm_backend=backend)
    x = torch.randn(2, 1024, 384, requires_grad=mode == "train")

    def step() -> None:
        if mode == "train":
            block(x).square().sum().backward()
        else:
            with torch.no_grad():
                block(x)

    step()
    times = []
    for _ in range(5):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    print(json.dumps({"src": src, "mode": mode, "backend": backend, "cpu_s": statistics.median(times)}))


if __name__ == "__main__":
    main()
