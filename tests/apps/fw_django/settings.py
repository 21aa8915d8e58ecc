"""Settings of the test project: the least Django needs to serve views with
CSRF protection. No database (no model is used), no sessions, no static files."""

SECRET_KEY = "ipserve-e2e-tests-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]              # clients use the server's test addresses as Host
ROOT_URLCONF = "fw_django.urls"
WSGI_APPLICATION = "fw_django.wsgi.application"
INSTALLED_APPS: list[str] = []
DATABASES: dict = {}
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [],
    "APP_DIRS": False,
    "OPTIONS": {},
}]
USE_TZ = True
USE_I18N = False
DEFAULT_CHARSET = "utf-8"
