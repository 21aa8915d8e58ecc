"""The WSGI application of the test project: Django's own WSGI handler.

Loaded by path (``tests/apps/fw_django/wsgi.py:application``), so the
project's parent directory is put on sys.path here and the settings are
found as ``fw_django.settings`` however this file was imported.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fw_django.settings")

from django.core.wsgi import get_wsgi_application  # noqa: E402

from wsgi_validate import validated  # noqa: E402

application = validated(get_wsgi_application())
