"""The floor modules on their own, without a server: the protocol's parsing, the stream config's rules, the
settings read from the environment, the auth checks, and the one client-error type."""

from __future__ import annotations

import base64
import json
import pickle

import pytest

from service import auth, protocol
from service.config import PROCESSORS, Settings, StreamConfig, valid_stream_id
from service.errors import ClientError
from tests.helpers import solid_jpeg

JPEG = solid_jpeg((200, 40, 40), (32, 32))


def client_error(fn, *args) -> ClientError:
    with pytest.raises(ClientError) as caught:
        fn(*args)
    return caught.value


# ---- protocol ----------------------------------------------------------------------------------


def test_text_messages_parse_to_typed_messages():
    frame = protocol.parse_text(json.dumps({"type": "frame", "frame": base64.b64encode(JPEG).decode(), "ts": 5}),
                                1 << 20)
    assert frame == protocol.FrameMessage(JPEG, 5.0)
    url = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()
    assert protocol.parse_text(json.dumps({"type": "frame", "frame": url}), 1 << 20).data == JPEG
    assert protocol.parse_text('{"type":"ping"}', 100) == protocol.PingMessage()
    nested = protocol.parse_text('{"type":"config","config":{"prompt":"x"}}', 100)
    assert nested == protocol.ConfigMessage({"prompt": "x"})


@pytest.mark.parametrize(("text", "code", "words"), [
    ("{", "bad_message", "not valid JSON"),
    ("[1]", "bad_message", "JSON object"),
    ('{"type":"dance"}', "bad_message", "unknown message type"),
    ('{"type":7}', "bad_message", "string 'type'"),
    ('{"type":"frame"}', "bad_frame", "'frame'"),
    ('{"type":"frame","frame":"!!!"}', "bad_frame", "base64"),
    ('{"type":"frame","frame":"QUJD","ts":"soon"}', "bad_message", "'ts'"),
])
def test_broken_messages_name_what_is_wrong(text, code, words):
    error = client_error(protocol.parse_text, text, 1 << 20)
    assert error.code == code and words in error.message


def test_oversized_text_is_too_large_before_it_is_parsed():
    error = client_error(protocol.parse_text, "{" + "x" * 20_000, 1000)
    assert error.code == "too_large" and "1000 bytes" in error.message


# ---- stream config -----------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "words"), [
    ({"colour": "red"}, "unknown config key 'colour'"),
    ({"strength": 7}, "strength must be a finite number in (0, 1]"),
    ({"strength": "0.5"}, "strength must be"),
    ({"strength": True}, "strength must be"),
    ({"num_steps": True}, "num_steps must be between 1 and 100"),
    ({"num_steps": 2.0}, "num_steps must be"),
    ({"seed": -1}, "seed must be"),
    ({"prompt": "x" * 1001}, "prompt must be a string of at most 1000"),
    ({"prompt": "\ud800"}, "prompt must be"),
    ({"processor_type": "magic"}, "processor_type must be one of filter, standard, lightning"),
    ({"processor_type": ["filter"]}, "processor_type must be"),
    ({"processor_type": "lightning", "num_steps": 3}, "num_steps must be 1, 2, 4 or 8 for the lightning"),
])
def test_bad_config_says_which_key_and_why(changes, words):
    error = client_error(StreamConfig().updated, changes)
    assert error.code == "bad_config" and words in error.message, error.message
    assert error.status == 422


def test_config_changes_apply_and_a_switch_takes_the_new_processors_steps():
    config = StreamConfig(processor_type="filter", num_steps=2)
    assert config.updated({"prompt": "noir", "strength": 1}).to_dict() == {
        "prompt": "noir", "strength": 1.0, "num_steps": 2, "processor_type": "filter", "use_controlnet": True,
        "seed": 42}
    assert config.updated({"processor_type": "standard"}).num_steps == PROCESSORS["standard"].default_steps
    assert config.updated({"processor_type": "lightning", "num_steps": 8}).num_steps == 8
    assert config.updated({}) == config  # frozen and comparable: the hub keys batches on it


