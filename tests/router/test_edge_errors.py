"""Internal errors reach clients without traceback, actor id, pid, address, namespace or path
(issue 12, item 6: a Ray traceback with all of those reached a client)."""

from __future__ import annotations

import logging

import grpc
import httpx
import pytest

from engine.errors import KVTransferError, SplitServeError
from router import convert
from router.errors import classify, client_message, grpc_status, http_error, outcome_code
from tests.router.fake_backend import RAY_TASK_ERROR_TEXT

# str() of a RayActorError when a worker process died (Ray 2.x's format).
RAY_ACTOR_DIED_TEXT = (
    "The actor died unexpectedly before finishing this task.\n"
    "\tclass_name: DecodeWorker\n"
    "\tactor_id: 5e4f6b1a2c3d4e5f6a7b8c9d01000000\n"
    "\tpid: 48213\n"
    "\tname: decode-1\n"
    "\tnamespace: 7c1e0d6a-3f6b-4b0e-9d5e-2c7d7f5e9a11\n"
    "\tip: 10.128.0.7\n"
    "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
    "Worker exit detail: Worker unexpectedly exits with a connection error code 2.")

FORBIDDEN = ("48213", "10.128.0.7", "5e4f6b1a2c3d4e5f6a7b8c9d01000000", "pid", "actor_id",
             "7c1e0d6a", "namespace", "/home/ops", "worker.py", "Traceback", "File ",
             "0x7f3a2b1c4d50", "ray::", "6379")


def assert_clean(message: str) -> None:
    leaked = [f for f in FORBIDDEN if f in message]
    assert not leaked, f"{leaked} in {message!r}"
    assert "\n" not in message


def test_a_ray_task_error_becomes_its_own_message():
    message = client_message(RAY_TASK_ERROR_TEXT)
    assert_clean(message)
    assert message.startswith("prompt token ids must be in [0, 1024)")


# str() of a RayTaskError(PrefillFailed) as Ray 2.x prints it: the first line in terminal
# colours, the exception's class not named *Error (an API probe got the coloured first line)
RAY_PREFILL_FAILED_TEXT = (
    "\x1b[36mray::PrefillWorker.prefill()\x1b[39m (pid=48213, ip=10.128.0.7, "
    "actor_id=5e4f6b1a2c3d4e5f6a7b8c9d01000000, "
    "repr=<prefill_worker.worker.PrefillWorker object at 0x7f3a2b1c4d50>)\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/home/ops/splitserve/prefill_worker/worker.py", line 123, in prefill\n'
    "    return future.result(timeout_s)\n"
    "prefill_worker.worker.PrefillFailed: request r1#0.a1b2c3 failed: the engine step failed")


def test_a_ray_error_of_any_exception_class_becomes_its_own_message():
    message = client_message(RAY_PREFILL_FAILED_TEXT)
    assert_clean(message)
    assert "\x1b" not in message
    assert message == "request r1#0.a1b2c3 failed: the engine step failed"


def test_terminal_colour_codes_never_reach_a_client():
    assert client_message("\x1b[31mworker failed\x1b[0m: out of blocks") == (
        "worker failed: out of blocks")


def test_a_ray_actor_error_keeps_what_happened_only():
    message = client_message(RAY_ACTOR_DIED_TEXT)
    assert_clean(message)
    assert message == "The actor died unexpectedly before finishing this task."


@pytest.mark.parametrize("exc", [
    SplitServeError(RAY_TASK_ERROR_TEXT),
    SplitServeError(f"decode worker decode-1 failed: {RAY_ACTOR_DIED_TEXT}"),
    KVTransferError("request r7: KV transfer with decode-2 (10.128.0.7:41231) failed: timed "
                    "out after 30.0 s waiting for the payload"),
    KVTransferError("request r7: KV transfer with decode-2 ([fd00::17]:41231) failed"),
    RuntimeError(RAY_TASK_ERROR_TEXT),  # unexpected: INTERNAL, nothing of it shown
])
def test_every_edge_message_is_clean(exc):
    assert_clean(classify(exc).message)
    assert_clean(grpc_status(exc)[1])
    assert_clean(http_error(exc)[1]["error"]["message"])


