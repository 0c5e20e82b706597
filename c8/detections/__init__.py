"""Detections: rules -> alerts -> outputs.

An ordinary client of the broker: ``main.run`` subscribes to what the loaded
rules need (``rules.Engine.subscription_spec``), evaluates each batch with
numpy masks (``rules.Engine.evaluate``), and sends each alert through every
configured output (``outputs``), each behind its own alert limiter
(``limiter.AlertLimiter``).
"""
