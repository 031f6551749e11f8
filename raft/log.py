"""The in-memory Raft log of one node (etcd's ``raftLog`` + ``unstable``).

The log is a compacted prefix (described only by the last snapshot's index
and term) followed by the entries after it. Besides the entries it tracks
four positions the core needs to honour the Ready contract:

- ``committed``: highest index known committed;
- ``stable``: highest index known to be on stable storage (the driver called
  ``advance`` for the Ready that carried it) -- a leader may count itself
  towards a quorum only up to here (persist before ack);
- ``handed``: highest index already handed to the driver for persisting (in
  a Ready, maybe not yet advanced); entries after it go in the next Ready;
- ``applying``/``applied``: highest committed index handed out for applying,
  and the highest the driver reported applied.

Entry terms never decrease along the log, so the term searches used by fast
backtracking are binary searches.
"""

from __future__ import annotations

from collections.abc import Sequence

from raft.types import Entry

# A rough per-entry framing cost, so a batch of tiny entries still respects
# the byte budget of a message.
ENTRY_OVERHEAD_BYTES = 16


class LogError(ValueError):
    """The log was asked to do something that would break its invariants
    (e.g. overwrite a committed entry); the caller refuses the input."""


class RaftLog:
    def __init__(
        self, snapshot_index: int, snapshot_term: int, entries: Sequence[Entry], commit: int
    ) -> None:
        expected = snapshot_index + 1
        prev_term = snapshot_term
        for e in entries:
            if e.index != expected:
                raise LogError(f"restored entries not contiguous: expected index {expected}, got {e.index}")
            if e.term < prev_term:
                raise LogError(f"restored entry {e.index} has term {e.term} below previous term {prev_term}")
            expected += 1
            prev_term = e.term
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self._entries: list[Entry] = list(entries)
        #: Index of the last entry (the snapshot's when there is none). A
        #: plain attribute, kept up to date by every mutation below: the core
        #: reads it dozens of times per Ready.
        self.last_index = snapshot_index + len(self._entries)
        last = self.last_index
        commit = max(commit, snapshot_index)
        if commit > last:
            raise LogError(f"commit index {commit} beyond last log index {last}")
        self.committed = commit
        self.stable = last
        self.handed = last
        self.applying = snapshot_index
        self.applied = snapshot_index

    # -- positions -----------------------------------------------------

    @property
    def first_index(self) -> int:
        return self.snapshot_index + 1

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.snapshot_term

    def term(self, index: int) -> int | None:
        """Term of the entry at ``index``; None when compacted away or not
        (yet) in the log. Index 0 is the empty log's sentinel of term 0."""
        offset = index - self.snapshot_index
        if offset <= 0:
            return self.snapshot_term if offset == 0 else None
        if index > self.last_index:
            return None
        return self._entries[offset - 1].term

    def entry(self, index: int) -> Entry | None:
        if index <= self.snapshot_index or index > self.last_index:
            return None
        return self._entries[index - self.snapshot_index - 1]

    def match_term(self, index: int, term: int) -> bool:
        t = self.term(index)
        return t is not None and t == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """§5.4.1: a candidate's log is at least as up to date as ours."""
        my_term = self.last_term
        return last_term > my_term or (last_term == my_term and last_index >= self.last_index)

    def slice(
        self, lo: int, hi: int, max_count: int | None = None, max_bytes: int | None = None
    ) -> list[Entry]:
        """Entries [lo, hi), at most ``max_count`` of them and about
        ``max_bytes`` (always at least one). Requires lo > snapshot_index."""
        if lo <= self.snapshot_index:
            raise LogError(f"entries from {lo} are compacted (snapshot index {self.snapshot_index})")
        if hi > self.last_index + 1:
            hi = self.last_index + 1
        if lo >= hi:
            return []
        if max_count is not None and hi - lo > max_count:
            hi = lo + max(1, max_count)
        base = self.snapshot_index + 1
        out = self._entries[lo - base : hi - base]
        if max_bytes is not None and len(out) > 1:
            datas = [e.data for e in out]
            if ENTRY_OVERHEAD_BYTES * len(out) + sum(map(len, filter(None, datas))) > max_bytes:
                size = 0
                for n, data in enumerate(datas):
                    size += ENTRY_OVERHEAD_BYTES + (len(data) if data else 0)
                    if size > max_bytes and n > 0:
                        return out[:n]
        return out

    # -- backtracking searches -------------------------------------------

    def first_index_of_term(self, term: int, upto: int) -> int:
        """The first index <= ``upto`` of the run of ``term`` that contains
        ``upto`` (whose term must be ``term``), not below ``first_index``."""
        lo, hi = self.first_index, upto
        while lo < hi:
            mid = (lo + hi) // 2
            t = self.term(mid)
            if t is not None and t >= term:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def last_index_of_term(self, term: int) -> int | None:
        """The last index whose entry has ``term``, or None if the log holds
        no such entry (or it lies in the compacted prefix where we cannot
        tell)."""
        # largest index i in [snapshot_index, last_index] with term(i) <= term
        lo, hi = self.snapshot_index, self.last_index
        if self.snapshot_term > term:
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            t = self.term(mid)
            if t is not None and t <= term:
                lo = mid
            else:
                hi = mid - 1
        return lo if self.term(lo) == term else None

    # -- mutation --------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> None:
        """Leader: append new entries right after the last one."""
        if not entries:
            return
        if entries[0].index != self.last_index + 1:
            raise LogError(f"append at {entries[0].index} does not follow last index {self.last_index}")
        self._entries.extend(entries)
        self.last_index += len(entries)

    def append_new(self, term: int, data: bytes | None) -> int:
        """Leader: append one new entry of ``term`` after the last; returns
        its index (a proposal's fast path)."""
        index = self.last_index + 1
        self._entries.append(Entry(term, index, data))
        self.last_index = index
        return index

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """Index of the first of ``entries`` that is not already in the log
        with the same term (0 if all are)."""
        if entries and entries[0].index > self.last_index:
            return entries[0].index  # all new: the usual case, no lookups
        for e in entries:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def maybe_append(
        self, prev_index: int, prev_term: int, commit: int, entries: Sequence[Entry]
    ) -> int | None:
        """Follower side of AppendEntries (§5.3). Returns the last index now
        known to match the leader, or None if ``prev_index``/``prev_term``
        does not match (the caller rejects)."""
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            if conflict <= self.committed:
                raise LogError(f"entry {conflict} conflicts with committed entry (commit {self.committed})")
            self._truncate_and_append(entries[conflict - entries[0].index :])
        self.commit_to(min(commit, last_new))
        return last_new

    def _truncate_and_append(self, entries: Sequence[Entry]) -> None:
        first = entries[0].index
        keep = first - self.snapshot_index - 1
        del self._entries[keep:]
        self._entries.extend(entries)
        self.last_index = self.snapshot_index + len(self._entries)
        # Whatever storage holds from ``first`` on is being replaced.
        self.stable = min(self.stable, first - 1)
        self.handed = min(self.handed, first - 1)

    def commit_to(self, index: int) -> bool:
        index = min(index, self.last_index)
        if index > self.committed:
            self.committed = index
            return True
        return False

    def maybe_commit(self, index: int, term: int) -> bool:
        """Leader: commit ``index`` only if it carries the current ``term``
        (§5.4.2: never commit an earlier term's entry by counting)."""
        if index > self.committed and self.term(index) == term:
            self.committed = index
            return True
        return False

    def restore(self, snapshot_index: int, snapshot_term: int) -> None:
        """Replace the whole log by a snapshot's position (follower installing
        a leader's snapshot). Storage still holds the old entries until the
        snapshot is persisted; only the part that was committed matches the
        new history, so ``stable`` stays conservative until then."""
        self.stable = min(self.stable, self.committed)
        self.handed = snapshot_index
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self._entries = []
        self.last_index = snapshot_index
        self.committed = snapshot_index
        self.applying = max(self.applying, snapshot_index)

    def compact(self, index: int) -> int:
        """Drop entries <= ``index``; returns the term of ``index``."""
        term = self.term(index)
        if term is None or index <= self.snapshot_index:
            raise LogError(
                f"cannot compact to {index} (snapshot {self.snapshot_index}, last {self.last_index})"
            )
        del self._entries[: index - self.snapshot_index]
        self.snapshot_index = index
        self.snapshot_term = term
        return term

    # -- Ready bookkeeping -------------------------------------------------

    def unhanded_entries(self) -> list[Entry]:
        return self.slice(self.handed + 1, self.last_index + 1) if self.handed < self.last_index else []

    def mark_handed(self) -> None:
        self.handed = self.last_index

    def stable_to(self, index: int, term: int) -> None:
        """The driver persisted entries through (``index``, ``term``); ignore
        it if the log has since replaced that entry."""
        if index > self.stable and self.match_term(index, term):
            self.stable = index

    def snapshot_persisted(self, index: int) -> None:
        """The driver persisted the snapshot installed at ``index``."""
        # A snapshot covers only committed history, so everything up to it
        # is now durable and agrees with any leader.
        if index > self.stable:
            self.stable = index

    def has_committed_to_hand(self) -> bool:
        return min(self.committed, self.handed) > self.applying

    def committed_to_hand(self) -> list[Entry]:
        """Committed entries not yet handed out for applying, limited to
        those already handed out for persisting (persist before apply)."""
        hi = min(self.committed, self.handed)
        if hi <= self.applying:
            return []
        out = self.slice(self.applying + 1, hi + 1)
        self.applying = hi
        return out

    def applied_to(self, index: int) -> None:
        if index > self.applied:
            self.applied = index
