"""``manage.py models list|download|convert|quantize``: the model lifecycle from a terminal.

Jobs start exactly as through the management API; the command then follows the job with a
progress bar until it ends (``--no-wait`` returns at once). Exit status: 0 on success, 1 when
the job failed or was cancelled, 2 for a refused request.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from apps.jobs.models import Job
from apps.models.models import RegisteredModel
from apps.models.services import (
    CONVERT_OUTTYPES,
    ModelError,
    model_convert_start,
    model_download_start,
    model_quantize_start,
)

FOLLOW_BLOCK_SECONDS = 1.0


class Command(BaseCommand):
    help = "List models, or download, convert or quantize one as a job with a progress bar."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        actions.add_parser("list", help="registered models")
        download = actions.add_parser("download", help="a GGUF file of a Hugging Face repo")
        download.add_argument("repo_id")
        download.add_argument("filename")
        download.add_argument("--revision", default="")
        convert = actions.add_parser("convert", help="a Hugging Face safetensors checkpoint to GGUF")
        source = convert.add_mutually_exclusive_group(required=True)
        source.add_argument("--repo-id", default="")
        source.add_argument("--source-dir", default="", help="a directory under LLMP_CHECKPOINTS_DIR")
        convert.add_argument("--revision", default="")
        convert.add_argument("--outtype", choices=CONVERT_OUTTYPES, default="f16")
        convert.add_argument("--quantize", default="", help="then quantize to this type (Q4_K_M, ...)")
        quantize = actions.add_parser("quantize", help="a registered GGUF model")
        quantize.add_argument("model")
        quantize.add_argument("qtype")
        for sub, required in ((download, False), (convert, True), (quantize, False)):
            sub.add_argument("--name", required=required, help="id of the new model")
            sub.add_argument("--node", help="node to run the job on (default: the least busy live node)")
            sub.add_argument("--no-wait", action="store_true", help="start the job and return")

    def handle(self, *args, action, **options):
        if action == "list":
            return self._list()
        try:
            if action == "download":
                job = model_download_start(repo_id=options["repo_id"], filename=options["filename"],
                                           revision=options["revision"], name=options["name"], node=options["node"])
            elif action == "convert":
                job = model_convert_start(name=options["name"], repo_id=options["repo_id"],
                                          source_dir=options["source_dir"], revision=options["revision"],
                                          outtype=options["outtype"], quantize=options["quantize"], node=options["node"])
            else:
                job = model_quantize_start(source_model=options["model"], qtype=options["qtype"], name=options["name"],
                                           node=options["node"])
        except ModelError as exc:
            raise CommandError(str(exc), returncode=2) from exc
        self.stdout.write(f"job {job.pk} ({job.kind}) queued on node {job.node.name}")
        if options["no_wait"]:
            return
        job = self._follow(job)
        if job.status != "succeeded":
            raise CommandError(f"job {job.pk} {job.status}: {job.error or 'cancelled'}", returncode=1)
        self.stdout.write(self.style.SUCCESS(f"model {job.result_model_id} is ready"))

    def _list(self) -> None:
        rows = [(m.id, m.source, m.file_type or "-", m.architecture or "-", _size(m.size_bytes)) for m in
                RegisteredModel.objects.filter(is_active=True)]
        widths = [max(len(str(row[i])) for row in rows + [("ID", "SOURCE", "TYPE", "ARCH", "SIZE")]) for i in range(5)]
        for row in [("ID", "SOURCE", "TYPE", "ARCH", "SIZE")] + rows:
            self.stdout.write("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())

    def _follow(self, job: Job) -> Job:
        """A progress bar per stage, from the job's event stream, until the job ends."""
        from apps.jobs import events

        redis, stream, cursor, bar = events.events_redis(), events.job_stream(job.pk), "0-0", None
        try:
            while True:
                replies = redis.xread({stream: cursor}, block=int(FOLLOW_BLOCK_SECONDS * 1000), count=100)
                if not replies:
                    job.refresh_from_db()
                    if job.is_terminal:  # its events expired, or it ended before we looked
                        return job
                    continue
                for entry_id, fields in replies[0][1]:
                    event = events.event_decode(entry_id, fields)
                    cursor = event["id"]
                    data = event["data"]
                    if event["type"] == events.STAGE:
                        if bar is not None:
                            bar.close()
                        bar = tqdm(total=data.get("total"), desc=data["stage"], unit_scale=True,
                                   unit="B" if data.get("unit") == "bytes" else "it", file=self.stdout._out)
                    elif event["type"] == events.PROGRESS and bar is not None:
                        bar.total = data.get("total") or bar.total
                        bar.update(data["done"] - bar.n)
                    elif event["type"] in events.FINAL_TYPES:
                        job.refresh_from_db()
                        return job
        finally:
            if bar is not None:
                bar.close()


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size else "-"
