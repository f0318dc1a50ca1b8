"""`clip-pipeline redrive`: the dead-letter queue's messages back onto the upload queue.

Messages land in the dead-letter queue when the dispatcher failed on them maxReceiveCount times
(an outage of S3 or Batch, a bug since fixed). Moving them back lets the dispatcher try again; a
message is sent to the upload queue before it is deleted from the dead-letter queue, so a failure
in between duplicates a message (its object is embedded twice; readers keep one row) and never loses one.
Running it again moves what is left, and nothing once the queue is empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: SQS's most messages per receive and per batch call.
_BATCH = 10
#: Long enough for one batch to be sent and deleted before SQS would hand it out again.
_VISIBILITY_S = 60


class RedriveError(RuntimeError):
    """SQS refused to take messages back; the message says how many moved and why the rest did not."""


@dataclass(frozen=True)
class Redrive:
    #: ApproximateNumberOfMessages of the dead-letter queue before the move.
    waiting: int
    moved: int


def waiting(sqs: Any, queue_url: str) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"])


def redrive(sqs: Any, dead_letter_url: str, queue_url: str, dry_run: bool = False) -> Redrive:
    before = waiting(sqs, dead_letter_url)
    if dry_run:
        return Redrive(before, 0)
    moved = 0
    while True:
        messages = sqs.receive_message(
            QueueUrl=dead_letter_url,
            MaxNumberOfMessages=_BATCH,
            VisibilityTimeout=_VISIBILITY_S,
            MessageAttributeNames=["All"],
            WaitTimeSeconds=0,
        ).get("Messages", [])
        if not messages:
            return Redrive(before, moved)
        entries = [
            {
                "Id": str(index),
                "MessageBody": message["Body"],
                **({"MessageAttributes": message["MessageAttributes"]} if message.get("MessageAttributes") else {}),
            }
            for index, message in enumerate(messages)
        ]
        sent = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        done = [int(item["Id"]) for item in sent.get("Successful", [])]
        if done:
            sqs.delete_message_batch(
                QueueUrl=dead_letter_url,
                Entries=[{"Id": str(index), "ReceiptHandle": messages[index]["ReceiptHandle"]} for index in done],
            )
        moved += len(done)
        if sent.get("Failed"):
            failure = sent["Failed"][0]
            raise RedriveError(
                f"{moved} moved; SQS refused {len(sent['Failed'])} message(s) for {queue_url}: "
                f"{failure.get('Code')}: {failure.get('Message')} (they stay in the dead-letter queue)"
            )
