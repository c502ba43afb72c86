"""Which stored prefix a request reuses and what is evicted: pure decisions, no model."""

from __future__ import annotations

from ringserve.engine.prefix_index import (
    DiskBudget,
    Entry,
    Insert,
    Owner,
    PrefixIndex,
    Restored,
    common_prefix_length,
    find_match,
    kept_owner,
    plan_insert,
)

ANYONE = Owner()


def mine(conversation: str | None) -> Owner:
    return Owner("", conversation)


def entry(
    key: int, tokens: list[int], conversation: str | None = None, used: int = 0, scope: str = ""
) -> Entry:
    return Entry(key, tuple(tokens), Owner(scope, conversation), used or key)


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([5], [1]) == 0


def test_the_longest_common_prefix_wins() -> None:
    entries = [entry(1, [1, 2, 9]), entry(2, [1, 2, 3, 4, 9]), entry(3, [7, 8])]
    match = find_match(entries, [1, 2, 3, 4, 5, 6], ANYONE)
    assert match is not None and (match.key, match.reused) == (2, 4)


def test_no_shared_token_is_a_miss() -> None:
    assert find_match([entry(1, [1, 2, 3])], [4, 5, 6], ANYONE) is None
    assert find_match([], [4, 5, 6], ANYONE) is None


def test_an_exact_repeat_leaves_the_last_token_to_prefill() -> None:
    match = find_match([entry(1, [1, 2, 3, 4])], [1, 2, 3, 4], ANYONE)
    assert match is not None and match.reused == 3
    assert find_match([entry(1, [1])], [1], ANYONE) is None


def test_the_conversation_id_picks_its_own_entry_over_a_longer_prefix() -> None:
    entries = [entry(1, [1, 2, 3, 4, 5], "other"), entry(2, [1, 2, 3], "mine")]
    match = find_match(entries, [1, 2, 3, 4, 5, 6], mine("mine"))
    assert match is not None and (match.key, match.reused) == (2, 3)


def test_an_unknown_conversation_falls_back_to_the_longest_prefix() -> None:
    entries = [entry(1, [1, 2, 3, 4, 5], "other")]
    match = find_match(entries, [1, 2, 3, 9], mine("new"))
    assert match is not None and (match.key, match.reused) == (1, 3)


def test_ties_go_to_the_most_recently_used_entry() -> None:
    entries = [entry(1, [1, 2, 7], used=5), entry(2, [1, 2, 8], used=9)]
    match = find_match(entries, [1, 2, 3], ANYONE)
    assert match is not None and match.key == 2


def test_a_turn_replaces_its_conversation_and_the_prefixes_it_extends() -> None:
    entries = [entry(1, [1, 2], "c"), entry(2, [1, 2, 3]), entry(3, [1, 2, 3], "d")]
    plan = plan_insert(entries, [1, 2, 3, 4], mine("c"), budget=100, key=4)
    assert plan is not None
    assert plan.dropped == (1, 2) and plan.evicted == ()


def test_least_recently_used_entries_are_evicted_to_fit_the_budget() -> None:
    entries = [entry(1, [1] * 4, used=3), entry(2, [2] * 4, used=1), entry(3, [3] * 4, used=2)]
    plan = plan_insert(entries, [9] * 5, ANYONE, budget=10, key=4)
    assert plan is not None and plan.evicted == (2, 3)


def test_a_turn_larger_than_the_budget_is_not_stored() -> None:
    assert plan_insert([entry(1, [1])], [1, 2, 3], ANYONE, budget=2, key=2) is None


def test_the_index_stays_within_its_budget_and_counts_what_it_did() -> None:
    index = PrefixIndex(budget_tokens=10)
    assert index.lookup([1, 2, 3], mine("a")) is None
    index.insert([1, 2, 3, 4], mine("a"))
    match = index.lookup([1, 2, 3, 4, 5], mine("a"))
    assert match is not None and match.reused == 4
    index.insert([1, 2, 3, 4, 5, 6], mine("a"))
    index.insert([7, 8, 9], mine("b"))
    index.insert([5, 5, 5], mine("c"))  # 6 + 3 + 3 > 10: "a" is the least recently used
    stats = index.stats()
    assert {e.owner.conversation for e in index.entries.values()} == {"b", "c"}
    assert (stats["entries"], stats["tokens"], stats["hits"], stats["misses"]) == (2, 6, 1, 1)
    assert (stats["evictions"], stats["reused_tokens"]) == (1, 4)


