"""Settings: the least Django needs to serve views and forms with CSRF protection.

No database and no installed apps, so there is nothing to migrate. A real
project keeps its own settings; what matters under ipserve is below.
"""

import os

# Every worker must share it (signed cookies, CSRF tokens): set it in the
# environment of the master (systemd Environment=, a container's env); the
# workers inherit it.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

ROOT_URLCONF = "django_project.urls"
WSGI_APPLICATION = "django_project.wsgi.application"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [],
    "APP_DIRS": False,
    "OPTIONS": {},
}]

# No database here. With one: ipserve's workers run gevent, and Django keeps a
# database connection per thread, which under gevent means per greenlet, so
# one worker serving many requests at once opens as many connections. Bound
# them (Django 5.1+: "OPTIONS": {"pool": {...}} with PostgreSQL and psycopg 3,
# or a pooler such as PgBouncer) and size max_connections for
# workers x concurrent requests.
DATABASES: dict = {}

USE_TZ = True
USE_I18N = False

# When clients come over HTTPS (ipserve's certfile, or TLS ended before it),
# keep the cookies off plain HTTP.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = os.environ.get("DJANGO_HTTPS") == "1"
