"""Knowledge bank: storing, the new entry's logit, similarity bookkeeping and eviction (spec §5.3-§5.5)."""

from __future__ import annotations

import math

import pytest
import torch

from zoa_lightning.core import FusedLayerNorm, KnowledgeBank

WIDTHS = [3, 2]  # two layers: P = 2 * (3 + 2) = 10


def _bank(max_entries: int = 4, compact: bool = False, seed: int = 0) -> KnowledgeBank:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(10, generator=g)
    return KnowledgeBank(WIDTHS, base, max_entries=max_entries, compact_similarity=compact, initial_alpha=0.3)


def _fused(bank: KnowledgeBank) -> torch.Tensor:
    return torch.cat([torch.cat(bank.layer_affine(i)) for i in range(len(WIDTHS))])


def test_layer_affine_uses_the_flat_layout_gamma_then_beta() -> None:
    bank = _bank()
    bank.theta.copy_(torch.arange(10.0))
    w0, b0 = bank.layer_affine(0)
    torch.testing.assert_close(w0, bank.base[0:3] + torch.tensor([0.0, 1, 2]))
    torch.testing.assert_close(b0, bank.base[3:6] + torch.tensor([3.0, 4, 5]))
    w1, b1 = bank.layer_affine(1)
    torch.testing.assert_close(torch.cat([w1, b1]), bank.base[6:] + torch.tensor([6.0, 7, 8, 9]))


def test_fused_parameters_are_computed_once_per_bank_state() -> None:
    bank = _bank()

    def expected() -> torch.Tensor:
        k = bank.num_entries
        return bank.base + torch.softmax(bank.alpha[:k] * bank.alpha_scale, 0) @ bank.deltas[:k] + bank.theta

    first = bank.fused()
    assert bank.fused() is first  # nothing changed: reused
    for change in (
        lambda: bank.theta.add_(0.5),  # the SPSA perturbation and the update are in place
        lambda: bank.alpha.sub_(0.2),
        lambda: bank.store(),  # writes deltas and count
        lambda: bank.theta.copy_(torch.arange(10.0)),  # a rollback or load_state_dict
        lambda: setattr(bank, "theta", bank.theta.clone() + 1),  # a replaced tensor (e.g. moved to a device)
    ):
        before = bank.fused()
        change()
        after = bank.fused()
        assert after is not before
        assert torch.equal(after, expected())
    assert torch.equal(_fused(bank), torch.cat([after[0:6], after[6:10]]))


def test_store_keeps_fused_parameters_and_records_the_full_delta() -> None:
    bank = _bank()
    g = torch.Generator().manual_seed(1)
    for _ in range(6):  # fills the bank and forces evictions
        bank.theta.add_(0.05 * torch.randn(10, generator=g))
        before = _fused(bank)
        delta = bank.current_delta().clone()
        record = bank.store()
        torch.testing.assert_close(_fused(bank), before, atol=1e-6, rtol=0)
        assert torch.allclose(bank.deltas[bank.num_entries - 1], delta, atol=1e-7)
        assert record["entries"] == bank.num_entries <= bank.max_entries + 1
    assert bank.num_entries == 5
    assert torch.count_nonzero(bank.deltas[0]) == 0


def test_new_entry_logit_follows_the_scale_factor_rule() -> None:
    bank = _bank()
    bank.theta.fill_(0.03)  # mean |eps| = 0.03 in every layer -> s_f = 3
    assert bank.scale_factor() == pytest.approx(3.0)
    z = bank.alpha[:1] * bank.alpha_scale
    expected = max(float(z.max()), float(torch.logsumexp(z, 0)) + math.log(3 - 1)) / bank.alpha_scale
    record = bank.store()
    assert record["alpha_new"] == pytest.approx(expected, rel=1e-6)
    assert float(bank.mixing_weights()[-1]) >= (3 - 1) / 3 - 1e-6
    bank.theta.zero_()  # s_f = 0 <= 1: the new logit is the current maximum
    record = bank.store()
    assert record["alpha_new"] == pytest.approx(float(bank.alpha[:2].max()))


def test_new_entry_logit_is_clipped() -> None:
    bank = _bank()
    bank.alpha[0] = 9.9
    bank.theta.fill_(1e6)
    assert bank.store()["alpha_new"] == pytest.approx(bank.alpha_clip)


def test_similarity_is_the_mean_per_layer_and_per_gamma_beta_cosine() -> None:
    bank = _bank()
    a = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0, 2, 0])
    b = torch.tensor([1.0, 0, 0, -1, -1, -1, 0, 1, 2, 0])
    # segments: g0 cos 1, b0 cos -1, g1 cos 0, b1 cos 1 -> mean 0.25
    assert bank.snapshot_similarity(a, b) == pytest.approx(0.25)
    assert bank.snapshot_similarity(a, torch.zeros(10)) == 0.0