def workload(index: PrefixIndex) -> None:
    prompts = [([1, 2, 3], "a"), ([1, 2, 3, 4, 5], "a"), ([1, 2, 9], None), ([4, 4], "b")]
    for i, (tokens, conversation) in enumerate(prompts):
        index.lookup(tokens, mine(conversation))
        if i % 3 == 2:
            index.discarded(len(tokens), mine(conversation))
        else:
            index.insert([*tokens, 100 + i], mine(conversation))


def test_the_same_calls_give_the_same_decisions_and_digest() -> None:
    first, second = PrefixIndex(8), PrefixIndex(8)
    workload(first)
    workload(second)
    assert first.stats() == second.stats()
    assert first.entries == second.entries
    second.lookup([1], ANYONE)
    assert first.stats()["digest"] != second.stats()["digest"]


def test_an_entry_costs_what_its_cache_allocated_when_that_is_more_than_its_tokens() -> None:
    big = Entry(1, (1, 2, 3), ANYONE, 1, slots=256)
    assert big.size == 256
    plan = plan_insert([big], [7, 8, 9], ANYONE, budget=300, key=2, slots=256)
    assert plan is not None and plan.evicted == (1,)
    assert plan_insert([big], [7, 8, 9], ANYONE, budget=300, key=2) == Insert(2, (), ())


def test_a_scope_neither_reuses_nor_replaces_another_scopes_entries() -> None:
    theirs = entry(1, [1, 2, 3, 4, 5], "c", scope="them")
    assert find_match([theirs], [1, 2, 3, 4, 9], Owner("me", "c")) is None
    assert find_match([theirs], [1, 2, 3, 4, 9], Owner("me")) is None
    plan = plan_insert([theirs], [1, 2, 3, 4, 5, 6], Owner("me", "c"), budget=100, key=2)
    assert plan is not None and plan.dropped == ()
    ours = entry(2, [1, 2, 3], "c", scope="me")
    match = find_match([theirs, ours], [1, 2, 3, 4, 5, 6], Owner("me", "c"))
    assert match is not None and match.key == 2


def test_a_shared_index_reuses_any_scopes_prefix_but_not_its_conversations() -> None:
    theirs = entry(1, [1, 2, 3, 4, 5], "c", scope="them")
    match = find_match([theirs], [1, 2, 3, 9], Owner("me", "c"), shared=True)
    assert match is not None and (match.key, match.reused) == (1, 3)
    plan = plan_insert([theirs], [1, 2, 3, 4, 5, 6], Owner("me", "c"), budget=100, key=2)
    assert plan is not None and plan.dropped == ()


# --- the disk tier --------------------------------------------------------------------------

DISK = DiskBudget(bytes=100, entry_bytes=10, token_bytes=10)  # an entry of n tokens: 10 + 10n


def tiered(
    key: int, tokens: list[int], used: int, in_ram: bool = True, on_disk: bool = True
) -> Entry:
    return Entry(key, tuple(tokens), Owner("", f"c{key}"), used, 0, in_ram, on_disk)


def test_with_a_disk_tier_a_turn_leaving_ram_stays_on_disk() -> None:
    entries = [tiered(1, [1] * 4, used=1), tiered(2, [2] * 4, used=2)]
    roomy = DiskBudget(bytes=1000, entry_bytes=10, token_bytes=10)
    plan = plan_insert(entries, [9] * 4, ANYONE, budget=8, key=3, disk=roomy)
    assert plan == Insert(3, (), (), spilled=(1,), in_ram=True, on_disk=True)
    in_ram_only = [tiered(1, [1] * 4, used=1, on_disk=False), tiered(2, [2] * 4, used=2)]
    plan = plan_insert(in_ram_only, [9] * 4, ANYONE, budget=8, key=3, disk=roomy)
    assert plan == Insert(3, (), (1,), in_ram=True, on_disk=True)


