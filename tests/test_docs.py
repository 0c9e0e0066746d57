"""`/docs` works offline: the page and every file it loads come from the app itself (real HTTP)."""
from __future__ import annotations

import re
import threading
import time

import httpx
import pytest


@pytest.fixture(scope="module")
def docs_url():
    """The app's FastAPI object served by uvicorn on a free port (the docs routes need no Ray)."""
    import uvicorn

    from serve.app import api
    from serve.local_mlflow import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_docs_page_and_assets_are_served_by_the_app(docs_url):
    with httpx.Client(base_url=docs_url, timeout=30) as http:
        page = http.get("/docs")
        assert page.status_code == 200 and "swagger" in page.text.lower()
        assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
        linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"} <= set(linked)
        for path in linked:
            r = http.get(path)
            assert r.status_code == 200 and len(r.content) > 500, path
        assert http.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
        assert len(http.get("/docs/assets/swagger-ui-bundle.js").content) > 100_000
        assert "'/openapi.json'" in page.text
        assert "/v1/generate" in http.get("/openapi.json").json()["paths"]
        assert http.get("/docs/assets/index.html").status_code == 404  # only the named files
        assert http.get("/docs/assets/..%2f..%2fdocs.py").status_code == 404
