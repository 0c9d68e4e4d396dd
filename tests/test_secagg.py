"""Secure aggregation: exact sums, dropout recovery, threshold failures, masked inputs look uniform."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedprompt.errors import ConfigError, InputError, SecureAggregationError, WireError
from fedprompt.privacy import secagg


def random_updates(n, rng, scale=0.3):
    return [{"prompt": rng.normal(0, scale, (5, 4)).astype(np.float32), "head": {"w": rng.normal(0, scale, (3,))}}
            for _ in range(n)]


def plain_sum(updates, keep, clip_range):
    return {
        "prompt": sum(np.clip(updates[i]["prompt"].astype(np.float64), -clip_range, clip_range) for i in keep),
        "head": {"w": sum(np.clip(updates[i]["head"]["w"], -clip_range, clip_range) for i in keep)},
    }


# ---------------------------------------------------------------- the sum


@pytest.mark.parametrize("bits", [32, 64])
def test_secure_sum_equals_plain_sum_up_to_quantization(bits):
    rng = np.random.default_rng(0)
    n, clip_range = 6, 0.5
    updates = random_updates(n, rng)
    updates[2]["prompt"][0, 0] = 3.0   # beyond the range: clipped, as documented
    total = secagg.secure_sum(updates, dropped=(), t=4, seed=1, clip_range=clip_range, bits=bits)
    scale = secagg.scale_for(n, clip_range, bits)
    bound = n / (2 * scale) + 1e-6   # + float32 output rounding
    expected = plain_sum(updates, range(n), clip_range)
    for got, want in zip(secagg.flatten_tree(total)[0], secagg.flatten_tree(expected)[0]):
        assert abs(got - want) <= bound
    assert total["prompt"].dtype == np.float32 and total["prompt"].shape == (5, 4)


def test_stochastic_rounding_is_unbiased_and_within_one_step():
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, 2000)
    scale = 10.0
    draws = np.stack([secagg.dequantize(secagg.quantize(values, clip_range=1.0, scale=scale, rng=rng), scale=scale)
                      for _ in range(400)])
    assert np.all(np.abs(draws - values) < 1 / scale + 1e-12)
    # The mean of 400 draws has standard error <= 0.5 / scale / 20 per value.
    assert np.max(np.abs(draws.mean(axis=0) - values)) < 5 * 0.5 / scale / 20


def test_ring_capacity():
    for bits in (32, 64):
        for n in (1, 2, 7, 100):
            scale = secagg.scale_for(n, 0.25, bits)
            assert secagg.max_clients(0.25, scale, bits) >= n
            extreme = secagg.quantize(np.array([0.25, -0.25]), clip_range=0.25, scale=scale, bits=bits)
            total = sum([extreme] * n, np.zeros(2, secagg.ring_dtype(bits)))
            decoded = secagg.dequantize(total, scale=scale, bits=bits)
            np.testing.assert_allclose(decoded, [0.25 * n, -0.25 * n], rtol=1e-9)   # no wrap-around
    scale = secagg.scale_for(4, 1.0, 32)
    assert secagg.max_clients(1.0, scale, 32) < 5   # the largest scale for 4 leaves no room for a 5th
    with pytest.raises(ConfigError):
        secagg.secure_sum(random_updates(5, np.random.default_rng(0)), scale=scale, seed=0)
    with pytest.raises(InputError):
        secagg.quantize(np.array([np.nan]), clip_range=1.0, scale=1.0)


# ---------------------------------------------------------------- dropouts


@pytest.mark.parametrize("dropped", [set(), {0}, {6}, {2, 4}, {0, 6}, {1, 3}])
def test_dropouts_up_to_n_minus_t_are_recovered(dropped):
    rng = np.random.default_rng(len(dropped))
    n, t = 7, 5
    updates = random_updates(n, rng)
    total = secagg.secure_sum(updates, dropped=dropped, t=t, seed=3)
    expected = plain_sum(updates, [i for i in range(n) if i not in dropped], 1.0)
    np.testing.assert_allclose(secagg.flatten_tree(total)[0], secagg.flatten_tree(expected)[0], atol=1e-6)


@pytest.mark.parametrize("dropped", [{0, 1, 2}, {3, 4, 5, 6}])
def test_fewer_than_t_survivors_fail_and_publish_nothing(dropped):
    updates = random_updates(7, np.random.default_rng(0))
    result = None
    with pytest.raises(SecureAggregationError, match="threshold"):
        result = secagg.secure_sum(updates, dropped=dropped, t=5, seed=3)
    assert result is None


def test_unmasking_needs_t_responses_and_survivors_refuse_below_t():
    n, t, length = 5, 3, 16
    agg = secagg.SecureAggregation.setup(n, t, length=length, seed=0)
    x = [np.full(length, i + 1, np.uint32) for i in range(n)]
    survivors = [0, 1, 2, 3]
    total = agg.sum_masked({i: agg.mask(i, x[i]) for i in survivors})
    shares = agg.unmasking_shares(survivors, responders=[0, 1])   # two survivors answer, t = 3
    with pytest.raises(SecureAggregationError, match="nothing is published"):
        agg.unmask(total, survivors, shares)
    shares = agg.unmasking_shares(survivors, responders=[1, 2, 3])   # a third one arrives
    assert agg.unmask(total, survivors, shares).tolist() == [1 + 2 + 3 + 4] * length
    with pytest.raises(SecureAggregationError):
        agg.clients[4].unmasking_shares(agg.server.u2, {0, 4})   # a client will not help below t
    with pytest.raises(SecureAggregationError, match="another survivor list"):
        agg.clients[0].unmasking_shares(agg.server.u2, {0, 1, 2, 4})   # nor reveal for a second list


def test_late_masked_input_of_a_dropped_client_stays_hidden():
    """Double masking: the server rebuilds a dropped client's pairwise masks, but not its self-mask."""
    n, t, length = 5, 3, 4096
    agg = secagg.SecureAggregation.setup(n, t, length=length, seed=7)
    x = np.arange(length, dtype=np.uint32)    # a very structured input
    late = agg.mask(4, x)                     # arrives after the server declared client 4 dropped
    survivors = [0, 1, 2, 3]
    shares = agg.unmasking_shares(survivors)
    # What the server can strip from it: client 4's pairwise masks (it rebuilds 4's mask key).
    key_secret = secagg.shamir_reconstruct((v + 1, shares[v].mask_key_shares[4]) for v in survivors[:t])
    key = X25519PrivateKey.from_private_bytes(key_secret.to_bytes(32, "big"))
    peers = {v: agg.server.roster[v].mask_key for v in range(n)}
    stripped = late - secagg._pairwise_masks(key, 4, peers, length, 32, agg.server.session)
    assert not np.array_equal(stripped, x)
    residual = (stripped - x).astype(np.float64)   # = PRG(b_4): still uniform, independent of x
    assert abs(np.corrcoef(residual, x.astype(np.float64))[0, 1]) < 5 / math.sqrt(length)
    assert 4 not in next(iter(shares.values())).self_mask_shares   # nobody reveals b_4


