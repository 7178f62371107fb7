"""How obstore's errors map to ObjectStoreUnavailable (retry) or a final
ObjectStoreError. The integration tests cover refused connections, 403 and 404
against the real server; the server statuses it will not produce on demand (5xx,
408, 429) are checked here on obstore's message format, as it printed them."""

from __future__ import annotations

import pytest

from store import ObjectStoreUnavailable
from store._s3 import _translate

REPLY = ("Generic S3 error: Error performing PUT http://[::1]:1/b/k in 2ms - Server "
         "returned non-2xx status code: {status} {reason}: <?xml version=\"1.0\"?><Error>"
         "<Code>{code}</Code><Message></Message></Error>\n\nDebug source: ...")


@pytest.mark.parametrize(("status", "code", "unavailable"), [
    (500, "InternalError", True),
    (503, "SlowDown", True),
    (503, "ServiceUnavailable", True),
    (429, "TooManyRequests", True),
    (408, "RequestTimeout", True),
    (400, "InvalidRequest", False),
    (403, "AccessDenied", False),
    (404, "NoSuchBucket", False),
])
def test_status_decides_retry(status: int, code: str, unavailable: bool) -> None:
    error = _translate(Exception(REPLY.format(status=status, reason="X", code=code)),
                       "put s3://b/k")
    assert isinstance(error, ObjectStoreUnavailable) is unavailable
    assert str(error).startswith("put s3://b/k: ")
    assert f"HTTP {status} {code}" in str(error)
    assert "\n" not in str(error)


def test_no_status_is_a_transport_error() -> None:
    error = _translate(Exception(
        "Generic S3 error: Error performing PUT http://[::1]:1/b/k in 101ms, after 1 "
        "retries, max_retries: 1, retry_timeout: 3s  - HTTP error: error sending request\n"
        "\nDebug source: ..."), "put s3://b/k")
    assert isinstance(error, ObjectStoreUnavailable)
    assert str(error) == "put s3://b/k: cannot reach S3 (HTTP error: error sending request)"
