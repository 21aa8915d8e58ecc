"""The dashboard page (ipserve/dashboard.html) as a file: self-contained, and
built without any HTML parsing of data. How it renders is tested in a real
browser by tests/e2e/test_dashboard.py."""

from __future__ import annotations

import importlib.resources
import re

import pytest

PAGE = importlib.resources.files("ipserve").joinpath("dashboard.html").read_text(encoding="utf-8")
SVG_NAMESPACE = "http://www.w3.org/2000/svg"     # a name for createElementNS, never fetched


def without_comments(page: str) -> str:
    page = re.sub(r"<!--.*?-->", "", page, flags=re.DOTALL)
    page = re.sub(r"/\*.*?\*/", "", page, flags=re.DOTALL)
    return re.sub(r"(?m)^\s*//.*$", "", page)


def test_the_page_ships_in_the_package():
    assert PAGE.lstrip().lower().startswith("<!doctype html>")
    assert "</html>" in PAGE


def test_no_external_resource():
    """No CDN, no font, no image, no script from anywhere but the page itself."""
    code = without_comments(PAGE).replace(SVG_NAMESPACE, "")
    assert not re.search(r"(?i)\b(?:https?:|wss?:|ftp:)?//[a-z0-9.-]+\.[a-z]{2,}", code), \
        re.search(r"(?i)\b(?:https?:|wss?:)?//[a-z0-9.-]+\.[a-z]{2,}.{0,40}", code).group(0)
    assert not re.search(r"(?i)<(?:script|img|iframe|link)\b[^>]*\b(?:src|href)\s*=", code)
    assert "@import" not in code and "url(" not in code


@pytest.mark.parametrize("sink", ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                                  "eval(", "new Function", "srcdoc", "setAttribute(\"on"])
def test_data_never_reaches_an_html_parser(sink):
    """The status carries app-controlled strings (errors, leak reports): the page
    builds its DOM with createElement and textContent only."""
    assert sink not in without_comments(PAGE)


def test_fetches_only_its_own_endpoints_with_the_token_header():
    fetched = set(re.findall(r"getJSON\(\"([^\"]+)\"\)", PAGE))
    assert fetched == {"status.json", "series.json"}     # relative: a proxy may add a prefix
    assert '"Authorization": "Bearer " + TOKEN' in PAGE


def test_stable_hooks_for_tests():
    for hook in ('id="workers"', 'id="reloads"', 'id="leaks"', 'id="memory"', 'id="counters"',
                 'id="updated"', 'id="auth-error"', '"data-pid": w.pid', '"data-state": w.state'):
        assert hook in PAGE, hook
