"""A minimal Django project under ipserve, without manage.py: settings, urls,
views and the WSGI application (wsgi.py).

    .venv/bin/ipserve examples/django_project/wsgi.py:application -w 4 -b 127.0.0.1:8000

See wsgi.py for what to try, settings.py for what a real project would change.
"""
