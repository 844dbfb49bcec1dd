"""``manage.py fit``: this machine's model fit as a table, or ``fit serve``: llmfit's HTTP API for it."""

from __future__ import annotations

import json
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from apps.fit import engine, selectors
from workers.hardware import hardware_snapshot


class FitService:
    """The machine this command runs on, detected once, with the models it can consider."""

    def __init__(self, *, memory_bytes: int | None, max_context: int | None) -> None:
        self.node = {"name": os.environ.get("LLMP_NODE_NAME") or socket.gethostname(),
                     "os": os.uname().sysname.lower()}
        hardware = hardware_snapshot(models_dir=settings.MODELS_DIR)
        self.machine = engine.machine_from_hardware(name=self.node["name"], hardware=hardware, memory_bytes=memory_bytes)
        self.default_context = max_context or selectors.fit_default_context()
        try:
            self.models = selectors.fit_models()
        except DatabaseError:  # no database here: the catalog alone
            self.models = list(engine.catalog_models())

    def report(self, query: engine.FitQuery) -> dict:
        total, rows = engine.fit_rows(self.models, self.machine, query, default_context=self.default_context)
        return engine.envelope(node=self.node, machine=self.machine, total=total, rows=rows, query=query)

    def answer(self, path: str, params: dict[str, str]) -> tuple[int, dict]:
        """(status, body) for one GET of llmfit's API."""
        if path == "/health":
            return 200, {"status": "ok", "node": self.node}
        if path == "/api/v1/system":
            return 200, {"node": self.node, "system": engine.system_json(self.machine)}
        try:
            if path == "/api/v1/models":
                return 200, self.report(engine.parse_query(params))
            if path == "/api/v1/models/top":
                return 200, self.report(engine.parse_query(params, top_only=True, default_limit=5))
            if path.startswith("/api/v1/models/") and len(path) > len("/api/v1/models/"):
                name = unquote(path[len("/api/v1/models/"):])
                return 200, self.report(engine.parse_query(params, search=name, default_limit=20))
        except engine.FitQueryError as exc:
            return 400, {"error": str(exc)}
        return 404, {"error": f"no such endpoint: {path}"}


def _handler_for(service: FitService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "llmplatform-fit"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            try:
                status, body = service.answer(url.path.rstrip("/") or "/", dict(parse_qsl(url.query)))
            except Exception as exc:  # llmfit answers 500 with {"error": ...}
                status, body = 500, {"error": f"internal error: {exc}"}
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args) -> None:
            pass

    return Handler


class Command(BaseCommand):
    help = ("Which models this machine can run: a table (default), or `fit serve` for llmfit's HTTP API "
            "(/health, /api/v1/system, /api/v1/models, /api/v1/models/top, /api/v1/models/{name}).")

    def add_arguments(self, parser) -> None:
        parser.add_argument("action", nargs="?", choices=["serve"], help="serve: answer llmfit's API over HTTP")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8787)
        parser.add_argument("--memory", help="GPU memory to assume instead of the detected VRAM, e.g. 24G")
        parser.add_argument("--max-context", type=int, help="cap on the context used for memory estimates")
        parser.add_argument("--limit", "-n", type=int)
        parser.add_argument("--perfect", action="store_true", help="only perfect fits")
        parser.add_argument("--min-fit", help="perfect|good|marginal|too_tight (default marginal)")
        parser.add_argument("--runtime", help="any|mlx|llamacpp|vllm")
        parser.add_argument("--use-case", help="general|coding|reasoning|chat|multimodal|embedding")
        parser.add_argument("--provider")
        parser.add_argument("--search")
        parser.add_argument("--sort", help="score|tps|params|mem|ctx|date|use_case")
        parser.add_argument("--include-too-tight", action="store_true")
        parser.add_argument("--json", action="store_true", help="print llmfit's JSON envelope instead of a table")

    def handle(self, *args, **options) -> None:
        try:
            memory = engine.parse_memory_size(options["memory"]) if options["memory"] else None
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        service = FitService(memory_bytes=memory, max_context=options["max_context"])
        if options["action"] == "serve":
            self._serve(service, options["host"], options["port"])
            return
        params = {key: str(options[option]) for key, option in (
            ("limit", "limit"), ("min_fit", "min_fit"), ("runtime", "runtime"), ("use_case", "use_case"),
            ("provider", "provider"), ("search", "search"), ("sort", "sort")) if options[option] is not None}
        if options["perfect"]:
            params["perfect"] = "true"
        if options["include_too_tight"]:
            params["include_too_tight"] = "true"
            params.setdefault("min_fit", "too_tight")
        try:
            report = service.report(engine.parse_query(params))
        except engine.FitQueryError as exc:
            raise CommandError(str(exc)) from None
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
            return
        self._table(report)

    def _table(self, report: dict) -> None:
        system = report["system"]
        gpu = f"{system['gpu_count']}x {system['gpu_name']} ({system['gpu_vram_gb']} GiB)" if system["has_gpu"] else "no GPU"
        self.stdout.write(f"{report['node']['name']}: {system['cpu_name']}, {system['total_ram_gb']} GiB RAM, {gpu}")
        columns = [("name", 48), ("parameter_count", 7), ("best_quant", 8), ("fit_level", 9), ("run_mode", 11),
                   ("memory_required_gb", 8), ("estimated_tps", 8), ("score", 6), ("use_case", 10)]
        headers = ["model", "params", "quant", "fit", "mode", "mem GiB", "tok/s", "score", "use"]
        self.stdout.write("  ".join(h.ljust(width) for h, (_, width) in zip(headers, columns)))
        for row in report["models"]:
            self.stdout.write("  ".join(str(row[key])[:width].ljust(width) for key, width in columns))
        self.stdout.write(f"{report['returned_models']} of {report['total_models']} models")

    def _serve(self, service: FitService, host: str, port: int) -> None:
        server = ThreadingHTTPServer((host, port), _handler_for(service))
        address = f"http://{host}:{server.server_address[1]}"
        self.stdout.write(f"llmplatform fit API (llmfit-compatible) listening on {address}")
        for line in ("GET /health", "GET /api/v1/system", "GET /api/v1/models?limit=20&min_fit=marginal&sort=score",
                     "GET /api/v1/models/top?limit=5&use_case=coding&min_fit=good", "GET /api/v1/models/<name>"):
            self.stdout.write(f"  {line}")
        self.stdout.flush()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
