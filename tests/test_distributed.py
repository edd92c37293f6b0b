"""Distributed scoring: 2 gloo processes on CPU, each scoring its shard of the batches; the
all-reduced result equals the single-process result on the same batches (float64, ≤1e-12).
Also: a DistributedDataParallel-wrapped model, and a rank without batches (no hang)."""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import oba_ext
from tolerances import F64_SAME_FORMULA

WORLD = 2


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (3,), generator=g)) for _ in range(4)]
    return model, batches


def _worker(rank, port, out_dir):
    """Per rank: (1) its shard of the batches, all-reduced; (2) a DistributedDataParallel-wrapped
    model (scored as the inner module); (3) a run where rank 1 has no batch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model, batches = _setup()
        res = oba_ext.score(model, batches[rank::WORLD], kind="oba", granularity=("out", "in", "weight"),
                            impl="reference", progress=False)
        ddp = nn.parallel.DistributedDataParallel(model)
        res_ddp = oba_ext.score(ddp, batches[rank::WORLD], kind="oba",
                                granularity=("out", "in", "weight"), impl="auto", progress=False)
        mine = [] if rank == 1 else batches[:2]  # rank 1 has no batch
        try:
            oba_ext.score(model, mine, kind="oba", impl="reference", progress=False)
            error = None
        except ValueError as e:
            error = str(e)
        torch.save({"num_batches": res.num_batches,
                    "scores": {n: ls.tensors() for n, ls in res.items()},
                    "ddp_names": sorted(res_ddp),
                    "ddp_scores": {n: ls.tensors() for n, ls in res_ddp.items()},
                    "empty_error": error},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2 gloo ranks once, under a hard timeout (a hang fails instead of blocking)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo backend")
    out = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 150
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "the ranks hung"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _single():
    model, batches = _setup()
    return oba_ext.score(model, batches, kind="oba", granularity=("out", "in", "weight"),
                         impl="reference", progress=False)


def test_two_gloo_ranks_match_single_process(ranks):
    single = _single()
    for got in ranks:
        assert got["num_batches"] == 4
        for name in single:
            for key, t in single[name].tensors().items():
                torch.testing.assert_close(got["scores"][name][key], t, rtol=F64_SAME_FORMULA, atol=0)


def test_ddp_wrapped_model_scores_the_inner_module(ranks):
    single = _single()
    for got in ranks:
        assert got["ddp_names"] == sorted(single)  # "0", "3": not "module.0"
        for name in single:
            for key, t in single[name].tensors().items():
                torch.testing.assert_close(got["ddp_scores"][name][key], t, rtol=F64_SAME_FORMULA, atol=0)


def test_rank_without_batches_raises_on_every_rank_without_hanging(ranks):
    """Issue 11 ask 3: the ranks agree (one all-reduce) before raising, so rank 0 does not wait
    forever in the all-reduce of the sums; both raise the same error naming rank 1."""
    for got in ranks:
        assert got["empty_error"] is not None
        assert "rank(s) [1] of 2 got no batch" in got["empty_error"]


def test_rank_device_under_nccl():
    """Under NCCL a rank scores on cuda:LOCAL_RANK (device 'cuda' or a model on another GPU);
    an explicit index is kept; other backends and CPU devices are unchanged. (Pure logic: no
    GPU is touched.)"""
    from oba_ext.model_prep import rank_device
    cuda0, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert rank_device("cuda", cpu, "nccl", 3) == torch.device("cuda", 3)
    assert rank_device(None, cuda0, "nccl", 1) == torch.device("cuda", 1)
    assert rank_device("cuda:2", cuda0, "nccl", 1) == torch.device("cuda", 2)
    assert rank_device(None, cuda0, "gloo", 1) == cuda0
    assert rank_device(None, cpu, "nccl", 1) == cpu
    assert rank_device("cuda", cpu, None, None) == torch.device("cuda")
