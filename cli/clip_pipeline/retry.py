"""`clip-pipeline retry`: objects that ended `document-failed`, or whose job failed before they got
any outcome (a job cancelled after waiting for a GPU, a child out of attempts), go through the
dispatcher's checks again (type, size, current version) and into new jobs.

Without --code, every failure but those a retry would only repeat (`too-costly`: the same bytes cost
the same to decode) is resubmitted; naming a code with --code resubmits those too.

Each failure is resubmitted once: a marker named after the failure itself (the event that recorded
it, or the failed job) is written with a conditional PUT before the object is submitted, so running
retry again submits nothing new, while a later failure of the same object (a new event) can be
retried in its turn. A submission that fails deletes its markers.

The failures are read from the failure events, streamed from the batches whose counts say they
hold any (clip_pipeline.report.failures): nothing is read or held per embedded object. An object
replaced since it failed is left to its new version's upload event (counted as superseded); one
that failed in one job and was embedded by another with the same bytes (a duplicate delivery) is
resubmitted once, which costs one more embedding and writes nothing wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clip_dispatch.admission import ObjectRef, Verdict, admit, record_rejection
from clip_dispatch.submission import SubmittedJob
from clip_pipeline import jobs, report
from clip_pipeline.submitter import JobSubmitter, Target
from clip_shared import aws, keys
from clip_shared.events import ErrorCode
from clip_shared.manifest import ManifestEntry

#: The code given to objects whose job failed before they were recorded.
JOB_FAILED = "job-failed"
#: Failures retried only when asked for by code: decoding the same bytes again costs the same.
ONLY_WHEN_NAMED = frozenset({ErrorCode.TOO_COSTLY})
#: A candidate whose failure has a marker already: this retry leaves it alone.
ALREADY_RETRIED = "already_retried"
COUNTS = ("candidates", ALREADY_RETRIED, Verdict.REJECTED, Verdict.SUPERSEDED, "submitted", "jobs")
# Candidates examined at once: a failed step then gives back at most this many markers.
_CHUNK = 10_000


@dataclass(frozen=True)
class Candidate:
    url: str
    #: What failed: the failure event's id, or the failed job's id.
    failure_id: str
    code: str
    #: The ETag of the version that failed: an object replaced since is its new version's to embed.
    etag: str | None = None

    @property
    def ref(self) -> ObjectRef:
        bucket, key = keys.parse_s3_url(self.url)
        return ObjectRef(bucket, key)


def latest_failures(s3: Any, bucket: str, prefix: str, model_id: str) -> dict[str, Candidate]:
    """url -> its latest failure, from the failure events streamed batch by batch: what is held grows
    with the failed objects, not with the objects or their events."""
    latest: dict[str, tuple[str, Candidate]] = {}
    for failed in report.failures(s3, bucket, prefix, model_id):
        seen = latest.get(failed.url)
        if seen is None or failed.time >= seen[0]:
            failure = failed.failure
            latest[failed.url] = (failed.time, Candidate(failed.url, failure.event_id, failure.code, failed.etag))
    return {url: candidate for url, (_, candidate) in latest.items()}


def failed_job_objects(s3: Any, batch_client: Any, job_queue: str, bucket: str, prefix: str, model_id: str) -> list[Candidate]:
    """The entries of the queue's failed jobs that their own child recorded no outcome for, read one
    failed child at a time (its manifest and its events batch): a job that failed for one child of a
    thousand costs two GETs, not two thousand."""
    found: dict[str, Candidate] = {}
    for job in jobs.jobs(batch_client, job_queue, ["FAILED"]):
        for index in jobs.failed_children(batch_client, job):
            manifest = jobs.child_manifest(s3, job, index)
            if manifest is None:
                continue
            batch = keys.events_key(prefix, model_id, manifest.manifest_id, manifest.shard_index)
            recorded = {event["data"]["document"]["url"] for event in report.batch_events(s3, bucket, batch)}
            for entry in manifest.entries:
                if entry.url not in recorded:
                    found.setdefault(entry.url, Candidate(entry.url, job["jobId"], JOB_FAILED, entry.etag))
    return list(found.values())


def candidates(target: Target, codes: Iterable[str], failed_jobs: bool) -> list[Candidate]:
    """What `retry` takes: each failed object's latest failure if its code is wanted, then (with
    `failed_jobs`) the objects of failed jobs that got no outcome and failed nowhere else."""
    wanted = set(codes)
    s3, bucket, prefix = target.s3, target.output_bucket, target.output_prefix
    failed = latest_failures(s3, bucket, prefix, target.model_id)
    found = [
        candidate
        for _, candidate in sorted(failed.items())
        if (candidate.code in wanted if wanted else candidate.code not in ONLY_WHEN_NAMED)
    ]
    if failed_jobs:
        lost = failed_job_objects(s3, target.batch_client, target.job_queue, bucket, prefix, target.model_id)
        found += [candidate for candidate in lost if candidate.url not in failed]
    return found


def _mark(s3: Any, bucket: str, key: str, candidate: Candidate) -> bool:
    """True when this run took the failure (the marker is new)."""
    body = {
        "url": candidate.url,
        "failureId": candidate.failure_id,
        "code": candidate.code,
        "retriedAt": datetime.now(UTC).isoformat(),
    }
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(body).encode(), ContentType="application/json", IfNoneMatch="*")
        return True
    except Exception as exc:
        if aws.lost_race(exc):
            return False
        raise


def _marked(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except Exception as exc:
        if aws.is_missing(exc):
            return False
        raise


def retry(
    target: Target,
    candidates: list[Candidate],
    dry_run: bool,
    on_submitted: Callable[[SubmittedJob, int], None] = lambda job, entries: None,
) -> dict[str, int]:
    """Resubmits `candidates` (in a dry run, counts what would be); returns the counts by outcome."""
    counts = dict.fromkeys(COUNTS, 0)
    counts["candidates"] = len(candidates)
    s3, bucket, prefix = target.s3, target.output_bucket, target.output_prefix
    markers: dict[str, str] = {}

    def release(entries: list[ManifestEntry]) -> None:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda entry: s3.delete_object(Bucket=bucket, Key=markers[entry.url]), entries))

    submitter = JobSubmitter(target, release, on_submitted)

    def take(candidate: Candidate) -> str | ManifestEntry:
        marker = keys.retry_key(prefix, candidate.url, candidate.failure_id)
        if _marked(s3, bucket, marker) if dry_run else not _mark(s3, bucket, marker, candidate):
            return ALREADY_RETRIED
        try:
            admission = admit(s3, candidate.ref, target.max_object_bytes)
        except Exception:
            if not dry_run:
                s3.delete_object(Bucket=bucket, Key=marker)
            raise
        if admission.rejection is not None and not dry_run:
            record_rejection(s3, bucket, prefix, admission.rejection, submitter.manifest_id)
        if admission.entry is None:
            return str(admission.verdict)
        if candidate.etag and admission.entry.etag != candidate.etag:
            # Replaced since it failed: the new version's own upload event takes it to a job.
            return str(Verdict.SUPERSEDED)
        markers[admission.entry.url] = marker
        return admission.entry

    with ThreadPoolExecutor(16) as pool:
        for start in range(0, len(candidates), _CHUNK):
            futures = [pool.submit(take, candidate) for candidate in candidates[start : start + _CHUNK]]
            wait(futures)
            admitted: list[ManifestEntry] = [
                result for future in futures if not future.exception() and isinstance(result := future.result(), ManifestEntry)
            ]
            error = next((future.exception() for future in futures if future.exception()), None)
            if error is not None:
                if not dry_run:
                    # Markers never expire: those of objects not submitted must go, or they are never retried.
                    release([*submitter.entries, *admitted])
                raise error
            for future in futures:
                if isinstance(outcome := future.result(), str):
                    counts[outcome] += 1
            if dry_run:
                counts["submitted"] += len(admitted)
            else:
                submitter.add(admitted)
    if not dry_run:
        submitter.flush()
        counts["submitted"], counts["jobs"] = submitter.submitted, submitter.jobs
    return counts
