"""Secure aggregation of client updates: the server learns the sum and nothing else.

The protocol of Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal & Seth 2017
("Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS), semi-honest
version, over updates quantized to the ring ``Z_{2^bits}`` (``bits`` 32 or 64):

0. *AdvertiseKeys*: client ``u`` makes two X25519 key pairs (``cryptography``): ``c_u`` to
   encrypt the shares it sends, ``s_u`` to agree on pairwise masks; the server publishes the
   public keys of every client that sent them (``U1``).
1. *ShareKeys*: ``u`` draws a self-mask seed ``b_u`` and splits both ``s_u``'s private key and
   ``b_u`` into ``n`` Shamir shares with threshold ``t`` (:func:`shamir_split`, over the prime
   field ``GF(2^521 - 1)``); the share for ``v`` is encrypted with AES-256-GCM under
   ``HKDF(X25519(c_u, c_v))`` and relayed by the server, which learns nothing from it (``U2``:
   the clients that shared). Every ciphertext has its own 96-bit nonce from the party's entropy,
   sent in front of it, and a party shares its keys once per protocol run (a second ``share_keys``
   is refused), so no key and nonce ever encrypt two plaintexts, whatever the server asks.
2. *MaskedInputCollection*: ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv)
   - sum_{v in U2, v < u} PRG(s_uv)  (mod 2^bits)``, with ``s_uv = HKDF(X25519(s_u, s_v))`` the
   pairwise seed both ends derive (``U3``: the clients whose ``y`` arrived). Summed over
   ``U2``, the pairwise masks cancel (each pair adds ``+m`` once and ``-m`` once).
3. *Unmasking*: every client still there (``U4``) sends, for each dropped client
   ``u in U2 \\ U3``, its share of ``s_u``'s private key, and for each survivor ``v in U3``, its
   share of ``b_v``, never both for one client. With ``t`` shares the server rebuilds the
   dropped clients' keys and removes their pairwise masks from the sum, and rebuilds the
   survivors' seeds and removes their self-masks. The result is ``sum_{u in U3} x_u``.

*Double masking*: a client that is declared dropped but whose ``y_u`` arrives late is still
hidden by ``PRG(b_u)``, which the server cannot rebuild (honest clients never send shares of
``b_u`` for a client they were told dropped out).

If fewer than ``t`` clients remain at any step the protocol stops with
:class:`~fedprompt.errors.SecureAggregationError` and publishes nothing; ``t`` shares of a secret
rebuild it, ``t - 1`` reveal nothing about it. Choose ``t > n / 2`` (two disjoint groups cannot
both rebuild); the paper suggests ``t`` around ``2n / 3``.

PRG: SHAKE-256 (``hashlib``), an extendable-output function: ``PRG(seed) = SHAKE-256("fedprompt.secagg/prg" || seed)``
read as little-endian ``uint32``/``uint64`` words; uniform over the ring because every byte is.
Key derivation: HKDF-SHA256 with the session id as salt and a label per purpose.

Quantization (:func:`quantize`): a float is clipped to ``[-r, r]``, scaled by ``s`` and rounded
(to nearest, or stochastically: unbiased) to an integer ``q`` with ``|q| <= qmax = ceil(r s)``,
stored in two's complement modulo ``2^bits``. The sum of ``n`` clients decodes without
wrap-around while ``n * qmax <= 2^(bits-1) - 1``: :func:`max_clients`, and :func:`scale_for`
picks the largest ``s`` for ``n`` clients. Each client's rounding error is at most ``1/(2s)``
per coordinate (``1/s`` stochastic), the sum's at most ``n`` times that. For example
``r = 1``, 32 bits, 16 clients: ``s ~ 1.3e8``, sum error below ``6e-8``. 64-bit rings cap ``qmax``
at ``2^52`` (float64 has no more precision to keep).

Randomness: with ``seed=None`` every secret comes from the operating system's CSPRNG
(``secrets``), as a deployment needs. A seed makes the simulation reproducible and is for
simulation and tests only: it makes every secret predictable to whoever knows the seed.

Example:
  >>> import numpy as np
  >>> updates = [{"w": np.array([0.5, -0.25])}, {"w": np.array([0.125, 0.5])}, {"w": np.array([1.0, 1.0])}]
  >>> total = secure_sum(updates, dropped={2}, t=2, seed=0)
  >>> np.round(total["w"], 6).tolist()
  [0.625, 0.25]
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
import struct
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedprompt.errors import ConfigError, InputError, SecureAggregationError, WireError

__all__ = [
    "PRIME",
    "PublicKeys",
    "SecAggClient",
    "SecAggServer",
    "SecureAggregation",
    "TreeSpec",
    "UnmaskingShares",
    "dequantize",
    "flatten_tree",
    "max_clients",
    "prg_mask",
    "quantize",
    "ring_dtype",
    "scale_for",
    "secure_sum",
    "shamir_reconstruct",
    "shamir_split",
    "unflatten_tree",
]

PRIME = 2**521 - 1
"""The Shamir field's modulus, a Mersenne prime above every 256-bit secret."""

_SHARE_BYTES = 66  # 521 bits
_KEY_BYTES = 32
_FLOAT64_EXACT = 2**52


# ----------------------------------------------------------------------------- quantization


