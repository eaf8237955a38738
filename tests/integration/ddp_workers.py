"""Functions that ``torch.multiprocessing.spawn`` runs as ranks in tests/integration/test_ddp.py.

They live apart from the test module because a spawned rank imports the module its function comes from: this one
imports torch and src.distributed only, where tests/integration/test_ddp.py would cost each rank MLflow, transformers
and peft (about 20 s of the test on 2 cores).
"""

from __future__ import annotations

import os


def average_gradients_rank(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from src.distributed import average_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights on both ranks, as DDP starts
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1 + rank))  # each rank its own data
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp(x).square().sum().backward()  # DDP's hooks average the gradients
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()  # the module alone: DDP's hooks stay off
    local = [p.grad.clone() for p in model.parameters()]
    average_gradients([p.grad for p in model.parameters()])
    mixed = [torch.full((3,), float(rank), dtype=torch.bfloat16), torch.full((2, 2), 2.0 * rank)]
    average_gradients(mixed)  # one all-reduce per dtype
    result = {"reference": reference, "local": local, "averaged": [p.grad for p in model.parameters()], "mixed": mixed}
    torch.save(result, f"{out}/rank{rank}.pt.part")
    os.replace(f"{out}/rank{rank}.pt.part", f"{out}/rank{rank}.pt")  # whole, once it is there
    dist.destroy_process_group()