def test_the_disk_tier_evicts_its_least_recently_used_and_keeps_what_ram_holds() -> None:
    # On disk: 3 entries of 50 bytes in 100 would not fit; the oldest on disk leave it.
    entries = [tiered(1, [1] * 4, used=1, in_ram=False), tiered(2, [2] * 4, used=2)]
    plan = plan_insert(entries, [9] * 4, ANYONE, budget=100, key=3, disk=DISK)
    assert plan is not None and plan.evicted == (1,) and plan.unsaved == ()
    entries = [tiered(1, [1] * 4, used=1), tiered(2, [2] * 4, used=2)]
    plan = plan_insert(entries, [9] * 4, ANYONE, budget=100, key=3, disk=DISK)
    assert plan is not None and plan.evicted == () and plan.unsaved == (1,)


def test_a_turn_too_large_for_ram_goes_to_disk_alone_and_is_found_there() -> None:
    index = PrefixIndex(budget_tokens=4, disk=DISK)
    plan = index.insert([1, 2, 3, 4, 5, 6], mine("long"))
    assert plan is not None and (plan.in_ram, plan.on_disk) == (False, True)
    match = index.lookup([1, 2, 3, 4, 5, 6, 7], mine("long"))
    assert match is not None and match.from_disk and match.reused == 6
    stats = index.stats()
    assert (stats["disk_hits"], stats["ram_hits"], stats["tokens"], stats["disk_tokens"]) == (
        1,
        0,
        0,
        6,
    )
    assert stats["disk_charged_bytes"] == DISK.cost(6)


def test_a_disk_hit_that_cannot_be_read_back_is_a_miss_and_the_entry_goes() -> None:
    index = PrefixIndex(budget_tokens=4, disk=DISK)
    index.insert([1, 2, 3, 4, 5, 6], mine("long"))
    match = index.lookup([1, 2, 3, 4, 5, 6, 7], mine("long"))
    assert match is not None
    index.unreadable(match)
    stats = index.stats()
    assert not index.entries and (stats["hits"], stats["misses"], stats["unreadable"]) == (0, 1, 1)
    assert (stats["disk_entries"], stats["disk_charged_bytes"], stats["reused_tokens"]) == (0, 0, 0)


def test_restored_entries_keep_their_order_and_the_oldest_go_past_the_budget() -> None:
    index = PrefixIndex(budget_tokens=100, disk=DISK)
    found = [Restored(key, (key,) * 3, mine(f"c{key}")) for key in (7, 3, 12)]  # 40 bytes each
    dropped = index.restore(found)
    assert [r.key for r in dropped] == [3]
    assert sorted(index.entries) == [7, 12]
    assert all(not e.in_ram and e.on_disk for e in index.entries.values())
    plan = index.insert([5, 5], mine("new"))  # keys go on from the newest restored entry
    assert plan is not None and plan.key == 13 and plan.evicted == (7,)


def test_the_same_restore_gives_the_same_digest() -> None:
    found = [Restored(key, (key,) * 3, mine(f"c{key}")) for key in (2, 5)]
    first, second = PrefixIndex(10, disk=DISK), PrefixIndex(10, disk=DISK)
    first.restore(found)
    second.restore(list(reversed(found)))
    assert first.stats() == second.stats()
    third = PrefixIndex(10, disk=DISK)
    third.restore(found[:1])
    assert third.stats()["digest"] != first.stats()["digest"]


def test_an_owner_is_kept_with_its_conversation_as_a_fixed_size_digest() -> None:
    long = kept_owner(Owner("scope", "x" * 10_000))
    assert long.scope == "scope" and long.conversation is not None
    assert len(long.conversation) == 32 and long == kept_owner(Owner("scope", "x" * 10_000))
    assert kept_owner(Owner("scope", "y")) != kept_owner(Owner("scope", "z"))
    assert kept_owner(Owner("scope")) == Owner("scope")
