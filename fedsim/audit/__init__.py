"""The per-round privacy audit: the server attacks what a client really uploaded (``observer``; threat model
and codecs in its docstring). Who is attacked and how (``targets``), the gradient threat's query (``query``),
the attack jobs run off the training path (``jobs``), membership inference on the attacked model (``membership``:
the loss threshold; ``lira``: offline LiRA with shadows fedsim trains)."""

from .jobs import AuditJob, run_job
from .observer import AuditObserver
from .query import QUERY_GRADIENT, answer_gradient_query, batch_gradient
from .targets import AUDIT_STREAM, audited_round, auto_attack, choose_targets, query_batch

__all__ = ["AUDIT_STREAM", "QUERY_GRADIENT", "AuditJob", "AuditObserver", "answer_gradient_query", "audited_round",
           "auto_attack", "batch_gradient", "choose_targets", "query_batch", "run_job"]
