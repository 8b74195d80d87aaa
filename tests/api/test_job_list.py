"""`GET /v1/jobs`: the caller's jobs, newest first, in pages, optionally by status."""

from __future__ import annotations

from fastapi.testclient import TestClient
from redis import Redis
from rq.job import Job

from core.queues import Keys

TINY = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4}


def submit_many(client: TestClient, count: int) -> list[str]:
    return [client.post("/v1/txt2img", json={**TINY, "seed": i}).json()["id"] for i in range(count)]


def test_pages_go_newest_first_and_end_with_a_null_cursor(client: TestClient) -> None:
    ids = submit_many(client, 5)
    pages, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = client.get("/v1/jobs", params=params).json()
        pages.append([j["id"] for j in body["jobs"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    newest_first = ids[::-1]
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5]]
    first = client.get("/v1/jobs").json()["jobs"][0]
    assert first["status"] == "queued" and first["queue_position"] == 4  # full job views


def test_status_filter_and_new_jobs_do_not_shift_pages(client: TestClient) -> None:
    ids = submit_many(client, 4)
    for job_id in ids[:2]:
        client.post(f"/v1/jobs/{job_id}/cancel")
    canceled = client.get("/v1/jobs", params={"status": "canceled"}).json()
    assert [j["id"] for j in canceled["jobs"]] == [ids[1], ids[0]]

    page = client.get("/v1/jobs", params={"limit": 2}).json()
    submit_many(client, 1)  # arrives at the front; the next page still starts after ids[2]
    rest = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[1], ids[0]]


def test_expired_jobs_leave_the_list_and_the_index(client: TestClient, redis: Redis, keys: Keys) -> None:
    ids = submit_many(client, 3)
    redis.delete(Job.key_for(ids[1]))

    assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [ids[2], ids[0]]
    assert {m.decode() for m in redis.zrange(keys.owner_jobs(None), 0, -1)} == {ids[0], ids[2]}


def test_bad_query_parameters_are_422_naming_them(client: TestClient) -> None:
    for params, field in [({"cursor": "not-a-cursor"}, "cursor"), ({"limit": 0}, "limit"), ({"limit": 101}, "limit"),
                          ({"status": "done"}, "status")]:
        r = client.get("/v1/jobs", params=params)
        assert r.status_code == 422, params
        assert r.json()["error"]["field"] == field
