from queuetopia_celery.contrib.django.operations import AlembicUpgrade, SchemaMigration


class Migration(SchemaMigration):
    dependencies = [("queuetopia", "0001_initial")]
    operations = [AlembicUpgrade("0002", down_revision="0001")]
