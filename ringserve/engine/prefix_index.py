"""Which stored prefix a request reuses and which entries go: pure decisions, no MLX.

Every input is broadcast data (token ids, owners, counts), so every rank that applies the same
calls in the same order holds the same entries and decides the same thing.

Entries belong to the scope of the API key that made them: a request reuses, replaces or
measures only its own scope's entries (unless the index is `shared`, when a prefix made under
any key may be reused; a conversation id still names a conversation of its own scope only).

Two tiers: RAM, bounded in token positions, and disk, bounded in bytes counted by a cost per
entry and per token that every rank agreed on at start (each rank's files hold its own shard,
so their real sizes differ; the agreed cost is the largest). A turn is written to disk when it
is stored, so leaving RAM (least recently used first) keeps it on disk, and a restart finds it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Owner:
    """Whose turn an entry holds: the API key's scope, and the conversation within it."""

    scope: str = ""
    conversation: str | None = None


def kept_owner(owner: Owner) -> Owner:
    """An owner as the cache keeps it: the conversation id as a fixed-size digest (a client
    picks the id, of any length, and entries are written to disk)."""
    if owner.conversation is None:
        return owner
    digest = hashlib.blake2b(owner.conversation.encode(), digest_size=16).hexdigest()
    return Owner(owner.scope, digest)


@dataclass(frozen=True)
class DiskBudget:
    """The disk tier's bound, and what an entry of n tokens is counted as: `entry_bytes +
    token_bytes * n` (at least its file on any rank)."""

    bytes: int = 0  # 0: no disk tier
    entry_bytes: int = 0
    token_bytes: int = 0

    @property
    def enabled(self) -> bool:
        return self.bytes > 0

    def cost(self, tokens: int) -> int:
        return self.entry_bytes + self.token_bytes * tokens


@dataclass
class Entry:
    key: int  # when it was stored (the index's clock): names its file, orders a restart
    tokens: tuple[int, ...]
    owner: Owner
    last_used: int
    slots: int = 0  # KV positions its cache has allocated (mlx-lm grows caches in steps)
    in_ram: bool = True
    on_disk: bool = False

    @property
    def size(self) -> int:
        """What the entry costs against the budget: its allocation, at least its tokens."""
        return max(self.slots, len(self.tokens))


@dataclass(frozen=True)
class Match:
    key: int
    reused: int  # tokens of the entry kept; the entry holds len(entry.tokens) of them
    from_disk: bool = False  # the entry is on disk only: its cache is read back from there


@dataclass(frozen=True)
class Insert:
    key: int
    dropped: tuple[int, ...]  # entries this one replaces (same conversation, or a prefix of it)
    evicted: tuple[int, ...]  # least recently used entries removed to stay within the budgets
    spilled: tuple[int, ...] = ()  # entries that leave RAM and stay on disk
    unsaved: tuple[int, ...] = ()  # entries that leave disk and stay in RAM
    in_ram: bool = True  # where the new entry goes: RAM, disk, or both
    on_disk: bool = False


@dataclass(frozen=True)
class Restored:
    """An entry found on disk at start (by every rank)."""

    key: int
    tokens: tuple[int, ...]
    owner: Owner


