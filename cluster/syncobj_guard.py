"""pysyncobj's SyncObj with a Raft safety hole of the pinned 0.3.17 closed,
one wasted tick of a single-member cluster removed, a follower's commits two
messages sooner, resent entries a follower holds left alone, and its messages
protected by the encryptor the caller gives (cluster/raft_wire.py) instead of
Fernet.

A follower receiving append_entries takes the leader's commit index and moves
its own to `min(leader_commit, last index of its own log)`. For regular
batches that is right: the batch's prevLogIdx/prevLogTerm check has just made
the follower's log a prefix of the leader's. But while the leader streams a
snapshot (the follower is behind the leader's compacted log), the messages
carry no prevLogIdx, and pysyncobj still advances the commit index over the
follower's own, unverified log. A deposed leader that wakes up behind a
snapshot then applies -- and answers clients for -- entries of its old term
that the majority never committed and has since overwritten: its audit chain
diverges and a request is acknowledged without a majority record (found by
the chaos runs, reproduced in tests/unit/cluster/test_syncobj_guard.py).

`GuardedSyncObj` lets such messages move only what they safely can: the
snapshot transfer itself, and the leader commit index used for readiness.
The follower's commit index moves again with the first regular batch after
the snapshot is installed, once its log is known to match the leader's.

The wake: a leader appends queued commands at the end of its tick, after the
tick's commit step, and its next tick comes with a socket event or after the
tick period (50 ms). With peers, their acknowledgements bring it; a
single-member cluster has none, so every commit waited the whole period
(measured: 18 Decrypt/s at one request in flight). After appending, such a
leader now notifies itself (pysyncobj's pipe) so the next tick commits at once.

The late acknowledgement: with appendEntriesUseBatch=False the leader sends
each entry as soon as it appends it and moves the follower's nextIndex past it.
A success acknowledgement for an earlier message, arriving after that, set
nextIndex back to its own index, so the next send repeated entries the follower
already had (and its journal then skipped them). With one audit batch in flight
this hit the slower follower on about one batch in two: the entry went out
twice and the follower logged pysyncobj's "truncating already-applied log
entries" alarm. A late success now never lowers nextIndex; a refusal (reset)
still does, and that is how a follower that lost a message is caught up.

The follower's own commit: an entry is committed once the leader that made it
has it on a majority (Raft, section 5.3) -- the fact, not the leader learning
it. In a cluster of at most three, the leader and one follower are a
majority, so a follower holding an entry of the current term, which only its
current leader can have sent, knows that entry and all before it committed
as soon as it appends them. It moves its commit index there itself and
applies, instead of waiting for its acknowledgement to reach the leader and
the leader's next message to bring the commit index back: two of the four
messages between a follower's request and its audit record's commit (an
entry of an earlier term is left to the leader's commit index, as Raft
requires; a larger cluster needs more than these two, so it waits as before).

Entries already held: pysyncobj deletes a follower's log after a message's
prevLogIdx whenever the log is longer, even when the message's entries are the
ones it holds (Raft deletes only from the first conflict). kmsd's journal
(cluster/journal.py) keeps the entries that matter, but pysyncobj has by then
logged its "truncating already-applied log entries" alarm at critical level
(tens of times in a five-minute chaos run, none of them a loss), and it
acknowledges only up to the message's end, so the leader sends again what the
follower kept. The guard drops the leading entries the follower holds (same
index, same term) before pysyncobj sees the message, so a truncation starts at
a real conflict; when everything the message carries is held, it answers for
the entries after it that the sender holds too (those of the sender's term, and
committed ones). No false alarm, and the acknowledgement covers what is held.

The encryptor: pysyncobj builds a Fernet from `conf.password` and its transport
reads it back through the `encryptor` property, for every connection it makes
or accepts. Answering that property with the given encryptor swaps the cipher
on every connection and nothing else. `conf.password` must still be set: were
this override ever lost, the node would fall back to Fernet (and fail to reach
its peers), never to plaintext.
"""

from __future__ import annotations

from typing import Any

from pysyncobj import SyncObj

PEER_MESSAGE_PREFIX = "kmsd_"


