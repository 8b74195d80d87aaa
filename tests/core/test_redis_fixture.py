from redis import Redis


def test_fixture_gives_a_clean_real_redis(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.set("k", "v")
    assert client.get("k") == b"v"
