"""Alert outputs: stdout, file (JSON lines, rotated), webhook, syslog (RFC 5424).

``build_outputs(config)`` turns the config's ``alert_output.outputs`` list into
outputs, each wrapped by its own AlertLimiter.
"""

from c8.detections.outputs.base import Output
from c8.detections.outputs.factory import OutputConfigError, build_output, build_outputs

__all__ = ["Output", "OutputConfigError", "build_output", "build_outputs"]
