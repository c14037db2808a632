"""docs/api.md stays true: its receiver-side signature check accepts what the relay signs (and
refuses what it should), and every API path it lists is in the OpenAPI schema and vice versa."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from relay.api import signing

DOC = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()


def documented_check():
    code = re.search(r"```python\n(.*?)```", DOC, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    return namespace["check_relay_signature"]


def test_the_documented_python_check_verifies_relay_signatures():
    check = documented_check()
    body = b'{"data":{},"id":"x","type":"session.ended"}'
    now = int(time.time())
    header = signing.signature(secret="whsec_doc", timestamp=now, body=body)
    assert check("whsec_doc", str(now), header, body)
    assert not check("whsec_doc", str(now), header, body + b"x")
    assert not check("whsec_other", str(now), header, body)
    old = now - 3600
    assert not check("whsec_doc", str(old), signing.signature(secret="whsec_doc", timestamp=old, body=body), body)
    assert not check("whsec_doc", "not-a-number", header, body)


@pytest.mark.django_db
def test_every_documented_path_is_in_the_schema_and_back():
    import yaml

    schema = yaml.safe_load(APIClient().get("/api/schema/").content)
    in_schema = {re.sub(r"\{[^}]+\}", "{}", p) for p in schema["paths"]}
    listed = set()
    for row in re.findall(r"^\| `?([A-Z, ]+ /api/v1/[^|]*)\|", DOC, flags=re.M):
        for path in re.findall(r"/api/v1/[^` ]*", row):
            listed.add(re.sub(r"\{[^}]+\}", "{}", path.split("?")[0]))
    assert listed - in_schema == set(), "documented but not served"
    assert in_schema - listed == set(), "served but not in docs/api.md"
