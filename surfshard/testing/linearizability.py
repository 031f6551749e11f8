"""Linearizability checker for histories of SurfStore metadata calls.

Tests at every layer record what their clients saw (when each ``updatefile``
and ``getfileinfo`` was invoked, when it returned and what it returned) and
ask :func:`check` whether some sequential order of those calls, consistent
with real time, explains every result. Spot checks miss the interesting
bugs (a stale read served by a deposed leader, a retried CAS applied twice);
a checker over the whole history does not.

The model, per filename: the state is ``(version, hashlist)``, starting at
``(0, None)`` (no such file).

* ``update(name, version, hashlist)`` returns ``True`` (applied; legal only
  when ``version == stored + 1``), ``False`` or ``Mismatch(current)`` (not
  applied; legal only when ``version != stored + 1``, and with ``Mismatch``
  also ``current == stored``), or :data:`UNKNOWN` (timed out, connection
  lost: it may have taken effect at any moment after its invocation, or
  never).
* ``get(name)`` returns ``(version, hashlist)`` or ``None`` for a missing
  file.

Every operation touches one filename, so the history is linearizable iff
each filename's sub-history is (P-compositionality, Horn & Kroening); each
one is checked with the Wing & Gong search as improved by Lowe and as done in
Anish Athalye's porcupine: call/return events in a doubly linked list, a
call is "lifted" out of the list when it is linearized and put back on
backtrack, and configurations (set of linearized ops, state) already
explored are cached so that each is searched once.

Unknown outcomes follow porcupine: the return is at +infinity, so the call
may be placed anywhere after its invocation. "Never happened" needs no
branch: the search succeeds as soon as every operation with a known result
is placed, and an unknown update that does not apply where it is placed is
indistinguishable from one never placed, so it is placed only where it
applies, or as a no-op once it never can (its version is at or below the
stored one).

Beyond porcupine, one pruning rule keeps many concurrent readers cheap: an
op that leaves the state unchanged and is legal where the search stands is
placed there and never reconsidered at that node (see ``_Frame``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "GET",
    "UNKNOWN",
    "UPDATE",
    "CheckAborted",
    "CheckResult",
    "HistoryRecorder",
    "Mismatch",
    "Operation",
    "check",
    "check_name",
    "get_op",
    "update_op",
]

UPDATE: Final = "update"
GET: Final = "get"


class _Unknown:
    """Result of a call whose outcome the client never learned."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        # A singleton so that ``result is UNKNOWN`` holds even after copying.
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()


@dataclass(frozen=True)
class Mismatch:
    """An ``update`` refused with a version mismatch that named the stored
    version; stricter than a bare ``False``, which does not say what it saw."""

    current: int


@dataclass
class Operation:
    """One client call as the client saw it.

    ``args`` is ``(version, hashlist)`` for an update and ``()`` for a get.
    Times are any comparable numbers on one clock; ``return_time`` is
    ``math.inf`` when the outcome is unknown. ``call_seq``/``return_seq``
    (set by :class:`HistoryRecorder`) break ties between events at the same
    time, since a simulated ``Clock`` runs many events at one instant: when
    every known event of a file's operations carries one, the lower number
    happened first; otherwise a tie counts as overlap, which can only make
    the checker more permissive, never report a false violation.
    """

    client: Hashable
    kind: str
    name: str
    args: tuple[Any, ...]
    result: Any
    call_time: float
    return_time: float
    call_seq: int | None = None
    return_seq: int | None = None

    @property
    def unknown(self) -> bool:
        return self.result is UNKNOWN

    def describe(self) -> str:
        when = f"[{self.call_time}, {'inf' if self.return_time == math.inf else self.return_time}]"
        if self.kind == UPDATE:
            version, hashlist = self.args
            call = f"update({self.name!r}, v{version}, {_short(hashlist)})"
        else:
            call = f"get({self.name!r})"
        return f"client {self.client!r} {call} -> {_describe_result(self.result)} {when}"


def _short(hashlist: Any) -> str:
    if hashlist is None:
        return "None"
    items = list(hashlist)
    shown = ", ".join(str(h)[:8] for h in items[:3])
    return f"[{shown}{', ...' if len(items) > 3 else ''}]"


