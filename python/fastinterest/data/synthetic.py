"""Synthetic cross-platform behaviour logs with planted interests and counted faults.

What is generated (all vectorised numpy, deterministic for a seed, written in chunks):

* Categories (default 40, named, e.g. ``camping``), each with query words (``tent lantern sleeping``).
  Items belong to one category (10 % also to a second one); within a category item popularity is
  long-tailed (Zipf, exponent 1.1), and categories themselves are mildly Zipf-popular.
* Persons with planted interests: 2 or 3 categories each, with Dirichlet weights above a floor
  (`min_interest_weight`, default 0.2: every planted interest drives at least a fifth of the person's
  interest-driven events). 85 % of a person's events draw an item from those categories (by popularity),
  15 % from any category; 30 % of events go back to the previous event's item (view -> cart -> purchase
  funnels), so next items are predictable above popularity.
* Platforms ``shop``, ``search``, ``social``, ``video``, with platform-typical actions; 85 % of persons have
  accounts on 3 or 4 platforms, the rest on 1 or 2. Each account has a platform-styled id; the links file
  chains each person's accounts (``platform_a, account_a, platform_b, account_b``). Search events carry a
  query made of category words. Timestamps are unix seconds, except on social: ISO-8601 (``2024-01-05T12:34:56Z``).
* Sequence lengths are lognormal (median 50; about 2 % of persons have 400+ events).
* Injected faults, each an extra row whose count is exact and reported: ``duplicate`` (a copy of a valid
  row), ``missing_field`` (a required field blanked), ``bad_timestamp`` (unparsable), ``timestamp_out_of_range``,
  ``unknown_action``, ``bot_burst`` (bursts of more than `max_events_per_second` events of one account in one
  second). Valid events never collide by construction: one account never has two valid events in the
  same second, so `prepare` with the same threshold drops exactly the injected rows.

Files: the events (``.csv`` or ``.parquet``), ``<stem>.links.csv`` and ``<stem>.truth.json`` beside them.
The truth holds the planted interests of every generated person with their raw accounts;
`planted_interests` maps them onto a prepared directory through the keyed pseudonyms.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from .io import DEFAULT_CHUNK_ROWS, file_format
from .linking import ACCOUNT_SEPARATOR, pseudonymise, resolve_key
from .schema import DEFAULT_MAX_EVENTS_PER_SECOND, DataError

#: Category name and three query words each.
CATEGORY_WORDS: tuple[tuple[str, str, str, str], ...] = (
    ("books", "novel", "paperback", "author"), ("music", "album", "vinyl", "concert"),
    ("movies", "film", "bluray", "director"), ("gaming", "console", "controller", "rpg"),
    ("phones", "smartphone", "charger", "case"), ("laptops", "ultrabook", "keyboard", "ssd"),
    ("cameras", "lens", "tripod", "mirrorless"), ("audio", "headphones", "speaker", "earbuds"),
    ("tv", "television", "oled", "remote"), ("smart-home", "thermostat", "doorbell", "hub"),
    ("kitchen", "blender", "skillet", "knife"), ("coffee", "espresso", "grinder", "beans"),
    ("baking", "flour", "oven", "mixer"), ("grocery", "pasta", "snacks", "cereal"),
    ("wine", "merlot", "riesling", "corkscrew"), ("beauty", "lipstick", "serum", "mascara"),
    ("skincare", "moisturizer", "sunscreen", "cleanser"), ("fragrance", "perfume", "cologne", "musk"),
    ("womens-fashion", "dress", "blouse", "skirt"), ("mens-fashion", "shirt", "blazer", "chinos"),
    ("shoes", "sneakers", "boots", "sandals"), ("jewelry", "necklace", "ring", "earrings"),
    ("watches", "chronograph", "smartwatch", "strap"), ("bags", "backpack", "handbag", "wallet"),
    ("team-sports", "football", "racket", "jersey"), ("fitness", "dumbbell", "yoga", "treadmill"),
    ("running", "marathon", "trail", "shorts"), ("cycling", "bike", "helmet", "pedals"),
    ("camping", "tent", "lantern", "sleeping"), ("fishing", "rod", "reel", "bait"),
    ("garden", "seeds", "hose", "shovel"), ("tools", "drill", "wrench", "saw"),
    ("furniture", "sofa", "table", "chair"), ("bedding", "pillow", "duvet", "mattress"),
    ("decor", "lamp", "vase", "rug"), ("pets", "dog", "cat", "leash"),
    ("baby", "stroller", "diaper", "crib"), ("toys", "lego", "puzzle", "doll"),
    ("automotive", "tires", "oil", "dashcam"), ("travel", "luggage", "passport", "hotel"),
    ("art", "paint", "canvas", "brush"), ("crafts", "yarn", "sewing", "beads"),
    ("stationery", "pen", "planner", "ink"), ("health", "vitamins", "thermometer", "bandage"),
    ("office", "printer", "desk", "stapler"), ("asian-cooking", "wok", "soy", "noodles"),
    ("tea", "matcha", "oolong", "kettle"), ("barbecue", "grill", "charcoal", "smoker"),
    ("posters", "poster", "print", "frame"), ("collectibles", "coins", "stamps", "cards"),
)
MAX_CATEGORIES = len(CATEGORY_WORDS)

PLATFORMS = ("shop", "search", "social", "video")
#: Platform-typical actions and their probabilities.
PLATFORM_ACTIONS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "shop": (("view", "click", "cart", "favorite", "purchase", "rate"), (0.55, 0.15, 0.12, 0.06, 0.08, 0.04)),
    "search": (("search", "click", "view"), (0.6, 0.3, 0.1)),
    "social": (("like", "comment", "share", "view"), (0.45, 0.15, 0.15, 0.25)),
    "video": (("view", "like", "comment", "share"), (0.65, 0.2, 0.07, 0.08)),
}
ACTIONS = ("view", "click", "search", "cart", "favorite", "purchase", "like", "comment", "share", "rate")
FAULT_RULES = ("duplicate", "missing_field", "bad_timestamp", "timestamp_out_of_range", "unknown_action",
               "bot_burst")
#: Share of the fault rows given to each rule by `fault_rate`.
FAULT_SHARES = {"duplicate": 0.3, "missing_field": 0.2, "bad_timestamp": 0.15, "timestamp_out_of_range": 0.1,
                "unknown_action": 0.1, "bot_burst": 0.15}
BAD_TIMESTAMPS = ("not-a-time", "2024-13-01T00:00:00Z", "12/31/2024 10:00", "yesterday", "2024-02-30 10:00:00",
                  "1.7e9x")
OUT_OF_RANGE_TIMESTAMPS = ("0", "86400", "99999999999", "1969-07-20T20:17:00Z", "2150-01-01T00:00:00Z", "-5")
UNKNOWN_ACTIONS = ("hover", "scroll", "impression", "unknown")
START_TIME = 1_704_067_200  # 2024-01-01 00:00:00 UTC


def _sidecar(path: Path, suffix: str) -> Path:
    name = path.name
    for ext in (".csv.gz", ".parquet", ".csv", ".pq"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return path.with_name(name + suffix)


def _pick_by_weights(rng: np.random.Generator, cum_weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each row index, sample a column of `cum_weights[rows]` (rows are cumulative, ending at 1)."""
    u = rng.random(len(rows))
    return (u[:, None] > cum_weights[rows]).sum(axis=1)


