"""c8-exporter: fleet export to NATS JetStream.

    broker subscription (export.events) + the detector's alert file -> spool (disk, bounded)
        -> JetStream (c8.<sensor_id>.<category>, c8.<sensor_id>.alerts)

Messages are the broker's columnar batches as they came (msgpack maps, one per
batch), each with a Nats-Msg-Id so JetStream drops the duplicates a retry makes.
The consumer side (``c8ctl fleet``) lives in c8.clients.fleet.
"""

SUBJECT_PREFIX = "c8"
STREAM_SUBJECTS = [f"{SUBJECT_PREFIX}.>"]


def subject(sensor_id: str, suffix: str) -> str:
    """The subject of a sensor's messages: c8.<sensor_id>.<category | alerts | status>."""
    return f"{SUBJECT_PREFIX}.{sensor_id}.{suffix}"
