"""Account linking (union-find over links) and keyed pseudonyms.

An *account* is a (platform, user_id) pair, written canonically as ``"platform\\x1fuser_id"`` (platform
lower-cased, both trimmed). Links join accounts into *persons*; chains of links (A~B, B~C) join one
person, and an account no link mentions is a person of its own. A person's pseudonym is the keyed
BLAKE2b hash (128 bits, hex) of its smallest canonical account string, so it does not depend on the
order of the input; raw account ids never leave `prepare` unless a mapping is asked for.

The key comes from ``--key`` / ``key=``, else the environment variable ``FASTINTEREST_PSEUDONYM_KEY``,
else the public `DEFAULT_KEY` with a warning (fine for synthetic data, not for real people: anyone can
recompute pseudonyms made with a public key).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .io import read_table
from .schema import DataError

KEY_ENV = "FASTINTEREST_PSEUDONYM_KEY"
#: Public, documented default key. Pseudonyms made with it are NOT secret.
DEFAULT_KEY = "fastinterest-public-default-key"
ACCOUNT_SEPARATOR = "\x1f"

PAIR_COLUMNS = ("platform_a", "account_a", "platform_b", "account_b")
GROUP_COLUMNS = ("platform", "account_id", "person_id")


def resolve_key(key: str | bytes | None = None, *, warn: bool = True) -> tuple[bytes, str]:
    """The pseudonym key and where it came from: ``"argument"``, ``"environment"`` or ``"default"``."""
    if key:
        source = "argument"
    elif os.environ.get(KEY_ENV):
        key, source = os.environ[KEY_ENV], "environment"
    else:
        key, source = DEFAULT_KEY, "default"
        if warn:
            warnings.warn(
                f"no pseudonym key given (--key or ${KEY_ENV}); using the public default key, so "
                "pseudonyms can be recomputed by anyone. Set a secret key for real data.", UserWarning,
                stacklevel=3)
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    # BLAKE2b takes keys of at most 64 bytes; longer keys are first hashed down.
    return (raw if len(raw) <= 64 else hashlib.sha256(raw).digest()), source


def pseudonymise(texts: Iterable[str], key: bytes) -> list[str]:
    """Keyed BLAKE2b-128 hex digest of each string."""
    keyed = hashlib.blake2b(key=key, digest_size=16)  # copying a keyed state skips the key setup per string
    out = []
    for text in texts:
        h = keyed.copy()
        h.update(text.encode("utf-8"))
        out.append(h.hexdigest())
    return out


def account_strings(platforms: pa.Array, users: pa.Array) -> pa.Array:
    """Canonical account strings ``platform\\x1fuser`` (inputs already normalised)."""
    return pc.binary_join_element_wise(platforms.cast(pa.string()), users.cast(pa.string()), ACCOUNT_SEPARATOR)


def split_account_strings(accounts: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Inverse of `account_strings`: ``(platforms, users)``."""
    parts = pc.split_pattern(accounts, ACCOUNT_SEPARATOR, max_splits=1)
    return pc.list_element(parts, 0), pc.list_element(parts, 1)


