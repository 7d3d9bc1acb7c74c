from django.apps import AppConfig


class QueuetopiaConfig(AppConfig):  # type: ignore[misc]
    name = "queuetopia_celery.contrib.django"
    label = "queuetopia"
    verbose_name = "Queuetopia"
    default_auto_field = "django.db.models.BigAutoField"
