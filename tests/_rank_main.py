"""One rank of ``dist_harness.run_ranks``: join the gloo group, run the function, save its result."""

import importlib.util
from pathlib import Path

import torch
import torch.distributed as dist


def run(path: str, func: str, tmp: Path) -> None:
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
