from queuetopia_celery.contrib.django.operations import AlembicUpgrade, SchemaMigration


class Migration(SchemaMigration):
    dependencies = [("queuetopia", "0006_create_messages")]
    operations = [AlembicUpgrade("0007", down_revision="0006")]
