"""POST /debug/cuda-memory-snapshot: writes a CUDA memory snapshot (allocator state and
recorded allocation history) for https://pytorch.org/memory_viz, on a server started with
`--cuda-memory-debugging`. It needs an API key: a snapshot holds stack traces and file paths
of the server, and writing one can take seconds and much disk.

Answers JSON: 200 {path, bytes}; 404 when the server runs without the flag; 403 when the
server has no API key configured; 401 without a valid `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from interpql.backends import cuda_memory
from interpql.resolvers.context import Services

log = logging.getLogger(__name__)
PATH = "/debug/cuda-memory-snapshot"


def _refuse(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers)


def snapshot_route(services: Services) -> Route:
    async def snapshot(request: Request) -> JSONResponse:
        settings = services.settings
        if not settings.cuda_memory_debugging:
            return _refuse(
                404,
                "CUDA_MEMORY_DEBUGGING_OFF",
                "CUDA memory debugging is off: start the server with --cuda-memory-debugging "
                "(on a CUDA device) to record allocations and take snapshots.",
            )
        if not services.api_keys:
            return _refuse(
                403,
                "NO_API_KEYS",
                "Snapshots need an API key, and this server has none: start it with --api-key "
                "(or $INTERPQL_API_KEYS).",
            )
        key_id = services.api_keys.identify(request.headers.get("authorization"))
        if key_id is None:
            return _refuse(
                401,
                "UNAUTHENTICATED",
                "Snapshots need an API key: send 'Authorization: Bearer <key>'.",
                **{"WWW-Authenticate": "Bearer"},
            )
        folder = Path(settings.cuda_memory_snapshot_dir)
        try:
            path = await asyncio.to_thread(cuda_memory.dump_snapshot, folder)
            size = path.stat().st_size
        except OSError as exc:
            log.error("CUDA memory snapshot into %s failed", folder, exc_info=exc)
            return _refuse(
                500, "SNAPSHOT_FAILED", f"Could not write the snapshot into {folder}: {exc}"
            )
        log.info("CUDA memory snapshot %s (%d bytes) taken for %s", path, size, key_id)
        return JSONResponse({"path": str(path), "bytes": size})

    return Route(PATH, snapshot, methods=["POST"])
