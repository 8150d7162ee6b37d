"""The middleware's route path: the request path as the routes match it, without --root-path's prefix (Starlette's
router strips it the same way; its helper for that is private, so the middleware has its own)."""

from __future__ import annotations

import pytest

from nccr_guard.server.middleware import get_route_path


@pytest.mark.parametrize(
    ("root", "path", "want"),
    [
        ("", "/v2/health/live", "/v2/health/live"),
        ("/guard", "/guard/v2/health/live", "/v2/health/live"),
        ("/guard", "/guard", ""),
        ("/guard", "/guardian/metrics", "/guardian/metrics"),  # a longer name, not the prefix
        ("/guard", "/metrics", "/metrics"),  # a proxy that strips the prefix itself
    ],
)
def test_the_root_path_is_stripped_only_as_a_whole_segment(root, path, want):
    assert get_route_path({"type": "http", "path": path, "root_path": root}) == want