def connected_components(n_nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Union-find over edges ``a[i] ~ b[i]``, vectorised: each node gets the smallest node id of its
    component.

    Each round hooks, for every edge whose ends lie in different trees, the larger root under the smaller
    one, then compresses every path fully (pointer jumping). Pointers always go to smaller ids, so no
    cycle can form, and each round merges at least one pair of trees; in practice a handful of rounds
    suffice even for long chains.
    """
    parent = np.arange(n_nodes, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        lo = np.minimum(ra[differ], rb[differ])
        hi = np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        a, b = a[differ], b[differ]  # edges already inside one tree stay so
    return parent


def read_links(path: str | Path) -> tuple[pa.Array, pa.Array, int]:
    """Read a links file into pairs of canonical account strings ``(a, b, rows_skipped)``.

    Accepts ``platform, account_id, person_id`` (accounts sharing a person_id are linked) or
    ``platform_a, account_a, platform_b, account_b``. Rows with an empty field are skipped and counted.
    """
    table = read_table(path, string_columns=PAIR_COLUMNS + GROUP_COLUMNS)
    names = set(table.column_names)

    def norm(col: str) -> pa.Array:
        arr = table.column(col).combine_chunks().cast(pa.string())
        arr = pc.utf8_trim_whitespace(arr)
        return pc.utf8_lower(arr) if col.startswith("platform") else arr

    def present(*arrays: pa.Array) -> np.ndarray:
        ok = np.ones(table.num_rows, dtype=bool)
        for arr in arrays:
            ok &= pc.fill_null(pc.greater(pc.utf8_length(arr), 0), False).to_numpy(zero_copy_only=False)
        return ok

    if set(PAIR_COLUMNS) <= names:
        pa_, aa, pb, ab = (norm(c) for c in PAIR_COLUMNS)
        ok = present(pa_, aa, pb, ab)
        mask = pa.array(ok)
        a = account_strings(pa_.filter(mask), aa.filter(mask))
        b = account_strings(pb.filter(mask), ab.filter(mask))
        return a, b, int((~ok).sum())
    if set(GROUP_COLUMNS) <= names:
        plat, acc, pid = (norm(c) for c in GROUP_COLUMNS)
        ok = present(plat, acc, pid)
        mask = pa.array(ok)
        accounts = account_strings(plat.filter(mask), acc.filter(mask))
        pid = pid.filter(mask)
        order = pc.sort_indices(pid)
        accounts, pid = accounts.take(order), pid.take(order).to_numpy(zero_copy_only=False)
        same = np.flatnonzero(pid[1:] == pid[:-1])  # consecutive rows of one person_id -> an edge
        return accounts.take(pa.array(same)), accounts.take(pa.array(same + 1)), int((~ok).sum())
    raise DataError(
        "a links file needs the columns platform, account_id, person_id or platform_a, account_a, "
        f"platform_b, account_b (found: {', '.join(table.column_names)})", path, line=1)


def link_accounts(accounts: pa.Array, link_a: pa.Array, link_b: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Group accounts into persons.

    Args:
        accounts: the distinct canonical account strings of the events (node ids 0..n-1).
        link_a, link_b: linked pairs of canonical account strings; accounts that appear only in links
            become extra nodes, so a chain through an account without events still joins its ends.

    Returns:
        ``(component, representative)``: for each account, the id of its component (the smallest node id
        in it), and for each account, the smallest canonical string in its component (what the person's
        pseudonym hashes).
    """
    n = len(accounts)
    if len(link_a) == 0:
        return np.arange(n, dtype=np.int64), accounts
    ends = pa.concat_arrays([link_a.cast(pa.string()), link_b.cast(pa.string())])
    idx = pc.index_in(ends, value_set=accounts)
    unknown = pc.is_null(idx)
    extra = pc.unique(ends.filter(unknown))
    node = pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    unknown_np = unknown.to_numpy(zero_copy_only=False)
    node[unknown_np] = n + pc.index_in(ends.filter(unknown), value_set=extra).to_numpy(zero_copy_only=False)
    m = len(link_a)
    component = connected_components(n + len(extra), node[:m], node[m:])

    # The representative string: the smallest canonical string among the nodes of each component.
    names = pa.concat_arrays([accounts.cast(pa.string()), extra.cast(pa.string())])
    sizes = np.bincount(component, minlength=len(component))
    multi = np.flatnonzero(sizes[component] > 1)  # only linked nodes need a comparison
    rep_node = np.arange(len(component), dtype=np.int64)
    if len(multi):
        table = pa.table({"c": pa.array(component[multi]), "s": names.take(pa.array(multi))})
        order = pc.sort_indices(table, sort_keys=[("c", "ascending"), ("s", "ascending")]).to_numpy()
        sorted_nodes, sorted_comp = multi[order], component[multi][order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = sorted_comp[1:] != sorted_comp[:-1]
        rep_node[sorted_comp[first]] = sorted_nodes[first]
    representative = names.take(pa.array(rep_node[component[:n]]))
    return component[:n], representative
