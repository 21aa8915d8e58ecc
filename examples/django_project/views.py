"""Two views: who answered (JSON), and a guestbook form behind CSRF protection."""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template import engines

# In this worker's memory: with ipserve a client's next request reaches the
# same worker, so it sees what it signed. Other clients may be pinned to
# other workers, with guestbooks of their own: shared data goes in a database.
MAX_ENTRIES = 100
entries: list[str] = []

PAGE = engines["django"].from_string("""<!doctype html>
<title>guestbook</title>
<p>Served by worker pid {{ who.pid }} to {{ who.remote_addr }}.</p>
<form method="post">{% csrf_token %}
<input name="message" maxlength="200" required><button>sign</button>
</form>
<ul>{% for entry in entries %}<li>{{ entry }}</li>{% endfor %}</ul>
""")


def who(request: HttpRequest) -> dict:
    return {"pid": os.getpid(), "remote_addr": request.META.get("REMOTE_ADDR"),
            "worker": request.META.get("ipserve.worker")}   # None under another server


def index(request: HttpRequest) -> JsonResponse:
    return JsonResponse(who(request))


def guestbook(request: HttpRequest) -> HttpResponse:
    """GET: the form (sets the csrftoken cookie). POST: only reached when
    CsrfViewMiddleware found the token matching the cookie; else 403."""
    if request.method == "POST":
        message = request.POST.get("message", "").strip()[:200]
        if message:
            entries.append(message)
            del entries[:-MAX_ENTRIES]
    return HttpResponse(PAGE.render({"who": who(request), "entries": entries}, request))
