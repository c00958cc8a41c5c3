"""Logging: plain lines, or one JSON object a line (FACEGRAD_LOG_JSON=1) with the job id."""

from __future__ import annotations

import contextvars
import json
import logging
import time

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)


class _JobFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
               "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        if getattr(record, "job_id", None):
            doc["job_id"] = record.job_id
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(as_json: bool = False, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_JobFilter())
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s%(job_suffix)s: %(message)s"))
    if not as_json:
        class _Suffix(logging.Filter):
            def filter(self, record):
                jid = getattr(record, "job_id", None)
                record.job_suffix = f" [job {jid}]" if jid else ""
                return True
        handler.addFilter(_Suffix())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
