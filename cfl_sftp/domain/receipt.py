"""The uploader's receipt (SPEC 4): what the gateway did with a package and why, as served under /receipts."""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
from dataclasses import dataclass

from cfl_sftp.domain.errors import Outcome, Reason

UPLOAD_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def new_upload_id(now: dt.datetime) -> str:
    """Sortable by time, unique without coordination between nodes: ``20261124T083000Z-<10 hex>``."""
    return f"{now.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(5)}"


@dataclass(frozen=True, slots=True)
class Receipt:
    upload_id: str
    file_name: str
    uploader: str
    organisation: str
    received_at: dt.datetime
    size: int
    package_sha256: str
    outcome: Outcome
    reason: Reason
    message: str
    image_path: str | None
    audit_seq: int

    def to_json(self) -> bytes:
        """Pretty JSON with a trailing newline: read by people as often as by scripts."""
        body = {
            "upload_id": self.upload_id,
            "file_name": self.file_name,
            "uploader": self.uploader,
            "organisation": self.organisation,
            "received_at": self.received_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "size": self.size,
            "package_sha256": self.package_sha256,
            "outcome": self.outcome.value,
            "reason": self.reason.value,
            "message": self.message,
            "image_path": self.image_path,
            "audit_seq": self.audit_seq,
        }
        return (json.dumps(body, indent=2) + "\n").encode()
