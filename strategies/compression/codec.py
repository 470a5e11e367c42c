"""The codec interface, and ``none``: the upload travels as it is.

``encode(upload, state)`` runs on the client and returns the records that travel (Flower
``ArrayRecord``s only, never pickles); per-client codec state (residuals, error
feedback) lives in ``state``, the node's ``Context.state``. ``decode(content, sent)``
runs on the server on each reply's content, with the arrays the server sent that round,
and returns the content the strategy aggregates: the model under ``"arrays"`` plus the
strategy's extra records, whatever the codec did on the wire.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, RecordDict

from ..records import to_record
from ..upload import Upload


class Codec:
    name = "?"

    def encode(self, upload: Upload, state: RecordDict) -> RecordDict:
        raise NotImplementedError

    def decode(self, content: RecordDict, sent: ArrayRecord) -> RecordDict:
        raise NotImplementedError


class IdentityCodec(Codec):
    """The local weights as one ArrayRecord named ``arrays``, extras beside it (the bytes of a
    plain Flower FedAvg reply)."""

    name = "none"

    def encode(self, upload: Upload, state: RecordDict) -> RecordDict:
        return RecordDict({"arrays": to_record(upload.weights), **upload.extras})

    def decode(self, content: RecordDict, sent: ArrayRecord) -> RecordDict:
        return content