def test_the_http_schema_is_the_model():
    schema = StreamConfig.http_schema()
    assert schema["additionalProperties"] is False and "required" not in schema  # every key optional
    assert schema["properties"]["strength"]["exclusiveMinimum"] == 0
    assert set(schema["properties"]["processor_type"]["enum"]) == set(PROCESSORS)


def test_stream_ids_match_whole():
    assert valid_stream_id("main") and valid_stream_id("a" * 64) and valid_stream_id("cam_1-x")
    for bad in ("", "a" * 65, "main\n", "ma in", "mäin", "../x"):
        assert not valid_stream_id(bad), repr(bad)


# ---- settings from the environment -------------------------------------------------------------


def test_settings_read_the_environment_once(monkeypatch):
    monkeypatch.setenv("DREAMSTREAM_STREAM_KEYS", "a:k1, b:k2")
    monkeypatch.setenv("DREAMSTREAM_PROCESSORS", "filter, lightning")
    monkeypatch.setenv("DREAMSTREAM_ALLOWED_HOSTS", "studio.lan,")
    monkeypatch.setenv("DREAMSTREAM_BATCH_WAIT_MS", "5")
    settings = Settings.from_env(port=9000, prompt=None)
    assert settings.stream_keys == {"a": "k1", "b": "k2"} and settings.keys_enabled
    assert settings.processors == ("filter", "lightning")
    assert settings.allowed_hosts == ["studio.lan"]
    assert settings.batch_wait_s == 0.005 and settings.port == 9000
    assert settings.prompt == Settings().prompt  # an override of None keeps the default


@pytest.mark.parametrize(("name", "value", "words"), [
    ("DREAMSTREAM_MAX_FPS", "fast", "DREAMSTREAM_MAX_FPS must be a number"),
    ("DREAMSTREAM_STREAM_KEYS", "nokey", "id1:key1"),
    ("DREAMSTREAM_PROCESSORS", "filter,turbo", "unknown processor 'turbo'"),
])
def test_bad_settings_name_the_variable(monkeypatch, name, value, words):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=words):
        Settings.from_env()


# ---- auth --------------------------------------------------------------------------------------


def test_keys_tokens_and_origins():
    open_ = Settings()
    assert auth.broadcaster_allowed(open_, "x", None) and auth.viewer_allowed(open_, None)
    keyed = Settings(stream_keys={"a": "k1"}, broadcast_key="all", viewer_token="t")
    assert auth.broadcaster_allowed(keyed, "a", "k1") and auth.broadcaster_allowed(keyed, "b", "all")
    assert not auth.broadcaster_allowed(keyed, "b", "k1") and not auth.broadcaster_allowed(keyed, "a", None)
    assert auth.viewer_allowed(keyed, "t") and not auth.viewer_allowed(keyed, "T")
    assert auth.bearer_key("Bearer  k1 ", None) == "k1" and auth.bearer_key(None, "q") == "q"
    listed = Settings(allowed_origins=["https://studio.example"])
    assert auth.origin_allowed(listed, "https://studio.example", "127.0.0.1:8000")
    assert auth.origin_allowed(listed, "http://127.0.0.1:8000", "127.0.0.1:8000")  # our own pages
    assert not auth.origin_allowed(listed, "https://evil.example", "127.0.0.1:8000")
    assert auth.origin_allowed(listed, None, "127.0.0.1:8000")  # no Origin: not a browser


def test_secrets_are_redacted_from_log_text():
    assert auth.redact("/ws/broadcaster/a?key=s3cret&x=1") == "/ws/broadcaster/a?key=[redacted]&x=1"
    assert auth.redact("/overlay/a?fit=cover;token=t0k") == "/overlay/a?fit=cover;token=[redacted]"


# ---- the one client-error type -----------------------------------------------------------------


def test_client_error_carries_its_code_status_and_survives_pickling():
    error = ClientError("too_large", "frame is 9 MB")
    assert (error.status, error.to_message()) == (413, {"type": "error", "code": "too_large",
                                                        "message": "frame is 9 MB"})
    back = pickle.loads(pickle.dumps(error))  # how it returns from a remote GPU pool
    assert isinstance(back, ClientError) and (back.code, back.message) == ("too_large", "frame is 9 MB")
    with pytest.raises(ValueError, match="unknown error code"):
        ClientError("oops", "no such code")
