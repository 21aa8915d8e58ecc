from django.urls import path

from django_project import views

urlpatterns = [
    path("", views.index),
    path("guestbook/", views.guestbook),
]