def _describe_result(result: Any) -> str:
    if isinstance(result, tuple) and len(result) == 2:
        return f"(v{result[0]}, {_short(result[1])})"
    return repr(result)


@dataclass(frozen=True)
class CheckResult:
    """Verdict of :func:`check`. ``name`` is the first filename (in order of
    first appearance in the history) whose sub-history is not linearizable."""

    ok: bool
    name: str | None = None
    explanation: str = ""

    def __bool__(self) -> bool:
        return self.ok


class CheckAborted(Exception):
    """The search exceeded its step budget: neither verdict is proven."""


def update_op(
    client: Hashable,
    name: str,
    version: int,
    hashlist: Sequence[str] | None,
    result: Any,
    call_time: float,
    return_time: float | None = None,
) -> Operation:
    """A hand-made update; ``return_time`` may be omitted for an UNKNOWN result."""
    if return_time is None:
        return_time = math.inf
    return Operation(client, UPDATE, name, (version, hashlist), result, call_time, return_time)


def get_op(
    client: Hashable, name: str, result: Any, call_time: float, return_time: float | None = None
) -> Operation:
    """A hand-made get; ``result`` is ``(version, hashlist)`` or ``None``."""
    if return_time is None:
        return_time = math.inf
    return Operation(client, GET, name, (), result, call_time, return_time)


class HistoryRecorder:
    """Collects operations as a test's clients run them.

    Call :meth:`invoke` just before the request leaves and :meth:`complete`
    as soon as the answer arrives: the recorder numbers events in the order
    it sees them, so two events at the same ``Clock`` time keep their real
    order. Operations never completed are treated as UNKNOWN (still in
    flight when the test stopped).
    """

    def __init__(self) -> None:
        self._ops: list[Operation] = []
        self._done: list[bool] = []
        self._seq = 0

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def invoke(self, client: Hashable, kind: str, name: str, args: Sequence[Any], now: float) -> int:
        """Record a call about to be made; returns the id to complete it with."""
        if kind not in (UPDATE, GET):
            raise ValueError(f"kind must be {UPDATE!r} or {GET!r}, not {kind!r}")
        op = Operation(client, kind, name, tuple(args or ()), UNKNOWN, now, math.inf)
        _validate_args(op)
        op.call_seq = self._next_seq()
        self._ops.append(op)
        self._done.append(False)
        return len(self._ops) - 1

    def complete(self, op_id: int, result: Any, now: float) -> None:
        """Record the answer the client got for ``op_id``."""
        op = self._pending(op_id)
        if now < op.call_time:
            raise ValueError(f"operation {op_id} returns at {now}, before its call at {op.call_time}")
        if result is UNKNOWN:
            self.unknown(op_id)
            return
        op.result = result
        op.return_time = now
        op.return_seq = self._next_seq()
        _validate_result(op)
        self._done[op_id] = True

    def unknown(self, op_id: int) -> None:
        """Record that ``op_id`` ended without a known outcome."""
        op = self._pending(op_id)
        op.result = UNKNOWN
        op.return_time = math.inf
        self._done[op_id] = True

    def _pending(self, op_id: int) -> Operation:
        if not 0 <= op_id < len(self._ops):
            raise ValueError(f"no operation {op_id}")
        if self._done[op_id]:
            raise ValueError(f"operation {op_id} already completed")
        return self._ops[op_id]

    def history(self) -> list[Operation]:
        """A snapshot of the operations so far (copies: recording may go on)."""
        return [
            Operation(
                op.client,
                op.kind,
                op.name,
                op.args,
                op.result,
                op.call_time,
                op.return_time,
                op.call_seq,
                op.return_seq,
            )
            for op in self._ops
        ]

    def __len__(self) -> int:
        return len(self._ops)

    def check(self, max_steps: int | None = None) -> CheckResult:
        return check(self.history(), max_steps=max_steps)


# --------------------------------------------------------------------------
# Validation and normalization

_State = tuple[int, tuple[str, ...] | None]
_INITIAL: Final[_State] = (0, None)


