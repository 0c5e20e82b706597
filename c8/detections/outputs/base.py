"""The interface every alert output implements."""

from __future__ import annotations


class Output:
    """An alert destination. ``send`` takes an Alert (or its dict form);
    ``notice`` takes an operational line (the alert limiter's summaries) and,
    optionally, its details as a map (JSON outputs include them)."""

    type = "base"

    def __init__(self, name: str | None = None):
        self.name = name or self.type

    def send(self, alert) -> None:
        raise NotImplementedError

    def notice(self, text: str, details: dict | None = None) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Called about once a second by the detector (reports of drops, ...)."""

    def close(self) -> None:
        """Flush and release resources; the output is not used afterwards."""

    def stats(self) -> dict:
        return {}


def alert_dict(alert) -> dict:
    """The JSON-able form of an alert given as an Alert or a dict."""
    return alert if isinstance(alert, dict) else alert.to_dict()


def notice_dict(text: str, details: dict | None = None) -> dict:
    return {"type": "notice", "message": text, **(details or {})}
