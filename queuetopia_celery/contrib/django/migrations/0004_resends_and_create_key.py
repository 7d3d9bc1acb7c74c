from queuetopia_celery.contrib.django.operations import AlembicUpgrade, SchemaMigration


class Migration(SchemaMigration):
    dependencies = [("queuetopia", "0003_lease_expiry_index")]
    operations = [AlembicUpgrade("0004", down_revision="0003")]
