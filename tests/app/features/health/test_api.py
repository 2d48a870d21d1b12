import httpx


async def test_health_answers(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.json()["status"] == "healthy"


async def test_paths_answer_with_and_without_trailing_slash(client: httpx.AsyncClient) -> None:
    for path in ("/config", "/config/", "/histories", "/histories/", "/styles", "/styles/"):
        response = await client.get(path)
        assert response.status_code == 200, path


async def test_every_route_has_a_docstring(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    operations = [op for item in spec["paths"].values() for op in item.values()]
    assert len(operations) >= 15
    assert all(op.get("description") for op in operations)