def ring_dtype(bits: int) -> np.dtype:
    """The unsigned dtype of the ring ``Z_{2^bits}``: uint32 or uint64."""
    if bits == 32:
        return np.dtype(np.uint32)
    if bits == 64:
        return np.dtype(np.uint64)
    raise ConfigError(f"the ring has 32 or 64 bits, got {bits!r}")


def _qmax(clip_range: float, scale: float) -> int:
    return math.ceil(clip_range * scale)


def _check_range(clip_range: float, scale: float | None = None) -> None:
    if not (isinstance(clip_range, (int, float)) and math.isfinite(clip_range) and clip_range > 0):
        raise ConfigError(f"clip_range must be a finite number > 0, got {clip_range!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"scale must be a finite number > 0, got {scale!r}")


def max_clients(clip_range: float, scale: float, bits: int = 32) -> int:
    """How many clients' quantized values sum without wrap-around: ``floor((2^(bits-1) - 1) / ceil(r s))``."""
    ring_dtype(bits)
    _check_range(clip_range, scale)
    return (2 ** (bits - 1) - 1) // _qmax(clip_range, scale)


def scale_for(num_clients: int, clip_range: float, bits: int = 32) -> float:
    """The largest scale ``s`` at which ``num_clients`` clients in ``[-r, r]`` sum without wrap-around.

    ``qmax = min(floor((2^(bits-1) - 1) / n), 2^52)`` and ``s = qmax / r`` (nudged down until
    ``ceil(r s) <= qmax``, against float rounding).
    """
    ring_dtype(bits)
    _check_range(clip_range)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    qmax = min((2 ** (bits - 1) - 1) // int(num_clients), _FLOAT64_EXACT)
    if qmax < 1:
        raise ConfigError(f"{num_clients} clients do not fit a {bits}-bit ring")
    scale = qmax / clip_range
    while _qmax(clip_range, scale) > qmax:
        scale = math.nextafter(scale, 0.0)
    return scale


def quantize(
    values: Any,
    *,
    clip_range: float,
    scale: float,
    bits: int = 32,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Floats to ring elements: clip to ``[-r, r]``, scale, round, two's complement mod ``2^bits``.

    Args:
      values: a float array (any shape; flattened).
      clip_range: ``r``; values outside ``[-r, r]`` are clipped.
      scale: ``s`` (see :func:`scale_for`).
      bits: 32 or 64.
      rng: with a generator, stochastic rounding (``floor(v s) + Bernoulli(frac(v s))``,
        unbiased); without, rounding to nearest (half to even).

    Returns:
      A 1-D ``uint32``/``uint64`` array.

    Raises:
      InputError: a non-finite value.
      ConfigError: bad range, scale or bits, or a scale whose ``ceil(r s)`` does not fit the ring.
    """
    dtype = ring_dtype(bits)
    _check_range(clip_range, scale)
    qmax = _qmax(clip_range, scale)
    if qmax > min(2 ** (bits - 1) - 1, _FLOAT64_EXACT):
        raise ConfigError(f"scale {scale} makes ceil(r * s) = {qmax}, too large for a {bits}-bit ring")
    x = np.asarray(values, np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise InputError("cannot quantize non-finite values")
    y = np.clip(x, -clip_range, clip_range) * scale
    if rng is None:
        q = np.rint(y)
    else:
        low = np.floor(y)
        q = low + (rng.random(y.shape) < (y - low))
    q = np.clip(q, -qmax, qmax).astype(np.int64)
    return q.astype(dtype)


def dequantize(ints: Any, *, scale: float, bits: int = 32) -> np.ndarray:
    """Ring elements (a single client's, or a sum) back to float64: two's complement, divided by ``s``."""
    dtype = ring_dtype(bits)
    _check_range(1.0, scale)
    ints = np.asarray(ints)
    if ints.dtype != dtype:
        raise InputError(f"expected {dtype.name} ring elements, got {ints.dtype}")
    signed = ints.view(np.int32 if bits == 32 else np.int64)
    return signed.astype(np.float64) / scale


class TreeSpec(NamedTuple):
    """How :func:`flatten_tree` laid a pytree out: its structure and each leaf's shape."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))


def flatten_tree(tree: Any) -> tuple[np.ndarray, TreeSpec]:
    """A pytree of arrays as one float64 vector (leaves in ``jax.tree`` order, C order)."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        raise InputError("the update pytree has no leaves")
    arrays = [np.asarray(x, np.float64) for x in leaves]
    spec = TreeSpec(treedef, tuple(a.shape for a in arrays))
    return np.concatenate([a.reshape(-1) for a in arrays]), spec


def unflatten_tree(vector: Any, spec: TreeSpec, dtype: Any = np.float32) -> Any:
    """The inverse of :func:`flatten_tree`, leaves cast to ``dtype``."""
    vector = np.asarray(vector)
    if vector.shape != (spec.size,):
        raise InputError(f"expected a vector of {spec.size} values, got shape {vector.shape}")
    out, start = [], 0
    for shape in spec.shapes:
        size = math.prod(shape)
        out.append(vector[start : start + size].reshape(shape).astype(dtype))
        start += size
    return jax.tree.unflatten(spec.treedef, out)


# ----------------------------------------------------------------------------- Shamir sharing


def shamir_split(
    secret: int, n: int, t: int, *, xs: Sequence[int] | None = None, randbelow: Callable[[int], int] = secrets.randbelow
) -> list[tuple[int, int]]:
    """Shamir's ``t``-of-``n`` secret sharing over ``GF(PRIME)``.

    Draws ``f(x) = secret + a_1 x + ... + a_{t-1} x^{t-1}`` with uniform coefficients and returns
    the shares ``(x, f(x))``, evaluated by Horner's rule, at ``xs`` (default ``1..n``).

    Args:
      secret: an integer in ``[0, PRIME)``.
      n: the number of shares.
      t: the threshold, ``1 <= t <= n``: any ``t`` shares rebuild the secret, ``t - 1`` reveal
        nothing.
      xs: ``n`` distinct non-zero evaluation points in ``[1, PRIME)``.
      randbelow: source of the coefficients (``secrets.randbelow`` by default).

    Returns:
      ``n`` pairs ``(x, y)``.
    """
    if not 0 <= secret < PRIME:
        raise InputError("the secret must be an integer in [0, PRIME)")
    if not 1 <= t <= n:
        raise ConfigError(f"Shamir sharing needs 1 <= t <= n, got t={t}, n={n}")
    xs = list(range(1, n + 1)) if xs is None else [int(x) for x in xs]
    if len(xs) != n or len(set(xs)) != n or any(not 0 < x < PRIME for x in xs):
        raise InputError(f"need {n} distinct evaluation points in [1, PRIME), got {xs}")
    coefficients = [secret] + [randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in xs:
        y = 0
        for a in reversed(coefficients):
            y = (y * x + a) % PRIME
        shares.append((x, y))
    return shares


def shamir_reconstruct(shares: Iterable[tuple[int, int]]) -> int:
    """The polynomial through ``shares`` evaluated at 0 (Lagrange interpolation in ``GF(PRIME)``).

    ``f(0) = sum_j y_j prod_{m != j} x_m / (x_m - x_j)``. With at least ``t`` shares of one secret
    this is the secret; with fewer it is an unrelated field element.
    """
    shares = [(int(x) % PRIME, int(y) % PRIME) for x, y in shares]
    xs = [x for x, _ in shares]
    if not shares:
        raise InputError("no shares to reconstruct from")
    if len(set(xs)) != len(xs) or 0 in xs:
        raise InputError("shares need distinct non-zero x coordinates")
    secret = 0
    for j, (xj, yj) in enumerate(shares):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    return secret


# ----------------------------------------------------------------------------- primitives


def prg_mask(seed: bytes, length: int, bits: int = 32) -> np.ndarray:
    """``length`` uniform ring elements from a 32-byte seed: SHAKE-256, little-endian words."""
    dtype = ring_dtype(bits)
    stream = hashlib.shake_256(b"fedprompt.secagg/prg" + bytes(seed)).digest(int(length) * dtype.itemsize)
    return np.frombuffer(stream, dtype.newbyteorder("<")).astype(dtype)


def _kdf(shared: bytes, label: bytes, session: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=session, info=b"fedprompt.secagg/" + label).derive(shared)


_NONCE_BYTES = 12  # AES-GCM's 96-bit nonce, drawn fresh for every ciphertext


class _Entropy:
    """A party's randomness: the OS CSPRNG, or (simulation only) a seeded generator."""

    def __init__(self, seed: int | None, party: int, label: int = 0):
        self._rng = None if seed is None else np.random.default_rng([int(seed), int(party), int(label), 0x5EC466])

    def bytes(self, n: int) -> bytes:
        return secrets.token_bytes(n) if self._rng is None else self._rng.bytes(n)

    def randbelow(self, bound: int) -> int:
        if self._rng is None:
            return secrets.randbelow(bound)
        nbits = bound.bit_length()
        while True:
            value = int.from_bytes(self._rng.bytes((nbits + 7) // 8), "big") & ((1 << nbits) - 1)
            if value < bound:
                return value


# ----------------------------------------------------------------------------- messages


def _wire_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WireError(f"{what} must be an integer >= 0, got {value!r}")
    return value


def _wire_bytes(value: Any, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise WireError(f"{what} must be {size} bytes")
    return value


def _wire_shares(value: Any, what: str) -> dict[int, int]:
    if not isinstance(value, Mapping) or len(value) > 2**16:
        raise WireError(f"{what} must be a map of client ids to shares")
    out = {}
    for key, share in value.items():
        if not isinstance(key, str) or not key.isdigit() or len(key) > 10:
            raise WireError(f"{what}: client ids are decimal strings, got {key!r}")
        out[int(key)] = int.from_bytes(_wire_bytes(share, _SHARE_BYTES, what), "big")
    return out


@dataclasses.dataclass(frozen=True)
class PublicKeys:
    """Round 0 message: a client's two X25519 public keys (32 raw bytes each)."""

    index: int
    cipher_key: bytes
    mask_key: bytes

    def to_wire(self) -> dict[str, Any]:
        """Plain data for a wire message's ``meta`` (:mod:`fedprompt.wire.codec`)."""
        return {"index": self.index, "cipher_key": self.cipher_key, "mask_key": self.mask_key}

    @classmethod
    def from_wire(cls, data: Any) -> PublicKeys:
        """The inverse of :meth:`to_wire`, checking a hostile input (raises ``WireError``)."""
        if not isinstance(data, Mapping) or set(data) != {"index", "cipher_key", "mask_key"}:
            raise WireError("public keys must be a map with index, cipher_key and mask_key")
        return cls(_wire_int(data["index"], "index"), _wire_bytes(data["cipher_key"], _KEY_BYTES, "cipher_key"),
                   _wire_bytes(data["mask_key"], _KEY_BYTES, "mask_key"))


@dataclasses.dataclass(frozen=True)
class UnmaskingShares:
    """Round 3 message of one client: shares at its point ``x = index + 1``.

    Attributes:
      index: the client that sends them.
      mask_key_shares: ``{dropped client u: share of u's mask private key}``.
      self_mask_shares: ``{surviving client v: share of v's self-mask seed}``.
    """

    index: int
    mask_key_shares: dict[int, int]
    self_mask_shares: dict[int, int]

    def to_wire(self) -> dict[str, Any]:
        """Plain data for a wire message's ``meta``: shares as 66-byte big-endian strings
        (they are 521-bit field elements, too large for msgpack integers)."""
        def pack(shares: Mapping[int, int]) -> dict[str, bytes]:
            return {str(k): int(v).to_bytes(_SHARE_BYTES, "big") for k, v in shares.items()}

        return {"index": self.index, "mask_key_shares": pack(self.mask_key_shares),
                "self_mask_shares": pack(self.self_mask_shares)}

    @classmethod
    def from_wire(cls, data: Any) -> UnmaskingShares:
        """The inverse of :meth:`to_wire`, checking a hostile input (raises ``WireError``)."""
        if not isinstance(data, Mapping) or set(data) != {"index", "mask_key_shares", "self_mask_shares"}:
            raise WireError("unmasking shares must be a map with index, mask_key_shares and self_mask_shares")
        return cls(_wire_int(data["index"], "index"), _wire_shares(data["mask_key_shares"], "mask_key_shares"),
                   _wire_shares(data["self_mask_shares"], "self_mask_shares"))


def _check_index(index: Any, n: int, what: str = "client index") -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise InputError(f"{what} must be an integer in [0, {n}), got {index!r}")
    return int(index)


def _check_protocol(n: int, t: int, length: int, bits: int) -> None:
    for name, value in (("n", n), ("t", t), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"secure aggregation needs an integer {name} >= 1, got {value!r}")
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 clients, got {n}")
    if not 2 <= t <= n:
        raise ConfigError(f"the threshold t must be in [2, n] = [2, {n}], got {t}")
    ring_dtype(bits)


def _pairwise_masks(own_key: X25519PrivateKey, own: int, peers: Mapping[int, bytes], length: int, bits: int,
                    session: bytes) -> np.ndarray:
    """``sum_{v > own} PRG(s_uv) - sum_{v < own} PRG(s_uv)`` over ``peers`` ``{v: v's mask public key}``."""
    total = np.zeros(length, ring_dtype(bits))
    for v, public in peers.items():
        if v == own:
            continue
        shared = own_key.exchange(X25519PublicKey.from_public_bytes(public))
        mask = prg_mask(_kdf(shared, b"pairwise-mask", session), length, bits)
        if v > own:
            total += mask
        else:
            total -= mask
    return total


# ----------------------------------------------------------------------------- parties


class SecAggClient:
    """One client of the protocol. Its secrets never leave it except as the protocol says.

    Args:
      index: the client's id in ``[0, n)``; its Shamir point is ``index + 1``.
      n, t: the number of clients and the threshold.
      length: the number of ring elements of an input.
      bits: 32 or 64.
      session: the round's session id (from the server; in the key derivation of every mask
        and share, so nothing is reused across rounds).
      seed: None (OS randomness) or a seed for reproducible simulation.
    """

    def __init__(self, index: int, *, n: int, t: int, length: int, bits: int = 32, session: bytes,
                 seed: int | None = None):
        _check_protocol(n, t, length, bits)
        self.index = _check_index(index, n)
        self.n, self.t, self.length, self.bits, self.session = n, t, length, bits, bytes(session)
        self._entropy = _Entropy(seed, index)
        self._cipher_key = X25519PrivateKey.from_private_bytes(self._entropy.bytes(_KEY_BYTES))
        self._mask_key = X25519PrivateKey.from_private_bytes(self._entropy.bytes(_KEY_BYTES))
        self._self_seed = self._entropy.bytes(_KEY_BYTES)
        self._roster: dict[int, PublicKeys] | None = None
        self._held: dict[int, tuple[int, int]] = {}  # u -> (share of u's mask key, share of b_u) at my point
        self._answered: tuple[frozenset[int], frozenset[int]] | None = None  # (U2, U3) of round 3

    def to_state(self) -> dict[str, Any]:
        """Everything this client holds between protocol steps, as plain data, for a runtime
        that runs each step in a fresh process (a Flower SuperNode keeps it in its node
        state). It holds the client's private keys: it must never leave the client's machine."""
        return {
            "index": self.index, "n": self.n, "t": self.t, "length": self.length, "bits": self.bits,
            "session": self.session,
            "cipher_key": self._cipher_key.private_bytes_raw(), "mask_key": self._mask_key.private_bytes_raw(),
            "self_seed": self._self_seed,
            "roster": None if self._roster is None else [p.to_wire() for p in self._roster.values()],
            "held": {str(u): [a.to_bytes(_SHARE_BYTES, "big"), b.to_bytes(_SHARE_BYTES, "big")]
                     for u, (a, b) in self._held.items()},
            "answered": None if self._answered is None else [sorted(self._answered[0]), sorted(self._answered[1])],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SecAggClient:
        """The client :meth:`to_state` saved (raises ``WireError`` on a malformed state)."""
        try:
            client = cls.__new__(cls)
            client.index, client.n, client.t = int(state["index"]), int(state["n"]), int(state["t"])
            client.length, client.bits, client.session = int(state["length"]), int(state["bits"]), bytes(state["session"])
            _check_protocol(client.n, client.t, client.length, client.bits)
            client._entropy = _Entropy(None, client.index)
            client._cipher_key = X25519PrivateKey.from_private_bytes(_wire_bytes(state["cipher_key"], _KEY_BYTES, "key"))
            client._mask_key = X25519PrivateKey.from_private_bytes(_wire_bytes(state["mask_key"], _KEY_BYTES, "key"))
            client._self_seed = _wire_bytes(state["self_seed"], _KEY_BYTES, "seed")
            roster = state["roster"]
            client._roster = None if roster is None else {p.index: p for p in map(PublicKeys.from_wire, roster)}
            client._held = {int(u): (int.from_bytes(_wire_bytes(a, _SHARE_BYTES, "share"), "big"),
                                     int.from_bytes(_wire_bytes(b, _SHARE_BYTES, "share"), "big"))
                            for u, (a, b) in state["held"].items()}
            answered = state["answered"]
            client._answered = None if answered is None else (frozenset(answered[0]), frozenset(answered[1]))
        except (KeyError, TypeError, ValueError) as err:
            raise WireError(f"malformed secure-aggregation client state: {err}") from None
        return client

    def advertise_keys(self) -> PublicKeys:
        """Round 0: the client's public keys."""
        return PublicKeys(self.index, self._cipher_key.public_key().public_bytes_raw(),
                          self._mask_key.public_key().public_bytes_raw())

    def share_keys(self, roster: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """Round 1: Shamir-shares the mask key and self-mask seed; one ciphertext per other client.

        Raises:
          SecureAggregationError: fewer than ``t`` clients in the roster, this client missing or
            its keys changed, or two clients with the same key.
        """
        if self._roster is not None:
            # New Shamir shares under the same keys would hand out 2 x (t - 1) shares of the same
            # secrets to some clients; refused, whatever the server asks.
            raise SecureAggregationError("this client already shared its keys for this protocol run (session id); "
                                         "a second share_keys is refused")
        roster = dict(roster)
        if len(roster) < self.t:
            raise SecureAggregationError(f"only {len(roster)} clients advertised keys, fewer than the threshold {self.t}")
        if roster.get(self.index) != self.advertise_keys():
            raise SecureAggregationError("the roster does not hold this client's own public keys")
        keys = [k for p in roster.values() for k in (p.cipher_key, p.mask_key)]
        if len(set(keys)) != len(keys):
            raise SecureAggregationError("two advertised public keys are equal")
        self._roster = roster
        members = sorted(roster)
        xs = [v + 1 for v in members]
        key_secret = int.from_bytes(self._mask_key.private_bytes_raw(), "big")
        seed_secret = int.from_bytes(self._self_seed, "big")
        key_shares = dict(zip(members, (y for _, y in shamir_split(key_secret, len(xs), self.t, xs=xs, randbelow=self._entropy.randbelow))))
        seed_shares = dict(zip(members, (y for _, y in shamir_split(seed_secret, len(xs), self.t, xs=xs, randbelow=self._entropy.randbelow))))
        self._held[self.index] = (key_shares[self.index], seed_shares[self.index])
        out = {}
        for v in members:
            if v == self.index:
                continue
            plaintext = (struct.pack(">II", self.index, v) + key_shares[v].to_bytes(_SHARE_BYTES, "big")
                         + seed_shares[v].to_bytes(_SHARE_BYTES, "big"))
            nonce = self._entropy.bytes(_NONCE_BYTES)
            out[v] = nonce + self._aead(roster[v]).encrypt(nonce, plaintext, self._ad(self.index, v))
        return out

    def _aead(self, peer: PublicKeys) -> AESGCM:
        shared = self._cipher_key.exchange(X25519PublicKey.from_public_bytes(peer.cipher_key))
        return AESGCM(_kdf(shared, b"share-encryption", self.session))

    def _ad(self, sender: int, receiver: int) -> bytes:
        return self.session + struct.pack(">II", sender, receiver)

    def receive_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Round 1 (receiving side): decrypts and keeps the shares other clients sent it.

        Raises:
          SecureAggregationError: a ciphertext from a client not in the roster, or one that
            does not decrypt or is not addressed to this client.
        """
        if self._roster is None:
            raise SecureAggregationError("receive_shares before share_keys")
        for u, ciphertext in ciphertexts.items():
            if u not in self._roster or u == self.index:
                raise SecureAggregationError(f"shares from client {u}, which is not another member of the roster")
            ciphertext = bytes(ciphertext)
            if len(ciphertext) < _NONCE_BYTES + 16:  # nonce and GCM tag
                raise SecureAggregationError(f"the shares from client {u} are too short to be a ciphertext")
            try:
                plaintext = self._aead(self._roster[u]).decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:],
                                                                 self._ad(u, self.index))
            except InvalidTag:
                raise SecureAggregationError(f"the shares from client {u} do not decrypt") from None
            if len(plaintext) != 8 + 2 * _SHARE_BYTES or struct.unpack(">II", plaintext[:8]) != (u, self.index):
                raise SecureAggregationError(f"the shares from client {u} are malformed or misaddressed")
            key_share = int.from_bytes(plaintext[8 : 8 + _SHARE_BYTES], "big")
            seed_share = int.from_bytes(plaintext[8 + _SHARE_BYTES :], "big")
            self._held[u] = (key_share, seed_share)

    def masked_input(self, values: Any, u2: Collection[int]) -> np.ndarray:
        """Round 2: ``y = x + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)`` over ``v in U2``.

        Args:
          values: this client's quantized input, ``length`` ring elements.
          u2: the clients whose shares were relayed (the server says who).

        Raises:
          InputError: ``values`` of the wrong dtype or length.
          SecureAggregationError: fewer than ``t`` clients in ``U2``, this client not in it, or a
            client in it whose shares this client never received.
        """
        values = np.asarray(values)
        dtype = ring_dtype(self.bits)
        if values.dtype != dtype or values.shape != (self.length,):
            raise InputError(f"the input must be {self.length} {dtype.name} ring elements, got {values.dtype} {values.shape}")
        u2 = set(int(v) for v in u2)
        if len(u2) < self.t:
            raise SecureAggregationError(f"only {len(u2)} clients shared keys, fewer than the threshold {self.t}")
        if self.index not in u2 or not u2 <= set(self._held):
            raise SecureAggregationError("U2 holds clients whose shares this client has not received")
        peers = {v: self._roster[v].mask_key for v in u2}
        masked = values + prg_mask(self._self_seed, self.length, self.bits)
        masked += _pairwise_masks(self._mask_key, self.index, peers, self.length, self.bits, self.session)
        return masked

    def unmasking_shares(self, u2: Collection[int], u3: Collection[int]) -> UnmaskingShares:
        """Round 3: mask-key shares of the dropped clients (``U2 \\ U3``) and self-mask shares of the survivors.

        A client answers for one survivor list only: asked again with another one (a server
        trying to collect both shares of some client), it refuses.

        Raises:
          SecureAggregationError: ``U3`` smaller than ``t``, not inside ``U2``, without this
            client, or different from the list this client already answered for.
        """
        u2, u3 = set(int(v) for v in u2), set(int(v) for v in u3)
        if self._answered is not None and self._answered != (frozenset(u2), frozenset(u3)):
            raise SecureAggregationError("this client already revealed shares for another survivor list")
        if len(u3) < self.t:
            raise SecureAggregationError(f"only {len(u3)} clients sent masked inputs, fewer than the threshold {self.t}")
        if not u3 <= u2 or self.index not in u3 or not u2 <= set(self._held):
            raise SecureAggregationError("inconsistent survivor lists")
        self._answered = (frozenset(u2), frozenset(u3))
        return UnmaskingShares(
            index=self.index,
            mask_key_shares={u: self._held[u][0] for u in sorted(u2 - u3)},
            self_mask_shares={v: self._held[v][1] for v in sorted(u3)},
        )


class SecAggServer:
    """The server: relays messages, sums masked inputs, removes the masks it is allowed to."""

    def __init__(self, *, n: int, t: int, length: int, bits: int = 32, session: bytes):
        _check_protocol(n, t, length, bits)
        self.n, self.t, self.length, self.bits, self.session = n, t, length, bits, bytes(session)
        self.roster: dict[int, PublicKeys] = {}
        self.u2: frozenset[int] = frozenset()

    def collect_keys(self, keys: Iterable[PublicKeys]) -> dict[int, PublicKeys]:
        """Round 0: the roster ``U1`` to broadcast. Raises if fewer than ``t`` clients."""
        roster = {}
        for p in keys:
            i = _check_index(p.index, self.n)
            if len(p.cipher_key) != _KEY_BYTES or len(p.mask_key) != _KEY_BYTES or i in roster:
                raise SecureAggregationError(f"malformed or repeated public keys from client {i}")
            roster[i] = p
        if len(roster) < self.t:
            raise SecureAggregationError(f"only {len(roster)} clients advertised keys, fewer than the threshold {self.t}")
        self.roster = roster
        return dict(roster)

    def route_shares(self, outgoing: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Round 1: ``{receiver v: {sender u: ciphertext}}`` among the senders ``U2``."""
        u2 = {int(u) for u in outgoing if int(u) in self.roster}
        if len(u2) < self.t:
            raise SecureAggregationError(f"only {len(u2)} clients shared keys, fewer than the threshold {self.t}")
        for u in u2:
            if set(outgoing[u]) != set(self.roster) - {u}:
                raise SecureAggregationError(f"client {u} did not send one share to every other client")
        self.u2 = frozenset(u2)
        return {v: {u: outgoing[u][v] for u in sorted(u2) if u != v} for v in sorted(u2)}

    def sum_masked(self, masked: Mapping[int, Any]) -> np.ndarray:
        """Round 2: the sum (mod ``2^bits``) of the masked inputs of ``U3 = masked.keys()``."""
        dtype = ring_dtype(self.bits)
        if not set(masked) <= self.u2:
            raise SecureAggregationError("a masked input from a client outside U2")
        total = np.zeros(self.length, dtype)
        for u, y in masked.items():
            y = np.asarray(y)
            if y.dtype != dtype or y.shape != (self.length,):
                raise SecureAggregationError(f"client {u}'s masked input is not {self.length} {dtype.name} elements")
            total += y
        return total

    def unmask(self, masked_sum: Any, survivors: Collection[int], responses: Mapping[int, UnmaskingShares] | Iterable[UnmaskingShares]) -> np.ndarray:
        """Round 3: removes the dropped clients' pairwise masks and the survivors' self-masks.

        Args:
          masked_sum: :meth:`sum_masked` of the survivors' inputs.
          survivors: ``U3``, the clients whose masked input is in the sum.
          responses: the survivors' :class:`UnmaskingShares` (``U4``, a subset of ``U3``).

        Returns:
          ``sum_{u in U3} x_u`` in the ring.

        Raises:
          SecureAggregationError: fewer than ``t`` survivors or responses, an inconsistent
            response, or shares that rebuild a key other than the advertised one. Nothing is
            returned then.
        """
        u3 = {int(v) for v in survivors}
        if len(u3) < self.t:
            raise SecureAggregationError(
                f"only {len(u3)} clients sent masked inputs, fewer than the threshold {self.t}: nothing is published")
        if not u3 <= self.u2:
            raise SecureAggregationError("a survivor outside U2")
        if isinstance(responses, Mapping):
            responses = list(responses.values())
        u4 = {}
        for r in responses:
            if r.index in u4 or r.index not in u3:
                raise SecureAggregationError(f"an unexpected or repeated response from client {r.index}")
            if set(r.mask_key_shares) != self.u2 - u3 or set(r.self_mask_shares) != u3:
                raise SecureAggregationError(f"client {r.index}'s response does not match the survivor list")
            u4[r.index] = r
        if len(u4) < self.t:
            raise SecureAggregationError(
                f"only {len(u4)} survivors sent their shares, fewer than the threshold {self.t}: nothing is published")
        dtype = ring_dtype(self.bits)
        total = np.asarray(masked_sum)
        if total.dtype != dtype or total.shape != (self.length,):
            raise SecureAggregationError(f"the masked sum is not {self.length} {dtype.name} elements")
        total = total.copy()
        responders = sorted(u4)[: self.t]
        for u in sorted(self.u2 - u3):
            secret = shamir_reconstruct((v + 1, u4[v].mask_key_shares[u]) for v in responders)
            if secret >= 2 ** (8 * _KEY_BYTES):
                raise SecureAggregationError(f"the shares of client {u}'s mask key do not rebuild a key")
            key = X25519PrivateKey.from_private_bytes(secret.to_bytes(_KEY_BYTES, "big"))
            if key.public_key().public_bytes_raw() != self.roster[u].mask_key:
                raise SecureAggregationError(f"the shares of client {u}'s mask key rebuild a different key")
            # Survivor v added sign(v, u) * PRG(s_vu); client u's view of the same pairs has the
            # opposite signs, so adding u's pairwise masks (as u would have) cancels them.
            peers = {v: self.roster[v].mask_key for v in u3}
            total += _pairwise_masks(key, u, peers, self.length, self.bits, self.session)
        for v in sorted(u3):
            secret = shamir_reconstruct((w + 1, u4[w].self_mask_shares[v]) for w in responders)
            if secret >= 2 ** (8 * _KEY_BYTES):
                raise SecureAggregationError(f"the shares of client {v}'s self-mask seed do not rebuild a seed")
            total -= prg_mask(secret.to_bytes(_KEY_BYTES, "big"), self.length, self.bits)
        return total


# ----------------------------------------------------------------------------- simulation driver


class SecureAggregation:
    """All parties of one protocol run in one process (simulation), each using only its own secrets.

    Use :meth:`setup` (rounds 0 and 1 for all ``n`` clients), then :meth:`mask` per surviving
    client (round 2), :meth:`sum_masked`, :meth:`unmasking_shares` (round 3) and :meth:`unmask`.

    Example:
      >>> import numpy as np
      >>> agg = SecureAggregation.setup(3, 2, length=2, seed=0)
      >>> x = [np.array([1, 2], np.uint32), np.array([3, 4], np.uint32), np.array([5, 6], np.uint32)]
      >>> masked = {i: agg.mask(i, x[i]) for i in (0, 1)}          # client 2 drops out
      >>> total = agg.sum_masked(masked)
      >>> agg.unmask(total, {0, 1}, agg.unmasking_shares({0, 1})).tolist()
      [4, 6]
    """

    def __init__(self, clients: Sequence[SecAggClient], server: SecAggServer):
        self.clients = list(clients)
        self.server = server

    @classmethod
    def setup(cls, n: int, t: int, *, length: int, bits: int = 32, seed: int | None = None,
              session: bytes | None = None) -> SecureAggregation:
        """Creates the server and ``n`` clients and runs AdvertiseKeys and ShareKeys for all of them."""
        _check_protocol(n, t, length, bits)
        if session is None:
            session = _Entropy(seed, -1 % 2**32).bytes(16)
        server = SecAggServer(n=n, t=t, length=length, bits=bits, session=session)
        clients = [SecAggClient(i, n=n, t=t, length=length, bits=bits, session=session, seed=seed) for i in range(n)]
        roster = server.collect_keys(c.advertise_keys() for c in clients)
        inbox = server.route_shares({c.index: c.share_keys(roster) for c in clients})
        for c in clients:
            c.receive_shares(inbox[c.index])
        return cls(clients, server)

    @property
    def t(self) -> int:
        return self.server.t

    def mask(self, i: int, update_ints: Any) -> np.ndarray:
        """Client ``i``'s round-2 message: its quantized update, masked."""
        i = _check_index(i, len(self.clients))
        return self.clients[i].masked_input(update_ints, self.server.u2)

    def sum_masked(self, masked: Mapping[int, Any]) -> np.ndarray:
        """The server's sum of the masked inputs it received."""
        return self.server.sum_masked(masked)

    def unmasking_shares(self, survivors: Collection[int], responders: Collection[int] | None = None) -> dict[int, UnmaskingShares]:
        """The round-3 responses of ``responders`` (default: every survivor)."""
        responders = survivors if responders is None else responders
        return {int(i): self.clients[_check_index(i, len(self.clients))].unmasking_shares(self.server.u2, survivors)
                for i in responders}

    def unmask(self, masked_sum: Any, survivors: Collection[int], shares_from_survivors: Mapping[int, UnmaskingShares]) -> np.ndarray:
        """The sum of the survivors' inputs (ring elements); see :meth:`SecAggServer.unmask`."""
        return self.server.unmask(masked_sum, survivors, shares_from_survivors)


def secure_sum(
    updates: Sequence[Any],
    dropped: Collection[int] = (),
    t: int | None = None,
    seed: int | None = None,
    *,
    clip_range: float = 1.0,
    bits: int = 32,
    scale: float | None = None,
    stochastic: bool = False,
) -> Any:
    """The sum of the surviving clients' updates, computed by secure aggregation.

    Every client quantizes its update (:func:`quantize`, clip range ``r``), all ``n`` run setup,
    the clients in ``dropped`` drop out after sharing their keys (the case the protocol must
    recover from: their pairwise masks are in everybody else's input), the others send masked
    inputs and their unmasking shares, and the server unmasks and the sum is dequantized.

    Args:
      updates: one pytree per client, all of one structure and shapes (``n = len(updates)``).
      dropped: indices of clients that drop out before sending their masked input.
      t: the threshold; None: ``max(2, ceil(2 n / 3))``.
      seed: None (OS randomness) or a seed for a reproducible simulation.
      clip_range: ``r``: every coordinate is clipped to ``[-r, r]`` before quantization (with
        central DP and clipping norm ``C``, ``r = C`` clips nothing more).
      bits: 32 or 64.
      scale: quantization scale; None: :func:`scale_for` ``n`` clients.
      stochastic: stochastic (unbiased) rounding instead of rounding to nearest.

    Returns:
      The float32 pytree ``sum_{u not dropped} clip(x_u, r)``, up to quantization error (at most
      ``(n - |dropped|) / (2 s)`` per coordinate; twice that with stochastic rounding).

    Raises:
      SecureAggregationError: fewer than ``t`` clients survive; nothing is published.
      InputError: mismatched updates, non-finite values, bad indices.
    """
    n = len(updates)
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 clients, got {n}")
    t = max(2, math.ceil(2 * n / 3)) if t is None else t
    dropped = {_check_index(i, n, "dropped client") for i in dropped}
    vectors, spec = [], None
    for i, update in enumerate(updates):
        vector, s = flatten_tree(update)
        if spec is None:
            spec = s
        elif s != spec:
            raise InputError(f"client {i}'s update has another structure or shapes than client 0's")
        vectors.append(vector)
    scale = scale_for(n, clip_range, bits) if scale is None else scale
    if max_clients(clip_range, scale, bits) < n:
        raise ConfigError(f"scale {scale} lets only {max_clients(clip_range, scale, bits)} clients sum without wrap-around, not {n}")
    agg = SecureAggregation.setup(n, t, length=spec.size, bits=bits, seed=seed)
    survivors = [i for i in range(n) if i not in dropped]
    masked = {}
    for i in survivors:
        rng = np.random.default_rng([0 if seed is None else int(seed), i, 0x90A7]) if stochastic and seed is not None else (
            np.random.default_rng() if stochastic else None)
        masked[i] = agg.mask(i, quantize(vectors[i], clip_range=clip_range, scale=scale, bits=bits, rng=rng))
    total = agg.sum_masked(masked)
    if len(survivors) < t:  # the server stops before asking anyone for shares
        raise SecureAggregationError(
            f"only {len(survivors)} of {n} clients survived, fewer than the threshold {t}: nothing is published")
    ints = agg.unmask(total, survivors, agg.unmasking_shares(survivors))
    return unflatten_tree(dequantize(ints, scale=scale, bits=bits), spec)
