"""Two gloo processes hold the same CMIRegularizer state as one process on the union of their batches."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmi_fused import CMIRegularizer

WORLD_SIZE = 2
NUM_CLASSES, DIM = 3, 6
SETTINGS = [("epoch", "none"), ("ema", "none"), ("frozen", "none"), ("ema", "center_l2"), ("frozen", "center_l2")]


def union_batches(count, seed):
    """Batches of the whole job; rank r trains on rows r, r + WORLD_SIZE, ... of each."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(10, DIM, generator=generator) * 2, torch.randint(0, NUM_CLASSES, (10,), generator=generator))
        for _ in range(count)
    ]


def shard(batches, rank, world_size):
    return [(h[rank::world_size], y[rank::world_size]) for h, y in batches]


def run_settings(rank, world_size):
    """Train every setting for two epochs on this rank's shard; return the state dicts."""
    states = {}
    for mode, normalization in SETTINGS:
        reg = CMIRegularizer(NUM_CLASSES, DIM, mode, temperature=0.5, normalization=normalization, momentum=0.7)
        if mode == "frozen":
            reg.freeze(shard(union_batches(3, seed=11), rank, world_size))
        for epoch in range(2):
            for h, y in shard(union_batches(4, seed=epoch), rank, world_size):
                reg(h, y)
            reg.end_epoch()
        states[f"{mode}-{normalization}"] = reg.state_dict()
    return states


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(run_settings(rank, WORLD_SIZE), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_match_one_process_on_the_union(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    single = run_settings(0, 1)
    for rank in range(WORLD_SIZE):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        for setting, reference in single.items():
            for name in ("centroids", "centroid_valid", "feature_mean", "epoch"):
                assert torch.allclose(ranked[setting][name].double(), reference[name].double(), atol=1e-6), (
                    f"rank {rank}, {setting}: {name} differs from one process on the union"
                )
    # the shards differ, so matching the union is not automatic
    first_batch = union_batches(1, seed=0)
    assert not torch.equal(shard(first_batch, 0, WORLD_SIZE)[0][0], shard(first_batch, 1, WORLD_SIZE)[0][0])
