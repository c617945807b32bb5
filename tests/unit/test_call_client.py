"""A call stage's client without a service: what names a request, what it sends."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from podpipe.model.pipeline import Call
from podpipe.runtime.stage import call


def _name(client: call.Client, rows: pa.Table) -> str:
    return client.name(client.encode(rows))


def test_a_request_is_named_by_its_url_body_and_the_headers_of_memo_key_only():
    rows = pa.table({"x": [1, 2, 3]})
    env = {"TOKEN": "a", "HOST": "geo"}
    keyed = Call(url="http://$(HOST)/v1", headers={"Authorization": "Bearer $(TOKEN)",
                                                    "X-Model": "m1"}, memo_key=("X-Model",))
    one = call.Client(keyed, 1, env, "call")
    assert one.url == "http://geo/v1" and one.headers["Authorization"] == "Bearer a"
    same = call.Client(keyed, 1, {**env, "TOKEN": "b"}, "call")  # a new token: same request
    assert _name(one, rows) == _name(same, rows)
    other = Call(url=keyed.url, headers={**keyed.headers, "X-Model": "m2"},
                 memo_key=("X-Model",))  # another model: another request
    assert _name(one, rows) != _name(call.Client(other, 1, env, "call"), rows)
    assert _name(one, rows) != _name(one, rows.slice(1))  # another body


def test_json_requests_are_row_objects_and_answers_must_match_them_row_for_row():
    client = call.Client(Call(url="http://svc/", format="json"), 1, {}, "call")
    rows = pa.table({"x": [1, 2]})
    assert json.loads(client.encode(rows)) == [{"x": 1}, {"x": 2}]
    assert client.decode(b'[{"y": 2}, {"y": 4}]', rows, 0) == [{"y": 2}, {"y": 4}]
    with pytest.raises(call.CallFailed, match="has 1 rows, the request 2"):
        client.decode(b'[{"y": 2}]', rows, 3)
    with pytest.raises(call.CallFailed, match="is not json"):
        client.decode(b"<html>busy</html>", rows, 3)


def test_an_unset_variable_is_named_with_the_field():
    with pytest.raises(KeyError, match=r"call.headers.Authorization: \$\(TOKEN\) is not set"):
        call.Client(Call(url="http://svc/", headers={"Authorization": "$(TOKEN)"}), 1, {},
                    "call")


def test_a_retry_after_header_is_seconds_or_a_date():
    assert call._retry_after("2") == 2.0
    assert call._retry_after(None) is None and call._retry_after("soon") is None
    assert call._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def _arrow(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("fmt", ["arrow", "json"])
def test_an_answer_must_echo_the_echo_columns_as_they_were_sent(fmt):
    client = call.Client(Call(url="http://svc/", format=fmt, echo=("k",)), 1, {}, "call")
    rows = pa.table({"k": pa.array([7, 8], pa.int64()), "x": [1, 2]})

    def answer(keys: list) -> bytes:
        if fmt == "json":
            return json.dumps([{"k": k, "y": 0} for k in keys]).encode()
        return _arrow(pa.table({"k": pa.array(keys, pa.int32()), "y": [0, 0]}))
    client.decode(answer([7, 8]), rows, 0)  # another integer width is the same value
    with pytest.raises(call.CallFailed, match=r"row 1's 'k' is 9, sent as 8.*another request"):
        client.decode(answer([7, 9]), rows, 4)
    with pytest.raises(call.CallFailed, match="'k' is not a column of the rows sent"):
        client.decode(answer([7, 8]), rows.drop(["k"]), 4)
    if fmt == "arrow":
        with pytest.raises(call.CallFailed, match="it has no column 'k'"):
            client.decode(_arrow(pa.table({"y": [0, 0]})), rows, 4)
