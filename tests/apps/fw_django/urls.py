from django.urls import path

from fw_django import views

urlpatterns = [
    path("", views.index),
    path("hello/<str:name>/", views.hello),
    path("form/", views.form),
]