def _validate_args(op: Operation) -> None:
    if op.kind == UPDATE:
        if len(op.args) != 2:
            raise ValueError(f"update args must be (version, hashlist), got {op.args!r}")
        version, hashlist = op.args
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"update version must be an int, got {version!r}")
        if isinstance(hashlist, str) or not isinstance(hashlist, Iterable):
            raise ValueError(f"update hashlist must be a sequence of strings, got {hashlist!r}")
    elif op.kind == GET:
        if op.args:
            raise ValueError(f"get takes no args, got {op.args!r}")
    else:
        raise ValueError(f"kind must be {UPDATE!r} or {GET!r}, not {op.kind!r}")


def _validate_result(op: Operation) -> None:
    result = op.result
    if result is UNKNOWN:
        return
    if op.kind == UPDATE:
        if result is True or result is False:
            return
        if isinstance(result, Mismatch) and isinstance(result.current, int):
            return
        raise ValueError(f"update result must be True, False, Mismatch or UNKNOWN, got {result!r}")
    if result is None:
        return
    if isinstance(result, list | tuple) and len(result) == 2:
        version, hashlist = result
        if isinstance(version, int) and not isinstance(version, bool) and isinstance(hashlist, list | tuple):
            return
    raise ValueError(f"get result must be (version, hashlist), None or UNKNOWN, got {result!r}")


# Compiled operation kinds for the search (small ints compare fastest).
_K_UPDATE_OK, _K_UPDATE_FAIL, _K_UPDATE_MISMATCH, _K_UPDATE_UNKNOWN, _K_GET, _K_GET_MISSING = range(6)


def _compile(op: Operation) -> tuple[int, int, Any]:
    """``(code, version, payload)`` with hashlists as tuples, so that states
    are hashable and compare by value."""
    if op.kind == UPDATE:
        version, hashlist = op.args
        payload = tuple(hashlist)
        if op.result is UNKNOWN:
            return _K_UPDATE_UNKNOWN, version, payload
        if op.result is True:
            return _K_UPDATE_OK, version, payload
        if op.result is False:
            return _K_UPDATE_FAIL, version, None
        return _K_UPDATE_MISMATCH, version, op.result.current
    if op.result is None:
        return _K_GET_MISSING, 0, None
    version, hashlist = op.result
    return _K_GET, version, (version, tuple(hashlist))


def _step(state: _State, code: int, version: int, payload: Any) -> _State | None:
    """The sequential specification: the state after the op, or None when
    the op's result is impossible in ``state``."""
    stored = state[0]
    if code == _K_GET:
        return state if state == payload else None
    if code == _K_GET_MISSING:
        return state if stored == 0 else None
    if code == _K_UPDATE_OK:
        return (version, payload) if version == stored + 1 else None
    if code == _K_UPDATE_UNKNOWN:
        if version == stored + 1:
            return (version, payload)
        # Versions never go down, so an unknown update at or below the
        # stored version can no longer apply on this path: placing it now
        # as a no-op is the same as never, and takes it out of every later
        # scan of the event list.
        return state if version <= stored else None
    if code == _K_UPDATE_FAIL:
        return state if version != stored + 1 else None
    # _K_UPDATE_MISMATCH
    return state if version != stored + 1 and payload == stored else None


# --------------------------------------------------------------------------
# The search


class _Entry:
    """A call or return event in the doubly linked event list."""

    __slots__ = ("index", "is_call", "match", "next", "prev")

    def __init__(self, index: int, is_call: bool) -> None:
        self.index = index
        self.is_call = is_call
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _lift(call: _Entry) -> None:
    """Unlink a call and its return: the op is linearized."""
    call.prev.next = call.next
    call.next.prev = call.prev
    ret = call.match
    ret.prev.next = ret.next
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(call: _Entry) -> None:
    """Undo :func:`_lift`; the neighbours' pointers are still the ones the
    entries had, because lifts and unlifts are strictly nested."""
    ret = call.match
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    call.prev.next = call
    call.next.prev = call


