"""Logs: text or JSON lines, every record carrying the current trace and span ids, and the
access log (`retd.access`, a line per call, written by telemetry's `finish_rpc`)."""

from __future__ import annotations

import json
import logging
from typing import Any

from opentelemetry import trace

access_log = logging.getLogger("retd.access")


def hex_id(value: int, width: int) -> str:
    """A trace or span id as OpenTelemetry writes it; "" for none (0)."""
    return format(value, f"0{width}x") if value else ""


class TraceContextFilter(logging.Filter):
    """Puts the current trace and span ids on every log record, and `trace_suffix` (the
    text format's ` trace_id=... span_id=...`, empty when no span records: tracing off)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            context = trace.get_current_span().get_span_context()
            record.trace_id = hex_id(context.trace_id, 32)
            record.span_id = hex_id(context.span_id, 16)
        trace_id, span_id = getattr(record, "trace_id", ""), getattr(record, "span_id", "")
        record.trace_suffix = f" trace_id={trace_id} span_id={span_id}" if trace_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace ids and extras."""

    FIELDS = ("rpc_method", "status", "latency_ms", "tokens", "model")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", ""),
            "span_id": getattr(record, "span_id", ""),
        }
        entry.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, log_format: str, access: bool) -> None:
    """Root logging as text or JSON lines, every record carrying trace and span ids (text
    lines only when tracing is on). `access`: a line per call on `retd.access` (at INFO)."""
    handler = logging.StreamHandler()
    handler.addFilter(TraceContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(trace_suffix)s")
        )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    access_log.setLevel(logging.NOTSET if access else logging.WARNING)
