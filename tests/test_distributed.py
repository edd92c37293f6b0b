"""Distributed scoring: 2 gloo processes on CPU, each scoring its shard of the batches; the
all-reduced result equals the single-process result on the same batches (float64, ≤1e-12)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import oba_ext

WORLD = 2


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (3,), generator=g)) for _ in range(4)]
    return model, batches


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model, batches = _setup()
        res = oba_ext.score(model, batches[rank::WORLD], kind="oba", granularity=("out", "in", "weight"),
                            impl="reference", progress=False)
        torch.save({"num_batches": res.num_batches,
                    "scores": {n: ls.tensors() for n, ls in res.items()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_gloo_ranks_match_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model, batches = _setup()
    single = oba_ext.score(model, batches, kind="oba", granularity=("out", "in", "weight"),
                           impl="reference", progress=False)
    for rank in range(WORLD):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"), weights_only=False)
        assert got["num_batches"] == len(batches)
        for name in single:
            for key, t in single[name].tensors().items():
                torch.testing.assert_close(got["scores"][name][key], t, rtol=1e-12, atol=1e-14)