def _event_list(ops: Sequence[Operation]) -> _Entry:
    """Build the event list: events by time; at equal times, by the
    recorder's sequence numbers when every finite event has one, otherwise
    calls before returns so that a tie counts as overlap (permissive)."""
    sequenced = all(
        op.call_seq is not None and (op.return_seq is not None or op.return_time == math.inf) for op in ops
    )
    events: list[tuple[float, int, int, bool]] = []
    for i, op in enumerate(ops):
        if sequenced:
            call_tie = op.call_seq
            return_tie = op.return_seq if op.return_seq is not None else 0
        else:
            call_tie, return_tie = 0, 1
        events.append((op.call_time, call_tie, i, True))
        events.append((op.return_time, return_tie, i, False))
    events.sort(key=lambda e: (e[0], e[1]))
    head = _Entry(-1, False)
    calls: dict[int, _Entry] = {}
    last = head
    for _, _, index, is_call in events:
        entry = _Entry(index, is_call)
        if is_call:
            calls[index] = entry
        else:
            call = calls[index]
            call.match = entry
            entry.match = call
        entry.prev = last
        last.next = entry
        last = entry
    return head


# Search phases, in the order candidates are tried at a node.
_KEEP, _ADVANCE, _GUESS = range(3)


class _Frame:
    """One linearized op on the search stack, persistent so that the
    deepest partial linearization can be kept by reference."""

    __slots__ = ("depth", "entry", "parent", "phase", "state")

    def __init__(self, entry: _Entry, state: _State, parent: _Frame | None, depth: int, phase: int) -> None:
        self.entry = entry
        self.state = state  # the state *before* this op
        self.parent = parent
        self.depth = depth
        # The phase the op was placed in. A _KEEP placement (a get, a
        # refused update, a dead unknown update: the state is unchanged) is
        # never a wrong choice: in any linearization from this node the op
        # can be moved to the front, since it was invoked before every op
        # still unplaced returned, and nothing after it sees a difference.
        # So when the search comes back to such a placement, its node has no
        # alternative worth trying. Without this, every subset of concurrent
        # reads is a distinct configuration, and 20 concurrent clients take
        # seconds instead of milliseconds.
        self.phase = phase


def check_name(ops: Sequence[Operation], max_steps: int | None = None) -> tuple[bool, str]:
    """Check the sub-history of one filename; ``(ok, explanation)``.

    ``max_steps`` bounds the search (each placement or backtrack is one step)
    and raises :class:`CheckAborted` when exhausted.
    """
    # A get whose answer never came constrains nothing.
    ops = [op for op in ops if not (op.kind == GET and op.result is UNKNOWN)]
    if not ops:
        return True, "empty"
    compiled = [_compile(op) for op in ops]
    required = sum(1 for op in ops if op.result is not UNKNOWN)
    head = _event_list(ops)

    state: _State = _INITIAL
    linearized = 0  # bitmask of op indices
    placed_required = 0
    top: _Frame | None = None
    seen: set[tuple[int, _State]] = set()
    steps = 0
    best_depth = -1
    best_top: _Frame | None = None
    best_state: _State = _INITIAL
    best_blocked: _Entry | None = None

    # Candidates at a node are the calls before the first return in the
    # list; they are tried in three phases, by what placing them would do:
    # _KEEP (state unchanged: placed at once and committed, see _Frame),
    # then _ADVANCE (a known update applies), then _GUESS (an unknown update
    # applies). Each candidate belongs to exactly one phase, so the order
    # changes only how soon a linearization is found, never the verdict.
    phase = _KEEP
    entry = head.next
    while placed_required < required:
        steps += 1
        if max_steps is not None and steps > max_steps:
            raise CheckAborted(f"gave up after {max_steps} steps on {ops[0].name!r} ({len(ops)} operations)")
        if entry.is_call:
            index = entry.index
            code, version, payload = compiled[index]
            new_state = _step(state, code, version, payload)
            if new_state is None:
                entry = entry.next
                continue
            if new_state is state:
                op_phase = _KEEP
            else:
                op_phase = _GUESS if code == _K_UPDATE_UNKNOWN else _ADVANCE
            if op_phase != phase:
                entry = entry.next
                continue
            bit = 1 << index
            key = (linearized | bit, new_state)
            if key not in seen:
                seen.add(key)
                top = _Frame(entry, state, top, 0 if top is None else top.depth + 1, phase)
                linearized |= bit
                if code != _K_UPDATE_UNKNOWN:
                    placed_required += 1
                state = new_state
                _lift(entry)
                phase = _KEEP
                entry = head.next
                continue
            if phase != _KEEP:
                entry = entry.next
                continue
            # A state-preserving op that leads to a refuted configuration
            # refutes this one too (see _Frame): fall through to backtrack.
        elif phase != _GUESS:
            phase += 1
            entry = head.next
            continue
        else:
            # The return of an op not yet linearized, and every candidate
            # before it has been tried from here: a dead end.
            depth = 0 if top is None else top.depth + 1
            if depth > best_depth:
                best_depth, best_top, best_state, best_blocked = depth, top, state, entry
        # Backtrack: undo placements until one whose node has alternatives.
        while True:
            if top is None:
                return False, _explain(ops, best_top, best_depth, best_state, best_blocked)
            frame = top
            top = frame.parent
            state = frame.state
            linearized &= ~(1 << frame.entry.index)
            if compiled[frame.entry.index][0] != _K_UPDATE_UNKNOWN:
                placed_required -= 1
            _unlift(frame.entry)
            if frame.phase != _KEEP:
                break
        phase = frame.phase
        entry = frame.entry.next
    return True, f"linearizable ({len(ops)} operations, {len(seen)} configurations explored)"


