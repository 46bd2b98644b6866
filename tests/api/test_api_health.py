"""/healthz, /readyz (with a real and an unreachable broker) and the OpenAPI schema."""

from __future__ import annotations

from api_support import Env

CONTRACT = {
    "/v1/teachers": {"get", "post"},
    "/v1/teachers/{teacher_id}": {"get"},
    "/v1/datasets": {"get", "post"},
    "/v1/datasets/{dataset_id}": {"get"},
    "/v1/jobs": {"get", "post"},
    "/v1/jobs/{job_id}": {"get"},
    "/v1/jobs/{job_id}/events": {"get"},
    "/v1/jobs/{job_id}/cancel": {"post"},
    "/v1/jobs/{job_id}/artifacts/{name}": {"get"},
    "/healthz": {"get"},
    "/readyz": {"get"},
}


def test_healthz(env: Env) -> None:
    resp = env.client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


def test_readyz_with_database_and_broker_up(env: Env) -> None:
    resp = env.client.get("/readyz")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_names_an_unreachable_broker(env: Env) -> None:
    client = env.client_with(broker_url="redis://127.0.0.1:1/0")
    resp = client.get("/readyz")
    assert resp.status_code == 503, resp.text
    body = resp.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"] != "ok" and body["checks"]["broker"].startswith("error")


def test_readyz_names_an_unreachable_database(env: Env) -> None:
    client = env.client_with(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    resp = client.get("/readyz")
    assert resp.status_code == 503, resp.text
    checks = resp.json()["checks"]
    assert checks["database"].startswith("error") and checks["broker"] == "ok"


def test_openapi_lists_every_path_of_the_contract(env: Env) -> None:
    resp = env.client.get("/openapi.json")
    assert resp.status_code == 200
    paths = resp.json()["paths"]
    for path, methods in CONTRACT.items():
        assert path in paths, f"{path} missing from the OpenAPI schema"
        assert methods <= set(paths[path]), f"{path}: {sorted(methods - set(paths[path]))} missing"


def test_unknown_route_is_json_404(env: Env) -> None:
    resp = env.client.get("/v1/nothing", headers=env.auth("a"))
    assert resp.status_code == 404
    body = resp.json()
    assert body["code"] == "not_found" and body["message"]


def test_an_unreachable_database_answers_503_database_unavailable_never_500(env: Env) -> None:
    """Every route, the key check in front of them included, and both backends: 503 with Retry-After."""
    down = "postgresql+psycopg://postgres@127.0.0.1:1/gone" if env.kind == "postgres" else \
        f"sqlite:///{env.settings.data_dir}/missing-folder/none.db"
    client = env.client_with(database_url=down)
    for method, path, kwargs in (("get", "/v1/jobs", {}), ("get", "/v1/teachers", {}),
                                 ("post", "/v1/jobs", {"json": {"teacher_id": "t", "dataset_id": "d",
                                                                "student": {"arch": "resnet8"}}}),
                                 ("post", "/v1/jobs/job_x/cancel", {}), ("get", "/v1/jobs/job_x/events", {})):
        resp = getattr(client, method)(path, headers=env.auth(), **kwargs)
        assert resp.status_code == 503, (path, resp.status_code, resp.text)
        assert resp.json()["code"] == "database_unavailable", resp.text
        assert resp.headers["Retry-After"] == "5"
    assert client.get("/healthz").status_code == 200  # alive: only not ready
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["errors"][0]["code"] == "database_unreachable"
