"""The engine's limits, from the worker's settings (see ipserve.config)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """None means no limit, except keepalive, where 0 is keep-alive off."""

    request_line: int | None = 4094
    fields: int | None = 100
    field_size: int | None = 8190
    body: int | None = 100 * 1024 * 1024
    header_timeout: float | None = 10.0
    body_timeout: float | None = 30.0
    keepalive: float = 5.0
    connections: int = 10000
    ws_send_timeout: float | None = 30.0
    ws_max_message: int | None = 16 * 1024 * 1024
    shed_load: bool = False

    @classmethod
    def from_settings(cls, settings: dict) -> Limits:
        return cls(request_line=settings["limit_request_line"],
                   fields=settings["limit_request_fields"],
                   field_size=settings["limit_request_field_size"],
                   body=settings["limit_request_body"],
                   header_timeout=settings["header_timeout"],
                   body_timeout=settings["body_timeout"],
                   keepalive=settings["keepalive"],
                   connections=settings["worker_connections"],
                   ws_send_timeout=settings["ws_send_timeout"],
                   ws_max_message=settings["ws_max_message"],
                   shed_load=settings["shed_load"])

    @property
    def header_block(self) -> int | None:
        """Most bytes a request line and header block may take: whatever
        sends more, without finishing its headers, is refused (431) rather
        than buffered. httptools gathers a field's value in memory until its
        line ends, so this is also what bounds one endless field (with
        limit_request_fields = 0, as if the limit were 10,000)."""
        if self.field_size is None:
            return None      # fields of any length were asked for
        line = 65536 if self.request_line is None else self.request_line
        fields = 10000 if self.fields is None else self.fields
        return line + 2 + (fields + 1) * (self.field_size + 2) + 2
