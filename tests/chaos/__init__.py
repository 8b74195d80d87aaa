"""Chaos drills: real processes (Redis with an append-only file, the API, workers, the webhook sender) killed,
restarted, filled up and flooded while jobs run, then the end state checked from Redis, the API, storage and a
webhook receiver. ``tests/chaos/drills.py`` holds the drills; ``bench/chaos.py`` runs them longer (``make chaos``)."""