# ---------------------------------------------------------------- what one masked input reveals


def test_a_masked_input_is_uniform_and_uncorrelated_with_the_update():
    n, t, length = 4, 3, 100_000
    rng = np.random.default_rng(0)
    update = rng.normal(0, 0.1, length)
    update[: length // 2] = 0.2   # half of it constant: any leak would show
    scale = secagg.scale_for(n, 1.0, 32)
    x = secagg.quantize(update, clip_range=1.0, scale=scale)
    agg = secagg.SecureAggregation.setup(n, t, length=length, seed=11)
    y = agg.mask(1, x)
    # The top byte of a uniform ring element is uniform on 256 values.
    counts = np.bincount((y >> np.uint32(24)).astype(np.int64), minlength=256)
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    low = np.bincount((y & np.uint32(0xFF)).astype(np.int64), minlength=256)
    assert scipy.stats.chisquare(low).pvalue > 1e-3
    # No linear relation with the plain update (signed values), nor within the constant half.
    signed = y.view(np.int32).astype(np.float64)
    assert abs(np.corrcoef(signed, update)[0, 1]) < 5 / math.sqrt(length)
    assert np.unique(y[: length // 2]).size > 0.99 * (length // 2)
    assert not np.array_equal(y, x)


# ---------------------------------------------------------------- Shamir


def test_any_t_shares_reconstruct_and_t_minus_one_do_not():
    rng = np.random.default_rng(5)
    n, t = 6, 4
    for _ in range(3):
        secret = int.from_bytes(rng.bytes(32), "big")
        shares = secagg.shamir_split(secret, n, t)
        for subset in itertools.combinations(shares, t):
            assert secagg.shamir_reconstruct(subset) == secret
        for subset in itertools.combinations(shares, t - 1):
            assert secagg.shamir_reconstruct(subset) != secret
        assert secagg.shamir_reconstruct(shares) == secret   # more than t is fine too
    with pytest.raises(ConfigError):
        secagg.shamir_split(1, 3, 4)
    with pytest.raises(InputError):
        secagg.shamir_reconstruct([(1, 2), (1, 3)])


# ---------------------------------------------------------------- protocol hygiene


def test_tampered_or_misrouted_shares_are_refused():
    n, t, length = 3, 2, 8
    server = secagg.SecAggServer(n=n, t=t, length=length, session=b"s" * 16)
    clients = [secagg.SecAggClient(i, n=n, t=t, length=length, session=b"s" * 16, seed=0) for i in range(n)]
    roster = server.collect_keys(c.advertise_keys() for c in clients)
    outgoing = {c.index: c.share_keys(roster) for c in clients}
    inbox = server.route_shares(outgoing)
    tampered = dict(inbox[0])
    tampered[1] = bytes([tampered[1][0] ^ 1]) + tampered[1][1:]
    with pytest.raises(SecureAggregationError, match="decrypt"):
        clients[0].receive_shares(tampered)
    with pytest.raises(SecureAggregationError):
        clients[0].receive_shares({1: inbox[2][1]})   # addressed to client 2
    with pytest.raises(SecureAggregationError, match="threshold"):
        server.collect_keys([clients[0].advertise_keys()])


def test_no_aes_gcm_key_and_nonce_encrypt_two_plaintexts():
    """Every ciphertext carries its own nonce, and a party shares its keys once per protocol run,
    even when a server asks twice or the party is restored from its saved state."""
    n, t, length = 4, 3, 8
    session = b"n" * 16
    server = secagg.SecAggServer(n=n, t=t, length=length, session=session)
    clients = [secagg.SecAggClient(i, n=n, t=t, length=length, session=session) for i in range(n)]  # OS entropy
    roster = server.collect_keys(c.advertise_keys() for c in clients)
    outgoing = {c.index: c.share_keys(roster) for c in clients}
    nonces = [ciphertext[:12] for shares in outgoing.values() for ciphertext in shares.values()]
    assert len(nonces) == n * (n - 1) and len(set(nonces)) == len(nonces)
    with pytest.raises(SecureAggregationError, match="already shared"):
        clients[0].share_keys(roster)
    restored = secagg.SecAggClient.from_state(clients[1].to_state())
    with pytest.raises(SecureAggregationError, match="already shared"):
        restored.share_keys(roster)
    inbox = server.route_shares(outgoing)
    with pytest.raises(SecureAggregationError, match="too short"):
        clients[0].receive_shares({1: inbox[0][1][:20]})
    for c in clients:  # the protocol still completes
        c.receive_shares(inbox[c.index])


def test_a_bad_share_is_detected_not_silently_used():
    n, t, length = 4, 3, 8
    agg = secagg.SecureAggregation.setup(n, t, length=length, seed=2)
    x = [np.full(length, 1, np.uint32)] * n
    survivors = [0, 1, 2]
    total = agg.sum_masked({i: agg.mask(i, x[i]) for i in survivors})
    shares = agg.unmasking_shares(survivors)
    shares[1].mask_key_shares[3] += 1   # a corrupted share of the dropped client's key
    with pytest.raises(SecureAggregationError, match="key"):
        agg.unmask(total, survivors, shares)


def test_protocol_argument_checks():
    with pytest.raises(ConfigError):
        secagg.SecureAggregation.setup(3, 1, length=4, seed=0)   # t >= 2
    with pytest.raises(ConfigError):
        secagg.SecureAggregation.setup(3, 4, length=4, seed=0)   # t <= n
    with pytest.raises(ConfigError):
        secagg.ring_dtype(16)
    agg = secagg.SecureAggregation.setup(3, 2, length=4, seed=0)
    with pytest.raises(InputError):
        agg.mask(0, np.zeros(5, np.uint32))
    with pytest.raises(InputError):
        agg.mask(0, np.zeros(4, np.int64))
    with pytest.raises(InputError):
        secagg.secure_sum([{"a": np.zeros(2)}, {"a": np.zeros(3)}], seed=0)


def test_protocol_messages_travel_through_the_wire_codec():
    from fedprompt.wire import codec

    n, t, length = 4, 3, 32
    agg = secagg.SecureAggregation.setup(n, t, length=length, seed=9)
    x = [np.full(length, i, np.uint32) for i in range(n)]
    survivors = [0, 1, 3]
    masked = {}
    for i in survivors:   # masked inputs are plain uint32 leaves
        message = codec.decode(codec.encode({"masked": agg.mask(i, x[i])}, kind="secagg_masked", round=0))
        masked[i] = message.tree["masked"]
    keys = [secagg.PublicKeys.from_wire(codec.decode(codec.encode({}, kind="k", meta=c.advertise_keys().to_wire())).meta)
            for c in agg.clients]
    assert keys == [c.advertise_keys() for c in agg.clients]
    shares = {}
    for i, response in agg.unmasking_shares(survivors).items():
        meta = codec.decode(codec.encode({}, kind="secagg_shares", meta=response.to_wire())).meta
        shares[i] = secagg.UnmaskingShares.from_wire(meta)
        assert shares[i] == response
    assert agg.unmask(agg.sum_masked(masked), survivors, shares).tolist() == [0 + 1 + 3] * length
    with pytest.raises(WireError):
        secagg.UnmaskingShares.from_wire({"index": 0, "mask_key_shares": {"x": b""}, "self_mask_shares": {}})
    with pytest.raises(WireError):
        secagg.PublicKeys.from_wire({"index": -1, "cipher_key": b"", "mask_key": b""})
