from queuetopia_celery.contrib.django.operations import AlembicUpgrade, SchemaMigration


class Migration(SchemaMigration):
    dependencies = [("queuetopia", "0002_operator")]
    operations = [AlembicUpgrade("0003", down_revision="0002")]
