"""The README's example queries run on the demo as written and answer without errors (the
README stays true). Subscriptions, and the job examples (their ids are placeholders), run in
tests of their own (test_jobs, test_websocket_protocols)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from interpql.bootstrap import ServeOptions, build_services
from interpql.server import create_app

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```graphql\n(.*?)```", README, re.S)
# The prompt the examples' $p stands for.
PROMPT = "def check(x):\n    if x > 3:\n        return True\n    return False\n\nok = check(5) =="


def operations() -> list[str]:
    """Each block's operations: a block may hold a query and a subscription."""
    found = []
    for block in BLOCKS:
        for part in re.split(r"\n(?=subscription|query|\{)", block.strip()):
            if not part.startswith("subscription") and "job(" not in part:
                found.append(part)
    return found


def test_the_readme_has_the_examples_it_should() -> None:
    assert len(operations()) >= 8
    assert any("nodeTable" in op for op in operations())


@pytest.mark.parametrize("operation", operations(), ids=lambda op: op[:40])
async def test_a_readme_query_runs_on_the_demo(operation: str) -> None:
    services = build_services(ServeOptions(explanation_store=":memory:"))
    transport = httpx.ASGITransport(app=create_app(services))
    variables: dict[str, Any] = {"p": PROMPT} if "$p" in operation else {}
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        response = await client.post("/graphql", json={"query": operation, "variables": variables})
    services.registry.close()
    body = response.json()
    assert response.status_code == 200 and "errors" not in body, body
    assert body["data"]
