"""The filter language: text -> AST -> numpy masks, kernel filters, eBPF bounds.

One parser serves subscriptions and detection rules:
``filename like "*foo*" and (ret >= 0 or uid == 0)``. Data flow:
parse (parser) -> check (against c8.schema) -> compile_mask (broker, on whole
batches) / kernel_filter (pushed to collectors) / prefix_filter (eBPF);
evaluate is the per-event reference the masks are tested against.
"""

from c8.expr.check import check
from c8.expr.errors import ExprError, ExprFieldError, ExprSyntaxError, ExprTypeError
from c8.expr.evaluate import evaluate
from c8.expr.kernel import kernel_filter, kernel_filter_any
from c8.expr.kinds import kinds_of
from c8.expr.mask import compile_mask
from c8.expr.nodes import And, Compare, In, IsNull, Like, Node, Not, Or, fields, nnf, unparse
from c8.expr.parser import parse
from c8.expr.prefix import prefix_filter

__all__ = [
    "And", "Compare", "ExprError", "ExprFieldError", "ExprSyntaxError", "ExprTypeError", "In",
    "IsNull", "Like", "Node", "Not", "Or", "check", "compile_mask", "evaluate", "fields",
    "kernel_filter", "kernel_filter_any", "kinds_of", "nnf", "parse", "prefix_filter", "unparse",
]
