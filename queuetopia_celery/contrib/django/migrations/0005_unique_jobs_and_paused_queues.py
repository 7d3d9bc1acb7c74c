from queuetopia_celery.contrib.django.operations import AlembicUpgrade, SchemaMigration


class Migration(SchemaMigration):
    dependencies = [("queuetopia", "0004_resends_and_create_key")]
    operations = [AlembicUpgrade("0005", down_revision="0004")]
