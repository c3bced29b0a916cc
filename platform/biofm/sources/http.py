"""HTTP GET with retries: one way for the VitalDB API source and the BUT-PPG download."""

from __future__ import annotations

import time
import urllib.error
import urllib.request


def get(url: str, attempts: int = 4, timeout_s: float = 60.0, backoff_s: float = 1.0, method: str = "GET"):
    """``urlopen(url)``, trying ``attempts`` times in all: connection errors and HTTP 5xx are
    retried after ``backoff_s`` seconds, doubling each time; other HTTP errors (404) raise at once."""
    for attempt in range(attempts):
        try:
            return urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout_s)
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == attempts - 1:
                raise
        except OSError:
            if attempt == attempts - 1:
                raise
        time.sleep(backoff_s * 2 ** attempt)
