"""The key form: where a person using the page enters a read key (GSP_READ_KEYS) once.

The page's own requests (its searches and the ``<img>`` tags of its results) cannot carry an
``X-API-Key`` header, so a valid key is kept in an HttpOnly, SameSite=Strict cookie that the
read routes accept. The cookie grants reads only: writes still need the header, so that no
other site can make a visitor's browser write.

No ``from __future__ import annotations``: FastAPI evaluates the route annotations.
"""

import html
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from app.service.dependencies import KEY_COOKIE, State

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

_COOKIE_DAYS = 30
_FORM = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>GSP image retrieval: key</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 32rem; margin: 4rem auto">
<h1>Key needed</h1>
<p>This gallery is private. Enter a key to search it from this browser.</p>
<p role="alert">{message}</p>
<form method="post" action="key">
<label for="key">Key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Continue</button>
</form></body></html>
"""


def _form(message: str, status: int) -> HTMLResponse:
    return HTMLResponse(_FORM.format(message=html.escape(message)), status_code=status)


@router.get("/key")
async def key_form() -> HTMLResponse:
    return _form("", 200)


@router.post("/key", response_model=None)
async def enter_key(
    request: Request, state: State, key: Annotated[str, Form()]
) -> HTMLResponse | RedirectResponse:
    """Keep a valid key in the cookie and go to the page; show the form again otherwise."""
    if not state.settings.grants_read(key):
        return _form("That key is not valid.", 403)
    response = RedirectResponse(".", status_code=303)
    response.set_cookie(
        KEY_COOKIE,
        key,
        max_age=_COOKIE_DAYS * 24 * 3600,
        path=request.scope.get("root_path") or "/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response