class GuardedSyncObj(SyncObj):
    def __init__(self, *args: Any, encryptor: Any = None, **kwargs: Any) -> None:
        # Set before SyncObj.__init__ (which already connects, through the property),
        # and so also left out of pysyncobj's snapshot of the object's attributes.
        conf = kwargs.get("conf", args[2] if len(args) > 2 else None)
        if encryptor is not None and getattr(conf, "password", None) is None:
            raise ValueError("an encryptor needs conf.password set (see module docstring)")
        self._wire_encryptor = encryptor
        self.peer_message_handler: Any = None
        super().__init__(*args, **kwargs)

    @property
    def encryptor(self) -> Any:
        if self._wire_encryptor is not None:
            return self._wire_encryptor
        return self._SyncObj__encryptor  # type: ignore[attr-defined]

    def _getEncryptor(self) -> Any:  # noqa: N802 - pysyncobj's name
        return self.encryptor

    # The name is pysyncobj's private handler, which SyncObj registers with its
    # transport through the instance, so this override receives every message.
    def _SyncObj__onMessageReceived(self, node: Any, message: dict[str, Any]) -> None:  # noqa: N802
        kind = message.get("type")
        if isinstance(kind, str) and kind.startswith(PEER_MESSAGE_PREFIX):
            # Not Raft: messages between the nodes' services (see RaftNode.send_to_leader),
            # carried by the authenticated, encrypted Raft connections.
            handler = self.peer_message_handler
            if handler is not None:
                handler(node, message)
            return
        if kind == "next_node_idx":
            self._on_next_node_idx(node, message)
            return
        if kind != "append_entries":
            super()._SyncObj__onMessageReceived(node, message)  # type: ignore[misc]
            return
        if "prevLogIdx" in message:
            message = self._without_entries_already_held(message)
            super()._SyncObj__onMessageReceived(node, message)  # type: ignore[misc]
            self._commit_what_the_leader_and_this_node_hold(message)
            return
        leader_commit = message.get("commit_index", 0)
        held = dict(message, commit_index=self._SyncObj__raftCommitIndex)  # type: ignore[attr-defined]
        super()._SyncObj__onMessageReceived(node, held)  # type: ignore[misc]
        if message.get("term", -1) < self.raftCurrentTerm:
            return
        self._SyncObj__leaderCommitIndex = leader_commit
        applied = self._SyncObj__raftLastApplied  # type: ignore[attr-defined]
        if self._SyncObj__raftCommitIndex < applied:  # type: ignore[attr-defined]
            # An installed snapshot is committed state: its index is committed.
            self._SyncObj__raftCommitIndex = applied
            self._SyncObj__raftLog.setRaftCommitIndex(applied)  # type: ignore[attr-defined]

    def _without_entries_already_held(self, message: dict[str, Any]) -> dict[str, Any]:
        if "transmission" in message:  # an entry sent in parts: pysyncobj's own handling
            return message
        held = self._SyncObj__getEntries(message["prevLogIdx"])  # type: ignore[attr-defined]
        if not held or held[0][2] != message["prevLogTerm"]:
            return message  # pysyncobj refuses it, and the leader steps back
        entries = message.get("entries") or []
        held_terms = {index: term for _command, index, term in held[1:]}
        skip = 0
        while skip < len(entries) and held_terms.get(entries[skip][1]) == entries[skip][2]:
            skip += 1
        if skip < len(entries):
            if not skip:
                return message
            # pysyncobj truncates from the first entry that is new here: a conflict, or
            # the end of this log.
            _command, index, term = entries[skip - 1]
            return dict(message, prevLogIdx=index, prevLogTerm=term, entries=entries[skip:])
        # Everything the message carries is here.
        index = entries[-1][1] if entries else message["prevLogIdx"]
        term = entries[-1][2] if entries else message["prevLogTerm"]
        commit = self._SyncObj__raftCommitIndex  # type: ignore[attr-defined]
        for entry in held[1:]:
            # Entries after the message that the sender's log holds too, and so everything
            # before them: one of the sender's term (only the sender made those; Raft's
            # log matching), or one committed (every later leader holds those).
            if entry[1] > index and (entry[2] == message["term"] or entry[1] <= commit):
                _command, index, term = entry
        # pysyncobj cuts what follows, as before: entries of an earlier term that are not
        # committed, which this message does not vouch for.
        return dict(message, prevLogIdx=index, prevLogTerm=term, entries=[])

    def _commit_what_the_leader_and_this_node_hold(self, message: dict[str, Any]) -> None:
        term = self._SyncObj__raftCurrentTerm  # type: ignore[attr-defined]
        if (len(self._SyncObj__otherNodes) > 2  # type: ignore[attr-defined]
                or message.get("term") != term or self._isLeader()
                or self._SyncObj__getCurrentLogTerm() != term):  # type: ignore[attr-defined]
            return
        last = self._SyncObj__getCurrentLogIndex()  # type: ignore[attr-defined]
        if last > self._SyncObj__raftCommitIndex:  # type: ignore[attr-defined]
            self._SyncObj__raftCommitIndex = last
            self._SyncObj__raftLog.setRaftCommitIndex(last)  # type: ignore[attr-defined]

    def _on_next_node_idx(self, node: Any, message: dict[str, Any]) -> None:
        # A success acknowledges entries up to its index: the leader's nextIndex for
        # that follower only moves back on a refusal (reset), never on a late success.
        next_indexes = self._SyncObj__raftNextIndex  # type: ignore[attr-defined]
        sent_up_to = next_indexes.get(node)
        super()._SyncObj__onMessageReceived(node, message)  # type: ignore[misc]
        if (sent_up_to is not None and message.get("success") and not message.get("reset")
                and next_indexes.get(node, sent_up_to) < sent_up_to):
            next_indexes[node] = sent_up_to

    def _checkCommandsToApply(self) -> None:  # noqa: N802 - pysyncobj's name
        appended_from = self._SyncObj__getCurrentLogIndex()  # type: ignore[attr-defined]
        super()._checkCommandsToApply()
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        if (notifier is not None and not self._SyncObj__otherNodes  # type: ignore[attr-defined]
                and self._SyncObj__getCurrentLogIndex() != appended_from  # type: ignore[attr-defined]
                and self._isLeader()):
            notifier.notify()
