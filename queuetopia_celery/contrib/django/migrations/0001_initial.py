from queuetopia_celery.contrib.django.operations import AlembicUpgrade, SchemaMigration


class Migration(SchemaMigration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [AlembicUpgrade("0001")]
