"""/v1/me, /v1/students, and the pages the API serves itself: the dashboard and the self-hosted docs."""

from __future__ import annotations

import re

import pytest
from api_support import Env, assert_error

from app.api.routes.catalog import TIMM_COUNTED
from app.api.routes.ui import STATIC
from worker.distill.students import model_params


def test_me_names_the_key_tenant_and_says_keys_are_needed(env: Env) -> None:
    for who, name in (("a", "tenant-a"), ("b", "tenant-b")):
        resp = env.client.get("/v1/me", headers=env.auth(who))
        assert resp.status_code == 200, resp.text
        assert resp.json()["tenant"]["name"] == name and resp.json()["auth"] == "api_key"
    assert resp.json()["tenant"]["id"] != env.client.get("/v1/me", headers=env.auth("a")).json()["tenant"]["id"]
    assert_error(env.client.get("/v1/me", headers=env.auth("revoked")), 401, "invalid_api_key")


def test_me_with_keys_switched_off_is_the_local_tenant(env: Env) -> None:
    resp = env.client_with(auth="disabled").get("/v1/me")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"tenant": {"id": resp.json()["tenant"]["id"], "name": "local"}, "auth": "disabled"}


def test_students_are_filtered_by_name_with_parameter_counts_for_the_class_count(env: Env) -> None:
    resp = env.client.get("/v1/students", params={"filter": "resnet", "num_classes": 7}, headers=env.auth())
    assert resp.status_code == 200, resp.text
    items = {i["arch"]: i for i in resp.json()["items"]}
    assert "resnet8" in items and "resnet18" in items and all("resnet" in a for a in items)
    assert items["resnet8"]["family"] == "small" and items["resnet18"]["family"] == "torchvision"
    assert items["resnet8"]["parameters"] == model_params("resnet8", 7) != model_params("resnet8", 10)
    assert items["resnet8"]["min_input_size"] <= items["resnet8"]["default_input_size"]


def test_students_without_a_filter_leave_timm_out_and_limit_truncates(env: Env) -> None:
    every = env.client.get("/v1/students", params={"family": "small"}, headers=env.auth()).json()
    assert every["items"] and {i["family"] for i in every["items"]} == {"small"} and not every["truncated"]
    assert not any(i["arch"].startswith("timm:") for i in
                   env.client.get("/v1/students", headers=env.auth()).json()["items"])
    short = env.client.get("/v1/students", params={"family": "small", "limit": 2}, headers=env.auth()).json()
    assert [i["arch"] for i in short["items"]] == [i["arch"] for i in every["items"][:2]] and short["truncated"]
    assert_error(env.client.get("/v1/students", params={"family": "nope"}, headers=env.auth()), 422)


def test_students_list_timm_models_when_filtered(env: Env) -> None:
    resp = env.client.get("/v1/students", params={"filter": "mobilenetv3_small_050"}, headers=env.auth())
    assert resp.status_code == 200, resp.text
    assert "timm:mobilenetv3_small_050" in [i["arch"] for i in resp.json()["items"]]


def test_root_and_ui_lead_to_the_dashboard_page_whose_assets_are_all_served_here(env: Env) -> None:
    for path in ("/", "/ui"):
        resp = env.client.get(path, follow_redirects=False)
        assert resp.status_code == 307 and resp.headers["location"] == "/ui/"
    page = env.client.get("/ui/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # no API key needed for the page itself: it asks for one when /v1/me says so
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
    for asset in assets:
        if asset.startswith(("#", "/docs", "/redoc", "data:")):
            continue
        resp = env.client.get(asset if asset.startswith("/") else f"/ui/{asset}")
        assert resp.status_code == 200, (asset, resp.status_code)
    vendored = STATIC / "vendor"
    assert (vendored / "README.md").is_file(), "every vendored file names its version and licence"


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_load_their_scripts_from_this_server(env: Env, path: str) -> None:
    page = env.client.get(path)
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/docs-assets/") for a in assets), assets
    for asset in assets:
        resp = env.client.get(asset)
        assert resp.status_code == 200 and len(resp.content) > 1000, asset


def test_students_do_not_build_a_regnet_to_count_it(env: Env) -> None:
    # counting regnet_y_128gf's parameters for 10 classes would take a 2.6 GB build: the list says null
    resp = env.client.get("/v1/students", params={"filter": "regnet_y_128gf", "num_classes": 10}, headers=env.auth())
    assert [(i["arch"], i["parameters"]) for i in resp.json()["items"]] == [("regnet_y_128gf", None)]
    resp = env.client.get("/v1/students", params={"filter": "regnet_y_128gf", "num_classes": 1000},
                          headers=env.auth())
    assert resp.json()["items"][0]["parameters"] > 600_000_000  # recorded with torchvision's weights
    small = env.client.get("/v1/students", params={"filter": "regnet_x_400mf", "num_classes": 10},
                           headers=env.auth()).json()["items"]
    assert small[0]["parameters"] == model_params("regnet_x_400mf", 10)  # small enough to build and count


def test_a_filter_matching_many_timm_models_lists_them_without_counting_them(env: Env) -> None:
    resp = env.client.get("/v1/students", params={"filter": "mobilenet"}, headers=env.auth())
    items = resp.json()["items"]
    timm = [i for i in items if i["family"] == "timm"]
    assert len(timm) > TIMM_COUNTED and all(i["parameters"] is None for i in timm)
    assert all(i["parameters"] for i in items if i["family"] != "timm")  # torchvision's still counted
    narrow = env.client.get("/v1/students", params={"filter": "mobilenetv3_small_050"}, headers=env.auth())
    assert narrow.json()["items"][0]["parameters"] == model_params("timm:mobilenetv3_small_050", 10)
