"""/api/v1/connections: named SQL connections whose URL stays in an environment variable."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from tests.app.conftest import AUTH


def test_add_list_remove_a_connection(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAREHOUSE_URL", "postgresql://batch:pa55word@db.internal/warehouse")
    assert client.post("/api/v1/connections", json={"name": "warehouse", "url_env": "WAREHOUSE_URL"}).status_code == 401
    resp = client.post("/api/v1/connections", json={"name": "warehouse", "url_env": "WAREHOUSE_URL"}, headers=AUTH)
    assert resp.status_code == 201, resp.json
    assert resp.json["url_env"] == "WAREHOUSE_URL" and resp.json["url_set"] is True
    again = client.post("/api/v1/connections", json={"name": "warehouse", "url_env": "OTHER"}, headers=AUTH)
    assert again.status_code == 409
    listed = client.get("/api/v1/connections")
    assert [c["name"] for c in listed.json["connections"]] == ["warehouse"]
    assert "pa55word" not in listed.get_data(as_text=True)
    assert client.delete("/api/v1/connections/warehouse").status_code == 401
    assert client.delete("/api/v1/connections/warehouse", headers=AUTH).json == {"deleted": "warehouse"}
    assert client.delete("/api/v1/connections/warehouse", headers=AUTH).status_code == 404
    assert client.get("/api/v1/connections").json == {"connections": []}


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "w", "url": "postgresql://u:p@h/d"}, "url"),
    ({"name": "w", "url_env": "postgresql://u:p@h/d"}, "url_env"),
    ({"name": "bad name", "url_env": "X"}, "name"),
    ({"url_env": "X"}, "name"),
])
def test_refused_connections_name_the_field(client: FlaskClient, body: dict[str, str], field: str) -> None:
    resp = client.post("/api/v1/connections", json=body, headers=AUTH)
    assert resp.status_code == 400
    assert resp.json["field"] == field
    assert "u:p@h" not in resp.get_data(as_text=True)