def test_transfer_errors_keep_their_meaning():
    message = classify(KVTransferError(
        "request r7: KV transfer with decode-2 (10.128.0.7:41231) failed: timed out after "
        "30.0 s waiting for the payload")).message
    assert message == ("request r7: KV transfer with decode-2 (<address>) failed: timed out "
                       "after 30.0 s waiting for the payload")


def test_the_routers_own_request_id_reaches_the_client_a_ray_id_does_not():
    """A client matches its failed request to the server's logs by the id the router gave
    it (req-<32 hex>); Ray's hex ids of the same length are still hidden."""
    rid, ray_id = "req-" + "0f" * 16, "5a" * 14
    message = client_message(f"request {rid} failed after 3 retries: worker decode-4 died: "
                             f"actor {ray_id} is gone; retry the request")
    assert message == (f"request {rid} failed after 3 retries: worker decode-4 died: "
                       "actor <id> is gone; retry the request")


def test_an_error_shown_to_a_client_is_logged_once(caplog):
    """The outcome counter classifies an error too; only the edge's answer logs it."""
    exc = SplitServeError(f"decode worker decode-1 failed: {RAY_ACTOR_DIED_TEXT}")
    with caplog.at_level(logging.WARNING, logger="router.errors"):
        assert outcome_code(exc) == "INTERNAL"
        http_error(exc)
    assert len([r for r in caplog.records if "sent to the client" in r.message]) == 1


@pytest.mark.parametrize("message", [
    "temperature=-1.0 must be >= 0", "the prompt is empty",
    "model 'x' does not exist; this server serves 'fake-model' (see /v1/models or ListModels)",
    "request_id must be 1 to 128 characters of letters, digits and - _ . : @ = + (got 600 "
    "characters)"])
def test_plain_messages_pass_unchanged(message):
    assert client_message(message) == message


def test_a_worker_traceback_does_not_reach_http_or_grpc_clients(stack):
    resp = httpx.post(f"{stack.base_url}/v1/completions", timeout=10,
                      json={"model": "fake-model", "prompt": "raytrace", "max_tokens": 2})
    assert resp.status_code == 500
    assert_clean(resp.json()["error"]["message"])
    assert "prompt token ids must be in [0, 1024)" in resp.json()["error"]["message"]
    stream = httpx.post(f"{stack.base_url}/v1/completions", timeout=10, json={
        "model": "fake-model", "prompt": "raytrace", "max_tokens": 2, "stream": True})
    assert stream.status_code == 500  # before the response started: a status, not in-band
    assert_clean(stream.text)
    with grpc.insecure_channel(stack.grpc_address) as channel:
        stub = convert.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(convert.build_request("raytrace"), timeout=10))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert_clean(err.value.details())


def test_an_unexpected_exception_is_a_clean_500_on_a_kept_connection(tokenizer):
    """An exception no handler classifies used to reach Starlette's last-resort handler,
    which answers and re-raises; uvicorn then dropped the keep-alive connection."""
    import http.client
    import json

    from router.config import RouterConfig
    from tests.router.conftest import Stack, make_backend

    s = Stack(make_backend(tokenizer), tokenizer, RouterConfig(model_name="boom"))
    try:
        def explode():
            raise RuntimeError(RAY_TASK_ERROR_TEXT)

        s.service.list_models = explode
        conn = http.client.HTTPConnection("127.0.0.1", s.http.port, timeout=10)
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 500 and body["error"]["type"] == "internal_error"
        assert body["error"]["message"] == (
            "internal server error; the server log has the details")
        sock = conn.sock
        conn.request("GET", "/health")
        again = conn.getresponse()
        assert again.status == 200 and json.loads(again.read())["status"] == "ok"
        assert conn.sock is sock  # the same connection
        conn.close()
    finally:
        s.close()


def test_every_failed_prompt_of_a_batch_is_logged_not_only_the_answered_one(stack, caplog):
    """Only the first failure of a batch reaches the client (and the edge's log); the
    others' internal errors are logged too, or they would go unseen."""
    with caplog.at_level(logging.WARNING):
        resp = httpx.post(f"{stack.base_url}/v1/completions", timeout=10, json={
            "model": "fake-model", "prompt": ["raytrace a", "raytrace b"], "max_tokens": 4})
    assert resp.status_code == 500, resp.text
    answered = [r for r in caplog.records if "sent to the client" in r.getMessage()]
    others = [r for r in caplog.records if "another prompt of the batch" in r.getMessage()]
    assert len(answered) == 1 and len(others) == 1