def _allocate_faults(n_events: int, fault_rate: float, burst_size: int) -> dict[str, int]:
    total = int(round(n_events * fault_rate))
    faults = {rule: int(total * share) for rule, share in FAULT_SHARES.items()}
    if faults["bot_burst"] < burst_size:
        faults["duplicate"] += faults["bot_burst"]
        faults["bot_burst"] = 0
    else:
        faults["bot_burst"] -= faults["bot_burst"] % burst_size
    return faults


def generate_synthetic(
    n_events: int = 200_000,
    out: str | Path = "synthetic.parquet",
    *,
    links: str | Path | None = None,
    seed: int = 0,
    n_categories: int = 40,
    n_items: int | None = None,
    fault_rate: float = 0.01,
    faults: dict[str, int] | None = None,
    max_events_per_second: int = DEFAULT_MAX_EVENTS_PER_SECOND,
    median_length: float = 50.0,
    min_interest_weight: float = 0.2,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool | None = None,
) -> dict:
    """Write a synthetic event log of `n_events` rows (valid events + injected faults).

    Args:
        out: the events file, ``.csv`` or ``.parquet``.
        links: the links file (default ``<stem>.links.csv`` beside `out`).
        seed: everything is a function of the seed.
        n_categories: at most 50.
        n_items: default ``max(500, n_events // 20)``.
        fault_rate: share of rows that are faults, split by `FAULT_SHARES`; or give
        faults: exact row counts per rule (``bot_burst`` rows come in bursts of `max_events_per_second` + 1
            or more events, so it is 0 or at least that).
        max_events_per_second: the bot threshold `prepare` will use.
        median_length: median events per person (lognormal, sigma 1).
        min_interest_weight: the least weight of a planted interest (each of a person's k interests gets
            this much, the rest, 1 - k * min_interest_weight, is split by Dirichlet(1) weights); at most 1/3.
        chunk_rows: rows built and written at a time.
        progress: a tqdm bar while writing (None: only on a terminal).

    Returns a summary: paths of the files written, rows, valid events, persons, fault counts.
    """
    if not 1 <= n_categories <= MAX_CATEGORIES:
        raise ValueError(f"n_categories must be in [1, {MAX_CATEGORIES}]")
    if max_events_per_second < 1:
        raise ValueError("max_events_per_second must be >= 1")
    if not 0.0 <= min_interest_weight <= 1.0 / 3.0:
        raise ValueError("min_interest_weight must be in [0, 1/3]")
    out = Path(out)
    links_path = Path(links) if links is not None else _sidecar(out, ".links.csv")
    truth_path = _sidecar(out, ".truth.json")
    rng = np.random.default_rng(seed)
    burst_min = max_events_per_second + 1
    if faults is None:
        faults = _allocate_faults(n_events, fault_rate, burst_min)
    faults = {rule: int(faults.get(rule, 0)) for rule in FAULT_RULES}
    if 0 < faults["bot_burst"] < burst_min:
        raise ValueError(f"bot_burst rows come in bursts of at least {burst_min}")
    n_valid = n_events - sum(faults.values())
    if n_valid < 2:
        raise ValueError("n_events is too small for the requested faults")
    C = n_categories
    n_items = n_items or max(500, n_events // 20)

    # --- categories and items ------------------------------------------------------------------------
    cat_weight = 1.0 / np.arange(1, C + 1) ** 0.7
    cat_weight = cat_weight[rng.permutation(C)]
    cat_weight /= cat_weight.sum()
    # items per category ~ popularity, at least 3 each
    per_cat = np.maximum(3, np.floor(cat_weight * n_items)).astype(np.int64)
    n_items = int(per_cat.sum())
    item_cat = np.repeat(np.arange(C), per_cat)
    cat_start = np.concatenate([[0], np.cumsum(per_cat)[:-1]])
    rank_in_cat = np.arange(n_items) - cat_start[item_cat]
    pop = 1.0 / (rank_in_cat + 2.0) ** 1.1
    cat_pop_sum = np.bincount(item_cat, weights=pop)
    # Cumulative popularity inside each category, normalised to (c, c + 1] for category c, so that one
    # searchsorted of ``c + uniform`` samples an item of category c by popularity, for all events at once.
    within = np.cumsum(pop) - np.concatenate([[0.0], np.cumsum(cat_pop_sum)])[item_cat]
    cdf_norm = item_cat + within / cat_pop_sum[item_cat]
    second_cat = np.where(rng.random(n_items) < 0.1, rng.integers(0, C, n_items), -1)
    second_cat[second_cat == item_cat] = -1
    item_names = pc.binary_join_element_wise(
        "I", pa.array(rng.permutation(n_items) + 1_000_000).cast(pa.string()), "")
    cat_names = [w[0] for w in CATEGORY_WORDS[:C]]
    cat_arr = pa.array(cat_names)
    primary = cat_arr.take(pa.array(item_cat))
    secondary = pc.if_else(pa.array(second_cat >= 0), cat_arr.take(pa.array(np.maximum(second_cat, 0))), None)
    item_category = pc.binary_join_element_wise(primary, secondary, "|", null_handling="skip")

    # --- persons --------------------------------------------------------------------------------------
    mu, sigma = np.log(median_length), 1.0
    guess = int(n_valid / (median_length * np.exp(sigma ** 2 / 2)) * 1.3) + 10
    lengths = np.clip(np.round(rng.lognormal(mu, sigma, guess)), 2, 5000).astype(np.int64)
    while lengths.sum() < n_valid:
        lengths = np.concatenate([lengths, np.clip(np.round(rng.lognormal(mu, sigma, guess)), 2, 5000)
                                  .astype(np.int64)])
    cum = np.cumsum(lengths)
    P = int(np.searchsorted(cum, n_valid) + 1)
    lengths = lengths[:P]
    lengths[-1] -= int(cum[P - 1] - n_valid)
    if lengths[-1] < 1:
        lengths = lengths[:-1]
        P -= 1
    n_interests = np.where(rng.random(P) < 0.5, 2, 3)
    gumbel = np.log(cat_weight)[None, :] - np.log(-np.log(rng.random((P, C))))
    interests = np.argsort(-gumbel, axis=1)[:, :3]  # weighted sampling without replacement
    iw = rng.dirichlet(np.ones(3), P)
    iw[n_interests == 2, 2] = 0.0
    iw /= iw.sum(axis=1, keepdims=True)
    # A floor under the weights. Plain Dirichlet(1) weights planted interests that drive almost nothing: 18 %
    # of persons had one under 0.05 (e.g. 0.02 x 0.85 = 1.7 % of their events, below the 2 % that the noise
    # alone gives the most popular category), so a quarter of them were expected to show fewer than 2 events of
    # a "planted" interest, and even over 80..100-event histories the person's own category counts put all
    # planted interests in their top 3 for only 86 % of persons. Such a truth is not recoverable from behaviour
    # by any model; with the floor, long histories recover ~100 % and what remains is short histories.
    floor = min_interest_weight
    active = np.arange(3)[None, :] < n_interests[:, None]
    iw = np.where(active, floor + (1.0 - n_interests[:, None] * floor) * iw, 0.0)
    iw_cum = np.cumsum(iw, axis=1)
    iw_cum[:, -1] = 1.0

    n_plat = rng.choice([1, 2, 3, 4], size=P, p=[0.05, 0.10, 0.40, 0.45])
    plat_rank = np.argsort(rng.random((P, len(PLATFORMS))), axis=1)
    has_plat = np.zeros((P, len(PLATFORMS)), dtype=bool)
    np.put_along_axis(has_plat, plat_rank, np.arange(len(PLATFORMS))[None, :] < n_plat[:, None], axis=1)
    pw = rng.dirichlet(np.ones(len(PLATFORMS)), P) * has_plat
    pw /= pw.sum(axis=1, keepdims=True)
    pw_cum = np.cumsum(pw, axis=1)
    pw_cum[:, -1] = 1.0

    # --- valid events, per person in time order ---------------------------------------------------------
    pid = np.repeat(np.arange(P), lengths)
    first_of_person = np.zeros(n_valid, dtype=bool)
    first_of_person[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    slot = _pick_by_weights(rng, iw_cum, pid)
    cat = interests[pid, slot]
    noise = rng.random(n_valid) < 0.15
    cat[noise] = rng.choice(C, size=int(noise.sum()), p=cat_weight)
    item = np.minimum(np.searchsorted(cdf_norm, cat + rng.random(n_valid)), n_items - 1)
    item = np.where(item_cat[item] == cat, item, cat_start[cat])  # guard float edge cases
    # funnels: go back to the previous event's item
    repeat = (rng.random(n_valid) < 0.3) & ~first_of_person
    src = np.maximum.accumulate(np.where(repeat, 0, np.arange(n_valid)))
    item = item[src]
    platform = _pick_by_weights(rng, pw_cum, pid).astype(np.int8)
    action = np.zeros(n_valid, dtype=np.int8)  # index into ACTIONS
    for p, name in enumerate(PLATFORMS):
        rows = np.flatnonzero(platform == p)
        names, probs = PLATFORM_ACTIONS[name]
        action[rows] = np.array([ACTIONS.index(a) for a in names])[rng.choice(len(names), len(rows), p=probs)]
    # time: person start + gaps; a 0-second gap only to another platform and never twice in a row,
    # so one account never has two valid events in one second.
    gaps = np.maximum(1, np.round(rng.lognormal(np.log(600), 2.0, n_valid))).astype(np.int64)
    gaps[repeat] = np.maximum(1, np.round(rng.lognormal(np.log(30), 1.0, int(repeat.sum())))).astype(np.int64)
    zero = (rng.random(n_valid) < 0.1) & ~first_of_person
    zero[1:] &= platform[1:] != platform[:-1]
    zero[1:] &= ~zero[:-1].copy()
    gaps[zero] = 0
    gaps[first_of_person] = 0
    person_start = START_TIME + rng.integers(0, 30 * 86400, P)
    seg_cum = np.cumsum(gaps)
    seg_base = seg_cum[first_of_person]
    timestamp = person_start[pid] + seg_cum - seg_base[pid]
    value = np.full(n_valid, np.nan)
    purchase = action == ACTIONS.index("purchase")
    value[purchase] = np.round(rng.lognormal(3.0, 1.0, int(purchase.sum())), 2)
    rate = action == ACTIONS.index("rate")
    value[rate] = rng.integers(1, 6, int(rate.sum()))
    dwell = (action == ACTIONS.index("view")) & (platform == PLATFORMS.index("video"))
    value[dwell] = np.round(rng.lognormal(np.log(120), 1.0, int(dwell.sum())))
    no_category = (platform == PLATFORMS.index("social")) & (rng.random(n_valid) < 0.05)
    n_words = rng.integers(1, 4, n_valid)
    word_pick = rng.integers(0, 4, (n_valid, 3)).astype(np.int8)

    # --- accounts and links -----------------------------------------------------------------------------
    account_ids: dict[int, np.ndarray] = {}   # platform -> id string per person ('' if none)
    # one account id per (person, platform) with a platform-typical style; a few strings per person
    styles = {"shop": "u{:07d}", "search": "srch_{:08x}", "social": "@user{:06d}", "video": "{:d}"}
    for p, name in enumerate(PLATFORMS):
        owners = np.flatnonzero(has_plat[:, p])
        numbers = rng.permutation(len(owners)) + (1 if name != "video" else 10_000_000)
        if name == "search":
            numbers = (numbers.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(1 << 32)  # bijective mix
        ids = np.full(P, "", dtype=object)
        fmt = styles[name]
        ids[owners] = [fmt.format(int(x)) for x in numbers]
        account_ids[p] = ids
    acc_table = np.stack([account_ids[p] for p in range(len(PLATFORMS))], axis=1)  # [P, 4] object
    acc_flat = pa.array(acc_table.reshape(-1).tolist(), pa.string())  # index: person * 4 + platform
    platform_names = pa.array(PLATFORMS)
    action_names = pa.array(ACTIONS)
    words_flat = pa.array([w for c in CATEGORY_WORDS[:C] for w in c])  # index: category * 4 + word
    pair_rows = []
    for p in range(P):
        owned = np.flatnonzero(has_plat[p])
        for a, b in zip(owned[:-1], owned[1:]):
            pair_rows.append((PLATFORMS[a], acc_table[p, a], PLATFORMS[b], acc_table[p, b]))
    order = rng.permutation(len(pair_rows))
    links_table = pa.table({
        name: pa.array([pair_rows[i][k] for i in order], pa.string())
        for k, name in enumerate(("platform_a", "account_a", "platform_b", "account_b"))})

    # --- faults -----------------------------------------------------------------------------------------
    # Each fault row copies a random valid row (the source) and changes what its rule needs.
    kinds = np.concatenate([np.full(faults[r], i, dtype=np.int8) for i, r in enumerate(FAULT_RULES)])
    src_row = rng.integers(0, n_valid, len(kinds))
    f_timestamp = timestamp[src_row].copy()
    f_item = item[src_row].copy()
    f_action = action[src_row].copy()
    f_pid, f_platform = pid[src_row].copy(), platform[src_row].copy()
    is_burst = kinds == FAULT_RULES.index("bot_burst")
    if is_burst.any():
        n_burst_rows = int(is_burst.sum())
        n_bursts = n_burst_rows // burst_min
        sizes = np.full(n_bursts, burst_min)
        sizes[: n_burst_rows - n_bursts * burst_min] += 1  # spread the remainder (each still > threshold)
        while sizes.sum() < n_burst_rows:
            sizes[: n_burst_rows - sizes.sum()] += 1
        burst_src = rng.integers(0, n_valid, n_bursts)
        b_pid, b_platform = pid[burst_src], platform[burst_src]
        # the valid events of the burst accounts, as (account, second) keys
        account_of = pid.astype(np.int64) * len(PLATFORMS) + platform
        b_account = b_pid.astype(np.int64) * len(PLATFORMS) + b_platform
        is_burst_account = np.zeros(P * len(PLATFORMS), dtype=bool)
        is_burst_account[b_account] = True
        near = is_burst_account[account_of]
        valid_keys = account_of[near] * (1 << 34) + timestamp[near]
        b_time = timestamp[burst_src] + rng.integers(1, 3600, n_bursts)
        for _ in range(100):  # move a burst until its account has no valid event in that second
            clash = np.isin(b_account * (1 << 34) + b_time, valid_keys)
            if not clash.any():
                break
            b_time[clash] += rng.integers(1, 3600, int(clash.sum()))
        owner = np.repeat(np.arange(n_bursts), sizes)
        rows = np.flatnonzero(is_burst)
        f_pid[rows], f_platform[rows], f_timestamp[rows] = b_pid[owner], b_platform[owner], b_time[owner]
        f_item[rows] = rng.permutation(n_items)[np.arange(len(rows)) % n_items]  # distinct items: no duplicates
        first_action = np.array([ACTIONS.index(PLATFORM_ACTIONS[PLATFORMS[p]][0][0]) for p in range(len(PLATFORMS))])
        f_action[rows] = first_action[f_platform[rows]]
    fault_field = rng.integers(0, 5, len(kinds))  # which required field a missing_field row loses
    fault_variant = rng.integers(0, 6, len(kinds))

    # --- file order: by time, each fault beside its source row --------------------------------------------
    all_time = np.concatenate([timestamp, f_timestamp])
    order = np.argsort(all_time, kind="stable")
    n_rows = len(order)

    def column_chunk(rows: np.ndarray) -> pa.Table:
        """Build the raw-schema columns for rows of the combined (valid + fault) index."""
        fault = rows >= n_valid
        v = np.where(fault, 0, rows)
        f = np.where(fault, rows - n_valid, 0)
        kind = np.where(fault, kinds[f] if len(kinds) else 0, -1)
        r_pid = np.where(fault, f_pid[f] if len(kinds) else 0, pid[v])
        r_platform = np.where(fault, f_platform[f] if len(kinds) else 0, platform[v])
        r_time = np.where(fault, f_timestamp[f] if len(kinds) else 0, timestamp[v])
        r_item = np.where(fault, f_item[f] if len(kinds) else 0, item[v])
        r_action = np.where(fault, f_action[f] if len(kinds) else 0, action[v])
        src = np.where(fault, src_row[f] if len(kinds) else 0, v)  # valid row whose extras are copied
        burst = kind == FAULT_RULES.index("bot_burst")
        user = acc_flat.take(pa.array(r_pid.astype(np.int64) * len(PLATFORMS) + r_platform))
        plat = platform_names.take(pa.array(r_platform))
        unix = pa.array(r_time).cast(pa.string())
        plain = pa.array(r_time, pa.timestamp("s")).cast(pa.string())  # "YYYY-MM-DD HH:MM:SS" (fast)
        iso_t = pc.binary_join_element_wise(pc.utf8_replace_slice(plain, 10, 11, "T"), "Z", "")
        is_social = pa.array(r_platform == PLATFORMS.index("social"))
        ts = pc.if_else(is_social, iso_t, unix)
        act = action_names.take(pa.array(r_action))
        itm = item_names.take(pa.array(r_item))
        catg = item_category.take(pa.array(r_item))
        catg = pc.if_else(pa.array(no_category[src] & ~burst), None, catg)
        words = []
        wcat = item_cat[r_item]
        for w in range(3):
            word = words_flat.take(pa.array(wcat * 4 + word_pick[src, w]))
            words.append(pc.if_else(pa.array(n_words[src] > w), word, None))
        query = pc.binary_join_element_wise(*words, " ", null_handling="skip")
        query = pc.if_else(pa.array(r_action == ACTIONS.index("search")), query, None)
        val = np.where(burst, np.nan, value[src])
        value_col = pa.array(val, pa.float64(), mask=np.isnan(val))
        cols = {"user_id": user, "platform": plat, "timestamp": ts, "action": act, "item_id": itm,
                "category": catg, "query": query, "value": value_col}
        # the per-rule corruptions
        if fault.any():
            def override(name, mask, new_values):
                cols[name] = pc.if_else(pa.array(mask), new_values, cols[name])
            variant = fault_variant[f]
            bad = kind == FAULT_RULES.index("bad_timestamp")
            override("timestamp", bad, pa.array(BAD_TIMESTAMPS).take(pa.array(variant)))
            oor = kind == FAULT_RULES.index("timestamp_out_of_range")
            override("timestamp", oor, pa.array(OUT_OF_RANGE_TIMESTAMPS).take(pa.array(variant)))
            unk = kind == FAULT_RULES.index("unknown_action")
            override("action", unk, pa.array(UNKNOWN_ACTIONS).take(pa.array(variant % len(UNKNOWN_ACTIONS))))
            miss = kind == FAULT_RULES.index("missing_field")
            for k, name in enumerate(("user_id", "platform", "timestamp", "action", "item_id")):
                m = miss & (fault_field[f] == k)
                if m.any():
                    override(name, m, pa.nulls(len(rows), pa.string()))
        return pa.table(cols)

    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = file_format(out)
    writer = None
    try:
        with tqdm(total=n_rows, desc="write", unit="rows", unit_scale=True, leave=False,
                  disable=None if progress is None else not progress) as bar:
            for start in range(0, n_rows, chunk_rows):
                table = column_chunk(order[start:start + chunk_rows])
                if writer is None:
                    writer = (pq.ParquetWriter(out, table.schema) if fmt == "parquet"
                              else pacsv.CSVWriter(out, table.schema))
                writer.write_table(table)
                bar.update(table.num_rows)
    finally:
        if writer is not None:
            writer.close()
    pacsv.write_csv(links_table, links_path)

    truth = {
        "seed": seed, "rows": n_rows, "valid_events": n_valid, "persons": P,
        "faults": faults, "max_events_per_second": max_events_per_second,
        "categories": cat_names, "platforms": list(PLATFORMS),
        "people": [
            {"accounts": [[PLATFORMS[p], acc_table[i, p]] for p in np.flatnonzero(has_plat[i])],
             "interests": [cat_names[c] for c in interests[i, :n_interests[i]]],
             "weights": [round(float(x), 4) for x in iw[i, :n_interests[i]]],
             "events": int(lengths[i])}
            for i in range(P)],
    }
    truth_path.write_text(json.dumps(truth) + "\n", encoding="utf-8")
    return {"events": str(out), "links": str(links_path), "truth": str(truth_path), "rows": n_rows,
            "valid_events": n_valid, "persons": P, "items": n_items, "faults": faults}


def planted_interests(truth_path: str | Path, prepared_dir: str | Path, *, key: str | bytes | None = None
                      ) -> dict[int, set[int]]:
    """Planted interest categories of each generated person, keyed by the prepared person id.

    Matches people through the keyed pseudonym (`key` must be the one `prepare` used; default as in
    `prepare`), and category names through the prepared category vocabulary. People without kept
    events are absent.
    """
    from .prepared import load_vocab

    truth = json.loads(Path(truth_path).read_text(encoding="utf-8"))
    key_bytes, _ = resolve_key(key, warn=False)
    reps = [min(f"{plat.strip().lower()}{ACCOUNT_SEPARATOR}{acc.strip()}" for plat, acc in person["accounts"])
            for person in truth["people"]]
    pseudonyms = pseudonymise(reps, key_bytes)
    persons = pq.read_table(Path(prepared_dir) / "persons.parquet", columns=["person", "pseudonym"])
    by_pseudonym = dict(zip(persons.column("pseudonym").to_pylist(), persons.column("person").to_pylist()))
    category_vocab = load_vocab(prepared_dir)["category"]
    result: dict[int, set[int]] = {}
    for person, pseudonym in zip(truth["people"], pseudonyms):
        pid = by_pseudonym.get(pseudonym)
        if pid is None:
            continue
        ids = {category_vocab.id(name) for name in person["interests"]}
        result[int(pid)] = {i for i in ids if i >= 2}
    if not result and truth["people"]:
        raise DataError("no generated person found in the prepared data: wrong key, or another data set?",
                        prepared_dir)
    return result
