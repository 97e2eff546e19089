"""One rank of ``dist_harness.run_ranks``: join the gloo group, run the function, save its result."""

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    path, func, tmp = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kwargs = torch.load(tmp / "kwargs.pt", weights_only=False)
    dist.init_process_group("gloo")
    try:
        result = getattr(module, func)(**kwargs)
        torch.save(result, tmp / f"result-{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
