"""Named, derived random streams.

Every random draw of a run comes from a generator whose seed is derived from the recipe's top-level
``seed`` and a tuple of names (``("data", step)``, ``("sample", index)``, ...). Two consequences the
rest of the engine relies on:

* ``--set seed=N`` changes every stream of the run at once;
* a stream depends only on its names, not on how many draws happened before it, so a resumed run
  draws exactly what the uninterrupted run drew at the same step, and sample ``i`` of a sampling run
  is reproducible on its own.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed that is a stable hash of ``seed`` and ``names`` (not Python's salted ``hash``)."""
    text = "/".join([str(int(seed))] + [str(n) for n in names])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int, *names: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` for the stream ``(seed, *names)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *names))
    return g


def seed_everything(seed: int) -> None:
    """Seed the global RNGs too, for third-party code that draws from them (dropout, init)."""
    random.seed(derive_seed(seed, "python"))
    np.random.seed(derive_seed(seed, "numpy") % (2**32))
    torch.manual_seed(derive_seed(seed, "torch"))


def randn_per_sample(shape: tuple[int, ...], seed: int, indices, *names: object,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """Gaussian noise of ``shape`` (leading dim = len(indices)) where row ``k`` depends only on
    ``(seed, *names, indices[k])``: sample ``i`` is reproducible whatever batch it lands in."""
    rows = []
    for index in indices:
        g = generator(seed, *names, int(index))
        rows.append(torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32))
    return torch.stack(rows).to(device=device, dtype=dtype)
