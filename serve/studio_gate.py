"""The studio's door: `/studio` on the app, behind the app's API keys, in front of the Gradio app.

`StudioMount` is what `serve.app` mounts at `/studio` when the module is imported. It is a
stateless ASGI callable (Ray Serve copies the FastAPI app when `@serve.ingress` decorates the
class, so anything mounted later, in `Ingress.__init__`, would not be served); it forwards to
the `Studio` that the replica's `Ingress.__init__` installs with `install`.

Access: a browser signs in once per browser session by posting an API key to
`/studio/login`; the key goes into an HttpOnly, SameSite=Strict session cookie (gone when the
browser closes), and every request under `/studio` (page, Gradio config, assets, API calls,
exports) is checked with the app's `KeyStore` (`serve.auth`): a revoked key stops working
within a second, on every Ingress replica, with no server-side session to share. Without a
valid cookie the page is a sign-in form and everything else is 401.
"""
from __future__ import annotations

import asyncio
import html
import logging

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response

from serve.auth import Caller, KeyStore

log = logging.getLogger("ray.serve")
COOKIE = "comfusion_studio_key"
MAX_KEY_CHARS = 200
_installed = None  # the Studio of this process (one Ingress replica per process)


def install(studio) -> None:
    """Make `studio` the one `StudioMount` forwards to in this process."""
    global _installed
    _installed = studio


def installed():
    return _installed


def key_of(cookies: dict) -> str:
    """The API key a studio request carries ("" when none)."""
    key = cookies.get(COOKIE, "")
    return key if len(key) <= MAX_KEY_CHARS else ""


def caller_of(store: KeyStore | None, cookies: dict) -> Caller | None:
    """The key's owner when the request carries a valid studio cookie, else None."""
    key = key_of(cookies)
    return store.authenticate(key) if store is not None and key else None


def _root(scope) -> str:
    return scope.get("root_path", "").rstrip("/")


def _sub_path(scope) -> str:
    """The path below the mount point, e.g. "/" or "/login"."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root):] if root and path.startswith(root) else path) or "/"


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ComFusion studio: sign in</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0; padding: 1.5rem; background: #f6f6f8; }}
main {{ max-width: 26rem; margin: 10vh auto; background: white; padding: 1.5rem; border-radius: 10px;
        box-shadow: 0 1px 4px rgba(0,0,0,.12); }}
input, button {{ width: 100%; box-sizing: border-box; font-size: 1rem; padding: .7rem; margin-top: .5rem; }}
button {{ background: #ea580c; color: white; border: 0; border-radius: 6px; }}
.error {{ color: #b91c1c; }}
code {{ font-size: .85em; }}
</style></head>
<body><main>
<h1>ComFusion studio</h1>
<p>Sign in with your API key (asked once per browser session).</p>
{error}
<form method="post" action="{root}/login">
<label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required>
<button id="sign-in" type="submit">Sign in</button>
</form>
<p><small>No key? An operator creates one with <code>python -m serve.auth create NAME</code>.</small></p>
</main></body></html>"""


def login_page(scope, error: str = "", status: int = 200) -> HTMLResponse:
    shown = f'<p class="error" id="login-error">{html.escape(error)}</p>' if error else ""
    return HTMLResponse(LOGIN_PAGE.format(root=html.escape(_root(scope)), error=shown), status_code=status,
                        headers={"Cache-Control": "no-store"})


async def _login(scope, receive, store: KeyStore | None) -> Response:
    """POST /login: a valid key becomes the session cookie; anything else shows the form again."""
    request = Request(scope, receive)
    body = await request.body()
    if len(body) > 4 * MAX_KEY_CHARS:
        return login_page(scope, "That is not an API key.", 400)
    form = await request.form()
    key = str(form.get("key", "")).strip()
    caller = store.authenticate(key) if store is not None and key and len(key) <= MAX_KEY_CHARS else None
    if caller is None:
        return login_page(scope, "That key is not valid (or has been revoked).", 401)
    response = RedirectResponse(f"{_root(scope)}/", status_code=303)
    response.set_cookie(COOKIE, key, httponly=True, samesite="strict", path=f"{_root(scope)}/",
                        secure=scope.get("scheme") == "https")  # no max-age: a browser-session cookie
    log.info("studio: key %r signed in", caller.key_id)
    return response


def _logout(scope) -> Response:
    response = RedirectResponse(f"{_root(scope)}/", status_code=303)
    response.delete_cookie(COOKIE, path=f"{_root(scope)}/")
    return response


class StudioMount:
    """The ASGI app mounted at `/studio`: sign-in, exports, and the Gradio app for signed-in browsers."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return
        studio = installed()
        if studio is None:
            await JSONResponse({"detail": "the studio is starting; retry in a moment"}, status_code=503,
                               headers={"Retry-After": "2"})(scope, receive, send)
            return
        response = await self._gate(scope, receive, studio)
        if response is not None:
            if scope["type"] == "http":
                await response(scope, receive, send)
            return
        # the app serving this request (Starlette's scope["app"], before Gradio sets its own): the Train
        # page calls its training routes in-process
        studio.backend.attach_api(scope.get("app"), f"{_root(scope)}/gradio_api/upload")
        await studio.asgi(scope, receive, send)

    async def _gate(self, scope, receive, studio) -> Response | None:
        """The response for sign-in, sign-out, exports and refused requests; None to go on to Gradio."""
        path, method = _sub_path(scope), scope.get("method", "GET")
        if path == "/login" and method == "POST":
            return await _login(scope, receive, studio.keys)
        if path == "/logout":
            return _logout(scope)
        cookies = Request(scope).cookies
        caller = await asyncio.to_thread(caller_of, studio.keys, cookies)
        if caller is None:
            if path in ("/", "/login") and method == "GET":
                return login_page(scope)
            return PlainTextResponse("sign in to the studio first (an API key)", status_code=401)
        if path.startswith("/export/"):
            return await studio.export(path.removeprefix("/export/"))
        return None
