from queuetopia_celery.contrib.django.operations import AlembicUpgrade, SchemaMigration


class Migration(SchemaMigration):
    dependencies = [("queuetopia", "0005_unique_jobs_and_paused_queues")]
    operations = [AlembicUpgrade("0006", down_revision="0005")]
