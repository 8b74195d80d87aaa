from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_requests_jobs_and_queue_depth(client: TestClient) -> None:
    job = client.post("/v1/txt2img", json={"prompt": "a", "width": 64, "height": 64}).json()
    client.post("/v1/txt2img", json={"prompt": "a", "priority": "high", "width": 64, "height": 64})
    client.post("/v1/txt2img", json={"width": 64})
    client.get(f"/v1/jobs/{job['id']}")
    client.get("/no/such/route")

    m = samples(client)

    post = (("layer", "native"), ("method", "POST"), ("route", "/v1/txt2img"))
    assert m[("sdq_http_requests_total", (*post, ("status", "202")))] == 2
    assert m[("sdq_http_requests_total", (*post, ("status", "422")))] == 1
    get_job = (("layer", "native"), ("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "200"))
    assert m[("sdq_http_requests_total", get_job)] == 1  # labelled by template, not by id
    unmatched = (("layer", "native"), ("method", "GET"), ("route", "unmatched"), ("status", "404"))
    assert m[("sdq_http_requests_total", unmatched)] == 1
    assert m[("sdq_http_request_duration_seconds_count", post)] == 3
    assert m[("sdq_jobs_submitted_total", (("model", ""), ("priority", "normal"), ("task", "txt2img")))] == 1
    assert m[("sdq_jobs_submitted_total", (("model", ""), ("priority", "high"), ("task", "txt2img")))] == 1
    assert m[("sdq_queue_depth", (("model", ""), ("priority", "normal"), ("queue", "sdq-normal")))] == 1
    assert m[("sdq_queue_depth", (("model", ""), ("priority", "high"), ("queue", "sdq-high")))] == 1
    assert m[("sdq_queue_depth", (("model", ""), ("priority", "low"), ("queue", "sdq-low")))] == 0
    assert m[("sdq_workers", ())] == 0
    assert m[("sdq_redis_up", ())] == 1


def test_metrics_count_errors_by_type_and_jobs_by_status(client: TestClient) -> None:
    job = client.post("/v1/txt2img", json={"prompt": "a", "width": 64, "height": 64}).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    client.post(f"/v1/jobs/{job['id']}/cancel")
    client.get("/v1/jobs/nope")
    client.post("/v1/txt2img", json={"width": 64})
    client.get(f"/v1/jobs/{job['id']}/events")  # the job has ended: one event, then the stream closes

    m = samples(client)

    assert m[("sdq_http_errors_total", (("status", "404"), ("type", "not_found")))] == 1
    assert m[("sdq_http_errors_total", (("status", "422"), ("type", "invalid_request")))] == 1
    assert m[("sdq_jobs_by_status", (("queue", "sdq-normal"), ("status", "canceled")))] == 1
    assert m[("sdq_jobs_by_status", (("queue", "sdq-normal"), ("status", "running")))] == 0
    assert m[("sdq_event_streams", ())] == 0  # opened and closed again
    events = (("layer", "native"), ("method", "GET"), ("route", "/v1/jobs/{job_id}/events"), ("status", "200"))
    assert m[("sdq_http_requests_total", events)] == 1


def test_metrics_per_model_workers_waiting_jobs_and_eta(client: TestClient, redis: Redis) -> None:
    from rq import Worker

    from core.catalog import LoadedModel, publish_model
    from core.queue_stats import record_pipeline_call
    from core.queues import Keys

    keys = Keys("sdq")
    for name, model in (("a-1", "ink"), ("a-2", "ink"), ("b-1", "neon")):
        worker = Worker(keys.worker_queues(model), connection=redis, name=name)
        worker.register_birth()
        publish_model(redis, worker.key, LoadedModel(name=model, inpainting_unet=False, device="cpu", dtype="float32"))
    record_pipeline_call(redis, keys, seconds=4.0, images=2, jobs=2, model="ink")  # 2 s per image and job
    for model in ("ink", "ink", "ink", "ink", "neon"):
        assert client.post("/v1/txt2img", json={"prompt": "a", "width": 64, "height": 64, "model": model}).status_code \
            == 202

    m = samples(client)

    assert m[("sdq_model_workers", (("model", "ink"),))] == 2 and m[("sdq_model_workers", (("model", "neon"),))] == 1
    assert m[("sdq_model_queued", (("model", "ink"),))] == 4 and m[("sdq_model_queued", (("model", "neon"),))] == 1
    assert m[("sdq_model_queue_eta_seconds", (("model", "ink"),))] == 4.0  # 4 jobs, 2 workers, 2 s each
    assert ("sdq_model_queue_eta_seconds", (("model", "neon"),)) not in m  # no speed recorded yet
    normal = (("model", "ink"), ("priority", "normal"), ("queue", "sdq-model-ink-normal"))
    assert m[("sdq_queue_depth", normal)] == 4
    assert m[("sdq_jobs_submitted_total", (("model", "neon"), ("priority", "normal"), ("task", "txt2img")))] == 1
