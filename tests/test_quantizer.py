import pytest
import torch
import torch.multiprocessing as mp

import perco.models.quantizer as quantizer_module
from perco.models.quantizer import VectorQuantizer


def _grid(points: torch.Tensor) -> torch.Tensor:
    """Rows (N, D) → a (1, D, 1, N) feature map the quantizer takes."""
    return points.t()[None, :, None, :]


def _vq(**kw):
    kw = {"codebook_size": 4, "dim": 2, "codebook_dim": 2, "kmeans_init": False, **kw}
    return VectorQuantizer(**kw)


def test_ema_moves_codes_toward_the_data():
    vq = _vq(dead_code_threshold=0.0, decay=0.9).train()
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]))
    vq.embed_avg.copy_(vq.embed)
    target = torch.tensor([2.0, 1.0])
    torch.manual_seed(0)
    before = (vq.embed[0] - target).norm()
    for _ in range(50):
        vq(_grid(target + 0.01 * torch.randn(64, 2)))
    after = (vq.embed[0] - target).norm()
    assert after < 0.05 * before
    # codes that got no data stay put, up to the small pull of Laplace smoothing
    torch.testing.assert_close(vq.embed[1], torch.tensor([10.0, 10.0]), atol=0.05, rtol=0)


def test_dead_codes_are_restarted_from_the_batch():
    vq = _vq(codebook_size=8, dead_code_threshold=1.0).train()
    vq.embed.copy_(torch.randn(8, 2) + 100)  # far from any data: every code is unused
    vq.embed_avg.copy_(vq.embed)
    torch.manual_seed(0)
    data = torch.cat([torch.randn(32, 2) * 0.1 + 3, torch.randn(32, 2) * 0.1 - 3])
    vq(_grid(data))
    assert vq.restarted > 0
    nearest_data = torch.cdist(vq.embed, data).min(dim=1).values
    assert (nearest_data < 1e-5).sum() >= vq.restarted  # restarted codes are batch vectors
    for _ in range(20):
        vq(_grid(data))
    # afterwards every code sits among the data, none at the old far-away place
    assert torch.cdist(vq.embed, data).min(dim=1).values.max() < 1.0


def test_kmeans_initialisation_runs_once(monkeypatch, tmp_path):
    calls = []
    original = quantizer_module.kmeans

    def counting_kmeans(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(quantizer_module, "kmeans", counting_kmeans)
    vq = _vq(codebook_size=2, kmeans_init=True, dead_code_threshold=0.0)
    centres = torch.tensor([[5.0, 5.0], [-5.0, -5.0]])
    torch.manual_seed(0)
    data = torch.cat([centres[0] + 0.1 * torch.randn(50, 2), centres[1] + 0.1 * torch.randn(50, 2)])

    vq.eval()(_grid(data))  # evaluation never initialises
    assert not bool(vq.initted) and not calls
    vq.train()
    for _ in range(3):
        vq(_grid(data))
    assert len(calls) == 1 and bool(vq.initted)
    # both centres found, one code each
    assert torch.cdist(centres, vq.embed).min(dim=1).values.max() < 0.1

    vq.save_pretrained(tmp_path)
    back = VectorQuantizer.from_pretrained(tmp_path).train()
    back(_grid(data))
    assert len(calls) == 1  # a loaded, initialised codebook is not re-initialised


def test_straight_through_gradient_and_commitment_loss():
    vq = _vq(commitment_weight=1.0).train()
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    out = vq(x)
    (out.codes.sum()).backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # identity projections
    # commitment = mse(z, sg(e)) with the codebook used for the output
    expected = torch.nn.functional.mse_loss(x.detach(), out.codes.detach())
    torch.testing.assert_close(out.loss, expected)
    assert _vq(commitment_weight=0.0)(x).loss.item() == 0.0


def test_distances_and_updates_run_in_fp32_under_autocast():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=16, dim=8, codebook_dim=4, kmeans_init=False).train()
    x = torch.randn(2, 8, 4, 4)
    ref = vq.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(x)
    assert vq.embed.dtype == torch.float32 and vq.embed_avg.dtype == torch.float32
    assert torch.equal(out.indices, ref)


def test_lookup_inverts_encode_and_encode_leaves_the_codebook_alone():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=16, dim=8, codebook_dim=4, kmeans_init=False).train()
    x = torch.randn(2, 8, 4, 4)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    indices = vq.encode(x)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k
    vq.eval()
    torch.testing.assert_close(vq.lookup(indices), vq(x).codes)


def test_perplexity_and_usage():
    vq = _vq(codebook_size=8).eval()
    vq.embed.copy_(torch.arange(8.0)[:, None].repeat(1, 2))
    data = torch.arange(4.0)[:, None].repeat(1, 2).repeat(5, 1)  # codes 0..3, five times each
    out = vq(_grid(data))
    torch.testing.assert_close(out.perplexity, torch.tensor(4.0))
    torch.testing.assert_close(out.usage, torch.tensor(0.5))


# -- two ranks over gloo ------------------------------------------------------------------
def _rank_worker(rank: int, init_file: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        codebooks = {}
        for synced in (True, False):
            if not synced:  # control: the same run with rank sync switched off
                quantizer_module._distributed = lambda: False
            torch.manual_seed(0)  # same initial state on both ranks
            vq = VectorQuantizer(codebook_size=16, dim=4, codebook_dim=4, dead_code_threshold=2.0)
            vq.train()
            gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
            restarts = 0
            for step in range(8):
                # after the first steps the data shrinks to one cluster, so codes die
                spread = 3.0 if step < 2 else 0.1
                vq(torch.randn(2, 4, 4, 4, generator=gen) * spread + rank)
                restarts += vq.restarted
            assert bool(vq.initted) and restarts > 0, (rank, restarts)
            codebooks[synced] = vq.embed.clone()
        torch.save(codebooks, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_identical_codebooks(tmp_path):
    results = str(tmp_path / "codebook")
    mp.start_processes(
        _rank_worker,
        args=(str(tmp_path / "init"), results),
        nprocs=2,
        start_method="spawn",
    )
    r0 = torch.load(f"{results}.0", weights_only=True)
    r1 = torch.load(f"{results}.1", weights_only=True)
    assert torch.equal(r0[True], r1[True])
    assert not torch.allclose(r0[False], r1[False])  # without sync they drift apart


@pytest.mark.parametrize("n,k", [(10, 4), (3, 8)])
def test_kmeans_handles_fewer_points_than_clusters(n, k):
    x = torch.randn(n, 3)
    centroids, counts = quantizer_module.kmeans(x, k)
    assert centroids.shape == (k, 3) and counts.sum() == n
