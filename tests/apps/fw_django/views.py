"""Views: every answer tells which worker process answered whom."""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template import engines

FORM = engines["django"].from_string("""<!doctype html>
<html><body>
<p id="pid">{{ pid }}</p><p id="remote">{{ remote_addr }}</p>
<form method="post" action="/form/">{% csrf_token %}
<input name="message"><button>send</button>
</form>
</body></html>
""")


def _who(request: HttpRequest) -> dict:
    return {"pid": os.getpid(), "remote_addr": request.META.get("REMOTE_ADDR"),
            "worker": request.META.get("ipserve.worker")}


def index(request: HttpRequest) -> HttpResponse:
    who = _who(request)
    return HttpResponse(f"<!doctype html><title>ipserve django</title>"
                        f"<p id=pid>{who['pid']}</p><p id=remote>{who['remote_addr']}</p>",
                        content_type="text/html; charset=utf-8")


def hello(request: HttpRequest, name: str) -> JsonResponse:
    return JsonResponse({**_who(request), "name": name, "q": request.GET.getlist("q"),
                         "method": request.method})


def form(request: HttpRequest) -> HttpResponse:
    """GET: the form, with the CSRF token (sets the csrftoken cookie).
    POST (only reached past CsrfViewMiddleware): the posted message, echoed."""
    if request.method == "POST":
        return JsonResponse({**_who(request), "message": request.POST.get("message")})
    return HttpResponse(FORM.render(_who(request), request))