def entry_ident(tokens: Sequence[int], owner: Owner) -> int:
    """What an entry holds, as a number (63 bits, so it fits a signed 64-bit collective)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr((owner.scope, owner.conversation)).encode())
    digest.update(array("q", tokens).tobytes())
    return int.from_bytes(digest.digest(), "big") >> 1


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def find_match(
    entries: Sequence[Entry], tokens: Sequence[int], owner: Owner, shared: bool = False
) -> Match | None:
    """The conversation's own entry if it shares a prefix, else the longest common prefix
    among the entries of the owner's scope (of every scope when `shared`).

    At least one prompt token is left to prefill (the model needs logits for the next token),
    so an exact repeat reuses all but the last token.
    """
    mine = [e for e in entries if e.owner.scope == owner.scope]
    candidates = [e for e in mine if owner.conversation and e.owner == owner]
    best = _longest(candidates, tokens) or _longest(entries if shared else mine, tokens)
    if best is None:
        return None
    entry, length = best
    reused = min(length, len(tokens) - 1)
    return Match(entry.key, reused, not entry.in_ram) if reused > 0 else None


def _longest(entries: Sequence[Entry], tokens: Sequence[int]) -> tuple[Entry, int] | None:
    best: tuple[Entry, int] | None = None
    for entry in entries:
        length = common_prefix_length(entry.tokens, tokens)
        # Ties go to the most recently used entry; `last_used` is unique, so this is total.
        if length > 0 and (
            best is None
            or length > best[1]
            or (length == best[1] and entry.last_used > best[0].last_used)
        ):
            best = (entry, length)
    return best


def plan_insert(
    entries: Sequence[Entry],
    tokens: Sequence[int],
    owner: Owner,
    budget: int,
    key: int,
    slots: int = 0,
    disk: DiskBudget | None = None,
) -> Insert | None:
    """Where a finished turn (whose cache allocated `slots` positions) goes: RAM when it fits
    the budget, disk too when there is a disk tier it fits; None when it fits neither."""
    size = max(slots, len(tokens))
    in_ram = size <= budget
    on_disk = disk is not None and disk.enabled and disk.cost(len(tokens)) <= disk.bytes
    if not tokens or not (in_ram or on_disk):
        return None
    dropped = {e.key for e in entries if _replaced_by(e, tokens, owner)}
    kept = sorted((e for e in entries if e.key not in dropped), key=lambda e: e.last_used)
    leave_ram: list[int] = []
    if in_ram:
        held = sum(e.size for e in kept if e.in_ram)
        for e in (e for e in kept if e.in_ram):
            if held + size <= budget:
                break
            leave_ram.append(e.key)
            held -= e.size
    leave_disk: list[int] = []
    if on_disk and disk is not None:
        held = sum(disk.cost(len(e.tokens)) for e in kept if e.on_disk)
        for e in (e for e in kept if e.on_disk):
            if held + disk.cost(len(tokens)) <= disk.bytes:
                break
            leave_disk.append(e.key)
            held -= disk.cost(len(e.tokens))
    by_key = {e.key: e for e in kept}
    gone = {
        k
        for k in {*leave_ram, *leave_disk}
        if (k in leave_ram or not by_key[k].in_ram) and (k in leave_disk or not by_key[k].on_disk)
    }
    return Insert(
        key,
        tuple(sorted(dropped)),
        tuple(e.key for e in kept if e.key in gone),
        spilled=tuple(k for k in leave_ram if k not in gone),
        unsaved=tuple(k for k in leave_disk if k not in gone),
        in_ram=in_ram,
        on_disk=on_disk,
    )


def _replaced_by(entry: Entry, tokens: Sequence[int], owner: Owner) -> bool:
    if entry.owner.scope != owner.scope:
        return False
    if owner.conversation is not None and entry.owner == owner:
        return True
    subsumed = common_prefix_length(entry.tokens, tokens) == len(entry.tokens)
    return subsumed and entry.owner.conversation in (None, owner.conversation)


class PrefixIndex:
    """The entries' metadata, the LRU clock, counters and a digest of every decision."""

    def __init__(
        self, budget_tokens: int, shared: bool = False, disk: DiskBudget | None = None
    ) -> None:
        self.budget_tokens = budget_tokens
        self.shared = shared
        self.disk = disk or DiskBudget()
        self.entries: dict[int, Entry] = {}
        self._clock = 0
        self.hits = 0
        self.ram_hits = 0
        self.disk_hits = 0
        self.misses = 0
        self.reused_tokens = 0
        self.evictions = 0
        self.spills = 0
        self.lost = 0
        self.held_tokens = 0
        self.held_slots = 0
        self.ram_entries = 0
        self.disk_entries = 0
        self.disk_tokens = 0
        self.disk_charged = 0
        self.discards = 0
        self._digest = hashlib.blake2b(digest_size=8)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _record(self, *decision: object) -> None:
        self._digest.update(repr(decision).encode())

    def _leave_ram(self, entry: Entry) -> None:
        if entry.in_ram:
            entry.in_ram = False
            self.ram_entries -= 1
            self.held_tokens -= len(entry.tokens)
            self.held_slots -= entry.size

    def _leave_disk(self, entry: Entry) -> None:
        if entry.on_disk:
            entry.on_disk = False
            self.disk_entries -= 1
            self.disk_tokens -= len(entry.tokens)
            self.disk_charged -= self.disk.cost(len(entry.tokens))

    def _add(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        if entry.in_ram:
            self.ram_entries += 1
            self.held_tokens += len(entry.tokens)
            self.held_slots += entry.size
        if entry.on_disk:
            self.disk_entries += 1
            self.disk_tokens += len(entry.tokens)
            self.disk_charged += self.disk.cost(len(entry.tokens))

    def _remove(self, key: int) -> Entry:
        entry = self.entries.pop(key)
        self._leave_ram(entry)
        self._leave_disk(entry)
        return entry

    def lookup(self, tokens: Sequence[int], owner: Owner) -> Match | None:
        match = find_match(list(self.entries.values()), tokens, owner, self.shared)
        if match is None:
            self.misses += 1
            self._record("miss", len(tokens), owner)
            return None
        self.hits += 1
        if match.from_disk:
            self.disk_hits += 1
        else:
            self.ram_hits += 1
        self.reused_tokens += match.reused
        self.entries[match.key].last_used = self._tick()
        self._record("hit", match.key, match.reused, len(tokens), owner, match.from_disk)
        return match

    def rejected(self, match: Match) -> None:
        """A match the cache could not use after all (its KV cache cannot be trimmed)."""
        self.hits -= 1
        if match.from_disk:
            self.disk_hits -= 1
        else:
            self.ram_hits -= 1
        self.reused_tokens -= match.reused
        self.misses += 1
        self._record("rejected", match.key)

    def unreadable(self, match: Match) -> None:
        """A disk hit that some rank could not read back: a miss, and the entry goes."""
        self.rejected(match)
        self.lost += 1
        self._remove(match.key)
        self._record("unreadable", match.key)

    def insert(self, tokens: Sequence[int], owner: Owner, slots: int = 0) -> Insert | None:
        entries = list(self.entries.values())
        key = self._tick()
        plan = plan_insert(entries, tokens, owner, self.budget_tokens, key, slots, self.disk)
        if plan is None:
            self._record("skip", len(tokens), slots, owner)
            return None
        for gone in plan.dropped + plan.evicted:
            self._remove(gone)
        for spilled in plan.spilled:
            self._leave_ram(self.entries[spilled])
        for unsaved in plan.unsaved:
            self._leave_disk(self.entries[unsaved])
        self.evictions += len(plan.evicted)
        self.spills += len(plan.spilled)
        self._add(Entry(plan.key, tuple(tokens), owner, plan.key, slots, plan.in_ram, plan.on_disk))
        self._record("insert", plan, len(tokens), slots, owner)
        return plan

    def restore(self, found: Sequence[Restored]) -> list[Restored]:
        """Entries every rank found on disk at start, oldest first; returns those that do not
        fit the disk budget (the oldest), which are not restored."""
        ordered = sorted(found, key=lambda r: r.key)
        charged = sum(self.disk.cost(len(r.tokens)) for r in ordered)
        dropped = []
        while ordered and charged > self.disk.bytes:
            oldest = ordered.pop(0)
            charged -= self.disk.cost(len(oldest.tokens))
            dropped.append(oldest)
        for restored in ordered:
            key, tokens = restored.key, restored.tokens
            self._clock = max(self._clock, key)
            self._add(Entry(key, tokens, restored.owner, key, len(tokens), False, True))
        self._record("restored", [(r.key, len(r.tokens), r.owner) for r in ordered])
        return dropped

    def clear(self) -> None:
        for key in list(self.entries):
            self._remove(key)
        self._record("clear")

    def discarded(self, tokens: int, owner: Owner) -> None:
        """A turn that is not stored (cancelled): recorded so the digests still compare it."""
        self.discards += 1
        self._record("discard", tokens, owner)

    def stats(self) -> dict[str, int]:
        """Counters only (no iteration), so rank 0's socket threads may read them mid-step.
        `tokens` and `slots` are what RAM holds; `disk_*` what the disk tier holds."""
        return {
            "entries": len(self.entries),
            "ram_entries": self.ram_entries,
            "tokens": self.held_tokens,
            "slots": self.held_slots,
            "budget_tokens": self.budget_tokens,
            "disk_entries": self.disk_entries,
            "disk_tokens": self.disk_tokens,
            "disk_charged_bytes": self.disk_charged,
            "disk_budget_bytes": self.disk.bytes,
            "hits": self.hits,
            "ram_hits": self.ram_hits,
            "disk_hits": self.disk_hits,
            "misses": self.misses,
            "reused_tokens": self.reused_tokens,
            "evictions": self.evictions,
            "spills": self.spills,
            "unreadable": self.lost,
            "discards": self.discards,
            "digest": int.from_bytes(self._digest.digest(), "big") >> 1,
        }