def _fill(bank: KnowledgeBank, snapshots: list[torch.Tensor]) -> None:
    for s in snapshots:
        bank.theta.copy_(s - bank.mixing_weights() @ bank.deltas[: bank.num_entries])
        bank.store()


def _snapshots() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(10, generator=g) for _ in range(4)]
    base[3] = base[1] + 0.01 * torch.randn(10, generator=g)  # entries 2 and 4 (matrix 1 and 3) nearly equal
    return base


def test_eviction_removes_the_older_member_of_the_most_similar_pair() -> None:
    bank = _bank(max_entries=4)
    snaps = _snapshots()
    _fill(bank, snaps)
    assert bank.num_entries == 5
    k, p, _ = bank.most_similar_pair()
    assert (k, p) == (1, 3)
    # Upper triangle only.
    assert torch.count_nonzero(torch.tril(bank.similarity)) == 0
    kept = [bank.deltas[i].clone() for i in (1, 3, 4)]
    before = _fused(bank)
    removed = bank.evict()
    assert removed == 2  # stack entry min(k, p) + 1
    assert bank.num_entries == 4
    for i, want in enumerate(kept, start=1):
        torch.testing.assert_close(bank.deltas[i], want)
    torch.testing.assert_close(_fused(bank), before, atol=1e-6, rtol=0)


def test_reference_mode_leaves_the_similarity_matrix_stale_and_corrected_compacts_it() -> None:
    snaps = _snapshots()
    stale, compact = _bank(max_entries=4), _bank(max_entries=4, compact=True)
    for bank in (stale, compact):
        _fill(bank, snaps)
    m = stale.similarity.clone()
    extra = torch.randn(10, generator=torch.Generator().manual_seed(9))
    for bank in (stale, compact):
        _fill(bank, [extra])  # full: evicts matrix index 1, then stores at matrix index 3
        assert bank.num_entries == 5
    # Reference: rows/cols untouched except the new snapshot's column 3.
    torch.testing.assert_close(stale.similarity[:, :3], m[:, :3])
    # Corrected: row/col 1 deleted, the rest shifted, then column 3 recomputed with the correct indices.
    keep = [0, 2, 3]
    torch.testing.assert_close(compact.similarity[:2, :2], m[keep][:, keep][:2, :2])
    for j in range(3):
        want = compact.snapshot_similarity(compact.deltas[j + 1], compact.deltas[4])
        assert float(compact.similarity[j, 3]) == pytest.approx(want, abs=1e-6)
        assert float(stale.similarity[j, 3]) == pytest.approx(
            stale.snapshot_similarity(stale.deltas[j + 1], stale.deltas[4]), abs=1e-6
        )


def test_all_negative_similarities_evict_the_oldest() -> None:
    bank = _bank(max_entries=2)
    v = torch.ones(10)
    _fill(bank, [v, -v])
    assert float(bank.similarity[0, 1]) == pytest.approx(-1.0)
    assert bank.evict() == 1


def test_fused_layer_norm_reads_the_bank() -> None:
    bank = _bank()
    ln = FusedLayerNorm((3,), 1e-6, bank, 0)
    x = torch.randn(4, 3)
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (3,), *bank.layer_affine(0), 1e-6))
    bank.theta.add_(0.5)
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (3,), *bank.layer_affine(0), 1e-6))
    assert not list(ln.parameters())
    assert not list(ln.buffers())


def test_bank_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="flat tensor of 10"):
        KnowledgeBank(WIDTHS, torch.zeros(9))
    with pytest.raises(ValueError, match="max_entries"):
        KnowledgeBank(WIDTHS, torch.zeros(10), max_entries=0)
    with pytest.raises(RuntimeError, match="without stored entries"):
        _bank().evict()


def test_a_scratch_per_image_theta_receives_the_same_values_in_place() -> None:
    bank = _bank(seed=3)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        bank.theta.add_(0.05 * torch.randn(10, generator=g))
        bank.store()
    k = bank.num_entries
    alpha, rows = torch.randn(6, k, generator=g), torch.randn(6, 10, generator=g)

    def per_image() -> torch.Tensor:
        return torch.cat([torch.cat(bank.layer_affine(i), 1) for i in range(len(WIDTHS))], 1)

    with bank.evaluated_at(alpha, rows):
        expected = per_image()
    scratch = rows.clone()
    with bank.evaluated_at(alpha, scratch, scratch=True):
        got = per_image()
        assert bank.fused().data_ptr() == scratch.data_ptr()  # one (B, P) tensor held, not two
    assert torch.equal(got, expected)
    assert not torch.equal(scratch, rows)  # it was the workspace
    for theta in (rows[0].clone(), rows.clone().requires_grad_(), rows[:1].expand(6, -1)):  # never overwritten
        kept = theta.detach().clone()
        with bank.evaluated_at(alpha if theta.ndim == 2 else alpha[0], theta, scratch=True):
            bank.fused()
        assert torch.equal(theta.detach(), kept)
