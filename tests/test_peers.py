"""The benchmark's published peers (bench/peers): TSV-M, Iso-C and WUDI's closed form,
each checked against what its paper says it does, and merged through mergekit."""

import pytest
import torch
from merge_runner import run
from peers import register
from peers.iso_c import isotropic_change
from peers.tsv_m import tsv_change
from peers.wudi import wudi_change
from safetensors.torch import load_file


def _orthogonal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    return q


def test_tsv_m_adds_tasks_whose_directions_do_not_overlap_and_separates_those_that_do():
    u, v = _orthogonal(12, 10, 0), _orthogonal(10, 10, 1)
    # two rank-5 changes in disjoint singular directions: nothing interferes, and TSV-M's
    # top 1/N = 5 directions of each hold all of it, so it is their sum
    a = u[:, :5] @ torch.diag(torch.linspace(3.0, 1.0, 5)) @ v[:, :5].T
    b = u[:, 5:] @ torch.diag(torch.linspace(2.0, 0.5, 5)) @ v[:, 5:].T
    assert torch.allclose(tsv_change([a, b], [1.0, 1.0]), a + b, atol=1e-5)
    # overlapping changes: the kept directions are made orthonormal, so the kept singular
    # values of both become the merged change's singular values, none added to another
    g = torch.Generator().manual_seed(4)
    c, d = torch.randn(12, 10, generator=g), torch.randn(12, 10, generator=g)
    kept = torch.cat([torch.linalg.svdvals(c)[:5], torch.linalg.svdvals(d)[:5]])
    merged = torch.linalg.svdvals(tsv_change([c, d], [1.0, 1.0]))
    assert torch.allclose(merged, kept.sort(descending=True).values, atol=1e-4)
    assert not torch.allclose(tsv_change([c, d], [1.0, 1.0]), c + d, atol=1e-2)


def test_iso_c_keeps_the_sums_directions_with_a_flat_spectrum():
    g = torch.Generator().manual_seed(2)
    deltas = [torch.randn(9, 7, generator=g) for _ in range(3)]
    summed = sum(deltas)
    change = isotropic_change(deltas, [1.0] * 3)
    s = torch.linalg.svdvals(change)
    assert torch.allclose(s, torch.full_like(s, torch.linalg.svdvals(summed).mean()), atol=1e-4)
    u, _, vh = torch.linalg.svd(summed, full_matrices=False)
    assert torch.allclose(change, s[0] * u @ vh, atol=1e-4)


def test_wudi_solves_its_objective_in_closed_form():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 6, generator=g)
    deltas = [torch.randn(8, 6, generator=g) * s for s in (1.0, 0.1)]
    change = wudi_change(base, deltas, [1.0, 1.0], "test").double()
    grams = [(d.T @ d / d.square().sum()).double() for d in deltas]
    # the gradient of sum_i ||(delta - delta_i) G_i^(1/2)||^2 vanishes (up to the ridge)
    gradient = sum((change - d.double()) @ gram for d, gram in zip(deltas, grams, strict=True))
    assert gradient.abs().max() < 1e-3
    # changes that read disjoint input directions do not interfere: WUDI adds them
    q = _orthogonal(6, 6, 5)
    left = torch.randn(8, 3, generator=g) @ q[:, :3].T
    right = torch.randn(8, 3, generator=g) @ q[:, 3:].T
    disjoint = wudi_change(base, [left, right], [1.0, 1.0], "t")
    assert torch.allclose(disjoint, left + right, atol=1e-3)
    # where they overlap it is neither their sum nor their mean
    merged = change.float()
    assert not torch.allclose(merged, sum(deltas), atol=1e-2)
    assert not torch.allclose(merged, sum(deltas) / 2, atol=1e-2)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "wudi"])
def test_each_peer_merges_under_mergekit_by_name(family, tmp_path, method):
    register()
    register()  # once per process, however often it is called
    config = {
        "merge_method": method,
        "base_model": str(family["base"]),
        "models": [{"model": str(family[name])} for name in ("ft_a", "ft_b")],
        "dtype": "float32",
    }
    merged = run(config, tmp_path / "out")
    tensors = [load_file(family[n] / "model.safetensors") for n in ("base", "ft_a", "ft_b")]
    base, a, b = tensors
    name = next(k for k in base if k.endswith("q_proj.weight"))
    kernel = {"tsv_m": tsv_change, "iso_c": isotropic_change}.get(method)
    deltas = [a[name] - base[name], b[name] - base[name]]
    if kernel is not None:
        want = base[name] + kernel(deltas, [1.0, 1.0])
    else:
        want = base[name] + wudi_change(base[name], deltas, [1.0, 1.0], name)
    assert torch.allclose(merged[name], want, atol=1e-5)
    # the vocabulary matrix and the norms take the mean of the changes
    embedding = next(k for k in base if "embed_tokens" in k)
    for other in (embedding, next(k for k in base if "norm" in k)):
        mean = base[other] + ((a[other] - base[other]) + (b[other] - base[other])) / 2
        assert torch.allclose(merged[other], mean, atol=1e-6)
