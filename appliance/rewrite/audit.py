"""
What the rewriter decided about each link of a message, for the preview.

``prepare(message, audit=Audit())`` fills an ``Audit`` while it compiles the
message: every part it looked at (or skipped, and why) with its decoded text,
and every link found in it, tracked or left alone and why. The delivery path
passes no audit and does none of this work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.rewrite.edits import INITIAL_SLOT, LINK_SLOT, OPEN_SLOT, Edit, Link, Untracked

# Why a link is left as it came, beyond the reasons ``edits`` records.
OVER_CAP = "over_cap"  # past the part's max_tracked_links


@dataclass(frozen=True)
class LinkAudit:
    """One link of a part: tracked (``link`` set, ``reason`` empty) or left alone and why."""

    start: int  # span of the target as written in the part's decoded text
    end: int
    written: str
    target: str
    link: Link | None = None
    reason: str = ""


@dataclass
class PartAudit:
    kind: str  # "html" or "text"
    text: str = ""  # decoded; empty when the part was skipped
    links: list[LinkAudit] = field(default_factory=list)
    skipped: str = ""  # why the part is delivered as it came, if it is
    open_pixel: int | None = None  # where the pixels go in the decoded text
    initial_pixel: int | None = None


@dataclass
class Audit:
    parts: list[PartAudit] = field(default_factory=list)

    def add(self, kind: str, text: str, edits: list[Edit], capped: list[Edit],
            untracked: list[Untracked]) -> None:
        """A compiled part: ``edits`` as found, ``capped`` after max_tracked_links."""
        part = PartAudit(kind, text)
        found: list[LinkAudit] = [LinkAudit(u.start, u.end, u.written, u.target, reason=u.reason)
                                  for u in untracked]
        for edit, kept in zip(edits, capped, strict=True):
            if edit.slot == LINK_SLOT and edit.link is not None:
                tracked = kept.slot == LINK_SLOT
                found.append(LinkAudit(edit.start, edit.end, text[edit.start:edit.end], edit.link.target,
                                       edit.link, "" if tracked else OVER_CAP))
            elif edit.slot == OPEN_SLOT:
                part.open_pixel = edit.start
            elif edit.slot == INITIAL_SLOT:
                part.initial_pixel = edit.start
        part.links = sorted(found, key=lambda a: a.start)
        self.parts.append(part)

    def skip(self, kind: str, why: str) -> None:
        self.parts.append(PartAudit(kind, skipped=why))
