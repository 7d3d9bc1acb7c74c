from django.db import migrations, models

from queuetopia_celery.contrib.django.operations import AlembicUpgrade, SchemaMigration


class Migration(SchemaMigration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [
        AlembicUpgrade("0001"),
        # The admin's read-only model (unmanaged: no table is created for it; Django does
        # not track the fields of unmanaged models, so new columns need no migration).
        migrations.CreateModel(
            name="Job",
            fields=[("id", models.BigAutoField(primary_key=True, serialize=False))],
            options={
                "verbose_name": "job",
                "db_table": "queuetopia_jobs",
                "ordering": ("-id",),
                "managed": False,
            },
        ),
    ]
