"""The end of the stream at a transform or sink replica: whose end of stream (EOS) is in, when the
stage's ``finish`` runs, and when this replica has ended (its own EOS confirmed downstream).

Known, never guessed from a quiet input. The senders a replica must hear from are its ack peers:
every replica of every input stage, as the supervisor names them (``peers``, kept current through
a scale), each by its ack address, which is the same for every incarnation of that replica (a
sender that restarts is the same sender). A sender sends its EOS only once every batch it sent is
acknowledged, and a replica acknowledges a batch only once it has processed it, its outputs are
acknowledged and (a stage with state) a saved snapshot holds it; so with every sender's EOS in,
every batch before them is done. What a sender sends after its EOS is processed as any batch: a restarted source resumes
from its saved position and sends records again (their ids drop them at a stateful stage and at
the sinks), and a dead-letter replay sends new ones.

A sender's EOS is confirmed to it only once it is in this replica's state file (the ``eos`` list
saved with the snapshot), so a sender that completes and exits is never needed again: a replica
killed after that restores the list. Then, with every sender heard, ``finish`` runs on the state
(restored or not: a replica killed before it ended runs it again, from the snapshot taken before
it, and makes the same records), its records go out, and once they are acknowledged the replica
sends its own EOS to its receivers; once each has confirmed, it has *ended*, saved as ``ended``
with the state that ``finish`` left. An ended replica stays up: it confirms a repeated EOS at once
(a sender killed before it saved its own completion asks again) and sends its EOS again to a
receiver that has not confirmed it (a replica added downstream).

Without a supervisor (run-stage) the senders are not known in advance: an EOS is confirmed at
once and not passed on (what every replica did before).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from loguru import logger


class StreamEnd:
    """One replica's end of stream; written only through these methods (the loop saves and sends)."""

    def __init__(self) -> None:
        self.heard: set[str] = set()                  # senders whose EOS is in the saved state
        self.unsaved: dict[str, dict[str, Any]] = {}  # sender -> its EOS header, not saved yet (confirmed once it is)
        self.finishing = False                        # finish() ran in this process; its records are out
        self.ended = False                            # its own EOS confirmed downstream (saved)
        self.eos_sent_at = 0.0

    def restore(self, saved: dict[str, Any]) -> None:
        eos = saved.get("eos")
        self.heard = {s for s in eos if isinstance(s, str)} if isinstance(eos, list) else set()
        self.ended = saved.get("ended") is True

    def fields(self) -> dict[str, Any]:
        """What every save of this replica's state carries about the end of its stream."""
        return {"eos": sorted(self.heard | set(self.unsaved)), "ended": self.ended}

    def received(self, header: dict[str, Any]) -> dict[str, Any] | None:
        """An EOS came in: the header to confirm now (its sender is known to have ended already),
        or None (it is confirmed once it is saved: :meth:`saved`)."""
        sender = header["ack"]
        if sender in self.heard:
            return header
        if sender not in self.unsaved:
            logger.info(f"end of stream from {header['src']}.{header['r']}")
        self.unsaved[sender] = header     # the newest: a sender takes a confirmation for its own epoch only
        return None

    def saved(self) -> list[dict[str, Any]]:
        """The state file now holds every EOS received: their headers, to confirm."""
        headers = list(self.unsaved.values())
        self.heard.update(self.unsaved)
        self.unsaved.clear()
        return headers

    def input_ended(self, senders: Collection[str]) -> bool:
        """Whether every sender's EOS is in the saved state (and this replica is not finishing yet)."""
        return bool(senders) and not self.finishing and not self.ended and all(s in self.heard for s in senders)

    @property
    def saves_held(self) -> bool:
        """Between ``finish`` and the end: the state is not saved (a crash must find the snapshot
        taken before ``finish``, and run it again), except by the save that says it ended."""
        return self.finishing and not self.ended
