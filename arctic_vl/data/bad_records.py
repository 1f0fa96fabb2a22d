"""Bad records: what a format raises for a record it cannot use, the reasons, and the policy that counts them.

Under `on_bad_record: error` the first bad record stops the run (exit 2) with a message naming the file,
the record (and line), the field and the reason; under `skip` it is dropped and counted by reason and by
source in a `BadRecordReport`, which the run prints and writes to its summary. Nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from arctic_vl.data.images import IMAGE_TOO_LARGE, MISSING_IMAGE, UNREADABLE_IMAGE
from arctic_vl.errors import DataError

OnBadRecord = Literal["error", "skip"]

# The reasons any record format may reject a record for.
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_field"
MALFORMED_RECORD = "malformed_record"
MALFORMED_TURNS = "malformed_turns"
IMAGE_TOKEN_MISMATCH = "image_token_mismatch"
#: a record with video (a `videos` / `video` field, a `<video>` placeholder): only images are supported
UNSUPPORTED_VIDEO = "unsupported_video"
#: a placeholder (ms-swift's `<bbox>`, `<ref-object>`, ...) left in the text after rendering: it would train as text
UNRENDERED_PLACEHOLDER = "unrendered_placeholder"
#: an ms-swift grounding record whose `<ref-object>` / `<bbox>` count differs from its `objects.ref` / `objects.bbox`
GROUNDING_MISMATCH = "grounding_mismatch"
BAD_RECORD_REASONS = (INVALID_JSON, MISSING_FIELD, MALFORMED_RECORD, MALFORMED_TURNS, IMAGE_TOKEN_MISMATCH,
                      MISSING_IMAGE, UNREADABLE_IMAGE, IMAGE_TOO_LARGE, UNSUPPORTED_VIDEO, UNRENDERED_PLACEHOLDER,
                      GROUNDING_MISMATCH)
#: the dense_caption format's own reason (declared in its `reasons`)
GEOMETRY_OUT_OF_RANGE = "geometry_out_of_range"


class BadRecord(Exception):
    """A record that cannot become a Conversation: what a record format's `convert` raises.

    `reason` is one of `BAD_RECORD_REASONS` or of the format's own `reasons`; `field` is a path into the
    record like `conversations[1].value` (`<record>` for the record as a whole); `detail` says what is wrong
    and what is allowed. The reader adds the file, the record index and the line.
    """

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.reason = reason
        self.field = field
        self.detail = detail


class BadRecordReport:
    """Counts records skipped under on_bad_record="skip", by reason and by source, with a few examples.

    Most bad records are found when the data is read; a few only when a sample is loaded for a batch (pixels that
    do not decode, in a DataLoader worker). Those are `add_late`: counted once per record however often it is
    loaded (every epoch), kept as `late` entries that the loop gathers from every process and saves with its
    checkpoints, so a resumed run reports what an uninterrupted one does.
    """

    def __init__(self, max_examples: int = 3):
        self.max_examples = max_examples  # per reason
        self.counts: Counter[tuple[str, str]] = Counter()  # (source, reason) -> count
        self.examples: list[tuple[str, int | None, str, str]] = []  # (source, index, reason, message)
        self.late: dict[tuple[str, int | None], tuple[str, str]] = {}  # (source, index) -> (reason, message)

    def add(self, source: str, index: int | None, reason: str, message: str) -> None:
        """Count one skipped record; keep its message if its reason has few examples yet."""
        self.counts[(source, reason)] += 1
        if sum(1 for e in self.examples if e[2] == reason) < self.max_examples:
            self.examples.append((source, index, reason, message))

    def add_late(self, source: str, index: int | None, reason: str, message: str) -> bool:
        """Count a record found bad when loaded for a batch, once per record; True when it is new."""
        if (source, index) in self.late:
            return False
        self.late[(source, index)] = (reason, message)
        self.add(source, index, reason, message)
        return True

    def late_entries(self) -> list[list[Any]]:
        """The late records as JSON-ready [source, index, reason, message] lists (saved with checkpoints)."""
        return [[source, index, reason, message] for (source, index), (reason, message) in self.late.items()]

    def add_late_entries(self, entries: list[list[Any]]) -> None:
        """Add `late_entries()` of a checkpoint or of another process (records already counted stay once)."""
        for source, index, reason, message in entries:
            self.add_late(source, index, reason, message)

    @property
    def total(self) -> int:
        """The number of skipped records."""
        return sum(self.counts.values())

    def by_reason(self) -> dict[str, int]:
        """Skipped records per reason, reasons sorted by name."""
        out: Counter[str] = Counter()
        for (_, reason), c in self.counts.items():
            out[reason] += c
        return dict(sorted(out.items()))

    def by_source(self) -> dict[str, int]:
        """Skipped records per source file, sorted by path."""
        out: Counter[str] = Counter()
        for (source, _), c in self.counts.items():
            out[source] += c
        return dict(sorted(out.items()))

    def merge(self, other: BadRecordReport) -> None:
        """Add another report's counts and examples (e.g. gathered from other ranks)."""
        for (source, index, reason, message) in other.examples:
            if sum(1 for e in self.examples if e[2] == reason) < self.max_examples:
                self.examples.append((source, index, reason, message))
        self.counts.update(other.counts)

    def format(self) -> str:
        """A human summary: total, per reason, per source, then the kept examples."""
        if not self.total:
            return "no bad records"
        lines = [f"skipped {self.total} bad record{'s' if self.total != 1 else ''}:"]
        lines += [f"  {reason}: {c}" for reason, c in self.by_reason().items()]
        lines.append("by source:")
        lines += [f"  {source}: {c}" for source, c in self.by_source().items()]
        lines.append("examples:")
        lines += [f"  {m}" for (_, _, _, m) in self.examples]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"BadRecordReport(total={self.total}, by_reason={self.by_reason()})"


def reject_record(on_bad_record: OnBadRecord, report: BadRecordReport, source: str, index: int | None,
                  reason: str, message: str) -> None:
    """Apply the bad-record policy to one record: raise DataError (`error`) or count it in `report` (`skip`).

    `message` names the file, the record and what is wrong (the error adds how to skip such records).
    """
    if on_bad_record == "error":
        raise DataError(message + " (on_bad_record='skip' drops such records and counts them)",
                        source=source, index=index, reason=reason)
    report.add(source, index, reason, message)
