"""A minimal Django project for the framework end-to-end tests
(tests/e2e/test_frameworks.py): settings, urls, views and the WSGI
application, served unchanged by ipserve as
``tests/apps/fw_django/wsgi.py:application``. No database, no installed apps;
CSRF middleware on."""
