from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('nodes', '0002_maintenance_fit_metrics'),
    ]

    operations = [
        migrations.AddField(
            model_name='node',
            name='health_error',
            field=models.TextField(blank=True, help_text='Why the start-up test decode failed; empty: it passed or found no model to test. A node with an error gets no requests.'),
        ),
        migrations.AddField(
            model_name='node',
            name='health_checked_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='node',
            name='health_detail',
            field=models.JSONField(blank=True, default=dict, help_text="The self-test's result: model, elapsed seconds, signal or exit code, last stderr lines, llama.cpp system info."),
        ),
    ]