def _explain(
    ops: Sequence[Operation],
    best_top: _Frame | None,
    best_depth: int,
    best_state: _State,
    best_blocked: _Entry | None,
) -> str:
    order: list[int] = []
    frame = best_top
    while frame is not None:
        order.append(frame.entry.index)
        frame = frame.parent
    order.reverse()
    placed = set(order)
    blocked = ops[best_blocked.index] if best_blocked is not None else None
    # The candidates at the dead end: ops not placed that had been invoked
    # before the blocked op had to return.
    candidates = [
        op
        for i, op in enumerate(ops)
        if i not in placed
        and blocked is not None
        and op is not blocked
        and op.call_time <= blocked.return_time
    ]
    lines = [
        f"not linearizable: the longest linearizable prefix places {best_depth} of {len(ops)} operations"
        f" and ends in state {_describe_result(best_state) if best_state[0] else 'missing'}",
    ]
    shown = order[-5:]
    if len(order) > len(shown):
        lines.append(f"  ... {len(order) - len(shown)} earlier operations")
    lines.extend(f"  {ops[i].describe()}" for i in shown)
    if blocked is not None:
        lines.append(f"could not place: {blocked.describe()}")
        if candidates:
            lines.append("nor any other operation pending before it returned:")
            lines.extend(f"  {op.describe()}" for op in candidates[:10])
            if len(candidates) > 10:
                lines.append(f"  ... and {len(candidates) - 10} more")
    return "\n".join(lines)


def check(history: Iterable[Operation], max_steps: int | None = None) -> CheckResult:
    """Check a whole history, one filename at a time.

    Raises ValueError on a malformed operation (unknown kind, bad args or
    result, return before call) rather than guessing what it meant.
    ``max_steps`` bounds the search per filename (see :func:`check_name`).
    """
    by_name: dict[str, list[Operation]] = {}
    for op in history:
        _validate_args(op)
        _validate_result(op)
        if op.result is UNKNOWN:
            if op.return_time != math.inf:
                # An unknown outcome may take effect at any later time.
                op = Operation(
                    op.client, op.kind, op.name, op.args, op.result, op.call_time, math.inf, op.call_seq, None
                )
        elif op.return_time < op.call_time:
            raise ValueError(f"operation returns before it is called: {op.describe()}")
        by_name.setdefault(op.name, []).append(op)
    for name, ops in by_name.items():
        ok, explanation = check_name(ops, max_steps=max_steps)
        if not ok:
            return CheckResult(False, name, f"file {name!r}: {explanation}")
    return CheckResult(True, None, f"linearizable: {len(by_name)} files")
