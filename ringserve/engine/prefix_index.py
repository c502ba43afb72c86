"""Which stored prefix a request reuses and which entries go: pure decisions, no MLX.

Every input is broadcast data (token ids, owners, counts), so every rank that applies the same
calls in the same order holds the same entries and decides the same thing.

Entries belong to the scope of the API key that made them: a request reuses, replaces or
measures only its own scope's entries (unless the index is `shared`, when a prefix made under
any key may be reused; a conversation id still names a conversation of its own scope only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Owner:
    """Whose turn an entry holds: the API key's scope, and the conversation within it."""

    scope: str = ""
    conversation: str | None = None


@dataclass
class Entry:
    key: int
    tokens: tuple[int, ...]
    owner: Owner
    last_used: int
    slots: int = 0  # KV positions its cache has allocated (mlx-lm grows caches in steps)

    @property
    def size(self) -> int:
        """What the entry costs against the budget: its allocation, at least its tokens."""
        return max(self.slots, len(self.tokens))


@dataclass(frozen=True)
class Match:
    key: int
    reused: int  # tokens of the entry kept; the entry holds len(entry.tokens) of them


@dataclass(frozen=True)
class Insert:
    key: int
    dropped: tuple[int, ...]  # entries this one replaces (same conversation, or a prefix of it)
    evicted: tuple[int, ...]  # least recently used entries removed to stay within the budget


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
    return Match(entry.key, reused) if reused > 0 else None


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
) -> Insert | None:
    """Where a finished turn (whose cache allocated `slots` positions) goes, or None when it
    alone exceeds the budget."""
    size = max(slots, len(tokens))
    if not tokens or size > budget:
        return None
    dropped = {e.key for e in entries if _replaced_by(e, tokens, owner)}
    kept = sorted((e for e in entries if e.key not in dropped), key=lambda e: e.last_used)
    held = sum(e.size for e in kept)
    evicted = []
    while held + size > budget:
        oldest = kept.pop(0)
        evicted.append(oldest.key)
        held -= oldest.size
    return Insert(key, tuple(sorted(dropped)), tuple(evicted))


def _replaced_by(entry: Entry, tokens: Sequence[int], owner: Owner) -> bool:
    if entry.owner.scope != owner.scope:
        return False
    if owner.conversation is not None and entry.owner == owner:
        return True
    subsumed = common_prefix_length(entry.tokens, tokens) == len(entry.tokens)
    return subsumed and entry.owner.conversation in (None, owner.conversation)


class PrefixIndex:
    """The entries' metadata, the LRU clock, counters and a digest of every decision."""

    def __init__(self, budget_tokens: int, shared: bool = False) -> None:
        self.budget_tokens = budget_tokens
        self.shared = shared
        self.entries: dict[int, Entry] = {}
        self._clock = 0
        self._next_key = 1
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0
        self.evictions = 0
        self.held_tokens = 0
        self.held_slots = 0
        self.discards = 0
        self._digest = hashlib.blake2b(digest_size=8)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _record(self, *decision: object) -> None:
        self._digest.update(repr(decision).encode())

    def lookup(self, tokens: Sequence[int], owner: Owner) -> Match | None:
        match = find_match(list(self.entries.values()), tokens, owner, self.shared)
        if match is None:
            self.misses += 1
            self._record("miss", len(tokens), owner)
            return None
        self.hits += 1
        self.reused_tokens += match.reused
        self.entries[match.key].last_used = self._tick()
        self._record("hit", match.key, match.reused, len(tokens), owner)
        return match

    def rejected(self, match: Match) -> None:
        """A match the cache could not use after all (its KV cache cannot be trimmed)."""
        self.hits -= 1
        self.reused_tokens -= match.reused
        self.misses += 1
        self._record("rejected", match.key)

    def insert(self, tokens: Sequence[int], owner: Owner, slots: int = 0) -> Insert | None:
        entries = list(self.entries.values())
        plan = plan_insert(entries, tokens, owner, self.budget_tokens, self._next_key, slots)
        if plan is None:
            self._record("skip", len(tokens), slots, owner)
            return None
        self._next_key += 1
        for key in plan.dropped + plan.evicted:
            gone = self.entries.pop(key)
            self.held_tokens -= len(gone.tokens)
            self.held_slots -= gone.size
        self.evictions += len(plan.evicted)
        entry = Entry(plan.key, tuple(tokens), owner, self._tick(), slots)
        self.entries[plan.key] = entry
        self.held_tokens += len(tokens)
        self.held_slots += entry.size
        self._record("insert", plan.key, len(tokens), slots, owner, plan.dropped, plan.evicted)
        return plan

    def clear(self) -> None:
        self.entries.clear()
        self.held_tokens = self.held_slots = 0
        self._record("clear")

    def discarded(self, tokens: int, owner: Owner) -> None:
        """A turn that is not stored (cancelled): recorded so the digests still compare it."""
        self.discards += 1
        self._record("discard", tokens, owner)

    def stats(self) -> dict[str, int]:
        """Counters only (no iteration), so rank 0's socket threads may read them mid-step."""
        return {
            "entries": len(self.entries),
            "tokens": self.held_tokens,
            "slots": self.held_slots,
            "budget_tokens": self.budget_tokens,
            "hits": self.hits,
            "misses": self.misses,
            "reused_tokens": self.reused_tokens,
            "evictions": self.evictions,
            "discards": self.discards,
            "digest": int.from_bytes(self._digest.digest(), "big") >> 1,
        }
