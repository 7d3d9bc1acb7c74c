"""tests/apps/testapp.py's worker app with OpenTelemetry's SDK configured: every span
of the worker's processes is appended to ``QT_TEST_SPAN_FILE`` as one JSON line (the
test reads them back), and with ``QT_TEST_CELERY_INSTRUMENT=1`` Celery is instrumented
too (opentelemetry-instrumentation-celery), in each prefork child as its docs say."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

from celery import signals
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from tests.apps.testapp import app, qt

__all__ = ["app", "qt"]


class FileExporter(SpanExporter):
    """Appends each finished span to a file, one JSON object per line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            parent = span.parent
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "trace_id": f"{span.context.trace_id:032x}",
                        "span_id": f"{span.context.span_id:016x}",
                        "parent_id": f"{parent.span_id:016x}" if parent else None,
                        "kind": span.kind.name,
                        "status": span.status.status_code.name,
                        "attributes": dict(span.attributes or {}),
                        "links": [
                            {
                                "trace_id": f"{link.context.trace_id:032x}",
                                "span_id": f"{link.context.span_id:016x}",
                            }
                            for link in span.links
                        ],
                        "start": span.start_time,
                        "end": span.end_time,
                        "pid": os.getpid(),
                    }
                )
            )
        with self.lock, open(self.path, "a") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(FileExporter(os.environ["QT_TEST_SPAN_FILE"])))
trace.set_tracer_provider(provider)

if os.environ.get("QT_TEST_CELERY_INSTRUMENT") == "1":

    @signals.worker_process_init.connect(weak=False)
    def _instrument(**_: Any) -> None:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()
