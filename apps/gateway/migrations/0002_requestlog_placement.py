from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('gateway', '0001_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='requestlog',
            name='placement',
            field=models.CharField(blank=True, help_text='Why the gateway chose this node.', max_length=255),
        ),
    ]
