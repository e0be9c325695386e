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


# -- the cosine-similarity codebook (vector-quantize-pytorch's use_cosine_sim, PerCo (SD)) --
def _cosine_reference(vq: VectorQuantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and projected codes as vector-quantize-pytorch's cosine codebook computes them
    in eval mode, written out: a linear map to the codebook space, l2-normalise, the entry
    of largest dot product, the stored entry looked up, a linear map back."""
    w_in = vq.project_in.weight[:, :, 0, 0]
    w_out = vq.project_out.weight[:, :, 0, 0]
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    z = rows @ w_in.t() + vq.project_in.bias
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    indices = (z @ vq.embed.t()).argmax(dim=1)
    out = vq.embed[indices] @ w_out.t() + vq.project_out.bias
    b, _, h, w = x.shape
    return indices.view(b, h, w), out.view(b, h, w, -1).permute(0, 3, 1, 2)


def test_cosine_codebook_picks_by_direction_not_distance():
    # entries that are not unit vectors (a codebook set from outside) tell the two apart
    entries = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    cosine, euclid = _vq(codebook_size=2, distance="cosine").eval(), _vq(codebook_size=2).eval()
    cosine.embed.copy_(entries)
    euclid.embed.copy_(entries)
    point = _grid(torch.tensor([[0.5, 0.9]]))  # near entry 0, at 61°: closer in angle to 1
    assert cosine.encode(point).item() == 1 and euclid.encode(point).item() == 0
    # and the stored entry is what an index looks up, as vector-quantize-pytorch does
    torch.testing.assert_close(cosine.lookup(torch.ones(1, 1, 1, dtype=torch.long))[0, :, 0, 0],
                               entries[1])  # fmt: skip


def test_cosine_codebook_matches_the_written_out_reference():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=32, dim=12, codebook_dim=4, distance="cosine").eval()
    x = torch.randn(2, 12, 5, 3)
    indices, projected = _cosine_reference(vq, x)
    assert torch.equal(vq.encode(x), indices)
    out = vq(x)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(vq.project_out(out.codes), projected)
    torch.testing.assert_close(vq.project_out(vq.lookup(indices)), projected)


def test_cosine_codebook_stays_on_the_unit_sphere_in_training():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=8, dim=6, codebook_dim=3, distance="cosine",
                         dead_code_threshold=0.5).train()  # fmt: skip
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    out = vq(x)  # k-means on unit vectors, then an EMA step and restarts
    torch.testing.assert_close(vq.embed.norm(dim=1), torch.ones(8))
    # straight-through codes and the commitment term use the normalised projection
    z = vq.project(x)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 4, 4))
    expected = torch.nn.functional.mse_loss(z.detach(), out.codes.detach())
    torch.testing.assert_close(out.loss, expected)
    out.codes.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for _ in range(3):
        vq(torch.randn(2, 6, 4, 4))
    torch.testing.assert_close(vq.embed.norm(dim=1), torch.ones(8))


def test_unknown_distance_is_refused():
    with pytest.raises(ValueError, match="distance must be"):
        _vq(distance="manhattan")


def test_cosine_distance_enters_the_fingerprint_only_when_set():
    from perco.testing import TINY_QUANTIZER, tiny_perco

    plain = tiny_perco(quantizer={**TINY_QUANTIZER, "distance": "euclidean"})
    cosine = tiny_perco(quantizer={**TINY_QUANTIZER, "distance": "cosine"})
    assert "quantizer_distance" not in plain._settings()  # every earlier model unchanged
    assert cosine._settings()["quantizer_distance"] == "cosine"
    cosine.quantizer.load_state_dict(plain.quantizer.state_dict())  # same weights
    assert cosine.fingerprint != plain.fingerprint
