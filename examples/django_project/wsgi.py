"""The WSGI application of the example project: Django's own handler.

    .venv/bin/ipserve examples/django_project/wsgi.py:application -w 4 -b 127.0.0.1:8000

    curl -s 127.0.0.1:8000/                    # which worker answered you (JSON)
    open http://127.0.0.1:8000/guestbook/       # a form behind Django's CSRF protection

In a project of your own, point ipserve at your `<project>/wsgi.py` the same
way, or by module name from the directory that holds the project:
`ipserve --chdir /srv/site mysite.wsgi:application`. Set
DJANGO_ALLOWED_HOSTS (comma-separated) to the host names clients use; the
default accepts 127.0.0.1 and localhost only.

Each worker is a fresh interpreter that imports this file, so `kill -HUP` to
the master loads new code (and new settings) with no request dropped.
"""

import os
import sys

# Given by path (examples/django_project/wsgi.py:application), ipserve puts
# this file's own directory on sys.path; the settings are a module of the
# package, so its parent directory must be there too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")

from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()
